"""Ray, storage and tracking pipelines around the ossnet library."""

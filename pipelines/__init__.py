"""ossnet pipelines: everything that runs on Ray or talks to storage and tracking.

Submodules are imported explicitly (``from ossnet_pipelines.store import open_store``); importing the
package itself does no work and pulls in neither Ray nor Zarr.
"""

from __future__ import annotations

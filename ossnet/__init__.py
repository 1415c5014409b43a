"""ossnet: OSS-Net, memory-efficient high-resolution 3D segmentation with occupancy networks.

The library is usable on its own: it imports only torch, numpy and scipy. Ray, MLflow and Zarr
live in the ``pipelines`` and ``tune`` packages.
"""

from __future__ import annotations

__version__ = "0.1.0"

"""OSS-Net network: 3D CNN encoder, patch encoder and CBN occupancy decoder."""

from __future__ import annotations

from ossnet.model.decoder import CBNResidualBlock, OccupancyDecoder
from ossnet.model.encoder import Backbone3d, LowResHead, PlainLatentHead, ResidualBlock3d, SkipLatentHead
from ossnet.model.layers import ConditionalNorm, make_activation, make_norm3d
from ossnet.model.network import (
    Encoding,
    OSSNet,
    build_model,
    count_parameters,
    parameter_breakdown,
    skip_latent_channels,
)
from ossnet.model.patches import PatchEncoder

__all__ = [
    "Backbone3d",
    "CBNResidualBlock",
    "ConditionalNorm",
    "Encoding",
    "LowResHead",
    "OSSNet",
    "OccupancyDecoder",
    "PatchEncoder",
    "PlainLatentHead",
    "ResidualBlock3d",
    "SkipLatentHead",
    "build_model",
    "count_parameters",
    "make_activation",
    "make_norm3d",
    "parameter_breakdown",
    "skip_latent_channels",
]

"""OSS-Net: encoder over the low-resolution volume, decoder over query points (encode once, decode many)."""

from __future__ import annotations

import logging
from typing import NamedTuple

from torch import Tensor, nn

from ossnet.config import ModelConfig
from ossnet.model.decoder import OccupancyDecoder
from ossnet.model.encoder import Backbone3d, LowResHead, PlainLatentHead, SkipLatentHead
from ossnet.model.layers import check_shape
from ossnet.model.patches import PatchEncoder

logger = logging.getLogger(__name__)


class Encoding(NamedTuple):
    """Per-volume output of ``OSSNet.encode``.

    Attributes:
        latent: ``[B, L, latent_dim]``; ``L = 1`` (plain encoder) or ``1 + decoder.n_blocks`` (skip).
        lowres_logits: ``[B, K, *latent_shape]`` low-resolution segmentation logits (C, D), else None
            (K = ``config.targets.n_outputs``, 1 for the paper's binary model).
    """

    latent: Tensor
    lowres_logits: Tensor | None


def skip_latent_channels(config: ModelConfig) -> int:
    """Latent channels of the skip encoder: one for the decoder input plus one per decoder block.

    This is derived from ``decoder.n_blocks`` (6 for the paper's 5 blocks) rather than read from
    ``encoder.latent_channels``, so that the decoder can always route channel ``i + 1`` to block ``i``.
    """
    return config.decoder.n_blocks + 1


class OSSNet(nn.Module):
    """OSS-Net (and O-Net, its patch-free baseline) for one ``ModelConfig``.

    Args:
        config: a validated model configuration.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        enc = config.encoder
        act = config.activation
        self.backbone = Backbone3d(enc.in_channels, tuple(enc.channels), act, enc.norm)
        self.latent_head: nn.Module
        if enc.skip:
            n_latents = skip_latent_channels(config)
            if enc.latent_channels != n_latents:
                logger.warning(
                    "encoder.latent_channels=%d ignored: the skip encoder produces 1 + decoder.n_blocks = %d",
                    enc.latent_channels,
                    n_latents,
                )
            self.latent_head = SkipLatentHead(tuple(enc.channels), config.latent_shape, n_latents, act, enc.norm)
        else:
            self.latent_head = PlainLatentHead(enc.channels[-1], act, enc.norm)
        n_outputs = config.targets.n_outputs
        self.lowres_head = LowResHead(enc.channels[-1], n_outputs) if enc.lowres_head else None
        self.patch_encoder = (
            PatchEncoder(config.patch_channels, config.patch.size, act, config.patch.conv_kernel)
            if config.patch.enabled
            else None
        )
        dec = config.decoder
        self.decoder = OccupancyDecoder(
            latent_dim=config.latent_dim,
            local_dim=config.patch.feature_dim if config.patch.enabled else 0,
            hidden=dec.hidden,
            n_blocks=dec.n_blocks,
            norm=dec.cbn_norm,
            activation=act,
            n_outputs=n_outputs,
        )

    def encode(self, image_lowres: Tensor) -> Encoding:
        """Encode the x2-downscaled volumes.

        Args:
            image_lowres: ``[B, C, *config.lowres_input_shape]``.

        Returns:
            ``Encoding`` with latent ``[B, L, latent_dim]`` and optional low-res logits.
        """
        cfg = self.config
        check_shape("image_lowres", image_lowres, (-1, cfg.encoder.in_channels, *cfg.lowres_input_shape))
        features = self.backbone(image_lowres)
        latent = self.latent_head(features)
        lowres = self.lowres_head(features[-1]) if self.lowres_head is not None else None
        return Encoding(latent, lowres)

    def decode(self, points: Tensor, patches: Tensor | None, encoding: Encoding) -> Tensor:
        """Occupancy logits of query points.

        Args:
            points: ``[B, N, 3]`` coordinates normalised to [-1, 1].
            patches: ``[B, N, patch_channels, k, k, k]``, or None for O-Net.
            encoding: output of ``encode`` for the same ``B`` volumes.

        Returns:
            Logits ``[B, N]`` (binary), or ``[B, N, K]`` for K target outputs.
        """
        local = None
        if self.patch_encoder is not None:
            if patches is None:
                raise ValueError(f"patches: variant {self.config.variant} needs patches, got None")
            local = self.patch_encoder(patches)
        elif patches is not None:
            raise ValueError(f"patches: variant {self.config.variant} takes no patches, pass None")
        return self.decoder(points, local, encoding.latent)

    def forward(
        self, image_lowres: Tensor, points: Tensor, patches: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Encode and decode in one call (the training path, and what DDP wraps).

        Returns:
            ``(point logits [B, N] or [B, N, K], low-res logits [B, K, *latent_shape] or None)``.
        """
        encoding = self.encode(image_lowres)
        return self.decode(points, patches, encoding), encoding.lowres_logits


def build_model(config: ModelConfig) -> OSSNet:
    """Validate ``config`` and build the network (on the current default device)."""
    model = OSSNet(config.validate())
    logger.debug("built OSS-Net variant %s with %d parameters", config.variant, count_parameters(model))
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors counted once; works on 'meta' models)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def parameter_breakdown(model: OSSNet) -> dict[str, int]:
    """Parameters per top-level component (backbone, latent_head, lowres_head, patch_encoder, decoder)."""
    return {name: count_parameters(child) for name, child in model.named_children()}


__all__ = ["Encoding", "OSSNet", "build_model", "count_parameters", "parameter_breakdown", "skip_latent_channels"]

"""Occupancy decoder: fully connected residual blocks with conditional batch norm (CBN)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ossnet.model.layers import ConditionalNorm, check_shape, make_activation


class CBNResidualBlock(nn.Module):
    """Linear -> CBN -> act -> Linear -> CBN, plus the identity shortcut, then act.

    Post-activation, as in the OSS-Net reference (and the encoder's residual blocks), rather than
    Occupancy Networks' pre-activation ``CResnetBlockConv1d``: the paper's description orders
    Linear -> CBN -> act, and ending on an activation makes the last block's output the decoder's
    "final act" before the output layer.

    Args:
        hidden: feature width.
        latent_dim: length of the conditioning latent.
        norm: CBN normalisation, "layer", "feature" or "pooled".
        activation: activation name.
    """

    def __init__(self, hidden: int, latent_dim: int, norm: str, activation: str) -> None:
        super().__init__()
        # Biases stay: with "pooled" normalisation a per-feature offset survives the norm.
        self.fc1 = nn.Linear(hidden, hidden)
        self.cbn1 = ConditionalNorm(latent_dim, hidden, norm)
        self.act1 = make_activation(activation)
        self.fc2 = nn.Linear(hidden, hidden)
        self.cbn2 = ConditionalNorm(latent_dim, hidden, norm)
        self.act2 = make_activation(activation)

    def forward(self, x: Tensor, latent: Tensor) -> Tensor:
        """``x [B, N, hidden]``, ``latent [B, latent_dim]`` -> ``[B, N, hidden]``."""
        h = self.act1(self.cbn1(self.fc1(x), latent))
        h = self.cbn2(self.fc2(h), latent)
        return self.act2(x + h)


class OccupancyDecoder(nn.Module):
    """Per-point occupancy logits from coordinates, an optional local feature and global latents.

    Input per point: ``[coordinates (3), local feature (local_dim), latent channel 0 (latent_dim)]``
    -> ``fc_p`` -> ``n_blocks`` CBN residual blocks -> ``Linear(hidden -> n_outputs)``.
    Block ``i`` is conditioned on latent channel ``i + 1`` when the encoder provides
    ``1 + n_blocks`` channels (skip encoder), otherwise every block uses channel 0.

    With ``norm="layer"`` the input layer normalises the per-point part of ``fc_p`` (coordinates
    and local feature) and the per-volume part (latent channel 0) separately (LayerNorm without
    affine) before adding them. The latent part is the same for every point of a volume and,
    from a latent of hundreds of cells, far larger than the point part: normalised together,
    the points of a volume become nearly indistinguishable and training stalls at the
    background rate (a batch norm over points hides this by subtracting the per-batch mean, which
    is exactly what fails at inference). Separately normalised, both parts enter at unit scale.

    Args:
        latent_dim: length of one latent vector.
        local_dim: length of the local patch feature (0 without patches).
        hidden: block width.
        n_blocks: number of residual blocks.
        norm: CBN normalisation, "layer", "feature" or "pooled" (``DecoderConfig.cbn_norm``).
        activation: activation name.
        n_outputs: logits per point (K targets; 1 for the paper's binary model).
    """

    def __init__(
        self, latent_dim: int, local_dim: int, hidden: int, n_blocks: int, norm: str, activation: str,
        n_outputs: int = 1,
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.local_dim = local_dim
        self.n_blocks = n_blocks
        self.split_input_norm = norm == "layer"
        self.fc_p = nn.Linear(3 + local_dim + latent_dim, hidden)
        self.blocks = nn.ModuleList(
            CBNResidualBlock(hidden, latent_dim, norm, activation) for _ in range(n_blocks)
        )
        self.fc_out = nn.Linear(hidden, n_outputs)

    def _input_layer(self, points: Tensor, local: Tensor | None, latent0: Tensor) -> Tensor:
        """``fc_p`` applied to the concatenated input, without materialising the concatenation.

        The weight is split by input block; the latent part is computed once per volume and
        broadcast over its points, which saves a ``[B, N, latent_dim]`` tensor per pass.
        Returns ``[B, N, hidden]``.
        """
        w = self.fc_p.weight
        h = F.linear(points, w[:, :3], self.fc_p.bias)
        if local is not None:
            h = h + F.linear(local, w[:, 3 : 3 + self.local_dim])
        z = F.linear(latent0, w[:, 3 + self.local_dim :]).unsqueeze(1)
        if self.split_input_norm:
            width = (h.shape[-1],)
            return F.layer_norm(h, width) + F.layer_norm(z, width)
        return h + z

    def forward(self, points: Tensor, local: Tensor | None, latent: Tensor) -> Tensor:
        """Decode.

        Args:
            points: ``[B, N, 3]`` coordinates normalised to [-1, 1].
            local: ``[B, N, local_dim]`` local features, or None when ``local_dim == 0``.
            latent: ``[B, L, latent_dim]`` with ``L == 1`` or ``L == 1 + n_blocks``.

        Returns:
            Occupancy logits ``[B, N]`` for one output, ``[B, N, K]`` for K.
        """
        check_shape("points", points, (-1, -1, 3))
        b, n = points.shape[:2]
        check_shape("latent", latent, (b, -1, self.latent_dim))
        n_latents = latent.shape[1]
        if n_latents not in (1, 1 + self.n_blocks):
            raise ValueError(
                f"latent: expected 1 or {1 + self.n_blocks} latent channels for {self.n_blocks} "
                f"decoder blocks, got {n_latents}"
            )
        if self.local_dim:
            if local is None:
                raise ValueError("patches: this model uses local patches but none were given")
            check_shape("local features", local, (b, n, self.local_dim))
        elif local is not None:
            raise ValueError("patches: this model (O-Net) takes no patches, pass None")
        x = self._input_layer(points, local, latent[:, 0])
        for i, block in enumerate(self.blocks):
            x = block(x, latent[:, i + 1] if n_latents > 1 else latent[:, 0])
        out = self.fc_out(x)
        return out.squeeze(-1) if out.shape[-1] == 1 else out


__all__ = ["CBNResidualBlock", "OccupancyDecoder"]

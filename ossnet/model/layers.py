"""Building blocks shared by the encoder and decoder: activation and normalisation factories, conditional norm."""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from ossnet.config import ACTIVATIONS, CBN_NORMS, ENCODER_NORMS, ConfigError

# One factory per name in ``ossnet.config.ACTIVATIONS``. No in-place variants: several outputs
# feed residual additions and in-place ops would corrupt tensors autograd still needs.
_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "leaky_relu": lambda: nn.LeakyReLU(negative_slope=0.01),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
}
assert set(_ACTIVATIONS) == set(ACTIVATIONS), "activation factory out of sync with ossnet.config"


def make_activation(name: str) -> nn.Module:
    """Return a new activation module.

    Args:
        name: one of ``ossnet.config.ACTIVATIONS``.

    Raises:
        ConfigError: unknown name.
    """
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ConfigError(
            f"model.activation: unknown activation {name!r}; choose from {', '.join(ACTIVATIONS)}"
        ) from None


class ConditionalNorm(nn.Module):
    """Normalisation without affine parameters, then a per-volume affine predicted from a latent.

    ``out = gamma(latent) * normalise(x) + beta(latent)`` with ``gamma`` and ``beta`` linear maps
    of the latent, initialised to the identity transform (gamma weight 0, bias 1; beta 0).

    Why "layer" exists: a batch norm over points computes its statistics from the points of the
    batch in training, and from running averages at inference. When a batch holds one volume,
    or a few copies of one case, the training statistics are that volume's own, so the
    network learns features that only make sense after per-volume centring; inference then
    centres with the average over training batches instead, every new volume (even an
    augmented copy of a training one) is shifted, and predictions collapse (all background was
    measured). "layer" normalises every point over its own features: the same function in
    training and inference, whatever the batch (``OccupancyDecoder`` explains the input layer
    that goes with it).

    Args:
        latent_dim: length of the conditioning vector.
        features: number of features of ``x``.
        norm: "layer" normalises each point over its features; "feature" normalises each
            feature over all points of the batch (Occupancy Networks' conditional batch norm);
            "pooled" normalises over points and features together (OSS-Net reference code),
            with a single running mean and variance.
        momentum: running-statistics momentum (batch-norm modes).
    """

    def __init__(self, latent_dim: int, features: int, norm: str = "feature", momentum: float = 0.1) -> None:
        super().__init__()
        if norm not in CBN_NORMS:
            raise ConfigError(f"decoder.cbn_norm: must be one of {', '.join(CBN_NORMS)}, got {norm!r}")
        self.norm = norm
        self.features = features
        self.bn = (
            nn.BatchNorm1d(features if norm == "feature" else 1, affine=False, momentum=momentum)
            if norm != "layer"
            else None
        )
        self.gamma = nn.Linear(latent_dim, features)
        self.beta = nn.Linear(latent_dim, features)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Identity affine: gamma = 1, beta = 0 for every latent."""
        nn.init.zeros_(self.gamma.weight)
        nn.init.ones_(self.gamma.bias)
        nn.init.zeros_(self.beta.weight)
        nn.init.zeros_(self.beta.bias)

    def forward(self, x: Tensor, latent: Tensor) -> Tensor:
        """Normalise and modulate.

        Args:
            x: features ``[B, N, features]``.
            latent: conditioning vectors ``[B, latent_dim]``.

        Returns:
            ``[B, N, features]``.
        """
        b, n, f = x.shape
        if self.bn is None:
            normed = F.layer_norm(x, (f,))
        else:
            # "feature": every feature is a channel, statistics over all B*N points;
            # "pooled": a single channel, statistics over all B*N*F values.
            flat = x.reshape(b * n, f) if self.norm == "feature" else x.reshape(b * n * f, 1)
            normed = self.bn(flat).reshape(b, n, f)
        # Broadcasting one affine per volume over its N points avoids materialising [B, N, F] copies.
        return self.gamma(latent).unsqueeze(1) * normed + self.beta(latent).unsqueeze(1)


def make_norm3d(kind: str, channels: int) -> nn.Module:
    """The encoder's normalisation of ``channels`` feature maps (``EncoderConfig.norm``).

    "batch": ``BatchNorm3d``; "instance": ``InstanceNorm3d`` with a learned affine and no
    running statistics (per volume, in training and inference alike); "group": ``GroupNorm``
    with the largest group count <= 8 that divides ``channels``.
    """
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "group":
        groups = max(g for g in range(1, min(8, channels) + 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    raise ConfigError(f"encoder.norm: unknown normalisation {kind!r}; choose from {', '.join(ENCODER_NORMS)}")


def ceil_avg_pool3d(x: Tensor) -> Tensor:
    """Average-pool by 2 in every spatial axis, keeping a partial last window on odd sizes.

    With ``ceil_mode`` and no padding, PyTorch divides an overhanging window by the number of
    voxels actually inside the volume, so border cells are true means. An axis of size 1 stays 1.

    Args:
        x: ``[B, C, X, Y, Z]``.

    Returns:
        ``[B, C, ceil(X/2), ceil(Y/2), ceil(Z/2)]``.
    """
    # A 2-wide kernel cannot fit a size-1 axis; a 1-wide kernel there gives the same mean.
    kernel = tuple(min(2, int(s)) for s in x.shape[2:])
    return F.avg_pool3d(x, kernel_size=kernel, stride=2, ceil_mode=True)


def check_shape(name: str, tensor: Tensor, expected: tuple[int, ...]) -> None:
    """Raise a one-line ValueError when ``tensor.shape`` differs from ``expected`` (-1 = any)."""
    shape = tuple(tensor.shape)
    if len(shape) != len(expected) or any(e != -1 and s != e for s, e in zip(shape, expected)):
        pretty = ", ".join("*" if e == -1 else str(e) for e in expected)
        raise ValueError(f"{name}: expected shape [{pretty}], got {list(shape)}")


__all__ = ["ConditionalNorm", "ceil_avg_pool3d", "check_shape", "make_activation", "make_norm3d"]

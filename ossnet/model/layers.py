"""Building blocks shared by the encoder and decoder: activation factory and conditional batch norm."""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from ossnet.config import ACTIVATIONS, ConfigError

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


class ConditionalBatchNorm(nn.Module):
    """Batch norm without affine parameters, then a per-volume affine predicted from a latent.

    ``out = gamma(latent) * normalise(x) + beta(latent)`` with ``gamma`` and ``beta`` linear maps
    of the latent, initialised to the identity transform (gamma weight 0, bias 1; beta 0), so at
    initialisation the layer is a plain batch norm.

    Args:
        latent_dim: length of the conditioning vector.
        features: number of features of ``x``.
        norm: "feature" normalises each feature over all points of the batch (Occupancy
            Networks); "pooled" normalises over points and features together (OSS-Net
            reference code), with a single running mean and variance.
        momentum: running-statistics momentum.
    """

    def __init__(self, latent_dim: int, features: int, norm: str = "feature", momentum: float = 0.1) -> None:
        super().__init__()
        if norm not in ("feature", "pooled"):
            raise ConfigError(f"decoder.cbn_norm: must be 'feature' or 'pooled', got {norm!r}")
        self.norm = norm
        self.features = features
        self.bn = nn.BatchNorm1d(features if norm == "feature" else 1, affine=False, momentum=momentum)
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
        # "feature": every feature is a channel, statistics over all B*N points;
        # "pooled": a single channel, statistics over all B*N*F values.
        flat = x.reshape(b * n, f) if self.norm == "feature" else x.reshape(b * n * f, 1)
        normed = self.bn(flat).reshape(b, n, f)
        # Broadcasting one affine per volume over its N points avoids materialising [B, N, F] copies.
        return self.gamma(latent).unsqueeze(1) * normed + self.beta(latent).unsqueeze(1)


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


__all__ = ["ConditionalBatchNorm", "ceil_avg_pool3d", "check_shape", "make_activation"]

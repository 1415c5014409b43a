"""Inference: dense chunked decoding and both MISE paths against dense thresholding.

Most tests use ``BlobModel``, a parameter-free stand-in with the ``OSSNet`` encode/decode
interface whose occupancy is an analytic union of ellipsoids, so MISE can be checked exactly
against the dense answer; the last ones run the real (tiny) network.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import pytest
import torch
from torch import nn

from ossnet.config import DecoderConfig, EncoderConfig, ModelConfig, PatchConfig, model_config
from ossnet.inference import Inferer, grid
from ossnet.metrics import dice
from ossnet.model import Encoding, build_model
from ossnet.sampling import downsample_image, extract_patches, lowres_label, normalize_points


def fake_config(shape: Sequence[int], blocks: int = 3, head: bool = True) -> ModelConfig:
    """A config for ``BlobModel``: only the geometry (grid, low-res factor) matters."""
    return ModelConfig(
        variant="C" if head else "A",
        volume_shape=tuple(shape),
        encoder=EncoderConfig(in_channels=1, channels=(4,) * blocks, skip=head, lowres_head=head),
        patch=PatchConfig(size=0),
        decoder=DecoderConfig(hidden=8, n_blocks=1),
    ).validate()


class BlobModel(nn.Module):
    """Occupancy logit = -sharpness * (approximate signed distance to a union of ellipsoids).

    Args:
        config: model geometry.
        centers: ``(K, 3)`` voxel coordinates; axes: ``(K, 3)`` semi-axes in voxels.
        lowres_prob: ``(lx, ly, lz)`` map the fake low-res head returns (None: no head).
    """

    def __init__(self, config: ModelConfig, centers, axes, sharpness: float = 2.0, lowres_prob=None) -> None:
        super().__init__()
        self.config = config
        self.centers = torch.as_tensor(np.asarray(centers), dtype=torch.float32)
        self.axes = torch.as_tensor(np.asarray(axes), dtype=torch.float32)
        self.sharpness = sharpness
        self.lowres_prob = None if lowres_prob is None else torch.as_tensor(np.asarray(lowres_prob), dtype=torch.float32)
        self.encoded_shape: tuple[int, ...] | None = None

    def encode(self, image_lowres: torch.Tensor) -> Encoding:
        self.encoded_shape = tuple(image_lowres.shape)
        logits = None
        if self.lowres_prob is not None:
            p = self.lowres_prob.clamp(1e-4, 1 - 1e-4)
            logits = torch.log(p / (1 - p))[None, None].expand(image_lowres.shape[0], 1, *p.shape)
        return Encoding(torch.zeros(image_lowres.shape[0], 1, 1), logits)

    def decode(self, points: torch.Tensor, patches: torch.Tensor | None, encoding: Encoding) -> torch.Tensor:
        assert patches is None and points.dtype == torch.float32 and points.abs().max() <= 1.0
        scale = torch.tensor(self.config.volume_shape, dtype=torch.float32) - 1
        vox = (points[..., None, :] + 1) / 2 * scale  # [B, N, 1, 3]
        rel = ((vox - self.centers) / self.axes).norm(dim=-1)
        sdf = ((rel - 1) * self.axes.min(dim=-1).values).min(dim=-1).values
        return -self.sharpness * sdf

    def logits_at(self, vox: torch.Tensor) -> torch.Tensor:
        """Reference logits at voxel coordinates ``(N, 3)``."""
        return self.decode(normalize_points(vox, self.config.volume_shape)[None], None, Encoding(None, None))[0]


def random_blobs(shape, rng: np.random.Generator, n: int, r_min: float, r_max: float) -> tuple[np.ndarray, np.ndarray]:
    centers = rng.uniform(0.1, 0.9, (n, 3)) * np.asarray(shape)
    axes = rng.uniform(r_min, r_max, (n, 3))
    return centers, axes


def image_for(cfg: ModelConfig) -> np.ndarray:
    return np.zeros((cfg.encoder.in_channels, *cfg.volume_shape), dtype=np.float32)


def boundary(mask: np.ndarray) -> np.ndarray:
    """Voxels with a 6-neighbour of the other class."""
    out = np.zeros_like(mask)
    for axis in range(3):
        diff = np.diff(mask, axis=axis)
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis] = slice(None, -1)
        hi[axis] = slice(1, None)
        out[tuple(lo)] |= diff
        out[tuple(hi)] |= diff
    return out


# ------------------------------------------------------------------------------------- grid


def test_axis_nodes_include_far_edge() -> None:
    cpu = torch.device("cpu")
    assert grid.axis_nodes(37, 4, cpu).tolist() == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36]
    assert grid.axis_nodes(41, 4, cpu).tolist()[-2:] == [36, 40]
    assert grid.axis_nodes(31, 8, cpu).tolist() == [0, 8, 16, 24, 30]
    assert grid.axis_nodes(3, 8, cpu).tolist() == [0, 2]
    assert grid.axis_nodes(29, 1, cpu).tolist() == list(range(29))


def test_interpolate_is_exact_for_linear_fields() -> None:
    shape = (37, 41, 29)
    coarse = grid.level_nodes(shape, 8, torch.device("cpu"))
    fine = grid.level_nodes(shape, 1, torch.device("cpu"))
    x, y, z = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    field = 0.5 * x - 0.25 * y + 0.125 * z + 3
    out = grid.interpolate(grid.gather(field, coarse), coarse, fine)
    np.testing.assert_allclose(out.numpy(), field.numpy(), rtol=0, atol=1e-4)


def test_cells_and_closed_membership_match_brute_force() -> None:
    rng = np.random.default_rng(3)
    shape = (13, 10, 7)
    cpu = torch.device("cpu")
    coarse, fine = grid.level_nodes(shape, 4, cpu), grid.level_nodes(shape, 2, cpu)
    values = torch.from_numpy(rng.random(tuple(c.numel() for c in coarse)).astype(np.float32))
    cells = grid.straddling_cells(values, 0.5)
    v = values.numpy() >= 0.5
    for i, j, k in np.ndindex(*cells.shape):
        corners = v[i : i + 2, j : j + 2, k : k + 2]
        assert bool(cells[i, j, k]) == (corners.any() and not corners.all())
    for low, high in ((0.5, 0.5), (0.3, 0.7)):
        uncertain = grid.uncertain_cells(values, low, high)
        for i, j, k in np.ndindex(*cells.shape):
            corners = values.numpy()[i : i + 2, j : j + 2, k : k + 2]
            safe = corners.max() < low or corners.min() >= high
            assert bool(uncertain[i, j, k]) == (not safe)
    member = grid.in_closed_cells(cells, coarse, fine).numpy()
    c = [a.numpy() for a in coarse]
    for idx in np.ndindex(*member.shape):
        f = [fine[a][idx[a]].item() for a in range(3)]
        expected = any(
            cells[i, j, k] and all(c[a][n] <= f[a] <= c[a][n + 1] for a, n in enumerate((i, j, k)))
            for i, j, k in np.ndindex(*cells.shape)
        )
        assert bool(member[idx]) == expected
    corners = grid.cell_corners(cells).numpy()
    for idx in np.ndindex(*corners.shape):
        near = cells.numpy()[tuple(slice(max(n - 1, 0), n + 1) for n in idx)]
        assert bool(corners[idx]) == bool(near.any())


# ------------------------------------------------------------------------------- strategy


def test_inferer_validates_fields() -> None:
    with pytest.raises(ValueError, match="inferer.mode"):
        Inferer(mode="fast")
    with pytest.raises(ValueError, match="inferer.coarse_stride"):
        Inferer(coarse_stride=6)
    with pytest.raises(ValueError, match="inferer.coarse_stride"):
        Inferer(coarse_stride=1)
    with pytest.raises(ValueError, match="inferer.seed_threshold"):
        Inferer(seed_threshold=0.7)
    with pytest.raises(ValueError, match="inferer.chunk_points"):
        Inferer(chunk_points=0)
    assert Inferer().stride == 4 and Inferer(coarse_stride=8).stride == 8
    assert Inferer().seed == 0.3 and Inferer(threshold=0.2).seed == 0.2


def test_image_shape_is_checked() -> None:
    cfg = fake_config((21, 19, 17))
    model = BlobModel(cfg, [[10, 9, 8]], [[4, 4, 4]])
    with pytest.raises(ValueError, match=r"image: expected shape \(1, 21, 19, 17\)"):
        Inferer(mode="dense")(model, np.zeros((1, 21, 19, 16), np.float32))


def test_dense_is_exact_and_chunk_invariant() -> None:
    cfg = fake_config((37, 41, 29))
    model = BlobModel(cfg, [[18.3, 20.1, 14.2]], [[9.5, 7.2, 5.1]])
    image = image_for(cfg)
    a = Inferer(mode="dense", chunk_points=1000)(model, image)
    b = Inferer(mode="dense", chunk_points=10**6)(model, image)
    vox = torch.stack(torch.meshgrid(*[torch.arange(n) for n in cfg.volume_shape], indexing="ij"), -1).reshape(-1, 3)
    expected = torch.sigmoid(model.logits_at(vox)).reshape(cfg.volume_shape).numpy()
    np.testing.assert_allclose(a.probability, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(a.probability, b.probability, rtol=1e-5, atol=1e-7)  # batch-size rounding only
    np.testing.assert_array_equal(a.mask, a.probability >= 0.5)
    assert a.probability.dtype == np.float32 and a.mask.dtype == np.bool_
    assert a.n_queries == 37 * 41 * 29 and a.mode == "dense" and a.level_queries == {}
    assert model.encoded_shape == (1, 1, 19, 21, 15)  # x2-downscaled input, ceil for odd sizes


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_mise_agrees_with_dense_on_phantoms(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(29, 60, 3))
    cfg = fake_config(shape, blocks=int(rng.integers(2, 4)))
    centers, axes = random_blobs(shape, rng, int(rng.integers(2, 6)), 3.6, 12.0)
    model = BlobModel(cfg, centers, axes, sharpness=float(rng.uniform(0.5, 4.0)))
    image = image_for(cfg)
    dense = Inferer(mode="dense")(model, image)
    assert dense.mask.sum() > 500
    lowres = lowres_label(dense.mask, cfg.lowres_factor).astype(np.float32)
    noisy = np.where(lowres > 0, rng.uniform(0.35, 1.0, lowres.shape), rng.uniform(0.0, 0.25, lowres.shape))
    noisy[(lowres == 0) & (rng.random(lowres.shape) < 0.15)] = 0.8  # false alarms
    runs = [("mise", None), ("mise_lowres", lowres), ("mise_lowres", noisy)]
    for mode, lowres_prob in runs:
        model.lowres_prob = None if lowres_prob is None else torch.from_numpy(lowres_prob.astype(np.float32))
        result = Inferer(mode=mode, chunk_points=4096)(model, image)
        assert result.mode == mode
        assert dice(result.mask, dense.mask) >= 0.999, (mode, dice(result.mask, dense.mask))
        assert result.n_queries == sum(result.level_queries.values())
        assert result.n_queries < dense.n_queries / 2
        # Every boundary voxel of the mask was decoded, so it has the dense probability.
        edge = boundary(result.mask)
        np.testing.assert_allclose(result.probability[edge], dense.probability[edge], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(result.mask, result.probability >= 0.5)


@pytest.mark.parametrize("stride", [2, 8])
def test_mise_other_coarse_strides(stride: int) -> None:
    rng = np.random.default_rng(10 + stride)
    shape = (45, 39, 33)
    cfg = fake_config(shape, blocks=2)
    centers, axes = random_blobs(shape, rng, 3, 7.5, 13.0)  # larger than a stride-8 cell
    model = BlobModel(cfg, centers, axes, lowres_prob=np.ones(cfg.latent_shape) * 0.9)
    dense = Inferer(mode="dense")(model, image_for(cfg))
    for mode in ("mise", "mise_lowres"):
        result = Inferer(mode=mode, coarse_stride=stride)(model, image_for(cfg))
        assert dice(result.mask, dense.mask) >= 0.999
        start = stride if mode == "mise" else max(stride, 8)  # the low-res start probes at stride 8
        assert sorted(result.level_queries, reverse=True) == [start >> k for k in range(start.bit_length())]


def _lesion_case() -> tuple[BlobModel, np.ndarray, dict[str, tuple[int, ...]]]:
    """A large blob plus small lesions (diameter ~8, half a low-res cell of 16)."""
    shape = (97, 89, 61)
    cfg = fake_config(shape, blocks=3)  # low-res cells of 16 voxels
    centers = [(40.3, 44.2, 30.1), (72.0, 20.0, 24.0), (88.0, 70.0, 44.0), (20.0, 76.0, 12.0)]
    axes = [(22.0, 18.0, 14.0), (4.1, 3.8, 4.3), (3.9, 4.2, 3.7), (4.0, 4.0, 4.0)]
    model = BlobModel(cfg, centers, axes, sharpness=1.5)
    dense = Inferer(mode="dense")(model, image_for(cfg))
    cells = {"weak": (4, 1, 1), "neighbour_fires": (5, 4, 2), "own_cell": (1, 4, 0)}
    return model, dense.mask, cells


def test_mise_lowres_finds_small_lesions_the_head_hints_at() -> None:
    model, dense_mask, cells = _lesion_case()
    cfg = model.config
    lowres = lowres_label(dense_mask, cfg.lowres_factor).astype(np.float32)
    # lesion 1 (72, 20, 24), cell (4, 1, 1): the head fires only weakly (below 0.5).
    assert lowres[cells["weak"]] == 1
    lowres[cells["weak"]] = 0.35
    # lesion 2 (88, 70, 44) lies in cell (5, 4, 2) only; the head misses it and fires next door.
    assert lowres[cells["neighbour_fires"]] == 1 and lowres[5, 4, 3] == 0
    lowres[cells["neighbour_fires"]] = 0.05
    lowres[5, 4, 3] = 0.9  # z cells 32..47 vs 48..60: the lesion ends 4 voxels before the border
    model.lowres_prob = torch.from_numpy(lowres)
    image = image_for(cfg)
    result = Inferer(mode="mise_lowres")(model, image)
    assert dice(result.mask, dense_mask) >= 0.999
    for center in [(72, 20, 24), (88, 70, 44), (20, 76, 12)]:
        assert result.mask[center], center
    assert result.n_queries * 10 <= dense_mask.size  # >10x fewer queries than dense
    # The naive low-res start (threshold 0.5, no safety band, no probes) loses both hinted lesions.
    naive = Inferer(mode="mise_lowres", seed_threshold=0.5, safety_band=0, probe_stride=0, recall_margin=0)(model, image)
    assert not naive.mask[72, 20, 24] and not naive.mask[88, 70, 44]
    assert naive.mask[20, 76, 12]


def test_mise_lowres_on_an_empty_volume_decodes_only_the_probe_lattice() -> None:
    cfg = fake_config((37, 41, 29), blocks=2)
    model = BlobModel(cfg, [[-50.0, -50.0, -50.0]], [[3.0, 3.0, 3.0]], lowres_prob=np.zeros(cfg.latent_shape))
    result = Inferer(mode="mise_lowres")(model, image_for(cfg))
    assert result.n_queries == 6 * 6 * 5 and not result.mask.any()  # stride-8 nodes, far edges included
    assert result.level_queries == {8: 180, 4: 0, 2: 0, 1: 0} and int(result.decoded.sum()) == 180
    assert float(result.probability.max()) < 0.5
    no_probes = Inferer(mode="mise_lowres", probe_stride=0)(model, image_for(cfg))
    assert no_probes.n_queries == 0 and not no_probes.mask.any()
    dense_start = Inferer(mode="mise")(model, image_for(cfg))
    assert not dense_start.mask.any() and dense_start.n_queries == 10 * 11 * 8


# ------------------------------------------------------------------- recall guarantees

def _small_balls(shape, rng: np.random.Generator, n: int, r_min: float, r_max: float) -> tuple[np.ndarray, np.ndarray]:
    """Isolated balls with centres between lattice nodes (no stride-4 node inside a ball of radius < 2)."""
    centers = (rng.integers(1, np.asarray(shape) // 8 - 1, (n, 3)) * 8 + rng.uniform(2.5, 5.5, (n, 3)))
    radii = rng.uniform(r_min, r_max, n)
    return centers, np.repeat(radii[:, None], 3, axis=1)


def _heads(cfg: ModelConfig, dense_mask: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Low-res heads: right, confidently empty, wrong (fires only where there is nothing), noise."""
    truth = lowres_label(dense_mask, cfg.lowres_factor).astype(np.float32)
    return {"right": truth, "empty": np.zeros_like(truth), "wrong": 1.0 - truth,
            "noise": rng.uniform(0.0, 1.0, truth.shape).astype(np.float32)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mise_lowres_equals_dense_for_a_lipschitz_decoder_whatever_the_head(seed: int) -> None:
    """The Lipschitz guarantee: a logit slope <= margin / (8 * sqrt(3) / 2) per voxel -> the
    dense mask, small lesions between the nodes included, with a right, empty, wrong or random head."""
    rng = np.random.default_rng(seed)
    shape = (72, 64, 56)
    cfg = fake_config(shape, blocks=2)
    margin = 8.0
    slope = margin / (8 * np.sqrt(3) / 2)  # the steepest logit the guarantee covers (1.15 per voxel)
    centers, axes = _small_balls(shape, rng, 5, 1.5, 3.0)
    model = BlobModel(cfg, centers, axes, sharpness=slope)  # logit = -sharpness * distance to the surface
    dense = Inferer(mode="dense")(model, image_for(cfg))
    assert dense.mask.sum() > 0
    for name, head in _heads(cfg, dense.mask, rng).items():
        model.lowres_prob = torch.from_numpy(head)
        result = Inferer(mode="mise_lowres", recall_margin=margin)(model, image_for(cfg))
        np.testing.assert_array_equal(result.mask, dense.mask, err_msg=name)
        assert result.n_queries < dense.n_queries / 4, name
        np.testing.assert_allclose(result.probability[result.decoded], dense.probability[result.decoded], atol=1e-6)
    # Without the margin the lesions between the probes are lost when the head misses them.
    model.lowres_prob = torch.zeros(cfg.latent_shape)
    plain = Inferer(mode="mise_lowres", recall_margin=0.0)(model, image_for(cfg))
    assert plain.mask.sum() < dense.mask.sum()


def test_mise_lowres_lattice_guarantee_with_a_sharp_decoder() -> None:
    """No assumption on the decoder: a component holding a probe node (a ball of radius >=
    8 * sqrt(3) / 2) is found with any head; one holding a stride-4 node of a seeded cell is
    found too; a small one away from seeds and probes is not guaranteed."""
    shape = (72, 64, 56)
    cfg = fake_config(shape, blocks=2)  # low-res cells of 8 voxels
    big = ((20.3, 21.7, 19.2), 7.2)  # radius > 8 * sqrt(3) / 2: holds a stride-8 node wherever it lies
    seeded = ((52.0, 44.0, 36.0), 2.5)  # holds the stride-4 node (52, 44, 36)
    hidden = ((46.0, 14.0, 46.0), 1.5)  # no node of stride 4 inside, no seed, no probe
    centers = [c for c, _ in (big, seeded, hidden)]
    axes = [(r, r, r) for _, r in (big, seeded, hidden)]
    model = BlobModel(cfg, centers, axes, sharpness=8.0)
    dense = Inferer(mode="dense")(model, image_for(cfg))
    head = np.zeros(cfg.latent_shape, dtype=np.float32)
    head[52 // 8, 44 // 8, 36 // 8] = 0.9  # the head sees only the seeded lesion's cell
    model.lowres_prob = torch.from_numpy(head)
    result = Inferer(mode="mise_lowres", recall_margin=0.0)(model, image_for(cfg))
    for center, radius in (big, seeded):
        box = tuple(slice(int(c - radius) - 1, int(c + radius) + 2) for c in center)
        np.testing.assert_array_equal(result.mask[box], dense.mask[box])
    assert dense.mask[46, 14, 46] and not result.mask[46, 14, 46]
    model.lowres_prob = torch.zeros(cfg.latent_shape)
    empty_head = Inferer(mode="mise_lowres", recall_margin=0.0)(model, image_for(cfg))
    assert empty_head.mask[20, 22, 19] and not empty_head.mask[52, 44, 36]


def test_invalid_strides_are_refused() -> None:
    cfg = fake_config((37, 41, 29), blocks=2)  # low-res cells of 8 voxels
    model = BlobModel(cfg, [[18.0, 20.0, 14.0]], [[8.0, 7.0, 6.0]], lowres_prob=np.ones(cfg.latent_shape))
    with pytest.raises(ValueError, match="inferer.coarse_stride: 16 exceeds the model's low-res cell of 8 voxels"):
        Inferer(mode="mise_lowres", coarse_stride=16, probe_stride=16)(model, image_for(cfg))
    with pytest.raises(ValueError, match="inferer.probe_stride"):
        Inferer(probe_stride=6)
    with pytest.raises(ValueError, match="inferer.probe_stride"):
        Inferer(coarse_stride=8, probe_stride=4)
    with pytest.raises(ValueError, match="inferer.recall_margin"):
        Inferer(recall_margin=-0.1)


def test_mise_lowres_falls_back_without_head(caplog: pytest.LogCaptureFixture) -> None:
    cfg = fake_config((37, 41, 29), blocks=2, head=False)
    model = BlobModel(cfg, [[18.0, 20.0, 14.0]], [[8.0, 7.0, 6.0]])
    with caplog.at_level(logging.WARNING, logger="ossnet.inference"):
        result = Inferer(mode="mise_lowres")(model, image_for(cfg))
    assert result.mode == "mise"
    assert any("no low-resolution head" in r.getMessage() for r in caplog.records)
    dense = Inferer(mode="dense")(model, image_for(cfg))
    assert dice(result.mask, dense.mask) == 1.0


def test_output_placement_and_dtype() -> None:
    cfg = fake_config((21, 19, 17), blocks=2)
    model = BlobModel(cfg, [[10.0, 9.0, 8.0]], [[5.0, 4.0, 4.5]])
    result = Inferer(mode="mise", output_device="cpu", probability_dtype="float16")(model, torch.zeros(1, 21, 19, 17))
    assert isinstance(result.probability, torch.Tensor) and result.probability.dtype == torch.float16
    assert isinstance(result.mask, torch.Tensor) and result.mask.dtype == torch.bool
    assert result.mask.shape == (21, 19, 17) and result.mask.any()


# ------------------------------------------------------------------------------ real model


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    shape = (23, 19, 17)
    return {
        v: build_model(model_config(v, "tiny", volume_shape=shape, patch_size=3)).train()
        for v in ("onet", "C", "D")
    }


@pytest.mark.parametrize("variant", ["onet", "C", "D"])
def test_real_model_dense_matches_direct_decoding(tiny_models: dict[str, nn.Module], variant: str) -> None:
    model = tiny_models[variant]
    cfg = model.config
    image = np.random.default_rng(1).normal(size=(cfg.encoder.in_channels, *cfg.volume_shape)).astype(np.float32)
    result = Inferer(mode="dense", chunk_points=1000)(model, image)
    assert model.training  # the inferer restores the caller's mode
    model.eval()
    with torch.no_grad():
        vox = torch.stack(torch.meshgrid(*[torch.arange(n) for n in cfg.volume_shape], indexing="ij"), -1).reshape(-1, 3)
        encoding = model.encode(torch.from_numpy(downsample_image(image, cfg.lowres_input_shape))[None])
        patches = None
        if cfg.patch.enabled:
            patches = extract_patches(torch.from_numpy(image), vox, cfg.patch.size, cfg.patch.multiscale)[None]
        logits = model.decode(normalize_points(vox, cfg.volume_shape)[None], patches, encoding)[0]
    model.train()
    expected = torch.sigmoid(logits).reshape(cfg.volume_shape).numpy()
    np.testing.assert_allclose(result.probability, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["mise", "mise_lowres"])
def test_real_model_mise_decodes_the_mask_boundary(tiny_models: dict[str, nn.Module], mode: str) -> None:
    model = tiny_models["C"]
    cfg = model.config
    image = np.random.default_rng(2).normal(size=(cfg.encoder.in_channels, *cfg.volume_shape)).astype(np.float32)
    dense = Inferer(mode="dense", chunk_points=2048)(model, image)
    # A random network's probabilities hover near 0.5: put the threshold inside their range.
    threshold = float(np.quantile(dense.probability, 0.7))
    dense_mask = dense.probability >= threshold
    result = Inferer(mode=mode, threshold=threshold, chunk_points=2048)(model, image)
    assert result.mode == mode
    edge = boundary(result.mask)
    np.testing.assert_allclose(result.probability[edge], dense.probability[edge], rtol=0, atol=1e-5)
    assert result.n_queries <= dense.n_queries
    if mode == "mise":
        assert dice(result.mask, dense_mask) > 0.9


class LabelModel(BlobModel):
    """Oracle from a phantom's label: logit = sharpness * signed distance to the label surface
    (positive inside), a ``sharpness``-Lipschitz logit whose dense mask is the label."""

    def __init__(self, config: ModelConfig, label: np.ndarray, sharpness: float, lowres_prob=None) -> None:
        from scipy import ndimage

        super().__init__(config, [[0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0]], sharpness, lowres_prob)
        inside = label.astype(bool)
        signed = ndimage.distance_transform_edt(inside) - ndimage.distance_transform_edt(~inside)
        signed = np.where(inside, signed - 0.5, signed + 0.5)  # the surface half-way between voxels
        self.logits = torch.from_numpy((sharpness * signed).astype(np.float32))

    def decode(self, points: torch.Tensor, patches: torch.Tensor | None, encoding: Encoding) -> torch.Tensor:
        scale = torch.tensor(self.config.volume_shape, dtype=torch.float32) - 1
        vox = torch.round((points + 1) / 2 * scale).long()
        return self.logits[vox[..., 0], vox[..., 1], vox[..., 2]]


@pytest.mark.parametrize("seed", [0, 4])
def test_mise_lowres_finds_every_small_phantom_nodule_with_any_head(seed: int) -> None:
    """The small-nodule phantoms (radius 1.5-5 voxels) as an oracle within the Lipschitz bound:
    every nodule is found, and the mask is the dense one, with a right, empty, wrong or random head."""
    from scipy import ndimage

    from ossnet.phantoms.hard import brats_hard

    shape = (96, 96, 64)
    label = brats_hard(shape, seed=seed, lesions="small").label
    components = ndimage.label(label)[1]
    assert components >= 1
    cfg = fake_config(shape, blocks=2)
    model = LabelModel(cfg, label, sharpness=8.0 / (8 * np.sqrt(3) / 2))
    dense = Inferer(mode="dense")(model, image_for(cfg))
    np.testing.assert_array_equal(dense.mask, label.astype(bool))
    for name, head in _heads(cfg, dense.mask, np.random.default_rng(seed)).items():
        model.lowres_prob = torch.from_numpy(head)
        result = Inferer(mode="mise_lowres")(model, image_for(cfg))
        np.testing.assert_array_equal(result.mask, dense.mask, err_msg=name)
        assert result.n_queries * 8 < dense.n_queries, name


class RegionsModel(BlobModel):
    """Oracle of a multi-region label: region t's logit = sharpness * signed distance to its surface,
    and a low-res head that is the max-pooled regions."""

    def __init__(self, config: ModelConfig, label: np.ndarray, sharpness: float) -> None:
        from scipy import ndimage

        super().__init__(config, [[0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0]], sharpness)
        logits = []
        for inside in config.targets.region_masks(label):
            signed = ndimage.distance_transform_edt(inside) - ndimage.distance_transform_edt(~inside)
            logits.append(sharpness * np.where(inside, signed - 0.5, signed + 0.5))
        self.logits = torch.from_numpy(np.stack(logits, axis=-1).astype(np.float32))  # (X, Y, Z, T)
        pooled = [lowres_label(m, config.lowres_factor) for m in config.targets.region_masks(label)]
        self.lowres = torch.from_numpy(np.where(np.stack(pooled) > 0, 6.0, -6.0).astype(np.float32))

    def encode(self, image_lowres: torch.Tensor) -> Encoding:
        return Encoding(torch.zeros(image_lowres.shape[0], 1, 1), self.lowres[None])

    def decode(self, points: torch.Tensor, patches: torch.Tensor | None, encoding: Encoding) -> torch.Tensor:
        scale = torch.tensor(self.config.volume_shape, dtype=torch.float32) - 1
        vox = torch.round((points + 1) / 2 * scale).long()
        return self.logits[vox[..., 0], vox[..., 1], vox[..., 2]]


def _nested_label(shape: Sequence[int]) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    r = np.sqrt(((grid - np.array([20, 24, 14])[:, None, None, None]) ** 2).sum(0))
    label = np.zeros(shape, np.uint8)
    label[r < 11] = 2
    label[r < 7] = 1
    label[(r >= 4) & (r < 7)] = 4
    return label


@pytest.mark.parametrize("mode", ["mise", "mise_lowres"])
def test_multi_region_mise_writes_the_dense_label_map_decoding_shared_points_once(mode: str) -> None:
    from dataclasses import replace

    from ossnet.targets import TARGET_PRESETS

    shape = (48, 48, 32)
    label = _nested_label(shape)
    cfg = replace(fake_config(shape, blocks=2), targets=TARGET_PRESETS["brats-regions"]).validate()
    model = RegionsModel(cfg, label, sharpness=1.0)
    dense = Inferer(mode="dense")(model, image_for(cfg))
    assert dense.probability.shape == (3, *shape) and dense.mask.shape == (3, *shape)
    np.testing.assert_array_equal(dense.label_map, label)
    result = Inferer(mode=mode)(model, image_for(cfg))
    np.testing.assert_array_equal(result.label_map, label)
    assert set(result.target_queries) == {"wt", "tc", "et"}
    separately = sum(result.target_queries.values())
    # Nested surfaces share their points: one pass decodes fewer than three separate refinements,
    # and at most 1.5x the largest single target's (what a binary model of it would decode).
    assert result.n_queries < separately and result.n_queries <= 1.5 * max(result.target_queries.values())
    assert result.decoded.shape == shape and int(result.decoded.sum()) == result.n_queries


def test_classes_decide_on_their_regions_summed_probabilities() -> None:
    from dataclasses import replace

    from ossnet.targets import TARGET_PRESETS

    spec = TARGET_PRESETS["lits-classes"]
    shape = (16, 16, 8)
    label = np.zeros(shape, np.uint8)
    label[2:12, 2:12, 1:7] = 1
    label[5:8, 5:8, 3:5] = 2
    cfg = replace(fake_config(shape, blocks=1, head=False), targets=spec).validate()

    class ClassesModel(LabelModel):
        def __init__(self) -> None:
            super().__init__(cfg, label > 0, 1.0)
            # Background, liver and tumour probabilities: tumour voxels 0.2/0.25/0.55; the liver's
            # first slab 0.45/0.30/0.25, where the argmax says background but the liver region
            # (liver + tumour: 0.55) holds.
            onehot = np.eye(3, dtype=np.float32)[spec.class_index(label)] * 4.0
            onehot[label == 2] = np.log([0.2, 0.25, 0.55])
            onehot[2:12, 2:12, 1] = np.log([0.45, 0.30, 0.25])
            self.class_logits = torch.from_numpy(onehot)

        def decode(self, points, patches, encoding):
            scale = torch.tensor(self.config.volume_shape, dtype=torch.float32) - 1
            vox = torch.round((points + 1) / 2 * scale).long()
            return self.class_logits[vox[..., 0], vox[..., 1], vox[..., 2]]

    result = Inferer(mode="dense")(ClassesModel(), image_for(cfg))
    np.testing.assert_allclose(result.probability[0][label == 2], 0.8, atol=1e-5)  # the liver region's
    np.testing.assert_allclose(result.probability[1][label == 2], 0.55, atol=1e-5)
    np.testing.assert_array_equal(result.label_map, label)

"""Multi-target OSS-Net in the library: target maps, K outputs, loss, per-target border sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ossnet.border import border_band, target_bands
from ossnet.checkpoint import PreprocessSpec, load_checkpoint, save_checkpoint
from ossnet.config import AugmentConfig, ConfigError, SamplingConfig, config_to_dict, model_config, model_config_from_dict
from ossnet.loss import ossnet_loss
from ossnet.model import build_model
from ossnet.sampling import sample_points, training_sample
from ossnet.targets import BINARY, TARGET_PRESETS, TargetError, TargetSpec, target_preset

BRATS = TARGET_PRESETS["brats-regions"]
LITS = TARGET_PRESETS["lits-classes"]


def _brats_label(shape: tuple[int, int, int] = (32, 32, 24)) -> np.ndarray:
    """Nested spheres: edema (2) around a necrotic core (1) holding an enhancing rim (4)."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    r = np.sqrt(((grid - np.array(shape)[:, None, None, None] / 2) ** 2).sum(0))
    label = np.zeros(shape, np.uint8)
    label[r < 10] = 2
    label[r < 6] = 1
    label[(r >= 4) & (r < 6)] = 4
    return label


def _forward(cfg, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    torch.manual_seed(1)
    image = torch.randn(2, cfg.encoder.in_channels, *cfg.lowres_input_shape)
    points = torch.rand(2, 16, 3) * 2 - 1
    patches = torch.randn(2, 16, cfg.patch_channels, *(cfg.patch.size,) * 3)
    with torch.no_grad():
        logits, lowres = model(image, points, patches)
    return logits, lowres, model


def test_one_output_reproduces_the_binary_model_exactly() -> None:
    binary = model_config("C", "tiny")
    one_region = model_config("C", "tiny", targets=TargetSpec("regions", (0, 1, 2), ("lesion",), ((1, 2),)))
    a_logits, a_low, a = _forward(binary)
    b_logits, b_low, b = _forward(one_region)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert a_logits.shape == (2, 16) and a_low.shape == (2, 1, *binary.latent_shape)
    assert torch.equal(a_logits, b_logits) and torch.equal(a_low, b_low)
    # The same rows, too: one region's targets are the binary form.
    label = np.where(_brats_label() == 4, 1, _brats_label())
    image = np.random.default_rng(0).normal(size=(4, 32, 32, 24)).astype(np.float32)
    rows = [training_sample(image, label, cfg, SamplingConfig(256, 0.5, 2), AugmentConfig.off(), np.random.default_rng(3))
            for cfg in (binary, one_region)]
    for key in rows[0]:
        np.testing.assert_array_equal(rows[0][key], rows[1][key], err_msg=key)


def test_k_outputs_and_their_shapes() -> None:
    for spec, k in ((BRATS, 3), (LITS, 3)):
        cfg = model_config("C", "tiny", targets=spec)
        logits, lowres, _ = _forward(cfg)
        assert logits.shape == (2, 16, k) and lowres.shape == (2, k, *cfg.latent_shape)


def test_the_target_map_travels_in_the_checkpoint(tmp_path) -> None:
    cfg = model_config("C", "tiny", targets=BRATS)
    assert model_config_from_dict(config_to_dict(cfg)) == cfg
    save_checkpoint(tmp_path / "m.pt", build_model(cfg), PreprocessSpec.for_model(cfg, ("t1", "t1ce", "t2", "flair")))
    model, _ = load_checkpoint(str(tmp_path / "m.pt"))
    assert model.config.targets == BRATS
    old = {k: v for k, v in config_to_dict(model_config("C", "tiny")).items() if k != "targets"}
    assert model_config_from_dict(old).targets == BINARY  # checkpoints from before target maps


def test_region_label_maps_are_nested_and_round_trip() -> None:
    label = _brats_label()
    wt, tc, et = BRATS.region_masks(label)
    assert et.any() and (et <= tc).all() and (tc <= wt).all()
    np.testing.assert_array_equal(BRATS.label_map(BRATS.region_masks(label)), label)
    # Any decisions, even contradictory ones, give a nested map in the source convention.
    decisions = np.random.default_rng(0).random((3, 20, 20, 20)) < 0.5
    written = BRATS.label_map(decisions)
    assert set(np.unique(written)) <= {0, 1, 2, 4}
    wt, tc, et = BRATS.region_masks(written)
    assert (et <= tc).all() and (tc <= wt).all()
    # ET without TC is not enhancing tumour: the voxel keeps what WT says (edema).
    assert BRATS.label_map(np.array([[True], [False], [True]]))[0] == 2
    assert BRATS.label_map(np.array([[False], [False], [True]]))[0] == 0
    # BraTS 2023 labels enhancing tumour 3: the same regions through the label map.
    later = target_preset("brats2023-regions")
    np.testing.assert_array_equal(later.region_masks(np.where(label == 4, 3, label)), BRATS.region_masks(label))


def test_classes_map_values_to_indices_and_back() -> None:
    label = np.array([[[0, 1, 2, 2]]], np.uint8)
    assert LITS.point_targets(label.ravel()).tolist() == [0, 1, 2, 2]
    np.testing.assert_array_equal(LITS.label_map(LITS.region_masks(label)), label)
    assert LITS.class_regions().tolist() == [[0, 0], [1, 0], [1, 1]]
    liver, tumour = LITS.region_masks(label)
    assert liver.ravel().tolist() == [False, True, True, True] and tumour.ravel().tolist() == [False, False, True, True]
    with pytest.raises(TargetError, match=r"^label: values \[3\] are not in the target map's label values \[0, 1, 2\]$"):
        LITS.class_index(np.array([0, 3]))
    with pytest.raises(TargetError, match=r"values \[3\]"):
        BRATS.check_values(np.array([0, 1, 3]))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (TargetSpec("fuzzy"), "targets.kind: must be one of binary, regions, classes"),
        (TargetSpec("regions", (1, 2), ("a",), ((1,),)), "targets.label_values: need distinct values"),
        (TargetSpec("regions", (0, 1), ("a", "a"), ((1,), (1,))), "targets.names: need distinct identifiers"),
        (TargetSpec("regions", (0, 1), ("a",), ((2,),)), "targets.regions.a: need non-zero values"),
        (TargetSpec("binary", (0, 1), ("a", "b"), ((1,), (1,))), "targets.names: a binary task has one target"),
    ],
)
def test_bad_target_maps_name_the_field(spec: TargetSpec, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + message.replace("[", r"\[")):
        spec.validate()
    with pytest.raises(ConfigError):
        model_config("C", "tiny", targets=spec)


def test_loss_per_region_per_class_and_weighted() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 50, 3, generator=g)
    regions = (torch.rand(2, 50, 3, generator=g) > 0.5).float()
    low_logits = torch.randn(2, 3, 4, 4, 3, generator=g)
    low_labels = (torch.rand(2, 3, 4, 4, 3, generator=g) > 0.5).float()
    plain = ossnet_loss(logits, regions, low_logits, low_labels, 0.1, kind="regions")
    assert torch.allclose(plain.point, F.binary_cross_entropy_with_logits(logits, regions))
    assert torch.allclose(plain.aux, F.binary_cross_entropy_with_logits(low_logits, low_labels))
    same = ossnet_loss(logits, regions, low_logits, low_labels, 0.1, kind="regions", weights=[2.0, 2.0, 2.0])
    assert torch.allclose(same.total, plain.total)
    only_et = ossnet_loss(logits, regions, None, None, 0.1, kind="regions", weights=[0, 0, 1])
    assert torch.allclose(only_et.point, F.binary_cross_entropy_with_logits(logits[..., 2], regions[..., 2]))
    classes = torch.randint(0, 3, (2, 50), generator=g)
    ce = ossnet_loss(logits, classes, low_logits, low_labels, 0.0, kind="classes")
    assert torch.allclose(ce.point, F.cross_entropy(logits.reshape(-1, 3), classes.reshape(-1)))
    with pytest.raises(ValueError, match="weights: need 3"):
        ossnet_loss(logits, regions, None, None, 0.1, kind="regions", weights=[1, 1])
    with pytest.raises(ValueError, match="class indices"):
        ossnet_loss(logits, regions, None, None, 0.1, kind="classes")


def test_border_points_are_split_between_the_targets_bands() -> None:
    label = _brats_label()
    bands = target_bands(label, BRATS, band_width=1)
    assert bands.dtype == np.uint8 and bands.max() < 8
    np.testing.assert_array_equal((bands & 4) > 0, border_band(label == 4, 1))
    np.testing.assert_array_equal(target_bands(label, BINARY, 1), border_band(label, 1).view(np.uint8))
    points = sample_points(label, 3000, 1.0, np.random.default_rng(0), band=bands, n_bands=3)
    in_band = [((bands[tuple(points.T)] >> t) & 1).astype(bool) for t in range(3)]
    # Each target's band holds at least its third of the points, though ET's band is the smallest.
    assert all(b.sum() >= 1000 for b in in_band), [int(b.sum()) for b in in_band]
    assert (bands & 4).astype(bool).sum() < (bands & 1).astype(bool).sum()


def test_training_rows_for_regions_and_classes() -> None:
    label = _brats_label()
    image = np.random.default_rng(0).normal(size=(4, 32, 32, 24)).astype(np.float32)
    cfg = model_config("C", "tiny", targets=BRATS)
    row = training_sample(image, label, cfg, SamplingConfig(512, 0.5, 2), AugmentConfig(), np.random.default_rng(1))
    assert row["labels"].shape == (512, 3) and row["label_lowres"].shape == (3, *cfg.latent_shape)
    wt, tc, et = row["labels"].T
    assert (et <= tc).all() and (tc <= wt).all() and et.sum() > 0
    lits_label = np.where(label > 0, 1, 0).astype(np.uint8)
    lits_label[label == 4] = 2
    cfg = model_config("C", "tiny", targets=LITS)
    row = training_sample(image[:1].repeat(4, 0), lits_label, cfg, SamplingConfig(512, 0.5, 2), AugmentConfig.off(),
                          np.random.default_rng(1))
    assert row["labels"].dtype == np.int64 and set(np.unique(row["labels"])) == {0, 1, 2}
    assert row["label_lowres"].shape == (3, *cfg.latent_shape)


@pytest.mark.parametrize("preset", ["brats-regions", "lits-classes"])
def test_training_steps_on_multi_target_rows_learn_and_count_points_per_target(preset: str) -> None:
    from ossnet.training import make_optimizer, train_step

    spec = TARGET_PRESETS[preset]
    label = _brats_label()
    if preset == "lits-classes":
        label = np.select([label == 4, label > 0], [2, 1], 0).astype(np.uint8)
    image = np.stack([(label > 0) * 2.0 - 1.0, (label == 1) * 1.0, (label == 4) * 1.0, np.zeros(label.shape)])
    image = image.astype(np.float32)
    cfg = model_config("C", "tiny", targets=spec)
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = make_optimizer(model, "adam", 3e-3)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(30):
        rows = [training_sample(image, label, cfg, SamplingConfig(512, 0.5, 2), AugmentConfig.off(), rng) for _ in range(2)]
        batch = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}
        metrics = train_step(model, batch, optimizer, alpha=0.1, weights=[1.0] * spec.n_outputs)
        losses.append(metrics["loss"])
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    counts = [metrics[f"points_{name}"] for name in spec.names]
    assert all(c > 0 for c in counts) and counts == sorted(counts, reverse=True)  # nested: the inner ones hold fewer


def test_a_map_holds_at_most_eight_targets_of_either_kind() -> None:
    values = tuple(range(10))
    for kind in ("regions", "classes"):
        spec = TargetSpec(kind, values, tuple(f"t{v}" for v in values[1:]), tuple((v,) for v in values[1:]))
        with pytest.raises(TargetError, match=r"^targets.names: at most 8 targets, got 9$"):
            spec.validate()

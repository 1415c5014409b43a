"""OSS-Net network: shapes on odd grids, gradient flow, latent routing, CBN, parameter counts."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ossnet.config import ACTIVATIONS, ConfigError, ModelConfig, model_config
from ossnet.loss import ossnet_loss
from ossnet.model import (
    ConditionalNorm,
    OSSNet,
    ResidualBlock3d,
    build_model,
    count_parameters,
    make_activation,
    parameter_breakdown,
)
from ossnet.model.layers import ceil_avg_pool3d

VARIANTS = ("onet", "A", "B", "C", "D")
ODD_SHAPE = (37, 41, 29)
# Reference parameter counts at the BraTS preset (PAPER.md, estimated from the reference code).
REFERENCE_PARAMS = {"onet": 6.9e6, "A": 7.25e6, "B": 7.25e6, "C": 8.7e6, "D": 8.7e6}


def make_inputs(cfg: ModelConfig, b: int = 2, n: int = 5, seed: int = 0) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    k = cfg.patch.size
    return {
        "image_lowres": torch.randn(b, cfg.encoder.in_channels, *cfg.lowres_input_shape, generator=g),
        "points": torch.rand(b, n, 3, generator=g) * 2 - 1,
        "patches": torch.randn(b, n, cfg.patch_channels, k, k, k, generator=g) if cfg.patch.enabled else None,
        "labels": (torch.rand(b, n, generator=g) > 0.5).float(),
        "label_lowres": (torch.rand(b, *cfg.latent_shape, generator=g) > 0.5).float(),
    }


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_shapes_on_odd_volume(variant: str, preset: str) -> None:
    torch.manual_seed(0)
    cfg = model_config(variant, preset, volume_shape=ODD_SHAPE)
    model = build_model(cfg)
    x = make_inputs(cfg, b=2, n=5)
    encoding = model.encode(x["image_lowres"])
    n_latents = cfg.decoder.n_blocks + 1 if cfg.encoder.skip else 1
    assert encoding.latent.shape == (2, n_latents, cfg.latent_dim)
    logits, lowres = model(x["image_lowres"], x["points"], x["patches"])
    assert logits.shape == (2, 5)
    assert torch.isfinite(logits).all()
    if cfg.has_lowres_head:
        assert lowres is not None and lowres.shape == (2, 1, *cfg.latent_shape)
    else:
        assert lowres is None and encoding.lowres_logits is None


def test_degenerate_grid_with_size_one_axes_runs() -> None:
    cfg = model_config("D", "small", volume_shape=(9, 3, 2))
    assert cfg.lowres_input_shape == (5, 2, 1) and cfg.latent_shape == (1, 1, 1)
    x = make_inputs(cfg, b=2, n=3)
    logits, lowres = build_model(cfg)(x["image_lowres"], x["points"], x["patches"])
    assert logits.shape == (2, 3) and lowres is not None and lowres.shape == (2, 1, 1, 1, 1)


def test_latent_shape_is_ceil_halving_of_odd_grid() -> None:
    cfg = model_config("C", "small", volume_shape=ODD_SHAPE)
    # 37x41x29 -> lowres 19x21x15 -> 10x11x8 -> 5x6x4 -> 3x3x2 (three blocks)
    assert cfg.lowres_input_shape == (19, 21, 15)
    assert cfg.latent_shape == (3, 3, 2)
    features = build_model(cfg).backbone(torch.randn(1, 4, 19, 21, 15))
    assert [tuple(f.shape[2:]) for f in features] == [(10, 11, 8), (5, 6, 4), (3, 3, 2)]


def test_ceil_avg_pool_divides_partial_windows_by_voxels_inside() -> None:
    x = torch.arange(3 * 5 * 1, dtype=torch.float32).reshape(1, 1, 3, 5, 1)
    out = ceil_avg_pool3d(x)
    assert out.shape == (1, 1, 2, 3, 1)
    # Last cell along both axes holds only x[2, 4] = 14: a true mean, not 14 / 8.
    assert out[0, 0, 1, 2, 0].item() == pytest.approx(14.0)
    assert out[0, 0, 0, 0, 0].item() == pytest.approx((0 + 1 + 5 + 6) / 4)
    assert torch.allclose(ceil_avg_pool3d(torch.ones(1, 2, 7, 3, 5)), torch.ones(1, 2, 4, 2, 3))


@pytest.mark.parametrize(("preset", "kernel"), [("brats", 7), ("tiny", 3)])
def test_patch_encoder_kernel_follows_config_and_keeps_feature_size(preset: str, kernel: int) -> None:
    cfg = model_config("B", preset)
    with torch.device("meta"):
        model = build_model(cfg)
    convs = [m for m in model.patch_encoder.net if isinstance(m, torch.nn.Conv3d)]
    assert [c.kernel_size for c in convs] == [(kernel,) * 3] * 2
    assert [(c.in_channels, c.out_channels) for c in convs] == [(8, 4), (4, 1)]
    assert model.patch_encoder(torch.zeros(2, 3, 8, 7, 7, 7, device="meta")).shape == (2, 3, 343)


def test_residual_block_shortcut_only_when_channels_change() -> None:
    same = ResidualBlock3d(8, 8, "relu")
    change = ResidualBlock3d(4, 8, "relu")
    assert isinstance(same.shortcut, torch.nn.Identity)
    assert isinstance(change.shortcut, torch.nn.Conv3d) and change.shortcut.kernel_size == (1, 1, 1)
    assert change(torch.randn(2, 4, 9, 6, 5)).shape == (2, 8, 5, 3, 3)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_every_parameter(variant: str) -> None:
    torch.manual_seed(1)
    cfg = model_config(variant, "tiny", volume_shape=ODD_SHAPE)
    model = build_model(cfg)
    x = make_inputs(cfg, b=2, n=6)
    logits, lowres = model(x["image_lowres"], x["points"], x["patches"])
    ossnet_loss(logits, x["labels"], lowres, x["label_lowres"], alpha=0.1).total.backward()
    groups = {"backbone", "latent_head", "decoder.fc_p", "decoder.fc_out", "decoder.blocks"}
    groups |= {"patch_encoder"} if cfg.patch.enabled else set()
    groups |= {"lowres_head"} if cfg.has_lowres_head else set()
    seen = set()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
        seen |= {g for g in groups if name.startswith(g)}
        if ".cbn" in name:
            seen.add("cbn")
    assert seen == groups | {"cbn"}
    assert ("patch_encoder" in dict(model.named_children())) == cfg.patch.enabled
    assert ("lowres_head" in dict(model.named_children())) == cfg.has_lowres_head


def _capture_block_latents(model: OSSNet) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    for block in model.decoder.blocks:
        block.register_forward_pre_hook(lambda _m, args: seen.append(args[1].detach().clone()))
    return seen


@pytest.mark.parametrize("n_blocks", [5, 3])
def test_skip_latent_channel_i_plus_1_conditions_block_i(n_blocks: int) -> None:
    torch.manual_seed(2)
    base = model_config("C", "tiny", volume_shape=ODD_SHAPE)
    cfg = dataclasses.replace(base, decoder=dataclasses.replace(base.decoder, n_blocks=n_blocks))
    model = build_model(cfg).eval()
    x = make_inputs(cfg)
    seen = _capture_block_latents(model)
    encoding = model.encode(x["image_lowres"])
    assert encoding.latent.shape[1] == n_blocks + 1
    model.decode(x["points"], x["patches"], encoding)
    assert len(seen) == n_blocks
    for i, latent in enumerate(seen):
        assert torch.equal(latent, encoding.latent[:, i + 1])


def test_plain_latent_conditions_every_block() -> None:
    torch.manual_seed(3)
    cfg = model_config("A", "tiny", volume_shape=ODD_SHAPE)
    model = build_model(cfg).eval()
    x = make_inputs(cfg)
    seen = _capture_block_latents(model)
    encoding = model.encode(x["image_lowres"])
    model.decode(x["points"], x["patches"], encoding)
    assert len(seen) == cfg.decoder.n_blocks
    assert all(torch.equal(latent, encoding.latent[:, 0]) for latent in seen)


@pytest.mark.parametrize("variant", ["onet", "D"])
def test_chunked_decode_in_eval_mode_matches_forward(variant: str) -> None:
    torch.manual_seed(4)
    cfg = model_config(variant, "small", volume_shape=ODD_SHAPE)
    model = build_model(cfg)
    x = make_inputs(cfg, b=2, n=9)
    model(x["image_lowres"], x["points"], x["patches"])  # one train pass moves the running stats
    model.eval()
    with torch.no_grad():
        whole, lowres = model(x["image_lowres"], x["points"], x["patches"])
        encoding = model.encode(x["image_lowres"])
        parts = []
        for sl in (slice(0, 4), slice(4, 9)):
            patches = x["patches"][:, sl] if x["patches"] is not None else None
            parts.append(model.decode(x["points"][:, sl], patches, encoding))
    assert torch.allclose(torch.cat(parts, dim=1), whole, atol=1e-5)
    if lowres is not None:
        assert torch.equal(lowres, encoding.lowres_logits)


def test_cbn_is_plain_batch_norm_at_init_and_conditions_per_volume() -> None:
    torch.manual_seed(5)
    x = torch.randn(2, 50, 8) * torch.linspace(0.5, 4.0, 8) + torch.linspace(-3.0, 3.0, 8)
    latent = torch.randn(2, 6)
    feature = ConditionalNorm(6, 8, "feature")
    out = feature(x, latent).reshape(-1, 8)
    assert torch.allclose(out.mean(0), torch.zeros(8), atol=1e-5)
    assert torch.allclose(out.var(0, unbiased=False), torch.ones(8), atol=1e-3)
    pooled = ConditionalNorm(6, 8, "pooled")
    out_p = pooled(x, latent)
    assert out_p.mean().abs() < 1e-5 and (out_p.var(unbiased=False) - 1).abs() < 1e-3
    assert out_p.reshape(-1, 8).mean(0).abs().max() > 0.5  # per-feature offsets survive pooling
    assert pooled.bn.running_mean.shape == (1,) and feature.bn.running_mean.shape == (8,)
    # Non-zero gamma/beta weights: each volume gets its own affine.
    torch.nn.init.normal_(feature.gamma.weight)
    torch.nn.init.normal_(feature.beta.weight)
    feature.eval()
    same = feature(x[:1].expand(2, -1, -1), latent)
    assert not torch.allclose(same[0], same[1])


def test_cbn_rejects_unknown_norm() -> None:
    with pytest.raises(ConfigError, match="cbn_norm"):
        ConditionalNorm(4, 4, "instance")
    with pytest.raises(ConfigError, match="encoder.norm"):
        model_config("C", "tiny", encoder_norm="layer")


def _decode_first_volume(model, x, together: bool) -> torch.Tensor:
    """Logits of volume 0, decoded in a batch with volume 1 or alone."""
    if together:
        return model(x["image_lowres"], x["points"], x["patches"])[0][0]
    return model(x["image_lowres"][:1], x["points"][:1], x["patches"][:1])[0][0]


@pytest.mark.parametrize("encoder_norm", ["batch", "instance", "group"])
def test_layer_norm_decoder_is_the_same_function_in_training_and_inference(encoder_norm: str) -> None:
    # The collapse this mode prevents: with batch statistics a volume's logits depend on the
    # other volumes of the batch in training and on running averages at inference.
    torch.manual_seed(3)
    cfg = model_config("C", "tiny", volume_shape=ODD_SHAPE, encoder_norm=encoder_norm)
    assert cfg.decoder.cbn_norm == "layer"
    model = build_model(cfg)
    x = make_inputs(cfg, b=2, n=40)
    x["image_lowres"][1] = x["image_lowres"][1] * 3 + 2  # a very different second volume
    with torch.no_grad():
        for block in model.decoder.blocks:  # non-trivial conditioning
            torch.nn.init.normal_(block.cbn1.gamma.weight, std=0.1)
            torch.nn.init.normal_(block.cbn2.beta.weight, std=0.1)
        model.eval()
        reference = _decode_first_volume(model, x, together=False)
        assert torch.allclose(_decode_first_volume(model, x, together=True), reference, atol=1e-5)
        model.decoder.train()  # the decoder has no batch statistics to switch
        assert torch.allclose(_decode_first_volume(model, x, together=True), reference, atol=1e-5)


def test_feature_norm_decoder_depends_on_the_batch() -> None:
    torch.manual_seed(3)
    cfg = model_config("C", "tiny", volume_shape=ODD_SHAPE, cbn_norm="feature")
    model = build_model(cfg)
    x = make_inputs(cfg, b=2, n=40)
    x["image_lowres"][1] = x["image_lowres"][1] * 3 + 2
    with torch.no_grad():
        model.train()
        alone = _decode_first_volume(model, x, together=False)
        assert not torch.allclose(_decode_first_volume(model, x, together=True), alone, atol=1e-3)


def test_pooled_cbn_model_trains_a_step() -> None:
    cfg = model_config("C", "tiny", volume_shape=ODD_SHAPE, cbn_norm="pooled")
    model = build_model(cfg)
    x = make_inputs(cfg)
    logits, lowres = model(x["image_lowres"], x["points"], x["patches"])
    ossnet_loss(logits, x["labels"], lowres, x["label_lowres"], 0.1).total.backward()
    assert model.decoder.blocks[0].cbn1.bn.running_mean.shape == (1,)
    assert model.decoder.fc_p.weight.grad is not None


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_builds_and_runs(activation: str) -> None:
    cfg = model_config("B", "tiny", volume_shape=ODD_SHAPE, activation=activation)
    model = build_model(cfg)
    x = make_inputs(cfg, b=2, n=3)
    logits, _ = model(x["image_lowres"], x["points"], x["patches"])
    assert torch.isfinite(logits).all()
    expected = type(make_activation(activation))
    assert isinstance(model.backbone.blocks[0].act1, expected)
    assert isinstance(model.patch_encoder.net[1], expected)
    assert isinstance(model.decoder.blocks[0].act2, expected)


def test_unknown_activation_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="activation"):
        make_activation("swish")


def test_bad_inputs_raise_clear_errors() -> None:
    cfg = model_config("A", "tiny", volume_shape=ODD_SHAPE)
    model = build_model(cfg)
    x = make_inputs(cfg)
    with pytest.raises(ValueError, match="image_lowres"):
        model.encode(torch.randn(2, 4, 18, 21, 15))
    encoding = model.encode(x["image_lowres"])
    with pytest.raises(ValueError, match="patches"):
        model.decode(x["points"], None, encoding)
    with pytest.raises(ValueError, match="patches"):
        model.decode(x["points"], x["patches"][:, :, :2], encoding)
    with pytest.raises(ValueError, match="points"):
        model.decode(x["points"][..., :2], x["patches"], encoding)
    onet = build_model(model_config("onet", "tiny", volume_shape=ODD_SHAPE))
    with pytest.raises(ValueError, match="patches"):
        onet.decode(x["points"], x["patches"], onet.encode(x["image_lowres"]))


def test_parameter_counts_match_reference_at_brats() -> None:
    counts = {}
    for variant in VARIANTS:
        with torch.device("meta"):  # shapes only: no memory, no init cost
            model = build_model(model_config(variant, "brats"))
        counts[variant] = count_parameters(model)
        assert sum(parameter_breakdown(model).values()) == counts[variant]
    for variant, n in counts.items():
        ref = REFERENCE_PARAMS[variant]
        print(f"{variant:>4}: {n / 1e6:.3f}M parameters (reference {ref / 1e6:.2f}M, {100 * (n / ref - 1):+.1f}%)")
        assert abs(n / ref - 1) < 0.15, f"{variant}: {n} parameters vs reference {ref:.0f}"
    # Skip encoder and low-res head cost ~1.45M; patches add the 343-d feature to fc_p.
    assert counts["onet"] < counts["A"] < counts["B"] < counts["C"] < counts["D"]


@pytest.mark.parametrize("kernel", [3, 5, 7])
def test_patch_encoder_matmul_path_equals_convolutions(kernel: int) -> None:
    from ossnet.model.patches import PatchEncoder

    torch.manual_seed(0)
    enc = PatchEncoder(in_channels=8, size=7, activation="leaky_relu", kernel=kernel, use_matmul=True)
    patches = torch.randn(2, 5, 8, 7, 7, 7, requires_grad=True)
    fast = enc(patches)
    grad_fast = torch.autograd.grad(fast.square().sum(), [patches, enc.net[0].weight])
    enc.use_matmul = False
    slow = enc(patches)
    grad_slow = torch.autograd.grad(slow.square().sum(), [patches, enc.net[0].weight])
    assert torch.allclose(fast, slow, atol=1e-5, rtol=1e-4)
    for a, b in zip(grad_fast, grad_slow):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3)

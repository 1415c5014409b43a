"""The easy phantom level: lesions and liver stand out by intensity (smoke tests, MISE and speed benchmarks).

BraTS-like: four MRI-like modalities (flair, t1, t1ce, t2) of a skull-stripped "brain" (a
perturbed ellipsoid, zero outside) with white/grey matter texture, ventricles, a smooth bias
field and Rician noise, plus 1-3 irregular lesions (perturbed ellipsoids with an optional
satellite blob): oedema around a core with an enhancing rim and sometimes a necrotic centre,
each with its own contrast per modality. The label is the whole tumour (oedema + core).

LiTS-like: one CT-like channel in Hounsfield units: air, a body with subcutaneous fat, a spine,
a spleen and a large liver blob (with hypodense tumours), Gaussian noise. The label is the
liver including its tumours.

Geometry is relative to the volume, so a case looks the same at any resolution. Reproducibility:
every draw comes from ``np.random.default_rng(seed)``, and the geometry (hence the label) uses
only uniform draws and element-wise float32 arithmetic (no transcendental functions or
reductions), which IEEE platforms evaluate identically.
"""

from __future__ import annotations

import numpy as np

from ossnet.phantoms._common import (
    BRATS_MODALITIES,
    BRATS_MODALITY_SCALE,
    PhantomCase,
    blob,
    sub_box,
    check_shape,
    cortex_ribbon,
    ellipsoid_q,
    mix,
    rician,
    smooth_field,
    soft,
    spacing_affine,
    unit_ball,
)

_REFERENCE_SHAPE = (64, 64, 48)

# Relative tissue intensities per modality (columns: flair, t1, t1ce, t2).
_TISSUE = {
    "wm": (0.50, 0.80, 0.75, 0.35),
    "gm": (0.62, 0.60, 0.60, 0.52),
    "csf": (0.15, 0.20, 0.22, 1.00),
    "edema": (1.00, 0.45, 0.50, 0.88),
    "core": (0.82, 0.40, 1.00, 0.65),
    "necrosis": (0.72, 0.25, 0.28, 0.97),
}


def brats_like(
    shape: tuple[int, int, int] = (64, 64, 48),
    seed: int = 0,
    empty: bool = False,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    case_id: str | None = None,
) -> PhantomCase:
    """A skull-stripped, four-modality brain with irregular lesions (see the module docstring).

    Args:
        shape: (X, Y, Z) grid.
        seed: seed of ``np.random.default_rng``; the same seed gives the same case.
        empty: no lesion (empty label).
        spacing: voxel size in mm (affine diagonal).
        case_id: defaults to ``"brats-<seed>"``.
    """
    shape = check_shape(shape)
    rng = np.random.default_rng(seed)
    dims = np.asarray(shape, dtype=np.float64)
    # Arithmetic mean of the per-axis ratios: exact on every platform (unlike cbrt / pow).
    scale = sum(d / r for d, r in zip(shape, _REFERENCE_SHAPE)) / 3.0
    full = tuple(slice(0, s) for s in shape)

    center = dims / 2 + rng.uniform(-0.02, 0.02, 3) * dims
    radii = dims * np.array([0.37, 0.42, 0.39]) * rng.uniform(0.92, 1.0, 3)
    brain = blob(rng, full, (0, 0, 0), center, radii, amplitude=0.05) > 0

    # Grey matter: textured, denser towards the brain surface (a cortex-like ribbon).
    grey = cortex_ribbon(rng, shape, ellipsoid_q(shape, center, radii), gain=3.0, offset=1.8)

    ventricles = []
    for side in (-1.0, 1.0):
        v_center = center + np.array([side * 0.07, 0.0, 0.03]) * dims
        v_radii = dims * np.array([0.05, 0.15, 0.07]) * rng.uniform(0.8, 1.2, 3)
        box, origin = sub_box(shape, v_center, v_radii * 1.2 + 2)
        ventricles.append((box, soft(blob(rng, box, origin, v_center, v_radii, 0.15), float(v_radii.min()))))

    # Shared intensity modulation: a smooth bias field times a fine tissue texture.
    modulation = smooth_field(rng, shape, (2, 2, 2))
    modulation *= np.float32(0.08)
    modulation += np.float32(1.0)
    fine = smooth_field(rng, shape, (16, 16, 12))
    fine *= np.float32(0.04)
    fine += np.float32(1.0)
    modulation *= fine
    del fine

    lesions = []
    if not empty:
        for _ in range(int(rng.integers(1, 4))):
            lesions.append(_lesion(rng, shape, center, radii, scale))

    jitter = rng.uniform(0.92, 1.08, size=(len(_TISSUE), 4))
    image = np.empty((4,) + shape, dtype=np.float32)
    for m in range(4):
        tissue = {name: values[m] * jitter[i, m] for i, (name, values) in enumerate(_TISSUE.items())}
        channel = image[m]
        np.multiply(grey, np.float32(tissue["gm"] - tissue["wm"]), out=channel)
        channel += np.float32(tissue["wm"])
        for box, weight in ventricles:
            mix(channel[box], tissue["csf"], weight)
        for box, edema, core, necrosis in lesions:
            sub = channel[box]
            mix(sub, tissue["edema"], edema)
            mix(sub, tissue["core"], core)
            if necrosis is not None:
                mix(sub, tissue["necrosis"], necrosis)
        channel *= modulation
        amplitude = BRATS_MODALITY_SCALE[m] * float(rng.uniform(0.8, 1.25))
        channel *= np.float32(amplitude)
        # Skull-stripped: noise only inside the brain, exact zeros outside.
        inside = rician(rng, channel[brain], 0.03 * amplitude)
        channel[...] = 0.0
        channel[brain] = inside

    label = np.zeros(shape, dtype=bool)
    for box, edema, core, _ in lesions:
        label[box] |= (edema > 0.5) | (core > 0.5)
    label &= brain
    return PhantomCase(
        case_id=case_id or f"brats-{seed}",
        image=image,
        label=label.view(np.uint8),
        affine=spacing_affine(spacing),
        modalities=BRATS_MODALITIES,
    )


def _lesion(rng: np.random.Generator, shape, brain_center, brain_radii, scale: float):
    """One lesion: (box, oedema, core, necrosis or None) memberships on a sub-box of the grid."""
    center = brain_center + 0.6 * unit_ball(rng) * brain_radii
    radius = float(rng.uniform(3.5, 12.0)) * scale
    radii = radius * rng.uniform(0.75, 1.25, 3)
    direction = unit_ball(rng)
    norm = max(float(np.sqrt(sum(float(d) * float(d) for d in direction))), 1e-3)
    offset = direction / norm * 0.8 * radius
    satellite = bool(rng.random() < 0.5)
    # Oedema reaches 1.4 * 1.25 radius; the satellite 0.8 + 0.6 * 1.3 * 1.25 radius; +2 for the ramp.
    box, origin = sub_box(shape, center, np.full(3, 2.3 * radius + 2.0))

    edema_s = blob(rng, box, origin, center, radii, 0.4, cells=5)
    satellite_s = blob(rng, box, origin, center + offset, 0.6 * radii, 0.3)
    if satellite:
        np.maximum(edema_s, satellite_s, out=edema_s)
    core_ratio = float(rng.uniform(0.35, 0.6))
    core_center = center + rng.uniform(-0.15, 0.15, 3) * radius
    core_s = blob(rng, box, origin, core_center, core_ratio * radii, 0.3, cells=4)
    necrosis = None
    if rng.random() < 0.5:
        necrotic_radius = 0.55 * core_ratio * radius
        necrosis = soft(blob(rng, box, origin, core_center, 0.55 * core_ratio * radii, 0.2), necrotic_radius)
    return box, soft(edema_s, radius), soft(core_s, core_ratio * radius), necrosis


def lits_like(
    shape: tuple[int, int, int] = (64, 64, 64),
    seed: int = 0,
    empty: bool = False,
    spacing: tuple[float, float, float] = (0.8, 0.8, 1.5),
    case_id: str | None = None,
) -> PhantomCase:
    """A CT-like abdomen (Hounsfield units) with one large liver blob (see the module docstring).

    Args:
        shape: (X, Y, Z) grid; X, Y axial, Z cranio-caudal.
        seed: seed of ``np.random.default_rng``.
        empty: no liver (empty label).
        spacing: voxel size in mm.
        case_id: defaults to ``"lits-<seed>"``.
    """
    shape = check_shape(shape)
    rng = np.random.default_rng(seed)
    dims = np.asarray(shape, dtype=np.float64)
    full = tuple(slice(0, s) for s in shape)
    # The body is an elliptic cylinder along Z: a huge Z radius turns the ellipsoid into a tube.
    body_center = dims / 2 + np.array([0.0, 0.03, 0.0]) * dims
    body_radii = dims * np.array([0.45, 0.36, 50.0]) * np.append(rng.uniform(0.92, 1.0, 2), 1.0)
    r_body = float(body_radii[:2].min())
    image = np.full(shape, -1000.0, dtype=np.float32)
    mix(image, -100.0, soft(blob(rng, full, (0, 0, 0), body_center, body_radii, 0.04), r_body))  # fat
    inner_radii = body_radii * np.array([0.88, 0.85, 1.0])
    soft_tissue = soft(blob(rng, full, (0, 0, 0), body_center, inner_radii, 0.04), r_body)
    mix(image, 45.0, soft_tissue)
    texture = smooth_field(rng, shape, (6, 6, 6))
    texture *= soft_tissue
    image += np.float32(8.0) * texture
    del texture, soft_tissue

    def organ(center, radii, amplitude, cells=3):
        box, origin = sub_box(shape, center, radii * (1.0 + amplitude) + 2)
        return box, blob(rng, box, origin, center, radii, amplitude, cells)

    spine_center = body_center + np.array([0.0, 0.22, 0.0]) * dims
    spine_radii = dims * np.array([0.06, 0.06, 50.0])
    box, spine_s = organ(spine_center, spine_radii, 0.1)
    mix(image[box], 700.0, soft(spine_s, float(spine_radii[0])))

    spleen_center = body_center + np.array([0.25, 0.08, 0.05]) * dims + rng.uniform(-0.03, 0.03, 3) * dims
    spleen_radii = dims * np.array([0.08, 0.1, 0.14]) * rng.uniform(0.85, 1.15, 3)
    box, spleen_s = organ(spleen_center, spleen_radii, 0.2)
    mix(image[box], 90.0, soft(spleen_s, float(spleen_radii.min())))

    label = np.zeros(shape, dtype=bool)
    liver_center = body_center + np.array([-0.17, -0.02, 0.05]) * dims + rng.uniform(-0.03, 0.03, 3) * dims
    liver_radii = dims * np.array([0.2, 0.2, 0.27]) * rng.uniform(0.85, 1.1, 3)
    liver_box, liver_s = organ(liver_center, liver_radii, 0.25, cells=4)
    r_liver = float(liver_radii.min())
    liver = soft(liver_s, r_liver)
    n_tumours = int(rng.integers(0, 3))
    if not empty:
        sub = mix(image[liver_box], 105.0, liver)
        origin = tuple(s.start for s in liver_box)
        for _ in range(n_tumours):
            t_center = liver_center + rng.uniform(-0.5, 0.5, 3) * liver_radii
            t_radii = r_liver * rng.uniform(0.12, 0.3) * rng.uniform(0.8, 1.2, 3)
            tumour = soft(blob(rng, liver_box, origin, t_center, t_radii, 0.3), float(t_radii.min()))
            mix(sub, 40.0, tumour * liver)
        label[liver_box] = liver_s > 0
    image += np.float32(14.0) * rng.standard_normal(shape, dtype=np.float32)
    return PhantomCase(
        case_id=case_id or f"lits-{seed}",
        image=image[None],
        label=label.view(np.uint8),
        affine=spacing_affine(spacing),
        modalities=("ct",),
    )


__all__ = ["brats_like", "lits_like"]

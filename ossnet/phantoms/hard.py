"""The hard phantom level: targets that no single-channel intensity window separates.

Each generator places the target among normal structures with the same intensities, so only
the combination of modalities, shape and anatomical context finds it. The trivial baseline
(``ossnet.baselines.window.best_window``, tuned per case on its own label) stays below Dice
0.60 on every set; ``python -m ossnet.phantoms --report`` prints the figures.

* ``brats_hard``: four MRI-like modalities of a skull-stripped brain. Oedema, enhancing core and
  necrosis each share their intensity with a normal tissue in every modality (oedema is as
  bright as white-matter hyperintensities on FLAIR and as grey matter on T1 and T1ce, the core
  enhances like vessels, necrosis is as bright as CSF on T2), under a different smooth bias
  field per modality. Lesion sizes spread widely and half of the cases carry 1-3 satellite
  lesions of radius 2-4 voxels (at the 96x96x64 reference grid), some far from the main one.
  Label: whole tumour.
* ``head_hard``: one T1-weighted channel of a whole head with scalp, skull (dark cortical bone
  around bright fatty marrow), face, eyes, neck muscles and spinal cord: a skull-stripping
  task. Muscle has grey matter's intensity, marrow and fat white matter's, and the ventricles
  inside the brain are dark. Label: the brain (parenchyma and ventricles).
* ``lits_hard``: one CT-like channel in Hounsfield units of an abdomen whose liver, spleen,
  kidneys and muscles overlap in HU (a non-contrast-like phase), with hypodense tumours,
  vessels, stomach, bowel loops and gas. Label: the liver including its tumours.

Geometry is relative to the grid (a case looks the same at any resolution); intensities are in
arbitrary MRI units or HU. Label geometry uses only uniform draws and element-wise float32
arithmetic, as in ``ossnet.phantoms._common``.
"""

from __future__ import annotations

import numpy as np

from ossnet.phantoms._common import (
    BRATS_MODALITIES,
    BRATS_MODALITY_SCALE,
    PhantomCase,
    blob,
    check_shape,
    cortex_ribbon,
    ellipsoid_q,
    mix,
    rician,
    smooth_field,
    soft,
    spacing_affine,
    sub_box,
    unit_ball,
)

BRATS_HARD_REFERENCE = (96, 96, 64)
"""Grid at which satellite radii are 2-4 voxels (they scale with the grid like everything else)."""

# Relative intensities per modality (flair, t1, t1ce, t2). Every lesion tissue matches a normal
# one somewhere: oedema ~ WMH (flair), ~ GM (t1, t1ce), between GM and CSF (t2); core ~ vessel
# (t1ce), ~ GM (flair, t1); necrosis ~ CSF (t2), ~ WM (flair).
_BRAIN = {
    "wm": (0.50, 0.80, 0.72, 0.38),
    "gm": (0.70, 0.60, 0.58, 0.55),
    "csf": (0.18, 0.22, 0.22, 1.00),
    "wmh": (0.92, 0.63, 0.60, 0.80),
    "vessel": (0.42, 0.52, 0.96, 0.30),
    "edema": (0.72, 0.56, 0.58, 0.95),
    "core": (0.70, 0.53, 0.93, 0.66),
    "necrosis": (0.52, 0.30, 0.30, 0.98),
}

# T1-weighted head (relative): muscle ~ grey matter, marrow and fat ~ white matter.
_HEAD = {
    "skin": 0.66, "fat": 0.82, "muscle": 0.6, "bone": 0.07, "marrow": 0.82, "csf": 0.17,
    "gm": 0.60, "wm": 0.80, "vitreous": 0.14, "cord": 0.76, "air": 0.0,
}

# Hounsfield units; liver, spleen, kidney cortex and muscle overlap.
_CT = {
    "air": -1000.0, "gas": -850.0, "fat": -100.0, "visceral_fat": -90.0, "muscle": 54.0, "liver": 62.0,
    "spleen": 58.0, "kidney": 60.0, "sinus": -40.0, "vessel": 44.0, "tumour": 30.0, "bowel": 38.0,
    "stomach": 22.0, "bile": 8.0, "bone": 380.0, "cortical_bone": 700.0,
}


def _scaled(values: tuple[float, ...], rng: np.random.Generator, spread: float) -> np.ndarray:
    """Per-case jitter of a tissue's intensities: each value times U(1 - spread, 1 + spread)."""
    return np.asarray(values, dtype=np.float64) * rng.uniform(1.0 - spread, 1.0 + spread, len(values))


def _paint(image: np.ndarray, box: tuple[slice, ...], weight: np.ndarray, values: np.ndarray) -> None:
    """Move every channel of ``image[:, box]`` towards ``values[c]`` by ``weight`` (in place)."""
    for c in range(image.shape[0]):
        mix(image[c][box], float(values[c]), weight)


def _organ(rng: np.random.Generator, shape, center, radii, amplitude: float, cells: int = 3):
    """A perturbed ellipsoid on its own sub-box: (box, implicit function > 0 inside)."""
    box, origin = sub_box(shape, center, np.asarray(radii) * (1.0 + amplitude) + 2)
    return box, blob(rng, box, origin, center, radii, amplitude, cells)


def _point_in(rng: np.random.Generator, center: np.ndarray, radii: np.ndarray, fraction: float) -> np.ndarray:
    """A uniform point inside the ellipsoid ``center +- fraction * radii``."""
    return center + fraction * unit_ball(rng) * radii


# --------------------------------------------------------------------------- BraTS-like


def brats_hard(
    shape: tuple[int, int, int] = (96, 96, 64),
    seed: int = 0,
    empty: bool = False,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    case_id: str | None = None,
    lesions: str = "mixed",
    regions: bool = False,
) -> PhantomCase:
    """A skull-stripped four-modality brain whose lesions no single modality separates.

    Args:
        shape: (X, Y, Z) grid.
        seed: seed of ``np.random.default_rng``.
        empty: no lesion (empty label); the confounders (WMH, vessels) stay.
        spacing: voxel size in mm.
        case_id: defaults to ``"brats-hard-<seed>"``.
        lesions: "mixed" (1-3 lesions of radius 3-10 voxels at 96x96x64, satellites in half of
            the cases) or "small" (1-6 isolated nodules of radius 1.5-5 voxels whatever the
            grid, at least 12 voxels apart, for MISE recall checks; ``small_lesions``).
        regions: label the sub-regions with the BraTS values (oedema 2, necrotic core 1,
            enhancing core 4; ``ossnet.targets`` "brats-regions"); the image is the same.

    Returns:
        ``image`` (4, X, Y, Z) float32 (zero outside the brain), ``label`` (X, Y, Z) uint8:
        0/1, or the BraTS values with ``regions``.
    """
    shape = check_shape(shape)
    rng = np.random.default_rng(seed)
    dims = np.asarray(shape, dtype=np.float64)
    scale = sum(d / r for d, r in zip(shape, BRATS_HARD_REFERENCE)) / 3.0
    full = tuple(slice(0, s) for s in shape)
    tissue = {name: _scaled(values, rng, 0.05) for name, values in _BRAIN.items()}

    center = dims / 2 + rng.uniform(-0.02, 0.02, 3) * dims
    radii = dims * np.array([0.38, 0.43, 0.40]) * rng.uniform(0.92, 1.0, 3)
    brain = blob(rng, full, (0, 0, 0), center, radii, amplitude=0.05) > 0

    image = np.empty((4,) + shape, dtype=np.float32)
    depth = ellipsoid_q(shape, center, radii)
    grey = cortex_ribbon(rng, shape, depth, gain=3.0, offset=1.5)
    for c in range(4):
        np.multiply(grey, np.float32(tissue["gm"][c] - tissue["wm"][c]), out=image[c])
        image[c] += np.float32(tissue["wm"][c])
    # Sulcal CSF: fine texture peaks near the surface (t2-bright partial volume, like oedema).
    sulci = smooth_field(rng, shape, (14, 14, 11))
    sulci -= np.float32(0.1)
    sulci *= np.float32(4.0)
    sulci *= np.clip((depth - np.float32(0.45)) * np.float32(4.0), np.float32(0.0), np.float32(1.0))
    np.clip(sulci, np.float32(0.0), np.float32(0.9), out=sulci)
    _paint(image, full, sulci, tissue["csf"])
    del grey, sulci, depth

    for side in (-1.0, 1.0):
        v_center = center + np.array([side * 0.07, 0.0, 0.03]) * dims
        v_radii = dims * np.array([0.06, 0.18, 0.08]) * rng.uniform(0.8, 1.2, 3)
        box, s = _organ(rng, shape, v_center, v_radii, 0.15)
        _paint(image, box, soft(s, float(v_radii.min())), tissue["csf"])

    # Confounders: white-matter hyperintensities (oedema-like) and enhancing vessels (core-like).
    for _ in range(int(rng.integers(4, 10))):
        w_center = _point_in(rng, center, radii, 0.55)
        w_radii = float(rng.uniform(2.0, 7.0)) * scale * rng.uniform(0.7, 1.3, 3)
        box, s = _organ(rng, shape, w_center, w_radii, 0.35)
        _paint(image, box, soft(s, float(w_radii.min())), tissue["wmh"])
    for _ in range(int(rng.integers(3, 6))):
        point = _point_in(rng, center, radii, 0.8)
        step = unit_ball(rng)
        step = step / max(float(np.abs(step).max()), 1e-3)
        radius = float(rng.uniform(0.9, 1.5)) * scale
        for _ in range(int(rng.integers(6, 14))):
            box, s = _organ(rng, shape, point, np.full(3, radius), 0.1)
            _paint(image, box, soft(s, radius), tissue["vessel"])
            point = point + step * radius * 1.2

    label = np.zeros(shape, dtype=np.uint8)
    if lesions not in LESION_SETS:
        raise ValueError(f"lesions: must be one of {', '.join(LESION_SETS)}, got {lesions!r}")
    if not empty and lesions == "small":
        for where, radius in small_lesions(rng, center, radii):
            _lesion(rng, image, label, tissue, shape, where, radius / 1.25, True)  # the rim is 1.25x the core
    elif not empty:
        mixed = [(float(rng.uniform(3.0, 10.0)) * scale, False) for _ in range(int(rng.integers(1, 4)))]
        if rng.random() < 0.5:
            mixed += [(float(rng.uniform(2.0, 4.0)) * scale, True) for _ in range(int(rng.integers(1, 4)))]
        for radius, small in mixed:
            where = _point_in(rng, center, radii, 0.75 if small else 0.6)
            _lesion(rng, image, label, tissue, shape, where, radius, small)

    modulation = np.empty(shape, dtype=np.float32)
    for c in range(4):
        # A bias field of its own per modality: no fixed intensity ratio between channels.
        modulation[...] = smooth_field(rng, shape, (2, 2, 2))
        modulation *= np.float32(rng.uniform(0.2, 0.3))
        modulation += np.float32(1.0)
        fine = smooth_field(rng, shape, (16, 16, 12))
        fine *= np.float32(0.05)
        fine += np.float32(1.0)
        modulation *= fine
        channel = image[c]
        channel *= modulation
        amplitude = BRATS_MODALITY_SCALE[c] * float(rng.uniform(0.8, 1.25))
        channel *= np.float32(amplitude)
        inside = rician(rng, channel[brain], 0.04 * amplitude)
        channel[...] = 0.0
        channel[brain] = inside
    label[~brain] = 0
    return PhantomCase(
        case_id=case_id or f"brats-hard-{seed}",
        image=image,
        label=label if regions else (label > 0).view(np.uint8),
        affine=spacing_affine(spacing),
        modalities=BRATS_MODALITIES,
    )


LESION_SETS: tuple[str, ...] = ("mixed", "small")


def small_lesions(
    rng: np.random.Generator, center: np.ndarray, radii: np.ndarray, min_gap: float = 12.0
) -> list[tuple[np.ndarray, float]]:
    """1-6 nodule centres inside the brain ellipsoid and their radii (1.5-5 voxels).

    Centres are at least ``min_gap`` voxels apart (isolated components); half of the cases put
    one nodule far (>= 3 * ``min_gap``) from every other, where no other lesion hints at it.
    """
    out: list[tuple[np.ndarray, float]] = []
    far = rng.random() < 0.5
    for k in range(int(rng.integers(1, 7))):
        gap = 3 * min_gap if far and k == 1 else min_gap
        for _ in range(200):
            where = _point_in(rng, center, radii, 0.7)
            if all(np.linalg.norm(where - c) >= gap for c, _ in out):
                out.append((where, float(rng.uniform(1.5, 5.0))))
                break
    return out


def _lesion(rng, image, label, tissue, shape, center, radius: float, small: bool) -> None:
    """Paint one lesion (oedema around an enhancing core, maybe necrotic) and add it to ``label``
    with the BraTS values: oedema 2, enhancing core 4, necrosis 1 (inner parts win).

    A small (satellite) lesion is an enhancing nodule with a thin oedema rim.
    """
    radii = radius * rng.uniform(0.75, 1.25, 3)
    edema_factor = 1.25 if small else float(rng.uniform(1.1, 1.6))
    box, origin = sub_box(shape, center, np.full(3, 1.4 * edema_factor * radius + 2.0))
    edema_s = blob(rng, box, origin, center, edema_factor * radii, 0.2 if small else 0.4, cells=3 if small else 5)
    core_ratio = float(rng.uniform(0.6, 0.8)) if small else float(rng.uniform(0.35, 0.65))
    core_center = center + rng.uniform(-0.15, 0.15, 3) * radius
    core_s = blob(rng, box, origin, core_center, core_ratio * radii, 0.3, cells=4)
    edema = soft(edema_s, edema_factor * radius)
    core = soft(core_s, core_ratio * radius)
    _paint(image, box, edema, tissue["edema"])
    _paint(image, box, core, tissue["core"])
    values = np.where(core_s > 0, np.uint8(4), np.where(edema_s > 0, np.uint8(2), np.uint8(0)))
    if not small and rng.random() < 0.6:
        necrotic_s = blob(rng, box, origin, core_center, 0.55 * core_ratio * radii, 0.2)
        _paint(image, box, soft(necrotic_s, 0.55 * core_ratio * radius), tissue["necrosis"])
        values[necrotic_s > 0] = 1
    target = label[box]
    # Overlapping lesions: an inner sub-region (necrosis, then enhancing core) wins over oedema.
    rank = np.array([0, 3, 1, 0, 2], dtype=np.uint8)
    np.copyto(target, values, where=rank[values] > rank[target])


# --------------------------------------------------------------------------- head with skull


def head_hard(
    shape: tuple[int, int, int] = (64, 72, 80),
    seed: int = 0,
    empty: bool = False,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    case_id: str | None = None,
) -> PhantomCase:
    """A T1-weighted whole head (scalp, skull, face, neck) for skull stripping.

    Axes are (X, Y, Z) = (left-right, posterior-anterior, inferior-superior).

    Args:
        shape: (X, Y, Z) grid.
        seed: seed of ``np.random.default_rng``.
        empty: no brain label (the image is unchanged): a field-of-view miss.
        spacing: voxel size in mm.
        case_id: defaults to ``"head-hard-<seed>"``.

    Returns:
        ``image`` (1, X, Y, Z) float32 (Rician background), ``label`` (X, Y, Z) uint8: the brain.
    """
    shape = check_shape(shape)
    rng = np.random.default_rng(seed)
    dims = np.asarray(shape, dtype=np.float64)
    t = {name: float(v) * float(rng.uniform(0.95, 1.05)) for name, v in _HEAD.items()}
    image = np.zeros((1,) + shape, dtype=np.float32)
    head = image[0]

    # Neck and face first: the cranium is painted over them.
    neck_center = dims * np.array([0.5, 0.45, 0.08]) + rng.uniform(-0.02, 0.02, 3) * dims
    neck_radii = dims * np.array([0.38, 0.34, 0.3]) * rng.uniform(0.9, 1.1, 3)
    face_center = dims * np.array([0.5, 0.57, 0.34]) + rng.uniform(-0.02, 0.02, 3) * dims
    face_radii = dims * np.array([0.36, 0.38, 0.2]) * rng.uniform(0.9, 1.1, 3)
    marbling = smooth_field(rng, shape, (8, 8, 8))  # fat streaks in the soft tissue
    for c, r in ((neck_center, neck_radii), (face_center, face_radii)):
        box, s = _organ(rng, shape, c, r, 0.08)
        mix(head[box], t["skin"], soft(s, float(r.min())))
        inner = soft(s - np.float32(0.12), float(r.min()))
        mix(head[box], t["muscle"], inner)
        fat = np.clip((marbling[box] - np.float32(0.1)) * np.float32(10.0), 0.0, 1.0) * inner
        mix(head[box], t["fat"], fat)
    del marbling
    airway_center = face_center + dims * np.array([0.0, 0.0, -0.02])
    for c, r, value in (
        (airway_center, dims * np.array([0.06, 0.1, 0.08]), t["air"]),
        (neck_center + dims * np.array([0.0, 0.12, 0.05]), dims * np.array([0.04, 0.04, 0.2]), t["air"]),
        (neck_center + dims * np.array([0.0, -0.08, 0.0]), dims * np.array([0.06, 0.06, 0.25]), t["marrow"]),
        (neck_center + dims * np.array([0.0, -0.02, 0.08]), dims * np.array([0.035, 0.035, 0.2]), t["cord"]),
    ):
        box, s = _organ(rng, shape, c, r * rng.uniform(0.85, 1.15, 3), 0.1)
        mix(head[box], value, soft(s, float(r.min())))
    for side in (-1.0, 1.0):  # the mandible's marrow
        c = face_center + dims * np.array([side * 0.2, 0.05, -0.08])
        r = dims * np.array([0.04, 0.14, 0.05])
        box, s = _organ(rng, shape, c, r, 0.15)
        mix(head[box], t["marrow"], soft(s, float(r.min())))

    # Cranium: nested layers sharing one perturbation, so they never cross.
    center = dims * np.array([0.5, 0.47, 0.65]) + rng.uniform(-0.02, 0.02, 3) * dims
    radii = dims * np.array([0.4, 0.44, 0.3]) * rng.uniform(0.93, 1.0, 3)
    perturb = smooth_field(rng, shape, (4, 4, 4))
    perturb *= np.float32(0.03)
    perturb += np.float32(1.0)
    perturb *= perturb
    q = ellipsoid_q(shape, center, radii)
    r_min = float(radii.min())

    def layer(fraction: float) -> np.ndarray:
        return perturb - q / np.float32(fraction * fraction)  # noqa: F821 - called before the del below

    thickness = rng.uniform(1.1, 1.4)
    scalp = layer(1.0)
    mix(head, t["skin"], soft(scalp, r_min))
    mix(head, t["fat"], soft(layer(1.0 - 0.02 * thickness), r_min))
    mix(head, t["muscle"], soft(layer(1.0 - 0.05 * thickness), r_min))  # galea and muscle
    mix(head, t["bone"], soft(layer(1.0 - 0.065 * thickness), r_min))
    mix(head, t["marrow"], soft(layer(1.0 - 0.08 * thickness), r_min))
    mix(head, t["bone"], soft(layer(1.0 - 0.105 * thickness), r_min))
    mix(head, t["csf"], soft(layer(1.0 - 0.12 * thickness), r_min))
    brain_s = layer(1.0 - 0.14 * thickness)
    del scalp, q, perturb
    for side in (-1.0, 1.0):  # temporalis muscles on the skull's sides
        c = center + dims * np.array([side * 0.38, 0.04, -0.08])
        r = dims * np.array([0.07, 0.2, 0.16]) * rng.uniform(0.85, 1.15, 3)
        box, s = _organ(rng, shape, c, r, 0.15)
        mix(head[box], t["muscle"], soft(s, float(r.min())) * (brain_s[box] < -0.05))

    # The brain: grey/white texture, a cortex-like ribbon, dark ventricles.
    brain = soft(brain_s, r_min)
    tissue = cortex_ribbon(rng, shape, -brain_s, gain=2.5, offset=-1.4)
    tissue *= np.float32(t["gm"] - t["wm"])
    tissue += np.float32(t["wm"])
    head += (tissue - head) * brain
    del tissue
    for side in (-1.0, 1.0):
        v_center = center + np.array([side * 0.06, 0.0, 0.03]) * dims
        v_radii = dims * np.array([0.045, 0.14, 0.06]) * rng.uniform(0.8, 1.2, 3)
        box, s = _organ(rng, shape, v_center, v_radii, 0.15)
        mix(head[box], t["csf"], soft(s, float(v_radii.min())) * brain[box])
    for side in (-1.0, 1.0):  # eyes in orbital fat, below the frontal lobes
        c = center + dims * np.array([side * 0.15, 0.36, -0.22])
        for value, r in ((t["fat"], 0.085), (t["vitreous"], 0.055)):
            rr = np.full(3, r) * dims * rng.uniform(0.9, 1.1, 3)
            box, s = _organ(rng, shape, c, rr, 0.05)
            mix(head[box], value, soft(s, float(rr.min())) * (brain_s[box] < 0))

    bias = smooth_field(rng, shape, (2, 2, 2))
    bias *= np.float32(rng.uniform(0.15, 0.25))
    bias += np.float32(1.0)
    head *= bias
    del bias
    amplitude = 1000.0 * float(rng.uniform(0.8, 1.25))
    head *= np.float32(amplitude)
    head[...] = rician(rng, head.ravel(), 0.035 * amplitude).reshape(shape)
    label = np.zeros(shape, dtype=bool) if empty else brain_s > 0
    return PhantomCase(
        case_id=case_id or f"head-hard-{seed}",
        image=image,
        label=label.view(np.uint8),
        affine=spacing_affine(spacing),
        modalities=("t1",),
    )


# --------------------------------------------------------------------------- LiTS-like


def lits_hard(
    shape: tuple[int, int, int] = (64, 64, 64),
    seed: int = 0,
    empty: bool = False,
    spacing: tuple[float, float, float] = (0.8, 0.8, 1.5),
    case_id: str | None = None,
    classes: bool = False,
) -> PhantomCase:
    """A CT-like abdomen whose liver shares its HU with spleen, kidneys and muscle.

    Args:
        shape: (X, Y, Z) grid; X, Y axial, Z cranio-caudal.
        seed: seed of ``np.random.default_rng``.
        empty: no liver (empty label).
        spacing: voxel size in mm.
        case_id: defaults to ``"lits-hard-<seed>"``.
        classes: label the tumours 2 and the rest of the liver 1 (the LiTS convention,
            ``ossnet.targets`` "lits-classes"); the image is the same.

    Returns:
        ``image`` (1, X, Y, Z) float32 in HU, ``label`` (X, Y, Z) uint8: liver and tumours as 1,
        or 1 and 2 with ``classes``.
    """
    shape = check_shape(shape)
    rng = np.random.default_rng(seed)
    dims = np.asarray(shape, dtype=np.float64)
    hu = {name: v + float(rng.uniform(-4.0, 4.0)) if abs(v) < 200 else v for name, v in _CT.items()}
    image = np.full(shape, hu["air"], dtype=np.float32)

    # The body is an elliptic cylinder along Z: skin and fat, a thick muscular wall, visceral fat.
    c = dims / 2 + np.array([0.0, 0.03, 0.0]) * dims
    body_radii = dims * np.array([0.46, 0.37, 50.0]) * np.append(rng.uniform(0.92, 1.0, 2), 1.0)
    perturb = smooth_field(rng, shape, (3, 3, 2))
    perturb *= np.float32(0.04)
    perturb += np.float32(1.0)
    perturb *= perturb
    q = ellipsoid_q(shape, c, body_radii)
    r_body = float(body_radii[:2].min())
    wall = rng.uniform(0.9, 1.2)
    for value, fraction in ((hu["fat"], 1.0), (hu["muscle"], 1.0 - 0.1 * wall), (hu["visceral_fat"], 1.0 - 0.17 * wall)):
        mix(image, value, soft(perturb - q / np.float32(fraction * fraction), r_body))
    del perturb, q
    texture = smooth_field(rng, shape, (8, 8, 6))

    def organ(value: float, center, radii, amplitude: float, cells: int = 3, grain: float = 6.0):
        box, s = _organ(rng, shape, center, radii, amplitude, cells)
        weight = soft(s, float(np.min(radii)))
        mix(image[box], value, weight)
        image[box] += np.float32(grain) * texture[box] * weight  # noqa: F821 - called before the del below
        return box, s

    for side in (-1.0, 1.0):
        organ(hu["muscle"], c + dims * np.array([side * 0.1, 0.25, 0.0]), dims * np.array([0.08, 0.07, 50.0]), 0.1)
        organ(hu["muscle"], c + dims * np.array([side * 0.075, 0.13, 0.0]), dims * np.array([0.04, 0.04, 50.0]), 0.15)
    organ(hu["cortical_bone"], c + dims * np.array([0.0, 0.19, 0.0]), dims * np.array([0.06, 0.055, 50.0]), 0.05)
    organ(hu["bone"], c + dims * np.array([0.0, 0.19, 0.0]), dims * np.array([0.048, 0.044, 50.0]), 0.05)
    organ(hu["vessel"], c + dims * np.array([-0.03, 0.11, 0.0]), dims * np.array([0.025, 0.025, 50.0]), 0.05)
    organ(hu["vessel"], c + dims * np.array([0.045, 0.09, 0.0]), dims * np.array([0.03, 0.022, 50.0]), 0.05)
    for side in (-1.0, 1.0):  # kidneys with their sinus fat
        k_center = c + dims * np.array([side * 0.16, 0.16, -0.08]) + rng.uniform(-0.02, 0.02, 3) * dims
        k_radii = dims * np.array([0.055, 0.07, 0.12]) * rng.uniform(0.85, 1.15, 3)
        organ(hu["kidney"], k_center, k_radii, 0.1)
        organ(hu["sinus"], k_center + dims * np.array([-side * 0.02, 0.0, 0.0]), 0.4 * k_radii, 0.2)
    s_center = c + dims * np.array([0.25, 0.07, 0.08]) + rng.uniform(-0.03, 0.03, 3) * dims
    organ(hu["spleen"], s_center, dims * np.array([0.08, 0.1, 0.14]) * rng.uniform(0.85, 1.2, 3), 0.2)
    st_center = c + dims * np.array([0.12, -0.14, 0.16]) + rng.uniform(-0.03, 0.03, 3) * dims
    st_radii = dims * np.array([0.11, 0.08, 0.1]) * rng.uniform(0.85, 1.15, 3)
    organ(hu["bowel"], st_center, st_radii, 0.15)
    organ(hu["stomach"], st_center, 0.8 * st_radii, 0.15)
    organ(hu["gas"], st_center + dims * np.array([0.0, -0.05, 0.03]), 0.45 * st_radii, 0.2, grain=0.0)
    for _ in range(int(rng.integers(5, 11))):  # bowel loops, some with gas
        b_center = c + dims * np.array([rng.uniform(-0.2, 0.2), rng.uniform(-0.25, 0.05), rng.uniform(-0.5, 0.1)])
        b_radii = dims * float(rng.uniform(0.03, 0.06)) * rng.uniform(0.7, 1.3, 3)
        organ(hu["bowel"], b_center, b_radii, 0.25)
        if rng.random() < 0.4:
            organ(hu["gas"], b_center, 0.5 * b_radii, 0.2, grain=0.0)

    liver_center = c + dims * np.array([-0.17, -0.02, 0.05]) + rng.uniform(-0.03, 0.03, 3) * dims
    liver_radii = dims * np.array([0.2, 0.2, 0.27]) * rng.uniform(0.85, 1.1, 3)
    liver_box, liver_s = _organ(rng, shape, liver_center, liver_radii, 0.25, cells=4)
    label = np.zeros(shape, dtype=bool)
    tumours = np.zeros(shape, dtype=bool)
    if not empty:
        origin = tuple(s.start for s in liver_box)
        liver = soft(liver_s, float(liver_radii.min()))
        sub = mix(image[liver_box], hu["liver"], liver)
        sub += np.float32(6.0) * texture[liver_box] * liver
        r_liver = float(liver_radii.min())
        for _ in range(int(rng.integers(2, 5))):  # portal and hepatic veins: bead chains
            point = _point_in(rng, liver_center, liver_radii, 0.6)
            step = unit_ball(rng)
            step = step / max(float(np.abs(step).max()), 1e-3)
            radius = r_liver * float(rng.uniform(0.05, 0.09))
            for _ in range(int(rng.integers(4, 9))):
                v = soft(blob(rng, liver_box, origin, point, np.full(3, radius), 0.1), radius)
                mix(sub, hu["vessel"], v * liver)
                point = point + step * radius * 1.3
        for _ in range(int(rng.integers(0, 4))):
            t_center = _point_in(rng, liver_center, liver_radii, 0.6)
            t_radii = r_liver * rng.uniform(0.08, 0.3) * rng.uniform(0.8, 1.2, 3)
            t_s = blob(rng, liver_box, origin, t_center, t_radii, 0.3)
            mix(sub, hu["tumour"], soft(t_s, float(t_radii.min())) * liver)
            tumours[liver_box] |= t_s > 0
        label[liver_box] = liver_s > 0
        # The gallbladder sits in the liver's fossa but is not liver.
        gb_center = liver_center + liver_radii * np.array([0.3, -0.55, -0.6])
        gb_box, gb_s = organ(hu["bile"], gb_center, dims * np.array([0.035, 0.035, 0.06]), 0.1, grain=0.0)
        label[gb_box] &= gb_s <= 0
    del texture
    image += np.float32(rng.uniform(14.0, 20.0)) * rng.standard_normal(shape, dtype=np.float32)
    return PhantomCase(
        case_id=case_id or f"lits-hard-{seed}",
        image=image[None],
        label=(label.view(np.uint8) + (label & tumours)) if classes else label.view(np.uint8),
        affine=spacing_affine(spacing),
        modalities=("ct",),
    )


__all__ = ["BRATS_HARD_REFERENCE", "LESION_SETS", "brats_hard", "head_hard", "lits_hard", "small_lesions"]

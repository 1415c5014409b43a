"""Synthetic archives on disk: seeded phantoms written in the layouts users bring.

The quickstart, the tests and the benchmarks need real NIfTI files to exercise ingestion and
batch inference without downloading anything; these writers produce them from
``ossnet.phantoms`` cases.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ossnet.phantoms import BRATS_MODALITIES, PhantomCase


def write_brats_archive(cases: Sequence[PhantomCase], folder: str | Path, dtype: Any = np.int16,
                        with_labels: bool = True) -> Path:
    """Write cases as a BraTS 2020 archive: ``<folder>/<id>/<id>_<modality>.nii.gz`` + ``_seg``.

    Args:
        cases: phantoms (``image`` (C, X, Y, Z) raw intensities, ``label`` (X, Y, Z)).
        folder: archive root (created).
        dtype: on-disk image dtype (BraTS ships int16).
        with_labels: also write ``<id>_seg.nii.gz``.

    Returns:
        ``folder``.
    """
    import nibabel as nib

    for case in cases:
        case_dir = Path(folder) / case.case_id
        case_dir.mkdir(parents=True, exist_ok=True)
        for c, mod in enumerate(case.modalities):
            data = np.rint(case.image[c]).astype(dtype) if np.issubdtype(dtype, np.integer) else case.image[c].astype(dtype)
            nib.save(nib.Nifti1Image(data, case.affine), str(case_dir / f"{case.case_id}_{mod}.nii.gz"))
        if with_labels:
            nib.save(nib.Nifti1Image(case.label.astype(np.uint8), case.affine),
                     str(case_dir / f"{case.case_id}_seg.nii.gz"))
    return Path(folder)


def write_generic_archive(cases: Sequence[PhantomCase], folder: str | Path, with_labels: bool = True) -> Path:
    """Write cases in the generic layout: ``<folder>/images/<id>.nii.gz`` (one channel) or
    ``<id>_0000.nii.gz``, ``<id>_0001.nii.gz``... (several), and ``<folder>/labels/<id>.nii.gz``.

    Images are written as float32 (CT in HU and MR intensities alike). Returns ``folder``.
    """
    import nibabel as nib

    images, labels = Path(folder) / "images", Path(folder) / "labels"
    images.mkdir(parents=True, exist_ok=True)
    for case in cases:
        n = case.image.shape[0]
        for c in range(n):
            name = f"{case.case_id}.nii.gz" if n == 1 else f"{case.case_id}_{c:04d}.nii.gz"
            nib.save(nib.Nifti1Image(case.image[c].astype(np.float32), case.affine), str(images / name))
        if with_labels:
            labels.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(case.label.astype(np.uint8), case.affine), str(labels / f"{case.case_id}.nii.gz"))
    return Path(folder)


def ellipsoid_scan(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """A single-channel scan: noisy background, a brighter off-centre ellipsoid, and a zero
    border two slices deep along the first axis (what the nonzero z-score mask leaves out).

    Returns:
        ``(X, Y, Z)`` float32 intensities.
    """
    rng = np.random.default_rng(seed)
    g = np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij")
    inside = ((g[0] - 0.2) / 0.5) ** 2 + (g[1] / 0.4) ** 2 + (g[2] / 0.6) ** 2 < 1
    x = rng.normal(300.0, 30.0, size=shape) + 250.0 * inside
    x[:2] = 0.0
    return x.astype(np.float32)


def write_case_store(
    root: str | Path,
    cases: Sequence[PhantomCase],
    *,
    preset: str = "tiny",
    splits: Mapping[str, str] | None = None,
    val_fraction: float = 0.25,
    test_fraction: float = 0.0,
    volume_shape: tuple[int, int, int] | None = None,
) -> str:
    """Phantom cases written as a BraTS-style archive under ``root`` and ingested into a store.

    Args:
        root: folder for ``archive/`` and ``store.zarr``.
        cases: the cases (any phantom kind: the archive's modalities are the cases' own).
        preset: model grid preset of the store.
        splits: case id -> "train" / "val" (written as a split file); default a seeded split
            with ``val_fraction``.
        val_fraction: validation fraction of the seeded split.
        test_fraction: test fraction of the seeded split (the promotion evidence).
        volume_shape: override of the preset's grid.

    Returns:
        The store path, ``<root>/store.zarr``.

    Raises:
        RuntimeError: a case did not ingest (the ingestion table is in the message).
    """
    import json

    from ossnet_pipelines.ingest import IngestJob, ingest

    root = Path(root)
    split_file = None
    if splits is not None:
        root.mkdir(parents=True, exist_ok=True)
        split_file = root / "splits.json"
        split_file.write_text(json.dumps(dict(splits)))
    url = str(root / "store.zarr")
    layout = "brats" if tuple(cases[0].modalities) == BRATS_MODALITIES else "generic"
    source = write_brats_archive(cases, root / "archive") if layout == "brats" else write_generic_archive(
        cases, root / "archive")
    report = ingest(IngestJob(source=str(source), store=url, layout=layout, preset=preset,
                              volume_shape=volume_shape, val_fraction=val_fraction, test_fraction=test_fraction,
                              split_file=None if split_file is None else str(split_file), executor="serial"))
    if not report.ok:
        raise RuntimeError(f"phantom store {url}: ingestion failed\n{report.table()}")
    return url


def write_phantom_store(
    root: str | Path,
    seeds: Sequence[int],
    *,
    source_shape: tuple[int, int, int] = (37, 41, 29),
    preset: str = "tiny",
    val_fraction: float = 0.25,
    test_fraction: float = 0.0,
) -> str:
    """The small stores of the tests: one easy BraTS-like phantom per seed (id ``brats-<seed>``),
    ingested serially onto ``preset``'s grid with a seeded train/val split (``write_case_store``)."""
    from ossnet.phantoms import brats_like

    cases = [brats_like(source_shape, seed=int(s), case_id=f"brats-{int(s)}") for s in seeds]
    return write_case_store(root, cases, preset=preset, val_fraction=val_fraction, test_fraction=test_fraction)


__all__ = ["ellipsoid_scan", "write_brats_archive", "write_case_store", "write_generic_archive", "write_phantom_store"]

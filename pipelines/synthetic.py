"""Synthetic archives on disk: seeded phantoms written in the layouts users bring.

The quickstart, the tests and the benchmarks need real NIfTI files to exercise ingestion and
batch inference without downloading anything; these writers produce them from
``ossnet.phantoms`` cases.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ossnet.phantoms import PhantomCase


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


def write_phantom_store(
    root: str | Path,
    seeds: Sequence[int],
    *,
    source_shape: tuple[int, int, int] = (37, 41, 29),
    preset: str = "tiny",
    val_fraction: float = 0.25,
) -> str:
    """BraTS-like phantoms written as an archive under ``root`` and ingested into a store.

    The small stores of the tests: one case per seed (id ``brats-<seed>``), ingested serially
    onto ``preset``'s grid with a seeded train/val split.

    Returns:
        The store path, ``<root>/store.zarr``.

    Raises:
        RuntimeError: a case did not ingest (the ingestion table is in the message).
    """
    from ossnet.phantoms import brats_like
    from pipelines.ingest import IngestJob, ingest

    cases = [brats_like(source_shape, seed=int(s), case_id=f"brats-{int(s)}") for s in seeds]
    url = str(Path(root) / "store.zarr")
    report = ingest(IngestJob(source=str(write_brats_archive(cases, Path(root) / "archive")), store=url,
                              preset=preset, val_fraction=val_fraction, executor="serial"))
    if not report.ok:
        raise RuntimeError(f"phantom store {url}: ingestion failed\n{report.table()}")
    return url


__all__ = ["ellipsoid_scan", "write_brats_archive", "write_phantom_store"]

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


__all__ = ["write_brats_archive"]

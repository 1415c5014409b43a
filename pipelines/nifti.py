"""NIfTI input and output: local or fsspec files, checked headers, lazy chunked reads, streamed writes.

Every reader of scans (ingest, batch inference, benchmarks) goes through this module; every
problem becomes a one-line ``NiftiError`` naming the file.

Reading. ``lazy_volume`` wraps a file's voxel data in a dask array of slabs along the last axis
(the slowest axis of NIfTI's Fortran order, so a slab is one contiguous run of the file):

* ``.nii`` is read slab by slab through the header's offset (random access, no full read);
* ``.nii.gz`` has no random access: every slab would decompress the file from its start, and
  the transform reads each file more than once (statistics, then the grid). A file whose voxels
  take at most ``IN_MEMORY_BYTES`` is decompressed once into memory (a BraTS channel: 18 MB);
  a larger one is decompressed once, in file order and in bounded memory, to a temporary
  ``.nii`` (``seekable``; disk space: the uncompressed size; measured in ``ossnet_bench.ingest``).

Writing. ``write_volume`` streams a (dask or NumPy) volume slab by slab into a gzip stream
behind a NIfTI-1 header, in a temporary file moved into place when complete, so the writer
never holds the whole scan and a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import os
import shutil
import tempfile
import uuid
from typing import Any, BinaryIO, Iterator, Mapping, Sequence

import nibabel as nib
import numpy as np

from ossnet.geometry import voxel_spacing
from ossnet.preprocess import validate_spatial_shape
from ossnet_pipelines.files import atomic_write

logger = logging.getLogger(__name__)

SLAB_BYTES = 32 << 20
"""Target size of one read slab (and one written slab): bounds what a reader thread holds."""
IN_MEMORY_BYTES = 256 << 20
"""A ``.nii.gz`` whose voxels fit this is read whole into memory instead of through a temporary
``.nii`` (small files: the temporary file's disk traffic would cost more than the memory)."""


class NiftiError(ValueError):
    """A file cannot be read or does not fit its case; the one-line message names the file."""


def one_line(text: Any) -> str:
    """Collapse whitespace (newlines from nibabel or zarr messages) into one line."""
    return " ".join(str(text).split())


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a local file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load(path: str, shown: str | None = None) -> Any:
    """The NIfTI image at a local ``path`` (header read, voxels not); ``shown`` names it in errors."""
    shown = shown or path
    try:
        return nib.load(path)
    except Exception as exc:  # nibabel raises many types for corrupt headers
        raise NiftiError(f"{shown}: cannot read NIfTI header ({type(exc).__name__}: {one_line(exc)})") from exc


def read(img: Any, shown: str, dtype: Any = None) -> np.ndarray:
    """All voxel data in memory, scaled as the header says, squeezed to 3D.

    With ``dtype`` (float32 for images) nibabel scales directly in that dtype and the result is
    a private, writable array; without it the on-disk dtype is kept (labels).
    """
    try:
        data = np.asarray(img.dataobj, dtype=dtype) if dtype is not None else np.asanyarray(img.dataobj)
    except Exception as exc:  # EOFError / zlib.error / OSError for truncated .nii.gz
        raise NiftiError(f"{shown}: cannot read voxel data, truncated or corrupt file "
                         f"({type(exc).__name__}: {one_line(exc)})") from exc
    if dtype is not None and (isinstance(data, np.memmap) or not data.flags.writeable):
        data = np.array(data)  # a float32 .nii maps the file: copy before normalising in place
    return np.asarray(data).reshape(validate_spatial_shape(data.shape, shown))


def header_codes(img: Any) -> tuple[int, int]:
    """The image's ``(sform_code, qform_code)``, so outputs sit exactly over the scan in viewers."""
    return int(img.header["sform_code"]), int(img.header["qform_code"])


def check_case(imgs: Mapping[str, Any], names: Mapping[str, str], affine_atol: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """Check that a case's files describe one voxel grid; return its shape and affine.

    Args:
        imgs: key -> loaded image, the reference (first image) first.
        names: key -> the path shown in errors.
        affine_atol: largest difference (mm) tolerated between the files' affines.

    Raises:
        NiftiError: a 2D/4D image, differing shapes or affines, or a degenerate, non-finite or
            sheared affine (rotated, oblique grids are accepted: the voxel grid is kept).
    """
    keys = list(imgs)
    first = keys[0]
    shape = validate_spatial_shape(imgs[first].shape, names[first])
    affine = np.asarray(imgs[first].affine, dtype=np.float64)
    try:
        voxel_spacing(affine, names[first])
    except ValueError as exc:
        raise NiftiError(str(exc)) from None
    for key in keys[1:]:
        check_same_grid(imgs[key], names[key], "label" if key == "label" else "image", shape, affine, names[first],
                        affine_atol)
    return shape, affine


def check_same_grid(img: Any, name: str, kind: str, shape: Sequence[int], affine: Any, reference: str,
                    affine_atol: float) -> None:
    """Check that ``img`` (the ``kind`` file ``name``) lies on the reference grid ``shape``/``affine``
    of the file ``reference``, within ``affine_atol`` mm.

    Raises:
        NiftiError: a 2D/4D image, another shape, or an affine further than ``affine_atol`` away.
    """
    other = validate_spatial_shape(img.shape, name)
    if other != tuple(shape):
        raise NiftiError(f"{name}: {kind} shape {other} != {reference} shape {tuple(shape)}")
    diff = float(np.abs(np.asarray(img.affine) - np.asarray(affine)).max())
    if not np.isfinite(diff) or diff > affine_atol:
        raise NiftiError(f"{name}: affine differs from {reference} (max difference {diff:.4g})")


# --------------------------------------------------------------------------------------------
# Lazy reads
# --------------------------------------------------------------------------------------------


class _SlabReader:
    """Array-like over an image's voxels for ``dask.array.from_array``: reads one slab per call,
    scales and casts it, and turns read errors into ``NiftiError`` naming the file.

    It pickles as its file path, so a graph can run on other processes (``scheduler="ray"``);
    they reopen the file, which must be visible to them.
    """

    def __init__(self, img: Any, shown: str, dtype: Any) -> None:
        self._path = img.get_filename()
        self._proxy: Any = img.dataobj
        self._shown = shown
        self.shape = validate_spatial_shape(img.shape, shown)
        self._extra_axes = len(img.shape) - 3
        if dtype is None:  # the stored dtype, unless the header scales it (then float64, as nibabel)
            slope, inter = getattr(img.dataobj, "slope", 1.0), getattr(img.dataobj, "inter", 0.0)
            scaled = (slope is not None and slope != 1) or (inter is not None and inter != 0)
            dtype = np.float64 if scaled else img.get_data_dtype()
        self.dtype = np.dtype(dtype)
        self.ndim = 3

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_proxy": None}

    def __getitem__(self, index: Any) -> np.ndarray:
        if self._proxy is None:
            self._proxy = load(self._path, self._shown).dataobj
        index = tuple(index) + (0,) * self._extra_axes  # (X, Y, Z, 1) files: the trailing axis
        try:
            block = np.asarray(self._proxy[index])
        except Exception as exc:
            raise NiftiError(f"{self._shown}: cannot read voxel data, truncated or corrupt file "
                             f"({type(exc).__name__}: {one_line(exc)})") from exc
        return block.astype(self.dtype, copy=False)


def slab_chunks(shape: Sequence[int], itemsize: int, slab_bytes: int | None = None) -> tuple[int, int, int]:
    """Chunks of whole ``(X, Y)`` planes, as many along Z as fit ``slab_bytes`` (``SLAB_BYTES``)."""
    slab_bytes = SLAB_BYTES if slab_bytes is None else slab_bytes
    plane = int(shape[0]) * int(shape[1]) * itemsize
    return int(shape[0]), int(shape[1]), max(1, min(int(shape[2]), slab_bytes // max(plane, 1)))


def _data_bytes(img: Any) -> int:
    return int(np.prod(img.shape, dtype=np.int64)) * np.dtype(img.get_data_dtype()).itemsize


def lazy_volume(img: Any, shown: str, dtype: Any = np.float32) -> Any:
    """The image's voxels as a lazy dask array ``(X, Y, Z)`` of z-slabs, cast to ``dtype``
    (``None``: the on-disk dtype). A ``.nii`` is read slab by slab when the array is computed;
    a (small, see ``seekable``) ``.nii.gz`` is read whole, once, now."""
    import dask.array as da

    reader = _SlabReader(img, shown, dtype)
    chunks = slab_chunks(reader.shape, reader.dtype.itemsize)
    if str(img.get_filename()).endswith(".gz"):
        return da.from_array(read(img, shown, reader.dtype), chunks=chunks)
    return da.from_array(reader, chunks=chunks, asarray=False, name=f"nifti-{uuid.uuid4().hex[:12]}")


@contextlib.contextmanager
def seekable(path: str, shown: str) -> Iterator[str]:
    """A path ``lazy_volume`` reads efficiently: a ``.nii`` or a small ``.nii.gz`` itself, a
    large ``.nii.gz`` as a temporary ``.nii`` decompressed once in file order (removed on exit)."""
    if not path.endswith(".gz") or _data_bytes(load(path, shown)) <= IN_MEMORY_BYTES:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="ossnet-gunzip-") as tmp:
        out = os.path.join(tmp, os.path.basename(path)[: -len(".gz")])
        try:
            with gzip.open(path, "rb") as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
        except Exception as exc:
            raise NiftiError(f"{shown}: cannot read voxel data, truncated or corrupt file "
                             f"({type(exc).__name__}: {one_line(exc)})") from exc
        yield out


# --------------------------------------------------------------------------------------------
# Streamed, atomic writes
# --------------------------------------------------------------------------------------------


def nifti_header(shape: Sequence[int], dtype: Any, affine: Any, sform_code: int = 1, qform_code: int = 1) -> Any:
    """A NIfTI-1 header for a single-file image of ``shape`` and ``dtype`` placed by ``affine``."""
    header = nib.Nifti1Header()
    header.set_data_shape(tuple(int(s) for s in shape))
    header.set_data_dtype(np.dtype(dtype))
    affine = np.asarray(affine, dtype=np.float64)
    header.set_sform(affine, code=int(sform_code))
    header.set_qform(affine, code=int(qform_code))
    header.set_xyzt_units("mm", "sec")
    header["vox_offset"] = 352  # 348-byte header + 4-byte extension flag
    return header


def write_volume(
    url: str,
    volume: Any,
    affine: Any,
    *,
    dtype: Any = None,
    sform_code: int = 1,
    qform_code: int = 1,
    compress: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> int:
    """Write ``volume`` ``(X, Y, Z)`` (NumPy or dask) as a NIfTI-1 file, slab by slab, atomically.

    Only one z-slab is computed and held at a time, so writing a scan-sized output needs memory
    for a slab, not for the scan. ``dtype`` defaults to the volume's.

    Returns:
        The number of nonzero voxels written (a mask's foreground), counted slab by slab so that
        a lazy volume need not be computed again for it.
    """
    dtype = np.dtype(dtype or volume.dtype)
    shape = tuple(int(s) for s in volume.shape)
    header = nifti_header(shape, dtype, affine, sform_code, qform_code)
    step = slab_chunks(shape, dtype.itemsize)[2]
    nonzero = 0

    def stream(fh: BinaryIO) -> None:
        nonlocal nonzero
        out: Any = gzip.GzipFile(fileobj=fh, mode="wb", compresslevel=1, mtime=0) if compress else fh
        try:
            out.write(header.binaryblock)
            out.write(b"\x00" * 4)  # no extensions
            for z in range(0, shape[2], step):
                slab = np.asarray(volume[:, :, z : z + step]).astype(dtype.newbyteorder("<"), copy=False)
                nonzero += int(np.count_nonzero(slab))
                out.write(slab.tobytes(order="F"))
        finally:
            if compress:
                out.close()

    atomic_write(url, stream, storage_options)
    return nonzero


__all__ = [
    "NiftiError",
    "IN_MEMORY_BYTES",
    "SLAB_BYTES",
    "check_case",
    "check_same_grid",
    "header_codes",
    "lazy_volume",
    "load",
    "nifti_header",
    "one_line",
    "read",
    "seekable",
    "sha256_file",
    "slab_chunks",
    "write_volume",
]

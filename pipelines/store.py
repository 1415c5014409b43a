"""The ossnet Zarr v3 case store: layout, open, atomic per-case writes, manifest.

Layout (one group per case; every array chunked and sharded by spatial blocks, Blosc zstd)::

    <store>/                      attrs: "ossnet_store" (format, grid, modalities, label meaning),
                                         "manifest" (case id -> split), "last_ingest"
      cases/<case_id>/image         (C, X, Y, Z) float16, z-scored per channel
      cases/<case_id>/label         (X, Y, Z) uint8 {0, 1}
      cases/<case_id>/border        (X, Y, Z) uint8 {0, 1}, border band for border sampling
      case attrs: preprocess record (affines, orientation, resampling, crop/pad box, z-score
                  stats), spacing, sources (path, size, sha256), status, complete

The encoder input and the low-resolution label are not stored: training derives them from the
augmented volume and inference from the image (format 1 stored both, and nothing read them).

Atomicity: a case is written in place and becomes visible only when its group attrs carry
``complete: true``. That flag is written last, in the same single-object write as the rest of
the case attrs, after every chunk has been stored. Renames are not atomic on object stores
(S3, GCS), a flag is; the same protocol therefore works for local paths, ``file://``,
``memory://`` and object-store URLs. Every reader checks the flag (``read_case`` refuses an
incomplete case) and the manifest lists only cases that were complete when it was written. A
re-run deletes and rewrites incomplete cases. Each case owns its arrays, so concurrent writers
never share a shard; only the ingest driver writes the root attrs.

Readers open the store by URL inside their own task: ``Store`` pickles as its URL, never as
array data. (A ``memory://`` store lives in one process, so it only works in-process.)
"""

from __future__ import annotations

import logging
import math
import re
import time
import unicodedata
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.errors import NodeNotFoundError
from zarr.storage import FsspecStore, LocalStore

from ossnet.preprocess import PreprocessRecord
from ossnet.targets import BINARY, TargetSpec
from ossnet_pipelines.constants import SPLITS

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
STORE_KEY = "ossnet_store"
ARRAYS: tuple[str, ...] = ("image", "label", "border")
# Store attributes that must agree between an existing store and a new ingest into it.
COMPAT_FIELDS: tuple[str, ...] = (
    "format_version", "modalities", "volume_shape", "lowres_shape", "latent_shape", "band_width", "zscore_mask",
    "resample", "target_spacing", "targets",
)
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CHUNK = 64
_SHARD_CHUNKS = 2


class StoreError(RuntimeError):
    """The store is missing, malformed or incompatible; the message names the store URL."""


class CaseNotFoundError(KeyError):
    """The case is absent from the store or not (yet) complete."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


def case_id_for(name: str) -> str:
    """A store case id for a file or folder name as hospital exports write them: accents
    dropped (NFKD), every run of other characters than letters, digits, '.', '_' and '-' (spaces,
    parentheses, non-Latin letters) made one '_', leading and trailing '.', '_', '-' removed,
    at most 128 characters. ``"Patient 01"`` -> ``"Patient_01"``, ``"Müller (2)"`` -> ``"Muller_2"``;
    "" when nothing is left."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", ascii_name).strip("._-")[:128].rstrip("._-")


def validate_case_id(case_id: str) -> str:
    """Return ``case_id`` if it is a safe single path component, else raise ``ValueError``.

    Allowed: letters, digits, ``.``, ``_``, ``-``; first character a letter or digit; at most 128
    characters. This rejects ``..``, ``../x``, absolute paths and hidden names, so a case can never
    be written outside ``cases/``.
    """
    if not isinstance(case_id, str) or not _CASE_ID.match(case_id):
        raise ValueError(
            f"case id {case_id!r} is not a safe store name (would escape the store path or is not a "
            "single component: use letters, digits, '.', '_', '-', starting with a letter or digit)"
        )
    return case_id


def zarr_store(url: str, *, read_only: bool = False, storage_options: Mapping[str, Any] | None = None) -> Any:
    """A zarr store for a local path, ``file://`` URL or any fsspec URL."""
    if url.startswith("file://"):
        return LocalStore(url[len("file://"):], read_only=read_only)
    if "://" in url:
        return FsspecStore.from_url(url, storage_options=dict(storage_options or {}), read_only=read_only)
    return LocalStore(url, read_only=read_only)


def chunk_layout(shape: Sequence[int], n_lead: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Chunks and shards for an array whose last three axes are spatial.

    Leading (channel) axes get chunk 1; spatial axes ``min(size, 64)``-voxel chunks grouped
    2x2x2 per shard (a BraTS float16 shard holds 4 MiB raw). Shards are multiples of chunks.
    """
    chunks = [1] * n_lead + [min(int(s), _CHUNK) for s in shape[n_lead:]]
    shards = list(chunks[:n_lead]) + [
        c * min(_SHARD_CHUNKS, math.ceil(int(s) / c)) for c, s in zip(chunks[n_lead:], shape[n_lead:])
    ]
    return tuple(chunks), tuple(shards)


def _compressor(dtype: np.dtype) -> BloscCodec:
    # Byte shuffle suits 2-byte floats; bit shuffle packs 0/1 masks to about a bit per voxel.
    shuffle = "bitshuffle" if np.dtype(dtype).itemsize == 1 else "shuffle"
    return BloscCodec(cname="zstd", clevel=3, shuffle=shuffle)


class CaseWriter:
    """Writes one case's arrays, then publishes it with ``commit``.

    Obtained from ``Store.case_writer``. Used as a context manager, an exception before
    ``commit`` deletes the partial case (best effort; a crash leaves it incomplete and invisible).
    """

    def __init__(self, group: zarr.Group, cases: zarr.Group, case_id: str, store_url: str) -> None:
        self._group = group
        self._cases = cases
        self.case_id = case_id
        self._url = store_url
        self._committed = False
        self._arrays: dict[str, zarr.Array] = {}

    def create_array(self, name: str, shape: Sequence[int], dtype: Any) -> zarr.Array:
        """Create ``name`` with spatial chunking/sharding (last three axes spatial)."""
        if name in self._arrays:
            raise StoreError(f"{self._url}: case {self.case_id}: array {name!r} created twice")
        shape = tuple(int(s) for s in shape)
        chunks, shards = chunk_layout(shape, len(shape) - 3)
        arr = self._group.create_array(
            name, shape=shape, dtype=np.dtype(dtype), chunks=chunks, shards=shards,
            compressors=_compressor(np.dtype(dtype)), fill_value=0,
        )
        self._arrays[name] = arr
        return arr

    def write(self, name: str, data: np.ndarray, index: tuple[int, ...] = ()) -> None:
        """Write ``data`` (the spatial block ``array[index]``) in shard-aligned slabs.

        Slabs along the first spatial axis each cover whole shards, so no shard is read back and
        the cast to the stored dtype needs only one slab of memory at a time.

        Args:
            name: an array made with ``create_array``.
            data: ``(X, Y, Z)`` for ``index`` = the leading (channel) indices, or the full array.
            index: leading indices, e.g. ``(c,)`` for channel ``c`` of ``(C, X, Y, Z)``.
        """
        arr = self._arrays[name]
        if tuple(data.shape) != tuple(arr.shape[len(index):]):
            raise StoreError(f"{self._url}: case {self.case_id}: {name}{list(index)} expects shape "
                             f"{arr.shape[len(index):]}, got {data.shape}")
        step = arr.shards[len(index)] if arr.shards else arr.chunks[len(index)]
        for start in range(0, data.shape[0], step):
            stop = min(data.shape[0], start + step)
            slab = data[start:stop]
            if arr.dtype == np.float16:  # saturate instead of overflowing to inf
                slab = np.clip(slab, -65504.0, 65504.0)
            arr[index + (slice(start, stop),)] = np.asarray(slab, dtype=arr.dtype)

    def write_array(self, name: str, data: np.ndarray) -> None:
        """Create ``name`` shaped and typed like ``data`` and write it."""
        self.create_array(name, data.shape, data.dtype)
        self.write(name, data)

    def commit(self, attrs: Mapping[str, Any]) -> None:
        """Publish the case: write ``attrs`` with ``complete: true`` in one final metadata write."""
        final = dict(attrs)
        final.update(case_id=self.case_id, status="complete", complete=True, arrays=sorted(self._arrays),
                     completed_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        self._group.attrs.put(final)
        self._committed = True

    def abort(self) -> None:
        """Delete the partial case (best effort)."""
        try:
            del self._cases[self.case_id]
        except Exception as exc:  # a half-written case stays invisible anyway
            logger.warning("%s: could not delete partial case %s: %s", self._url, self.case_id, exc)

    def __enter__(self) -> "CaseWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None and not self._committed:
            self.abort()


class Store:
    """An ossnet case store, opened by URL (local path, ``file://``, ``memory://``, ``s3://``...).

    Pickles as ``(url, mode, storage_options)``: send it to Ray tasks freely, each reopens it.

    Attributes:
        url: the store URL or path as given.
        mode: ``"r"`` (read only) or ``"r+"`` (read/write).
    """

    def __init__(self, url: str, mode: str = "r", storage_options: Mapping[str, Any] | None = None) -> None:
        if mode not in ("r", "r+"):
            raise ValueError(f"store mode must be 'r' or 'r+', got {mode!r}")
        self.url = str(url)
        self.mode = mode
        self.storage_options = dict(storage_options or {})
        zstore = zarr_store(self.url, read_only=mode == "r", storage_options=self.storage_options)
        try:
            self._root = zarr.open_group(zstore, mode=mode)
        except (NodeNotFoundError, FileNotFoundError) as exc:
            raise StoreError(f"{self.url}: no ossnet store here ({exc})") from exc
        self._attrs = self._root.attrs.asdict()
        if STORE_KEY not in self._attrs:
            raise StoreError(f"{self.url}: not an ossnet store (no {STORE_KEY!r} in the root attributes)")
        version = self._attrs[STORE_KEY].get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(f"{self.url}: store format version {version}, this ossnet reads {FORMAT_VERSION}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (Store, (self.url, self.mode, self.storage_options))

    def __repr__(self) -> str:
        return f"Store({self.url!r}, mode={self.mode!r}, cases={len(self.manifest)})"

    # ---------------------------------------------------------------- store-level metadata
    def refresh(self) -> "Store":
        """Re-read the root attributes (manifest) written by another process."""
        self._attrs = self._root.attrs.asdict()
        return self

    @property
    def attrs(self) -> dict[str, Any]:
        """All root attributes (a copy)."""
        return dict(self._attrs)

    @property
    def info(self) -> dict[str, Any]:
        """The ``ossnet_store`` attributes: grid, modalities, label meaning, preset, layout."""
        return dict(self._attrs[STORE_KEY])

    @property
    def preset(self) -> str:
        return str(self.info.get("preset", ""))

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.info["modalities"])

    @property
    def targets(self) -> TargetSpec:
        """What the labels mean (``ossnet.targets``): binary 0/1, or the source's values with the
        target map that reads them (stores from before target maps are binary)."""
        return TargetSpec.from_dict(self.info.get("targets"))

    @property
    def volume_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.info["volume_shape"])  # type: ignore[return-value]

    @property
    def lowres_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.info["lowres_shape"])  # type: ignore[return-value]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.info["latent_shape"])  # type: ignore[return-value]

    @property
    def band_width(self) -> int:
        return int(self.info["band_width"])

    @property
    def manifest(self) -> dict[str, str]:
        """Case id -> split (``train`` / ``val`` / ``unassigned``) for every published case."""
        return dict(self._attrs.get("manifest", {}).get("cases", {}))

    def case_ids(self, split: str | None = None) -> list[str]:
        """Sorted ids of published (complete) cases, optionally of one split."""
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        return sorted(cid for cid, s in self.manifest.items() if split is None or s == split)

    def splits(self) -> dict[str, list[str]]:
        """Split name -> sorted case ids."""
        return {s: self.case_ids(s) for s in SPLITS if self.case_ids(s)}

    # ---------------------------------------------------------------- case access
    def _cases(self) -> zarr.Group:
        return self._root.require_group("cases") if self.mode != "r" else self._root["cases"]  # type: ignore[return-value]

    def _case_group(self, case_id: str) -> zarr.Group | None:
        validate_case_id(case_id)
        try:
            node = self._root[f"cases/{case_id}"]
        except (KeyError, NodeNotFoundError, FileNotFoundError):
            return None
        return node if isinstance(node, zarr.Group) else None

    def case_status(self, case_id: str) -> str:
        """``"complete"``, ``"partial"`` (started, never committed) or ``"missing"``."""
        try:
            group = self._case_group(case_id)
            if group is None:
                return "missing"
            return "complete" if group.attrs.get("complete") is True else "partial"
        except ValueError:
            return "missing"
        except Exception:  # unreadable metadata of a torn write
            return "partial"

    def scan_cases(self) -> dict[str, dict[str, Any]]:
        """Attributes of every case group in the store, complete or not (one concurrent listing)."""
        try:
            cases = self._root["cases"]
        except (KeyError, NodeNotFoundError, FileNotFoundError):
            return {}
        out: dict[str, dict[str, Any]] = {}
        for name, node in cases.members(max_depth=0):  # type: ignore[union-attr]
            if isinstance(node, zarr.Group):
                out[name] = node.attrs.asdict()
        return out

    def _complete_group(self, case_id: str) -> zarr.Group:
        group = self._case_group(case_id)
        if group is None:
            raise CaseNotFoundError(f"{self.url}: no case {case_id!r}")
        if group.attrs.get("complete") is not True:
            raise CaseNotFoundError(f"{self.url}: case {case_id!r} is incomplete (an interrupted ingest; re-run it)")
        return group

    def case_attrs(self, case_id: str) -> dict[str, Any]:
        """Attributes of a complete case (sources, spacing, preprocess record, ...)."""
        return self._complete_group(case_id).attrs.asdict()

    def record(self, case_id: str) -> PreprocessRecord:
        """The case's ``PreprocessRecord`` (undo it with ``record.to_original``)."""
        return PreprocessRecord.from_dict(self.case_attrs(case_id)["preprocess"])

    def open_array(self, case_id: str, name: str) -> zarr.Array:
        """Lazy zarr array of a complete case, for partial reads."""
        group = self._complete_group(case_id)
        try:
            return group[name]  # type: ignore[return-value]
        except (KeyError, NodeNotFoundError) as exc:
            raise CaseNotFoundError(f"{self.url}: case {case_id!r} has no array {name!r}") from exc

    def read_case(self, case_id: str, arrays: Sequence[str] = ("image", "label")) -> dict[str, np.ndarray]:
        """Read whole arrays of a complete case.

        Args:
            case_id: a case id.
            arrays: any of ``ARRAYS``.

        Returns:
            name -> array: ``image`` (C, X, Y, Z) float16, ``label`` (X, Y, Z) uint8, ...

        Raises:
            CaseNotFoundError: missing or incomplete case, or missing array.
        """
        group = self._complete_group(case_id)
        out: dict[str, np.ndarray] = {}
        for name in arrays:
            try:
                out[name] = np.asarray(group[name][...])  # type: ignore[index]
            except (KeyError, NodeNotFoundError) as exc:
                raise CaseNotFoundError(f"{self.url}: case {case_id!r} has no array {name!r}") from exc
        return out

    # ---------------------------------------------------------------- writing
    def _require_writable(self) -> None:
        if self.mode == "r":
            raise StoreError(f"{self.url}: opened read-only")

    def case_writer(self, case_id: str) -> CaseWriter:
        """Start (re)writing a case: any existing group of that id is deleted first."""
        self.delete_case(case_id)
        cases = self._cases()
        group = cases.create_group(case_id, attributes={"case_id": case_id, "status": "writing", "complete": False})
        return CaseWriter(group, cases, case_id, self.url)

    def delete_case(self, case_id: str) -> None:
        self._require_writable()
        validate_case_id(case_id)
        cases = self._cases()
        if case_id in cases:
            del cases[case_id]

    def update_attrs(self, **attrs: Any) -> None:
        """Merge top-level root attributes (only the ingest driver calls this)."""
        self._require_writable()
        self._root.attrs.update(attrs)
        self.refresh()

    def write_manifest(self, cases: Mapping[str, str], split_info: Mapping[str, Any]) -> None:
        """Publish the case list with splits (case id -> train / val / unassigned)."""
        bad = {s for s in cases.values() if s not in SPLITS}
        if bad:
            raise ValueError(f"manifest: unknown split names {sorted(bad)}")
        self.update_attrs(manifest={"cases": dict(sorted(cases.items())), "splits": dict(split_info),
                                    "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def open_store(url: str, mode: str = "r", storage_options: Mapping[str, Any] | None = None) -> Store:
    """Open an existing ossnet store (``StoreError`` if there is none)."""
    return Store(str(url), mode=mode, storage_options=storage_options)


def create_store(
    url: str,
    info: Mapping[str, Any],
    *,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Store:
    """Create a store, or open an existing compatible one for writing.

    Args:
        url: local path or fsspec URL.
        info: the ``ossnet_store`` attributes (``format_version`` is filled in).
        overwrite: delete whatever is at ``url`` first.
        storage_options: fsspec options for remote URLs.

    Raises:
        StoreError: an existing store disagrees on one of ``COMPAT_FIELDS`` (named), or ``url``
            holds something that is not an ossnet store.
    """
    info = {**dict(info), "format_version": FORMAT_VERSION}
    zstore = zarr_store(str(url), read_only=False, storage_options=storage_options)
    if not overwrite:
        try:
            existing = zarr.open_group(zstore, mode="r").attrs.asdict()
        except (NodeNotFoundError, FileNotFoundError):
            existing = None
        if existing is not None:
            old = existing.get(STORE_KEY)
            if old is None:
                raise StoreError(f"{url}: exists and is not an ossnet store; choose another path or overwrite")
            old = {"targets": BINARY.to_dict(), **old}  # stores from before target maps are binary
            for key in COMPAT_FIELDS:
                if _norm(old.get(key)) != _norm(info.get(key)):
                    raise StoreError(f"{url}: existing store has {key}={old.get(key)}, this ingest wants "
                                     f"{info.get(key)}; use a new store or overwrite")
            store = Store(str(url), mode="r+", storage_options=storage_options)
            store.update_attrs(**{STORE_KEY: {**old, **info}})
            return store
    zarr.open_group(zstore, mode="w", attributes={STORE_KEY: info, "manifest": {"cases": {}, "splits": {}}})
    zarr.open_group(zstore, mode="r+").require_group("cases")
    return Store(str(url), mode="r+", storage_options=storage_options)


def _norm(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    return value


def iter_cases(store: Store, split: str | None = None,
               arrays: Sequence[str] = ("image", "label")) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """Yield ``(case_id, arrays)`` for the published cases of ``split``."""
    for case_id in store.case_ids(split):
        yield case_id, store.read_case(case_id, arrays)


__all__ = [
    "ARRAYS",
    "CaseNotFoundError",
    "CaseWriter",
    "FORMAT_VERSION",
    "SPLITS",
    "Store",
    "StoreError",
    "chunk_layout",
    "zarr_store",
    "create_store",
    "iter_cases",
    "open_store",
    "case_id_for",
    "validate_case_id",
]

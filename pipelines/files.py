"""Files on local disks and fsspec filesystems: local copies of inputs, atomic (streamed) writes,
and the clean-up of temporary files a killed writer left behind.

Atomicity: a file is written under a hidden temporary name in its final folder
(``.<name>.<random>.ossnet-tmp``) and renamed over the final name (``os.replace`` locally, after
an fsync; on object stores the file is written to local disk first, uploaded under a temporary
name and moved, and an object is written by one PUT, so the final object still appears whole or
not at all). A killed writer leaves at most temporary files, which ``remove_stale_temps``
deletes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import posixpath
import tempfile
import uuid
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Mapping

import fsspec

logger = logging.getLogger(__name__)

TMP_SUFFIX = ".ossnet-tmp"


def absolute_url(url: str) -> str:
    """A job's path as every Ray worker must see it: local paths (and ``file://`` URLs) become
    absolute, other URLs (``s3://``, ``memory://``...) stay as given; blanks are stripped."""
    url = str(url).strip()
    if not url:
        return url
    if url.startswith("file://"):
        return "file://" + os.path.abspath(os.path.expanduser(url[len("file://"):]))
    if "://" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


def local_path(url: str) -> str:
    """``absolute_url`` without a ``file://`` scheme (for APIs that take plain local paths)."""
    url = absolute_url(url)
    return url[len("file://"):] if url.startswith("file://") else url


def is_local(fs: Any) -> bool:
    """Whether an fsspec filesystem is the local disk."""
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it back at once
    os.umask(mask)
    return mask


@contextlib.contextmanager
def local_files(paths: Iterable[str], options: Mapping[str, Any] | None = None) -> Iterator[dict[str, str]]:
    """Map each path to a local file: itself when local, else a temporary download."""
    with contextlib.ExitStack() as stack:
        out: dict[str, str] = {}
        tmpdir: str | None = None
        for path in paths:
            fs, p = fsspec.core.url_to_fs(path, **dict(options or {}))
            if is_local(fs):
                out[path] = p
                continue
            if tmpdir is None:
                tmpdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="ossnet-files-"))
            local = os.path.join(tmpdir, f"{len(out)}-{os.path.basename(p)}")  # keep the .nii.gz suffix
            fs.get_file(p, local)
            out[path] = local
        yield out


def atomic_write(url: str, write: Callable[[BinaryIO], None], storage_options: Mapping[str, Any] | None = None) -> None:
    """Write ``url`` through ``write(fileobj)`` so that readers see the old file or the whole
    new one, never a part (see the module docstring); its folder is created.

    ``write`` runs after the temporary file exists, so a failure while encoding also leaves no
    partial file; the temporary file is removed and the error re-raised.
    """
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    folder, name = posixpath.split(path)
    if is_local(fs):
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=TMP_SUFFIX)
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual mode
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return
    fs.makedirs(folder, exist_ok=True)
    remote_tmp = posixpath.join(folder, f".{name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")
    with tempfile.TemporaryDirectory(prefix="ossnet-upload-") as tmpdir:
        local = os.path.join(tmpdir, name)
        with open(local, "wb") as fh:
            write(fh)
        try:
            fs.put_file(local, remote_tmp)
            fs.mv(remote_tmp, path)
        except BaseException:
            with contextlib.suppress(Exception):  # already gone, or unreachable: the next run cleans up
                fs.rm(remote_tmp)
            raise


def atomic_write_bytes(url: str, data: bytes | Callable[[], bytes],
                       storage_options: Mapping[str, Any] | None = None) -> None:
    """``atomic_write`` of ``data``, or of what the function ``data`` returns."""
    atomic_write(url, lambda fh: fh.write(data() if callable(data) else data), storage_options)


def remove_stale_temps(folders: Iterable[str], storage_options: Mapping[str, Any] | None = None) -> int:
    """Delete temporary files left by a killed writer in ``folders``; returns how many."""
    removed = 0
    for url in folders:
        fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
        if not fs.isdir(path):
            continue
        for entry in fs.ls(path, detail=False):
            if posixpath.basename(entry).endswith(TMP_SUFFIX):
                fs.rm(entry)
                removed += 1
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted run", removed)
    return removed


__all__ = ["TMP_SUFFIX", "absolute_url", "atomic_write", "atomic_write_bytes", "is_local", "local_files", "local_path",
           "remove_stale_temps"]

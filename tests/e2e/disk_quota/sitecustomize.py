"""A disk quota for tests/e2e/test_full_disk.py on hosts where it cannot mount a small tmpfs.

Loaded by every Python process of the job (the driver and its Ray workers) through
``PYTHONPATH``. While ``OSSNET_TEST_QUOTA_BYTES`` is set, ``os.fsync`` of a file under
``OSSNET_TEST_QUOTA_DIR`` fails with ENOSPC, as a full disk can, once the files in that folder
take more than that many bytes in 4 KiB pages (as on the tmpfs). Inert without both variables.
"""

import errno
import os

_DIR = os.environ.get("OSSNET_TEST_QUOTA_DIR", "")
_BYTES = os.environ.get("OSSNET_TEST_QUOTA_BYTES", "")
_PAGE = 4096


def _used(folder: str) -> int:
    used = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                used += -(-os.path.getsize(os.path.join(root, name)) // _PAGE) * _PAGE
            except OSError:  # renamed or removed meanwhile by another writer
                pass
    return used


if _DIR and _BYTES:
    _real_fsync = os.fsync

    def _quota_fsync(fd) -> None:  # type: ignore[no-untyped-def]
        fileno = fd if isinstance(fd, int) else fd.fileno()
        path = os.readlink(f"/proc/self/fd/{fileno}")
        if path.startswith(_DIR.rstrip("/") + "/") and _used(_DIR) > int(_BYTES):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        _real_fsync(fd)

    os.fsync = _quota_fsync

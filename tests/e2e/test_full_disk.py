"""Batch inference writing onto a disk that fills up: a 64 KiB tmpfs.

The job runs inside its own mount namespace (``unshare``), where the output folder is a tmpfs
too small for every mask. Cases whose mask does not fit must fail with a one-line error and
leave no partial file; the masks that were written must be whole. After the tmpfs is grown
(space freed), the same command must complete every case.

A host that refuses ``unshare -rm`` (no unprivileged user namespaces) gets the same 64 KiB as a
quota instead: ``disk_quota/sitecustomize.py`` makes fsync fail with ENOSPC in every process of
the job once the output folder is full, and lifting it frees the space.
``OSSNET_TEST_FULL_DISK=quota`` picks the quota on any host.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import REFERENCE_SCANS, DenseReference
from ossnet_pipelines.files import TMP_SUFFIX

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
N_SCANS = REFERENCE_SCANS
TIMEOUT_S = 900
DISK_BYTES = 64 * 1024
QUOTA_SHIM = Path(__file__).with_name("disk_quota")


def _can_mount_tmpfs(folder: Path) -> bool:
    mount = f"mount -t tmpfs -o size={DISK_BYTES} tmpfs {shlex.quote(str(folder))}"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", mount], capture_output=True, text=True,
                           check=False) if shutil.which("unshare") else None
    return probe is not None and probe.returncode == 0


def test_a_full_disk_fails_cases_cleanly_and_a_rerun_completes_them(dense_reference: DenseReference,
                                                                   tmp_path: Path) -> None:
    out, logs = tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    logs.mkdir()
    scans, checkpoint = dense_reference.scans, dense_reference.checkpoint
    infer = shlex.join([sys.executable, "-m", "ossnet_cli", "infer", str(scans), "--output", str(out), "--model",
                        str(checkpoint), "--actors", "1", "--mode", "dense"])
    o, lg = shlex.quote(str(out)), shlex.quote(str(logs))
    if os.environ.get("OSSNET_TEST_FULL_DISK") != "quota" and _can_mount_tmpfs(out):
        runner = ["unshare", "-rm", "sh", "-c"]
        fill = f"mount -t tmpfs -o size={DISK_BYTES} tmpfs {o} || exit 90"
        free = f"mount -o remount,size=64m tmpfs {o} || exit 91"
    else:
        print("[full disk] unshare -rm refused or OSSNET_TEST_FULL_DISK=quota: a 64 KiB quota instead of a tmpfs")
        runner = ["sh", "-c"]
        fill = (f"export PYTHONPATH={shlex.quote(str(QUOTA_SHIM))}${{PYTHONPATH:+:$PYTHONPATH}} "
                f"OSSNET_TEST_QUOTA_DIR={o} OSSNET_TEST_QUOTA_BYTES={DISK_BYTES}")
        free = "unset OSSNET_TEST_QUOTA_BYTES"
    script = f"""
        {fill}
        {infer} > {lg}/first.log 2>&1; echo $? > {lg}/first.rc
        find {o} -type f | sort > {lg}/first.files
        cp -r {o} {lg}/first
        {free}
        start=$(date +%s.%N); {infer} > {lg}/second.log 2>&1; echo $? > {lg}/second.rc
        echo "$start $(date +%s.%N)" > {lg}/second.time
        cp -r {o} {lg}/second
    """
    proc = subprocess.run([*runner, script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT_S,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first_log = (logs / "first.log").read_text()
    assert (logs / "first.rc").read_text().strip() == "1", first_log[-6000:]
    written = sorted((logs / "first" / "masks").glob("*.nii.gz"))
    assert 0 < len(written) < N_SCANS, first_log[-6000:]  # the disk filled up mid-way
    assert "No space left on device" in first_log
    assert not [f for f in (logs / "first.files").read_text().split() if f.endswith(TMP_SUFFIX)]
    for mask in written:  # whatever was written is whole
        assert np.asarray(nib.load(str(mask)).dataobj).shape == (40, 44, 36)

    second_log = (logs / "second.log").read_text()
    assert (logs / "second.rc").read_text().strip() == "0", second_log[-6000:]
    begin, end = map(float, (logs / "second.time").read_text().split())
    print(f"[recovery] disk full, space freed, inference run again: {end - begin:.1f} s")
    final = logs / "second"
    assert len(dense_reference.assert_same_masks(final / "masks")) == N_SCANS
    for mask in written:  # the masks written before the disk filled were kept, not redone
        np.testing.assert_array_equal(np.asarray(nib.load(str(mask)).dataobj),
                                      np.asarray(nib.load(str(final / "masks" / mask.name)).dataobj))
    import pandas as pd

    report = pd.read_parquet(final / "report.parquet")
    assert len(report) == N_SCANS and set(report["status"]) <= {"ok", "skipped"}
    assert not [p for p in final.rglob("*") if p.name.endswith(TMP_SUFFIX)]

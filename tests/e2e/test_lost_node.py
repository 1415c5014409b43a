"""A worker node of the local multi-node cluster dies (SIGKILL to its process group) in the
middle of a batch inference job submitted to the cluster.

The job must still complete: the cases lost with the node are run again on what is left of the
cluster, every mask is written once and equals the mask of an undisturbed run, and the report
lists every case. The cluster is restarted afterwards (same addresses and token) for the tests
that follow.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pandas as pd
import pytest

from conftest import CLUSTER_START_TIMEOUT_S, STOP_TIMEOUT_S, process_group
from ossnet_pipelines.files import TMP_SUFFIX

if TYPE_CHECKING:
    from conftest import DenseReference, LocalCluster

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 900


@pytest.fixture
def restored_cluster(local_cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The session's cluster, stopped and started again after the test (a dead node is not
    restarted by ``start`` alone); a failed restart is a teardown error, not the test's."""
    yield local_cluster
    local_cluster.run_script("stop", STOP_TIMEOUT_S)
    restarted = local_cluster.run_script("start", CLUSTER_START_TIMEOUT_S)
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr


def test_inference_completes_when_a_worker_node_is_lost(restored_cluster: LocalCluster,
                                                       dense_reference: DenseReference, tmp_path: Path) -> None:
    local_cluster = restored_cluster
    scans, checkpoint = dense_reference.scans, dense_reference.checkpoint
    out = tmp_path / "out"
    flags = ["--model", str(checkpoint), "--actors", "2", "--cpus-per-actor", "0.5", "--mode", "dense",
             "--set", "progress_every=1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(local_cluster.client_env)
    command = [sys.executable, "-m", "ossnet_cli", "infer", str(scans), "--output", str(out), *flags,
               "--address", local_cluster.address]
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + TIMEOUT_S
    for line in proc.stdout:
        lines.append(line)
        if "infer: 3/" in line:
            break
        assert time.monotonic() < deadline, "".join(lines)[-4000:]
    worker = local_cluster.node_pids()["worker1"]
    for pid in process_group(worker):
        os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    rest, _ = proc.communicate(timeout=TIMEOUT_S)
    log = "".join(lines) + rest
    assert proc.returncode == 0, log[-6000:]
    lost = "lost with a worker or node" in log
    print(f"[recovery] worker node lost: the job finished {time.monotonic() - killed_at:.1f} s after the kill "
          f"({'cases lost with the node were run again' if lost else 'no case was lost with the node'})")

    names = dense_reference.assert_same_masks(out / "masks")
    assert names == sorted(p.name for p in scans.iterdir())
    report = pd.read_parquet(out / "report.parquet")
    assert sorted(report["case_id"]) == [n.removesuffix(".nii.gz") for n in names]
    assert set(report["status"]) == {"ok"} and report["case_id"].is_unique
    assert not [p for p in out.rglob("*") if p.name.endswith(TMP_SUFFIX)]

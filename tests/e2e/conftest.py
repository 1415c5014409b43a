"""Session fixtures for end-to-end tests: a local multi-node Ray cluster and an MLflow server.

Both run as separate process trees started from the repo's own launchers
(``infra/local-cluster.sh``, ``mlflow/server.sh``) on free 127.0.0.1 ports, with their data
in pytest's temp dir. Neither fixture changes ``os.environ`` or any global of this process:
clients get the addresses (and the cluster's auth token) from the yielded objects. Teardown
stops each tree by process id and fails the session if any of its processes survive.

Never run these next to another Ray cluster started by tests (tests/ray's shared
``ray.init``): run the e2e tier in its own pytest invocation, ``pytest tests/e2e -m slow``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO_ROOT / "infra" / "local-cluster.sh"
MLFLOW_SCRIPT = REPO_ROOT / "mlflow" / "server.sh"

CLUSTER_START_TIMEOUT_S = 300
MLFLOW_START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 120

# Variables of the test process that must not leak into the launched services.
_SCRUBBED_ENV = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                 "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_BACKEND_STORE_URI",
                 "MLFLOW_ARTIFACTS_DESTINATION")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_block(n: int, start: int = 23000, stop: int = 24000) -> int:
    """First port of ``n`` consecutive ports in [start, stop) that are all free right now."""
    for base in range(start, stop - n, n):
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("0.0.0.0", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports in [{start}, {stop})")


def _service_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env.update(overrides)
    return env


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(ppid, pgid) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[2])


def process_group(pgid: int) -> set[int]:
    """Live processes whose process group is ``pgid``."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None and stat[1] == pgid:
                pids.add(int(entry))
    return pids


def processes_mentioning(text: str) -> set[int]:
    """Live processes whose command line contains ``text``."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and pid_alive(int(entry)):
            pids.add(int(entry))
    return pids


def _wait_gone(pids: set[int], timeout_s: float) -> set[int]:
    deadline = time.monotonic() + timeout_s
    alive = {p for p in pids if pid_alive(p)}
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = {p for p in alive if pid_alive(p)}
    return alive


def _kill(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass(frozen=True)
class LocalCluster:
    """A running ``infra/local-cluster.sh`` cluster.

    Attributes:
        address: the Jobs API / dashboard URL (what ``--address`` takes); also ``str(self)``.
        gcs_address: ``host:port`` of the GCS, for ``ray.init(address=...)``.
        auth_token: bearer token of the cluster (token auth is on).
        token_path: file holding the token (``RAY_AUTH_TOKEN_PATH`` for clients).
        state_dir: pid files, node logs and ``cluster.env``.
        temp_dir: Ray's temp dir of this cluster (session logs).
        script_env: environment the launcher ran with (reused by ``stop``).
    """

    address: str
    gcs_address: str
    auth_token: str
    token_path: Path
    state_dir: Path
    temp_dir: Path
    script_env: dict[str, str] = field(repr=False)

    def __str__(self) -> str:
        return self.address

    @property
    def client_env(self) -> dict[str, str]:
        """Variables that let a client process (e.g. ``ossnet ... --address``) authenticate."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path),
                "RAY_API_SERVER_ADDRESS": self.address}

    def node_pids(self) -> dict[str, int]:
        """Pid of each node's ``ray start --block`` leader (also its process group id)."""
        pids = {}
        for pid_file in sorted(self.state_dir.glob("*.pid")):
            text = pid_file.read_text().strip()
            if text.isdigit():
                pids[pid_file.stem] = int(text)
        return pids

    def processes(self) -> set[int]:
        """Every live process of the cluster: the node process groups plus any process
        naming the cluster's temp dir (workers that left the groups)."""
        pids: set[int] = set()
        for pgid in self.node_pids().values():
            pids |= process_group(pgid)
        return pids | processes_mentioning(f"{self.temp_dir}/")

    def run_script(self, command: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(CLUSTER_SCRIPT), command], env=self.script_env, capture_output=True,
            text=True, timeout=timeout_s, check=False,
        )


def _log_tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"(no log at {path})"


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A head + 1 worker Ray cluster on 127.0.0.1 (2 logical CPUs each, token auth).

    The cluster starts once per session (about a minute on two busy cores) and is shared by
    every e2e test that asks for it.
    """
    state_dir = tmp_path_factory.mktemp("local-cluster")
    # Ray's Unix socket paths must stay short: a fresh dir directly under /tmp.
    temp_dir = Path(tempfile.mkdtemp(prefix="ossnet-ray-", dir="/tmp"))
    gcs_port, dashboard_port, client_port = free_ports(3)
    ray_bin = Path(sys.executable).parent / "ray"
    env = _service_env(
        OSSNET_CLUSTER_STATE_DIR=str(state_dir),
        OSSNET_CLUSTER_TEMP_DIR=str(temp_dir),
        OSSNET_CLUSTER_PORT=str(gcs_port),
        OSSNET_CLUSTER_DASHBOARD_PORT=str(dashboard_port),
        OSSNET_CLUSTER_CLIENT_PORT=str(client_port),
        OSSNET_CLUSTER_WORKER_PORT_BASE="21000",
        OSSNET_CLUSTER_AGENT_PORT_BASE=str(free_port_block(8)),
        OSSNET_CLUSTER_WORKERS="1",
        OSSNET_CLUSTER_CPUS="2",
        OSSNET_CLUSTER_OBJECT_STORE_MB="200",
        OSSNET_CLUSTER_AUTH="token",
        OSSNET_CLUSTER_START_TIMEOUT=str(CLUSTER_START_TIMEOUT_S - 30),
    )
    if ray_bin.exists():
        env["OSSNET_RAY"] = str(ray_bin)
    token_path = state_dir / "auth_token"
    cluster = LocalCluster(
        address=f"http://127.0.0.1:{dashboard_port}", gcs_address=f"127.0.0.1:{gcs_port}",
        auth_token="", token_path=token_path, state_dir=state_dir, temp_dir=temp_dir,
        script_env=env,
    )
    started = cluster.run_script("start", CLUSTER_START_TIMEOUT_S)
    if started.returncode != 0:
        cluster.run_script("stop", STOP_TIMEOUT_S)
        logs = "\n".join(f"--- {p.name}\n{_log_tail(p)}" for p in state_dir.glob("*.log"))
        shutil.rmtree(temp_dir, ignore_errors=True)
        pytest.fail(f"local-cluster.sh start failed ({started.returncode}):\n"
                    f"{started.stdout}\n{started.stderr}\n{logs}")
    cluster = dataclasses.replace(cluster, auth_token=token_path.read_text().strip())
    try:
        yield cluster
    finally:
        before = cluster.processes()
        stopped = cluster.run_script("stop", STOP_TIMEOUT_S)
        leftovers = _wait_gone(before, 15) | cluster.processes()
        _kill(leftovers)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert stopped.returncode == 0, f"local-cluster.sh stop failed: {stopped.stderr}"
        assert not leftovers, f"processes of the local cluster survived stop: {sorted(leftovers)}"


def scans_and_model(root: Path, n: int) -> tuple[Path, Path]:
    """``n`` single-channel NIfTI scans (``<root>/scans/scanNN.nii.gz``, 40x44x36) and a tiny
    seeded one-channel OSS-Net C checkpoint for them (``<root>/model.pt``): an inference job that
    needs no registry."""
    import nibabel as nib
    import numpy as np
    import torch

    from ossnet.checkpoint import PreprocessSpec, save_checkpoint
    from ossnet.config import model_config
    from ossnet.model import build_model
    from ossnet_pipelines.synthetic import ellipsoid_scan

    grid = (16, 16, 16)
    torch.manual_seed(0)
    model = build_model(model_config("C", "tiny", in_channels=1, volume_shape=grid)).eval()
    checkpoint = save_checkpoint(root / "model.pt", model, PreprocessSpec(modalities=("t1",), volume_shape=grid))
    scans = root / "scans"
    scans.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        nib.save(nib.Nifti1Image(ellipsoid_scan((40, 44, 36), i), np.eye(4)), str(scans / f"scan{i:02d}.nii.gz"))
    return scans, Path(checkpoint)


@dataclass(frozen=True)
class DenseReference:
    """``REFERENCE_SCANS`` scans (``scans_and_model``) and the masks of one undisturbed local
    dense inference over them: what every disturbed run (killed, node lost, disk full) must end
    with. Scans are inputs only: tests read them, never write next to them."""

    scans: Path
    checkpoint: Path
    masks: Path

    def subset(self, folder: Path, n: int) -> Path:
        """A folder holding copies of the first ``n`` scans."""
        folder.mkdir(parents=True)
        for scan in sorted(self.scans.iterdir())[:n]:
            shutil.copy2(scan, folder / scan.name)
        return folder

    def assert_same_masks(self, masks: Path) -> list[str]:
        """Every mask in ``masks`` equals the reference mask of its case; returns the names."""
        import nibabel as nib
        import numpy as np

        names = sorted(p.name for p in masks.iterdir())
        assert names, f"no masks in {masks}"
        for name in names:
            np.testing.assert_array_equal(np.asarray(nib.load(str(masks / name)).dataobj),
                                          np.asarray(nib.load(str(self.masks / name)).dataobj), err_msg=name)
        return names


REFERENCE_SCANS = 24


@pytest.fixture(scope="session")
def dense_reference(tmp_path_factory: pytest.TempPathFactory) -> DenseReference:
    """One clean ``ossnet infer --mode dense`` (local Ray, one actor) shared by the fault tests,
    instead of a clean run of their own each."""
    root = tmp_path_factory.mktemp("dense-reference")
    scans, checkpoint = scans_and_model(root, REFERENCE_SCANS)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    clean = subprocess.run([sys.executable, "-m", "ossnet_cli", "infer", str(scans), "--output", str(root / "clean"),
                            "--model", str(checkpoint), "--actors", "1", "--mode", "dense"], cwd=REPO_ROOT, env=env,
                           check=False, capture_output=True, text=True, timeout=900)
    assert clean.returncode == 0, (clean.stdout + clean.stderr)[-6000:]
    reference = DenseReference(scans, checkpoint, root / "clean" / "masks")
    assert len(list(reference.masks.iterdir())) == REFERENCE_SCANS
    return reference


@dataclass(frozen=True)
class MlflowServer:
    """A running ``mlflow/server.sh`` (SQLite + local artifacts). ``str(self)`` is the URI."""

    uri: str
    pid: int
    home: Path
    log_path: Path

    def __str__(self) -> str:
        return self.uri


def _health_ok(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_mlflow_server(home: Path, port: int | None = None) -> MlflowServer:
    """Start ``mlflow/server.sh`` with its data in ``home`` on ``port`` (default: a free one) and
    wait until it is healthy. Restarting on the same home and port brings the same data back."""
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = home / "server.log"
    pid_file = home / "server.pid"
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    env = _service_env(
        OSSNET_MLFLOW_HOME=str(home), OSSNET_MLFLOW_PORT=str(port), OSSNET_MLFLOW_WORKERS="1",
        OSSNET_MLFLOW_PID_FILE=str(pid_file),
    )
    if mlflow_bin.exists():
        env["OSSNET_MLFLOW"] = str(mlflow_bin)
    with open(log_path, "ab") as log:
        # Own session: the pid is also the process group of the server's workers.
        proc = subprocess.Popen(["bash", str(MLFLOW_SCRIPT)], env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + MLFLOW_START_TIMEOUT_S
    while not _health_ok(uri):
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill(process_group(proc.pid))
            proc.wait(timeout=10)
            pytest.fail(f"mlflow/server.sh did not become healthy:\n{_log_tail(log_path)}")
        time.sleep(0.5)
    assert int(pid_file.read_text()) == proc.pid, "server.sh must exec the server (same pid)"
    return MlflowServer(uri=uri, pid=proc.pid, home=home, log_path=log_path)


def stop_mlflow_server(server: MlflowServer, *, hard: bool = False) -> None:
    """Stop a server's process tree: SIGTERM and wait, or SIGKILL at once (``hard``: a crash)."""
    group = process_group(server.pid)
    if hard:
        _kill(group)
    else:
        try:
            os.kill(server.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    leftovers = _wait_gone(group, 60)
    _kill(leftovers)
    assert hard or not leftovers, f"MLflow server processes survived SIGTERM: {sorted(leftovers)}"
    assert not _wait_gone(group, 15), "MLflow server processes survived SIGKILL"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """An MLflow tracking server on a free 127.0.0.1 port; data in the session temp dir."""
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    try:
        yield server
    finally:
        stop_mlflow_server(server)

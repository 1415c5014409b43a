"""The services the project starts: loopback-only HTTP, and a token on whatever Ray exposes.

Reads the kernel's socket tables (``/proc/net/tcp``, ``/proc/net/tcp6``) for the listening sockets
owned by every process of the local Ray cluster (``infra/local-cluster.sh``) and of the MLflow
server (``mlflow/server.sh``). The HTTP services (MLflow, Ray's dashboard and Jobs API) must
listen on 127.0.0.1 only. Ray 2.60's ``ray start`` binds its gRPC servers (GCS, raylets,
agents) to every interface whatever ``--node-ip-address`` says; those ports are guarded by the
cluster's token, so a driver without it must be refused on them.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from conftest import process_group

if TYPE_CHECKING:
    from conftest import LocalCluster, MlflowServer

pytestmark = pytest.mark.slow

_LISTEN = "0A"


def _listening_sockets() -> dict[int, tuple[str, int]]:
    """Socket inode -> (local address, port) of every listening TCP socket on this machine."""
    out: dict[int, tuple[str, int]] = {}
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        if not Path(table).is_file():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state != _LISTEN:
                continue
            hex_addr, hex_port = local.split(":")
            raw = bytes.fromhex(hex_addr)
            # The kernel prints each 32-bit word in host (little-endian) order.
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            address = str(ipaddress.ip_address(words if width == 16 else raw[::-1]))
            out[inode] = (address, int(hex_port, 16))
    return out


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            match = re.fullmatch(r"socket:\[(\d+)\]", target)
            if match:
                inodes.add(int(match.group(1)))
    except OSError:  # the process ended meanwhile
        pass
    return inodes


def _listening_addresses(pids: set[int]) -> set[tuple[str, int]]:
    sockets = _listening_sockets()
    return {sockets[i] for pid in pids for i in _socket_inodes(pid) if i in sockets}


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def test_http_services_listen_on_loopback_and_ray_refuses_a_client_without_the_token(
    local_cluster: LocalCluster, mlflow_server: MlflowServer
) -> None:
    cluster = _listening_addresses(local_cluster.processes())
    tracking = _listening_addresses(process_group(mlflow_server.pid))
    dashboard_port = int(local_cluster.address.rsplit(":", 1)[1])
    gcs_port = int(local_cluster.gcs_address.rsplit(":", 1)[1])
    mlflow_port = int(mlflow_server.uri.rsplit(":", 1)[1])
    # Not vacuous: the known ports are among the sockets found.
    assert {dashboard_port, gcs_port} <= {port for _, port in cluster}, cluster
    assert mlflow_port in {port for _, port in tracking}, tracking
    exposed_http = sorted(a for a in cluster | tracking if a[1] in (dashboard_port, mlflow_port) and not _loopback(a[0]))
    assert not exposed_http, f"HTTP services listening beyond the loopback interface: {exposed_http}"
    assert not [a for a in tracking if not _loopback(a[0])], tracking

    # The GCS port, reached on a non-loopback address where it is exposed, refuses a driver
    # without the cluster's token.
    host = next((a for a, port in sorted(cluster) if port == gcs_port and not _loopback(a)), "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-the-cluster-token")
    code = f"import ray; ray.init(address={f'{host}:{gcs_port}'!r}, log_to_driver=False); print('CONNECTED')"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180,
                          check=False)
    assert "CONNECTED" not in proc.stdout and proc.returncode != 0, proc.stdout + proc.stderr[-3000:]
    assert re.search(r"(?i)unauthenticated|auth|token", proc.stderr), proc.stderr[-3000:]

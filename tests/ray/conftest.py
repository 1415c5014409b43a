"""The ``ray`` tier: one local Ray instance shared by every test of the session.

Use the ``ray_session`` fixture (session scoped) in any test that needs Ray; it starts Ray once
with 4 logical CPUs (a 2-worker TorchTrainer needs CPU slots for its controller and for Ray
Data tasks too; see ARCHITECTURE.md "Facts about the stack") and a small object store, and
shuts it down at the end. Every test in this folder gets the ``ray`` marker.

The dashboard runs (bound to 127.0.0.1 on a free port): Ray Train V2's placement-group cleaner
polls the State API, which the dashboard serves; without it every Train run logs a warning per
second and a crashed controller's placement group would never be removed.

The instance is private to this pytest process: ``address="local"`` never joins another
cluster on the host, and its temp dir (sockets, logs) is a fresh short folder under /tmp. Do
not run this tier in the same pytest invocation as tests/e2e (its own multi-node cluster).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
RAY_NUM_CPUS = 4
RAY_OBJECT_STORE_BYTES = 200 * 1024 * 1024


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.ray)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    """The ``ray`` module, initialised once for the session (4 CPUs, 200 MiB object store)."""
    import ray

    if ray.is_initialized():  # started by an earlier fixture user of this process
        yield ray
        return
    # Ray's Unix socket paths must stay short: a fresh dir directly under /tmp.
    temp_dir = tempfile.mkdtemp(prefix="ossnet-rt-", dir="/tmp")
    # Workers inherit the environment of the raylet started here: make the repo importable
    # whatever the working directory, and keep usage stats off (no network).
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "RAY_USAGE_STATS_ENABLED")}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), saved["PYTHONPATH"]) if p)
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    try:
        ray.init(
            address="local",
            num_cpus=RAY_NUM_CPUS,
            object_store_memory=RAY_OBJECT_STORE_BYTES,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=_free_port(),
            _temp_dir=temp_dir,
            configure_logging=False,
        )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)

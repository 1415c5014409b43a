"""One policy for joining or starting Ray: ingest, training, sweeps and batch inference use it.

1. Ray already initialised in this process (a Ray job's driver, a Tune trial, a test session):
   use it.
2. ``RAY_ADDRESS`` set (a cluster, or a Ray job whose runtime environment carries the project):
   connect to it.
3. Otherwise start a private local instance: logical CPUs enough for the caller's tasks plus one
   for the controller (a 2-worker TorchTrainer deadlocks when its workers hold every CPU slot),
   the project on the workers' ``PYTHONPATH``, the dashboard on 127.0.0.1 when asked for (Train
   V2's placement-group cleaner polls its State API), and up to three attempts when the raylet
   misses its start-up deadline on a saturated host.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def verbose() -> bool:
    """Whether the user asked for every log line (``ossnet -v``: the root logger at DEBUG)."""
    return logging.getLogger().getEffectiveLevel() <= logging.DEBUG


def quiet_ray_data_env() -> dict[str, str]:
    """Environment for Ray processes whose Ray Data logs go to the session's ``ray-data.log``
    only, warnings excepted: the per-epoch execution plans and progress lines of the training
    stream are not for the console. Writes the logging config it names under the state dir."""
    import json

    from ossnet_pipelines.tracking.uri import state_dir

    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"ray": {"format": "%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"}},
        "handlers": {
            "file": {"class": "ray.data._internal.logging.SessionFileHandler", "formatter": "ray",
                     "filename": "ray-data.log"},
            "console": {"class": "ray._private.log.PlainRayHandler", "formatter": "ray", "level": "WARNING"},
        },
        "loggers": {"ray.data": {"level": "DEBUG", "handlers": ["file", "console"], "propagate": False}},
    }
    path = state_dir() / "ray-data-logging.yaml"
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    os.environ["RAY_DATA_LOGGING_CONFIG"] = str(path)  # this driver's Ray Data too, if not yet imported
    return {"RAY_DATA_LOGGING_CONFIG": str(path)}


def quiet_ray_data_console() -> None:
    """This process's Ray Data console handlers at WARNING (its file log keeps everything)."""
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler) and type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(logging.WARNING)


def ensure_ray(*, min_cpus: float = 1.0, object_store_mb: int | None = None, dashboard: bool = True,
               log_to_driver: bool = True) -> bool:
    """Join or start Ray by the module's policy.

    Args:
        min_cpus: logical CPUs the caller's tasks and actors hold at once (local start only).
        object_store_mb: object store size of a local start (None: Ray's default).
        dashboard: start the dashboard with a local instance.
        log_to_driver: forward task output to this process.

    Returns:
        True if this call connected or started Ray (the caller may ``ray.shutdown()`` when done),
        False if Ray was already initialised.
    """
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(configure_logging=False, log_to_driver=log_to_driver)
        return True
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    num_cpus = max(os.cpu_count() or 1, math.ceil(min_cpus) + 1)
    options: dict = {"address": "local", "num_cpus": num_cpus, "runtime_env": {"env_vars": env},
                     "configure_logging": False, "log_to_driver": log_to_driver, "include_dashboard": dashboard}
    if not verbose():  # (not ray.LoggingConfig: it would also reconfigure this process's root logger)
        env.update(quiet_ray_data_env())
    if object_store_mb is not None:
        options["object_store_memory"] = int(object_store_mb) << 20
    logger.info("starting a local Ray instance (%d logical CPUs%s)", num_cpus,
                f", {object_store_mb} MiB object store" if object_store_mb is not None else "")
    for attempt in range(3):
        if dashboard:
            options.update(dashboard_host="127.0.0.1", dashboard_port=free_port())
        try:
            ray.init(**options)
            if not verbose():
                quiet_ray_data_console()
            return True
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for this
            if "timed out during startup" not in str(exc) or attempt == 2:
                raise
            logger.warning("Ray start-up timed out (attempt %d of 3); retrying", attempt + 1)
            ray.shutdown()
    return True


__all__ = ["REPO_ROOT", "ensure_ray", "free_port", "quiet_ray_data_console", "quiet_ray_data_env", "verbose"]

"""Where MLflow data lives: tracking URI resolution, artifact roots and experiments.

Resolution order for the tracking URI (``resolve_tracking_uri``):

1. the ``--tracking-uri`` flag,
2. the ``MLFLOW_TRACKING_URI`` environment variable,
3. the default local SQLite database ``sqlite:///<state dir>/mlflow.db``.

The state directory is ``$OSSNET_HOME`` when set, else ``./.ossnet`` under the current working
directory (made absolute). Artifacts of SQLite-backed experiments go next to the database, to
``<db dir>/mlartifacts/<experiment>``, never to MLflow's fallback ``./mlruns``.

Open the UI on the default store with
``mlflow ui --backend-store-uri sqlite:///$PWD/.ossnet/mlflow.db --host 127.0.0.1``.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

OSSNET_HOME_ENV = "OSSNET_HOME"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
STATE_DIR_NAME = ".ossnet"
DEFAULT_DB_NAME = "mlflow.db"
ARTIFACTS_DIR_NAME = "mlartifacts"
DEFAULT_EXPERIMENT = "ossnet"

_SQLITE_PREFIX = "sqlite:///"
_REMOTE_SCHEMES = ("http", "https", "databricks", "databricks-uc", "uc")


class TrackingConfigError(ValueError):
    """The tracking URI or experiment settings are unusable; the message says which."""


def state_dir(create: bool = True) -> Path:
    """The absolute directory holding ossnet's local state (``$OSSNET_HOME`` or ``./.ossnet``).

    Args:
        create: create the directory when missing.
    """
    home = os.environ.get(OSSNET_HOME_ENV, "").strip()
    path = (Path(home).expanduser() if home else Path.cwd() / STATE_DIR_NAME).resolve()
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def default_tracking_uri(create: bool = True) -> str:
    """``sqlite:///<state dir>/mlflow.db`` with an absolute path (so four slashes in all)."""
    return _SQLITE_PREFIX + (state_dir(create) / DEFAULT_DB_NAME).as_posix()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (absolute), or None for other schemes."""
    if not uri.startswith(_SQLITE_PREFIX):
        return None
    raw = unquote(uri[len(_SQLITE_PREFIX) :].split("?", 1)[0])
    if raw in ("", ":memory:"):
        return None
    # sqlite:////abs/path has an extra slash; sqlite:///rel/path is relative to the cwd.
    return Path(raw).resolve() if raw.startswith("/") else (Path.cwd() / raw).resolve()


def resolve_tracking_uri(flag: str | None = None) -> str:
    """The tracking URI to use: ``flag``, else ``$MLFLOW_TRACKING_URI``, else the local default.

    A path ending in ``.db``/``.sqlite`` is turned into an absolute ``sqlite:///`` URI; a
    relative ``sqlite:///`` URI is made absolute (so Ray workers in other directories agree).
    The parent directory of a local SQLite database is created.

    Raises:
        TrackingConfigError: for a file-store URI (``./mlruns``, ``file:``), which MLflow 3 rejects.
    """
    source = "--tracking-uri"
    uri = (flag or "").strip()
    if not uri:
        source = TRACKING_URI_ENV
        uri = os.environ.get(TRACKING_URI_ENV, "").strip()
    if not uri:
        uri = default_tracking_uri()
        logger.debug("tracking URI (default): %s", uri)
        return uri
    scheme = urlparse(uri).scheme
    if not scheme or len(scheme) == 1:  # a bare path (a one-letter scheme is a Windows drive)
        if Path(uri).suffix.lower() in (".db", ".sqlite", ".sqlite3"):
            uri = _SQLITE_PREFIX + Path(uri).expanduser().resolve().as_posix()
        else:
            raise TrackingConfigError(
                f"{source}: {uri!r} is a file-store path, which MLflow 3 rejects; "
                f"use sqlite:///{Path(uri).expanduser().resolve().as_posix()}.db or http://HOST:PORT"
            )
    elif scheme == "file":
        raise TrackingConfigError(
            f"{source}: {uri!r} is a file store, which MLflow 3 rejects; use a sqlite:/// or http:// URI"
        )
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        uri = _SQLITE_PREFIX + db.as_posix()
    logger.debug("tracking URI (%s): %s", source, uri)
    return uri


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast when an ``http(s)://`` tracking server does not answer (other schemes pass).

    MLflow's own client retries a dead server for minutes before it gives up; jobs call this
    first so that an unreachable server stops them before any compute, in one line.

    Raises:
        TrackingConfigError: naming the URI and the reason.
    """
    import urllib.error
    import urllib.request

    if urlparse(uri).scheme not in ("http", "https"):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
            return
    except urllib.error.HTTPError:  # it answered (a proxy without /health, an auth wall): reachable
        return
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingConfigError(
            f"the MLflow server at {uri} is not reachable ({reason}); start it (mlflow/server.sh), "
            "point --tracking-uri / MLFLOW_TRACKING_URI elsewhere, or turn tracking off"
        ) from None


def default_artifact_root(tracking_uri: str) -> Path | None:
    """Local directory for experiment artifacts, or None when the server decides.

    SQLite stores keep artifacts next to the database (``<db dir>/mlartifacts``); other
    database backends without a server use ``<state dir>/mlartifacts``; tracking servers
    (``http(s)://``) manage their own artifact store.
    """
    scheme = urlparse(tracking_uri).scheme
    if scheme in _REMOTE_SCHEMES:
        return None
    db = sqlite_path(tracking_uri)
    base = db.parent if db is not None else state_dir()
    return base / ARTIFACTS_DIR_NAME


def _slug(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return slug or "experiment"


def get_or_create_experiment(client: "MlflowClient", name: str, tracking_uri: str) -> str:
    """Id of the experiment ``name``, creating it with a local artifact location when needed.

    Raises:
        TrackingConfigError: when the experiment exists but is deleted.
    """
    from mlflow.exceptions import MlflowException

    if not name or not name.strip():
        raise TrackingConfigError("experiment: name must not be empty")
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise TrackingConfigError(
                f"experiment: {name!r} is deleted in {tracking_uri}; restore it "
                "(mlflow experiments restore) or choose another name"
            )
        return exp.experiment_id
    root = default_artifact_root(tracking_uri)
    location = None
    if root is not None:
        path = root / _slug(name)
        path.mkdir(parents=True, exist_ok=True)
        location = path.as_uri()
    try:
        exp_id = client.create_experiment(name, artifact_location=location)
    except MlflowException:
        # Another process created it between the lookup and the create.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id
    logger.info("created MLflow experiment %r (id %s, artifacts %s)", name, exp_id, location or "server")
    return exp_id


__all__ = [
    "ARTIFACTS_DIR_NAME",
    "DEFAULT_DB_NAME",
    "DEFAULT_EXPERIMENT",
    "OSSNET_HOME_ENV",
    "STATE_DIR_NAME",
    "TrackingConfigError",
    "default_artifact_root",
    "default_tracking_uri",
    "get_or_create_experiment",
    "resolve_tracking_uri",
    "sqlite_path",
    "state_dir",
]

"""Ray Jobs API client: submit ossnet commands to a cluster, follow and manage them.

A thin layer over :class:`ray.job_submission.JobSubmissionClient`. Addresses are the
dashboard URL of a cluster (``http://127.0.0.1:8275`` for ``infra/local-cluster.sh``).

Authentication: clusters with ``RAY_AUTH_MODE=token`` need a bearer token. Every function
takes ``auth_token``; when it is ``None`` the token comes from ``RAY_AUTH_TOKEN`` or the file
named by ``RAY_AUTH_TOKEN_PATH`` (Ray's own variables, printed by
``infra/local-cluster.sh env``), and failing both Ray's default lookup applies. The token is
sent as an explicit header, so it never depends on process-global Ray state.

The project travels to the cluster as a ``working_dir`` runtime_env (build outputs, stores,
virtual environments and tracking data excluded), and the folders whose import name differs
(``pipelines/`` is ``ossnet_pipelines``, ``tune/`` is ``ossnet_tune``) as ``py_modules`` under
their import names; the job runs ``python -m ossnet_cli`` from it, so the cluster needs the
project's dependencies but not the project installed, and runs the code that was submitted.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import logging
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence, TextIO

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobStatus, JobSubmissionClient

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent

#: Paths never uploaded with the project (gitignore syntax, as Ray's ``excludes`` expects).
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".venv/",
    "venv/",
    ".git/",
    ".ossnet/",
    "*.zarr/",
    "*.zarr",
    "mlruns/",
    "mlartifacts/",
    "*.db",
    "*.db-journal",
    "__pycache__/",
    "*.pyc",
    ".pytest_cache/",
    ".mypy_cache/",
    ".ruff_cache/",
    "*.egg-info/",
    "build/",
    "dist/",
    "data/",
    "outputs/",
    "*.nii",
    "*.nii.gz",
    "*.pt",
    "*.ckpt",
)

#: Variables forwarded from the submitting shell into the job when set there.
FORWARDED_ENV_VARS: tuple[str, ...] = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
)

#: Variables naming a cluster's Jobs API address, in the order the CLI consults them.
ADDRESS_ENV_VARS: tuple[str, ...] = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


class JobError(RuntimeError):
    """A job request failed (bad address, refused authentication, unknown job)."""


def resolve_auth_token(auth_token: str | None = None) -> str | None:
    """The bearer token for a cluster: the argument, ``RAY_AUTH_TOKEN``, or ``RAY_AUTH_TOKEN_PATH``.

    Raises:
        JobError: ``RAY_AUTH_TOKEN_PATH`` names a missing or empty file.
    """
    if auth_token:
        return auth_token.strip()
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as exc:
            raise JobError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token ({exc})") from exc
        if not token:
            raise JobError(f"RAY_AUTH_TOKEN_PATH={path}: the token file is empty")
        return token
    return None


def get_client(address: str, auth_token: str | None = None) -> JobSubmissionClient:
    """A Jobs API client for ``address`` (a dashboard URL such as ``http://127.0.0.1:8275``).

    Raises:
        JobError: the address is empty or the cluster cannot be reached or refuses the token.
    """
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    if not address:
        raise JobError("no cluster address: pass --address or set RAY_API_SERVER_ADDRESS")
    if "://" not in address:
        address = f"http://{address}"
    token = resolve_auth_token(auth_token)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as exc:
        hint = "a wrong token" if token else "no token (set RAY_AUTH_TOKEN_PATH)"
        raise JobError(f"the Ray Jobs API at {address} refused {hint}") from exc
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise JobError(f"cannot reach the Ray Jobs API at {address}: {exc}") from exc


#: Import name -> folder of the packages installed under another name (pyproject.toml package-dir).
RENAMED_PACKAGES: dict[str, str] = {"ossnet_pipelines": "pipelines", "ossnet_tune": "tune"}


def _stage_renamed_packages(root: Path) -> list[str]:
    """Copies of the project's renamed package folders, each under its import name, in a
    temporary folder removed at exit (Ray uploads them when the job is submitted)."""
    folders = {name: root / folder for name, folder in RENAMED_PACKAGES.items() if (root / folder / "__init__.py").is_file()}
    if not folders:
        return []
    stage = Path(tempfile.mkdtemp(prefix="ossnet-py-modules-"))
    atexit.register(shutil.rmtree, stage, True)
    for name, folder in folders.items():
        shutil.copytree(folder, stage / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return [str(stage / name) for name in folders]


def build_runtime_env(
    project_root: str | os.PathLike[str] | None = None,
    env_vars: Mapping[str, str] | None = None,
    excludes: Sequence[str] = DEFAULT_EXCLUDES,
) -> dict[str, Any]:
    """A runtime_env that carries the project and environment variables to the cluster.

    Args:
        project_root: directory uploaded as the job's ``working_dir`` (default: this repo).
        env_vars: variables set for the driver and every task/actor of the job, e.g.
            ``{"MLFLOW_TRACKING_URI": "http://mlflow:5000"}``.
        excludes: gitignore-style patterns left out of the upload.

    Raises:
        ValueError: the project root is not a directory, or a variable is not a string.
    """
    root = Path(project_root or PROJECT_ROOT).resolve()
    if not root.is_dir():
        raise ValueError(f"project_root {root}: not a directory")
    runtime_env: dict[str, Any] = {"working_dir": str(root), "excludes": list(excludes)}
    py_modules = _stage_renamed_packages(root)
    if py_modules:
        runtime_env["py_modules"] = py_modules
    if env_vars:
        bad = [k for k, v in env_vars.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ValueError(f"env_vars: values must be strings (bad keys: {bad})")
        runtime_env["env_vars"] = dict(env_vars)
    return runtime_env


def forwarded_env(
    extra: Mapping[str, str] | None = None, names: Sequence[str] = FORWARDED_ENV_VARS
) -> dict[str, str]:
    """Variables of this process worth carrying into a job (MLflow, S3), plus ``extra``."""
    env = {name: os.environ[name] for name in names if os.environ.get(name)}
    env.update(extra or {})
    return env


def submit_job(
    address: str,
    entrypoint: Sequence[str] | str,
    runtime_env: Mapping[str, Any] | None = None,
    submission_id: str | None = None,
    *,
    auth_token: str | None = None,
    metadata: Mapping[str, str] | None = None,
    entrypoint_num_cpus: float | None = None,
    entrypoint_num_gpus: float | None = None,
) -> str:
    """Submit a job; returns its submission id.

    Args:
        address: the cluster's Jobs API (dashboard) URL.
        entrypoint: a shell command, or an argv list (quoted for the shell here).
        runtime_env: see :func:`build_runtime_env`.
        submission_id: a stable id (must be unique on the cluster); Ray picks one if None.
        entrypoint_num_cpus / entrypoint_num_gpus: resources reserved for the driver; the
            default (none) lets the driver run anywhere, its Ray tasks ask for their own.
    """
    command = entrypoint if isinstance(entrypoint, str) else shlex.join(entrypoint)
    if not command.strip():
        raise ValueError("entrypoint is empty")
    client = get_client(address, auth_token)
    job_id = client.submit_job(
        entrypoint=command,
        runtime_env=dict(runtime_env) if runtime_env else None,
        submission_id=submission_id,
        metadata=dict(metadata) if metadata else None,
        entrypoint_num_cpus=entrypoint_num_cpus,
        entrypoint_num_gpus=entrypoint_num_gpus,
    )
    logger.info("submitted job %s to %s: %s", job_id, address, command)
    return job_id


def job_status(address: str, job_id: str, *, auth_token: str | None = None) -> JobStatus:
    """The current status of a job."""
    return get_client(address, auth_token).get_job_status(job_id)


def wait_job(
    address: str,
    job_id: str,
    timeout_s: float | None = None,
    poll_s: float = 1.0,
    *,
    auth_token: str | None = None,
) -> JobStatus:
    """Poll until the job is terminal (SUCCEEDED, FAILED or STOPPED) and return the status.

    Raises:
        TimeoutError: still running after ``timeout_s`` seconds.
    """
    client = get_client(address, auth_token)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return status
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout_s:.0f}s")
        time.sleep(poll_s)


def _run_coroutine(coro: Any) -> Any:
    """``asyncio.run`` that also works when the caller already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = asyncio.run(coro)
        except BaseException as exc:  # re-raised in the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=target, name="ossnet-job-logs", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")


def follow_logs(
    address: str,
    job_id: str,
    out: TextIO | None = None,
    *,
    auth_token: str | None = None,
) -> JobStatus:
    """Stream a job's logs to ``out`` (default stdout) until it is terminal; return its status.

    The tail is a websocket that Ray closes when the job ends. If it drops early (a dashboard
    restart), the rest of the log is fetched once the job is terminal, so no line is lost or
    printed twice.
    """
    stream = out if out is not None else sys.stdout
    client = get_client(address, auth_token)
    written = 0

    async def tail() -> None:
        nonlocal written
        async for chunk in client.tail_job_logs(job_id):
            stream.write(chunk)
            stream.flush()
            written += len(chunk)

    try:
        _run_coroutine(tail())
    except Exception as exc:  # websocket/aiohttp errors: fall back to the stored log
        logger.warning("log stream of job %s interrupted (%s); waiting for the job", job_id, exc)
    status = wait_job(address, job_id, auth_token=auth_token)
    rest = client.get_job_logs(job_id)[written:]
    if rest:
        stream.write(rest)
        stream.flush()
    return status


def list_jobs(address: str, *, auth_token: str | None = None) -> list[JobDetails]:
    """All jobs the cluster knows, oldest first."""
    jobs = get_client(address, auth_token).list_jobs()
    return sorted(jobs, key=lambda j: j.start_time or 0)


def job_logs(address: str, job_id: str, *, auth_token: str | None = None) -> str:
    """The full log of a job so far."""
    return get_client(address, auth_token).get_job_logs(job_id)


def stop_job(address: str, job_id: str, *, auth_token: str | None = None) -> bool:
    """Ask the cluster to stop a job; True if it was running and is being stopped."""
    stopped = get_client(address, auth_token).stop_job(job_id)
    logger.info("stop job %s: %s", job_id, "requested" if stopped else "not running")
    return bool(stopped)


def cli_entrypoint(argv: Sequence[str]) -> list[str]:
    """The argv a job runs for ``ossnet <argv>``: the CLI module, from the uploaded project."""
    return ["python", "-m", "ossnet_cli", *argv]


def submit_cli_command(
    address: str,
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    *,
    auth_token: str | None = None,
    project_root: str | os.PathLike[str] | None = None,
    submission_id: str | None = None,
    out: TextIO | None = None,
) -> int:
    """Run ``ossnet <argv>`` as a cluster job, stream its logs; 0 if it SUCCEEDED, else 1.

    Args:
        address: the cluster's Jobs API URL.
        argv: the subcommand and its arguments, without ``--address``, local paths already
            absolute (the job runs in an uploaded copy of the project).
        env: variables for the job; MLflow/S3 variables of this process are added when
            not given here (see :data:`FORWARDED_ENV_VARS`).
        out: where the job's log goes (default stdout).
    """
    if "--address" in argv or any(a.startswith("--address=") for a in argv):
        raise ValueError("argv must not contain --address (the job would resubmit itself)")
    job_env = forwarded_env(env)
    uri = job_env.get("MLFLOW_TRACKING_URI", "")
    if not uri or uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        logger.warning(
            "MLFLOW_TRACKING_URI for the job is %r: a local store is private to the node the "
            "driver lands on (and a relative path to its temporary working copy); pass a "
            "tracking server URI",
            uri or "(unset)",
        )
    runtime_env = build_runtime_env(project_root, job_env)
    job_id = submit_job(
        address, cli_entrypoint(argv), runtime_env, submission_id, auth_token=auth_token
    )
    try:
        status = follow_logs(address, job_id, out, auth_token=auth_token)
    except KeyboardInterrupt:
        logger.warning("interrupted: stopping job %s", job_id)
        stop_job(address, job_id, auth_token=auth_token)
        raise
    logger.info("job %s finished: %s", job_id, status)
    return 0 if str(status) == "SUCCEEDED" else 1


def default_address() -> str | None:
    """The Jobs API address from ``RAY_API_SERVER_ADDRESS`` / ``RAY_ADDRESS`` if it is a URL."""
    for name in ADDRESS_ENV_VARS:
        value = os.environ.get(name, "")
        if value.startswith(("http://", "https://")):
            return value
    return None


def configure_jobs_parser(parser: argparse.ArgumentParser) -> None:
    """Add ``list``, ``status JOB``, ``logs JOB [--follow]`` and ``stop JOB`` to ``parser``."""
    parser.add_argument(
        "--address",
        default=default_address(),
        help="the cluster's Jobs API URL, e.g. http://127.0.0.1:8275 "
        "(default: $RAY_API_SERVER_ADDRESS)",
    )
    sub = parser.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    sub.add_parser("list", help="list the cluster's jobs")
    status = sub.add_parser("status", help="print a job's status")
    status.add_argument("job_id", metavar="JOB")
    logs = sub.add_parser("logs", help="print a job's logs")
    logs.add_argument("job_id", metavar="JOB")
    logs.add_argument("-f", "--follow", action="store_true", help="follow until the job ends")
    stop = sub.add_parser("stop", help="stop a running job")
    stop.add_argument("job_id", metavar="JOB")


def _format_time(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def run_jobs_cli(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Execute a parsed ``ossnet jobs ...`` command; returns the exit code."""
    stream = out if out is not None else sys.stdout
    address: str | None = args.address
    if not address:
        logger.error("no cluster address: pass --address or set RAY_API_SERVER_ADDRESS")
        return 2
    try:
        if args.jobs_command == "list":
            stream.write(f"{'SUBMISSION ID':<32} {'STATUS':<10} {'STARTED':<19}  ENTRYPOINT\n")
            for job in list_jobs(address):
                stream.write(
                    f"{job.submission_id or job.job_id or '-':<32} {str(job.status):<10} "
                    f"{_format_time(job.start_time):<19}  {job.entrypoint}\n"
                )
            return 0
        if args.jobs_command == "status":
            status = job_status(address, args.job_id)
            stream.write(f"{status}\n")
            return 0
        if args.jobs_command == "logs":
            if args.follow:
                status = follow_logs(address, args.job_id, stream)
                return 0 if str(status) == "SUCCEEDED" else 1
            stream.write(job_logs(address, args.job_id))
            return 0
        if args.jobs_command == "stop":
            stopped = stop_job(address, args.job_id)
            stream.write(f"{args.job_id}: {'stopping' if stopped else 'not running'}\n")
            return 0
    except JobError as exc:
        logger.error("%s", exc)
        return 1
    except RuntimeError as exc:  # Ray's SDK reports HTTP errors (unknown job, ...) this way
        logger.error("ossnet jobs %s: %s", args.jobs_command, exc)
        return 1
    raise ValueError(f"unknown jobs action {args.jobs_command!r}")

"""``ossnet jobs`` and the local-cluster script without a cluster: argument handling, runtime
environments, auth tokens and settings validation (the e2e tier runs them against a cluster)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ossnet_pipelines import jobs

CLUSTER_SCRIPT = Path(__file__).resolve().parents[2] / "infra" / "local-cluster.sh"


def _jobs_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ossnet jobs")
    jobs.configure_jobs_parser(parser)
    return parser


def test_cluster_script_rejects_bad_settings(tmp_path: Path) -> None:
    env = {**os.environ, "OSSNET_CLUSTER_STATE_DIR": str(tmp_path), "OSSNET_CLUSTER_AUTH": "none"}
    proc = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start"], env=env, capture_output=True,
                          text=True, timeout=30, check=False)
    assert proc.returncode == 1
    assert "OSSNET_CLUSTER_AUTH must be 'token' or 'disabled'" in proc.stderr
    env["OSSNET_CLUSTER_AUTH"] = "token"
    env["OSSNET_CLUSTER_CPUS"] = "two"
    proc = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start"], env=env, capture_output=True,
                          text=True, timeout=30, check=False)
    assert proc.returncode == 1
    assert "OSSNET_CLUSTER_CPUS must be a non-negative integer, got 'two'" in proc.stderr


def test_cli_entrypoint_and_infer_submission_resolves_local_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io
    import json

    from ossnet_cli import build_parser
    from ossnet_pipelines.infer.cli import _submit_argv, job_from_args

    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"x")
    argv = ["infer", "scans", "--output", "out", "--model", "model.pt", "--labels", "refs",
            "--address", "http://127.0.0.1:1"]
    args = build_parser(argv).parse_args(argv)
    submitted = _submit_argv(args, job_from_args(args), io.StringIO())
    assert submitted[:2] == ["infer", "--config-json"] and "--address" not in submitted
    job = json.loads(submitted[2])
    assert (job["input"], job["output"], job["labels"], job["model"]) == (
        str(tmp_path / "scans"), str(tmp_path / "out"), str(tmp_path / "refs"), str(tmp_path / "model.pt"))
    # What the cluster runs parses back to the same job.
    back = build_parser(submitted).parse_args(submitted)
    assert job_from_args(back).to_dict() == job
    assert jobs.cli_entrypoint(["train", "--name", "a b"]) == [
        "python", "-m", "ossnet_cli", "train", "--name", "a b"]


def test_build_runtime_env_carries_project_and_env(tmp_path: Path) -> None:
    env = jobs.build_runtime_env(tmp_path, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"})
    assert env["working_dir"] == str(tmp_path.resolve())
    assert env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}
    assert {".venv/", ".git/", ".ossnet/", "*.zarr"} <= set(env["excludes"])
    with pytest.raises(ValueError, match="not a directory"):
        jobs.build_runtime_env(tmp_path / "missing")
    with pytest.raises(ValueError, match="EPOCHS"):
        jobs.build_runtime_env(tmp_path, {"EPOCHS": 3})  # type: ignore[dict-item]
    assert "py_modules" not in env  # a plain folder: nothing to rename


def test_the_runtime_env_ships_renamed_packages_under_their_import_names(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = jobs.build_runtime_env(jobs.PROJECT_ROOT)
    staged = [Path(p) for p in env["py_modules"]]
    assert [p.name for p in staged] == ["ossnet_pipelines", "ossnet_tune"]
    assert (staged[0] / "jobs.py").read_text() == Path(jobs.__file__).read_text()
    assert not list(staged[0].rglob("__pycache__"))
    # What a cluster without the project installed does: py_modules and working_dir on sys.path.
    script = ("import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
              f"sys.path[:0] = [{str(staged[0].parent)!r}, {str(jobs.PROJECT_ROOT)!r}]; "
              "import ossnet_cli, ossnet_tune.cli, ossnet_pipelines.jobs as j; print(j.__file__)")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).is_relative_to(staged[0])


def test_auth_token_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert jobs.resolve_auth_token() is None
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert jobs.resolve_auth_token() == "from-file"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert jobs.resolve_auth_token() == "from-env"
    assert jobs.resolve_auth_token("explicit") == "explicit"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    token_file.write_text("")
    with pytest.raises(jobs.JobError, match="token file is empty"):
        jobs.resolve_auth_token()


def test_jobs_parser_is_strict(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8275")
    parser = _jobs_parser()
    args = parser.parse_args(["logs", "raysubmit_1", "--follow"])
    assert (args.address, args.jobs_command, args.job_id, args.follow) == (
        "http://127.0.0.1:8275", "logs", "raysubmit_1", True)
    with pytest.raises(SystemExit):
        parser.parse_args(["stop"])  # JOB is required
    with pytest.raises(SystemExit):
        parser.parse_args(["list", "--bogus"])


def test_help_and_version_load_no_heavy_library() -> None:
    """``ossnet --help``, every ``ossnet COMMAND --help`` and ``--version`` answer without importing
    torch, Ray or MLflow (their speed is measured by ``python -m ossnet_bench.cli``)."""
    from ossnet_cli import SUBCOMMANDS

    code = (
        "import sys\n"
        "from ossnet_cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))\n"
    )
    for argv in (["--help"], ["--version"], *([c.name, "--help"] for c in SUBCOMMANDS)):
        proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                              check=False)
        assert proc.stdout.strip().splitlines()[-1] == "HEAVY []", (argv, proc.stdout[-500:], proc.stderr[-2000:])
        assert "usage: ossnet" in proc.stdout or "ossnet " in proc.stdout
        assert "``" not in proc.stdout and ":class:" not in proc.stdout, argv  # no reST markup in help

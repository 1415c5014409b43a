"""ossnet_pipelines.jobrunner: one set of exit codes and error lines for train, tune and infer."""

from __future__ import annotations

import argparse
import io
from typing import Any

import pytest

from ossnet.config import ConfigError
from ossnet_pipelines.jobrunner import EXIT_BAD_INPUT, EXIT_FAILED, JobCommand, run_job_command


def _command(build: Any = lambda args: {"n": args.n}, run: Any = None, **kw: Any) -> JobCommand:
    def default_run(args: argparse.Namespace, job: Any, out: io.StringIO) -> int:
        out.write(f"ran {job['n']}\n")
        return 0

    return JobCommand(what="the work", build=build, run=run or default_run,
                      submit_argv=lambda args, job, out: ["work", "--n", str(job["n"])], **kw)


def _args(**kw: Any) -> argparse.Namespace:
    return argparse.Namespace(**{"n": 3, "address": None, "dry_run": False, **kw})


def test_runs_dry_runs_and_submits(monkeypatch: pytest.MonkeyPatch) -> None:
    from ossnet_pipelines import jobs

    out = io.StringIO()
    assert run_job_command(_command(), _args(), out, io.StringIO()) == 0 and out.getvalue() == "ran 3\n"
    dry = _command(dry_run=lambda args, job, out: out.write("would run\n") and 0)
    out = io.StringIO()
    assert run_job_command(dry, _args(dry_run=True), out, io.StringIO()) == 0 and out.getvalue() == "would run\n"
    calls = []
    monkeypatch.setattr(jobs, "submit_cli_command", lambda address, argv, **kw: calls.append((address, argv)) or 5)
    assert run_job_command(_command(), _args(address="http://127.0.0.1:8275"), io.StringIO(), io.StringIO()) == 5
    assert calls == [("http://127.0.0.1:8275", ["work", "--n", "3"])]


def test_bad_input_is_exit_2_and_failures_exit_1_with_one_line() -> None:
    def bad(args: argparse.Namespace) -> Any:
        raise ConfigError("train.epochs: must be >= 1, got 0")

    err = io.StringIO()
    assert run_job_command(_command(build=bad), _args(), io.StringIO(), err) == EXIT_BAD_INPUT
    assert err.getvalue() == "error: train.epochs: must be >= 1, got 0\n"

    hinted = _command(build=bad, hint=lambda job, exc: "; create it first")
    err = io.StringIO()
    run_job_command(hinted, _args(), io.StringIO(), err)
    assert err.getvalue() == "error: train.epochs: must be >= 1, got 0\n"  # no job was built: no hint

    def broken(args: argparse.Namespace, job: Any, out: io.StringIO) -> int:
        raise RuntimeError("disk full\nmore detail")

    err = io.StringIO()
    assert run_job_command(_command(run=broken), _args(), io.StringIO(), err) == EXIT_FAILED
    assert err.getvalue() == "error: the work failed: RuntimeError: disk full\n"

    def lookup(args: argparse.Namespace, job: Any, out: io.StringIO) -> int:
        raise KeyError("no such model")

    err = io.StringIO()
    assert run_job_command(_command(run=lookup, bad_input=(KeyError,)), _args(), io.StringIO(), err) == EXIT_BAD_INPUT

"""End to end: the local multi-node Ray cluster, the Jobs API wrapper and the MLflow server.

Run alone (never next to tests/ray's Ray instance): ``pytest tests/e2e/test_cluster.py -m slow``.
"""

from __future__ import annotations

import argparse
import io
import json
import textwrap
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ossnet_pipelines import jobs

if TYPE_CHECKING:
    from conftest import LocalCluster, MlflowServer


pytestmark = pytest.mark.slow

PROBE_SCRIPT = textwrap.dedent(
    """
    import json, os, ray

    ray.init()
    value = os.environ.get("OSSNET_PROBE")

    @ray.remote(num_cpus=1)
    def where():
        return ray.get_runtime_context().get_node_id(), os.environ.get("OSSNET_PROBE")

    # STRICT_SPREAD: one bundle per node, so the two tasks must run on different nodes.
    pg = ray.util.placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
    ray.get(pg.ready(), timeout=120)
    strategy = ray.util.scheduling_strategies.PlacementGroupSchedulingStrategy
    results = ray.get([
        where.options(scheduling_strategy=strategy(pg, placement_group_bundle_index=i)).remote()
        for i in range(2)
    ])
    alive = [n for n in ray.nodes() if n["Alive"]]
    print("RESULT " + json.dumps({
        "driver_env": value,
        "task_env": [env for _, env in results],
        "task_nodes": sorted({node for node, _ in results}),
        "alive_nodes": len(alive),
        "cpus_per_node": sorted(n["Resources"].get("CPU", 0) for n in alive),
    }))
    """
)

MLFLOW_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import mlflow
    from mlflow.pyfunc import PythonModel

    class Identity(PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    model_name, where = sys.argv[1], sys.argv[2]
    mlflow.set_experiment("ossnet-e2e")
    with mlflow.start_run(run_name=f"probe-{where}") as run:
        mlflow.log_params({"where": where, "probe": os.environ.get("OSSNET_PROBE", "")})
        for step, value in enumerate((0.25, 0.5, 0.75)):
            mlflow.log_metric("val_dice", value, step=step)
        mlflow.log_text("37x41x29", "notes/shape.txt")
        info = mlflow.pyfunc.log_model(
            name="model", python_model=Identity(), pip_requirements=["mlflow"],
            registered_model_name=model_name,
        )
    x = np.arange(37 * 3, dtype=np.float32).reshape(37, 3)
    loaded = mlflow.pyfunc.load_model(f"models:/{model_name}/{info.registered_model_version}")
    y = np.asarray(loaded.predict(x))
    print("RESULT " + json.dumps({
        "run_id": run.info.run_id,
        "version": int(info.registered_model_version),
        "identity": bool(x.shape == y.shape and np.array_equal(x, y)),
        "tracking_uri": mlflow.get_tracking_uri(),
    }))
    """
)


def _result(log: str) -> dict:
    lines = [line for line in log.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no RESULT line in the job log:\n{log[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def _project(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "project"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def _jobs_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ossnet jobs")
    jobs.configure_jobs_parser(parser)
    return parser


def _wait_status(cluster: LocalCluster, job_id: str, wanted: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        status = str(jobs.job_status(cluster.address, job_id, auth_token=cluster.auth_token))
        if status == wanted:
            return
        assert status in ("PENDING", "RUNNING"), f"job {job_id} ended {status}"
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not {wanted} after {timeout_s}s (last {status})")


def _verify_mlflow_run(server: MlflowServer, result: dict, model_name: str, where: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["where"] == where
    history = sorted(client.get_metric_history(run.info.run_id, "val_dice"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(0, 0.25), (1, 0.5), (2, 0.75)]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "notes")] == ["notes/shape.txt"]
    version = client.get_model_version(model_name, str(result["version"]))
    assert version.run_id == run.info.run_id
    assert version.status == "READY"
    assert result["identity"], "the registered pyfunc did not return its input"
    # Artifacts went through the server's proxy into its local artifact store.
    store = server.home / "mlartifacts"
    assert any(p.read_text() == "37x41x29" for p in store.rglob("shape.txt"))
    assert list(store.rglob("MLmodel")), f"no model files under {store}"


def test_status_and_env_report_the_cluster(local_cluster: LocalCluster) -> None:
    status = local_cluster.run_script("status", 60)
    assert status.returncode == 0, status.stderr
    assert f"address:    {local_cluster.address}" in status.stdout
    assert status.stdout.count(" running") == 2
    assert "alive nodes (Ray): 2" in status.stdout
    env = local_cluster.run_script("env", 30)
    assert f"export RAY_AUTH_TOKEN_PATH={local_cluster.token_path}" in env.stdout
    assert f"export RAY_API_SERVER_ADDRESS={local_cluster.address}" in env.stdout
    assert oct(local_cluster.token_path.stat().st_mode & 0o777) == "0o600"


def test_job_runs_on_both_nodes_and_sees_its_env(local_cluster: LocalCluster,
                                                tmp_path: Path) -> None:
    project = _project(tmp_path, {"probe.py": PROBE_SCRIPT})
    value = f"probe-{uuid.uuid4().hex[:8]}"
    runtime_env = jobs.build_runtime_env(project, {"OSSNET_PROBE": value})
    job_id = jobs.submit_job(local_cluster.address, ["python", "probe.py"], runtime_env,
                             auth_token=local_cluster.auth_token)
    out = io.StringIO()
    status = jobs.follow_logs(local_cluster.address, job_id, out,
                              auth_token=local_cluster.auth_token)
    log = out.getvalue()
    assert str(status) == "SUCCEEDED", log[-3000:]
    result = _result(log)
    assert result["driver_env"] == value
    assert result["task_env"] == [value, value]
    assert len(result["task_nodes"]) == 2, "STRICT_SPREAD tasks did not land on two nodes"
    assert result["alive_nodes"] == 2
    assert result["cpus_per_node"] == [2.0, 2.0]
    # The streamed log is the whole log: nothing lost or repeated.
    assert log == jobs.job_logs(local_cluster.address, job_id, auth_token=local_cluster.auth_token)


def test_jobs_api_refuses_a_wrong_or_missing_token(local_cluster: LocalCluster,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(jobs.JobError, match="refused a wrong token"):
        jobs.list_jobs(local_cluster.address, auth_token="not-the-token")
    with pytest.raises(jobs.JobError, match="refused"):
        jobs.list_jobs(local_cluster.address)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(local_cluster.token_path))
    assert isinstance(jobs.list_jobs(local_cluster.address), list)  # token from the env


def test_list_and_stop_a_long_running_job(local_cluster: LocalCluster,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    submission_id = f"ossnet-e2e-sleep-{uuid.uuid4().hex[:8]}"
    job_id = jobs.submit_job(
        local_cluster.address,
        ["python", "-c", "import time; print('sleeping', flush=True); time.sleep(600)"],
        None, submission_id, auth_token=local_cluster.auth_token,
    )
    assert job_id == submission_id
    _wait_status(local_cluster, job_id, "RUNNING", 120)

    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(local_cluster.token_path))
    parser = _jobs_parser()
    out = io.StringIO()
    assert jobs.run_jobs_cli(parser.parse_args(["--address", local_cluster.address, "list"]),
                             out) == 0
    row = next(line for line in out.getvalue().splitlines() if line.startswith(job_id))
    assert " RUNNING " in row

    out = io.StringIO()
    assert jobs.run_jobs_cli(
        parser.parse_args(["--address", local_cluster.address, "stop", job_id]), out) == 0
    assert out.getvalue() == f"{job_id}: stopping\n"
    status = jobs.wait_job(local_cluster.address, job_id, timeout_s=60,
                           auth_token=local_cluster.auth_token)
    assert str(status) == "STOPPED"
    assert "sleeping" in jobs.job_logs(local_cluster.address, job_id,
                                       auth_token=local_cluster.auth_token)
    out = io.StringIO()
    assert jobs.run_jobs_cli(
        parser.parse_args(["--address", local_cluster.address, "logs", "no-such-job"]), out) == 1


def test_submit_cli_command_runs_the_project_cli(local_cluster: LocalCluster,
                                                 tmp_path: Path) -> None:
    # A stand-in project whose CLI echoes its argv and environment.
    cli = textwrap.dedent(
        """
        import os, sys
        def main(argv=None):
            argv = sys.argv[1:] if argv is None else argv
            print("ARGV", argv, "URI", os.environ.get("MLFLOW_TRACKING_URI"), flush=True)
            print("UPLOADED .venv:", os.path.exists(".venv"), flush=True)
            return 0 if argv[:1] == ["ok"] else 3
        if __name__ == "__main__":
            sys.exit(main())
        """
    )
    project = _project(tmp_path, {"ossnet_cli/__init__.py": "", "ossnet_cli/__main__.py": cli,
                                  ".venv/big.bin": "x" * 1000})
    env = {"MLFLOW_TRACKING_URI": "http://mlflow.example:5000"}
    out = io.StringIO()
    rc = jobs.submit_cli_command(local_cluster.address, ["ok", "--name", "a b"], env,
                                 auth_token=local_cluster.auth_token, project_root=project,
                                 out=out)
    assert rc == 0, out.getvalue()[-2000:]
    assert "ARGV ['ok', '--name', 'a b'] URI http://mlflow.example:5000" in out.getvalue()
    assert "UPLOADED .venv: False" in out.getvalue()

    out = io.StringIO()
    rc = jobs.submit_cli_command(local_cluster.address, ["fail"], env,
                                 auth_token=local_cluster.auth_token, project_root=project,
                                 out=out)
    assert rc == 1
    with pytest.raises(ValueError, match="--address"):
        jobs.submit_cli_command(local_cluster.address, ["train", "--address=x"], env)


def test_mlflow_server_checks_the_host_header(mlflow_server: MlflowServer) -> None:
    def get(host: str) -> int:
        request = urllib.request.Request(
            f"{mlflow_server.uri}/api/2.0/mlflow/experiments/search?max_results=1",
            headers={"Host": host},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    port = mlflow_server.uri.rsplit(":", 1)[1]
    assert get(f"127.0.0.1:{port}") == 200
    assert get(f"localhost:{port}") == 200
    assert get(f"rebind.attacker.example:{port}") == 403
    assert (mlflow_server.home / "mlflow.db").is_file()


def test_cluster_job_logs_to_mlflow_through_runtime_env(local_cluster: LocalCluster,
                                                        mlflow_server: MlflowServer,
                                                        tmp_path: Path) -> None:
    """A job gets MLFLOW_TRACKING_URI from its runtime_env and logs a run, metrics, an
    artifact and a registered pyfunc model through the server, then loads the model back."""
    project = _project(tmp_path, {"log_model.py": MLFLOW_SCRIPT})
    runtime_env = jobs.build_runtime_env(project, {"MLFLOW_TRACKING_URI": mlflow_server.uri})
    job_id = jobs.submit_job(local_cluster.address,
                             ["python", "log_model.py", "ossnet-e2e-job", "ray-job"],
                             runtime_env, auth_token=local_cluster.auth_token)
    out = io.StringIO()
    status = jobs.follow_logs(local_cluster.address, job_id, out,
                              auth_token=local_cluster.auth_token)
    assert str(status) == "SUCCEEDED", out.getvalue()[-3000:]
    result = _result(out.getvalue())
    assert result["tracking_uri"] == mlflow_server.uri
    _verify_mlflow_run(mlflow_server, result, "ossnet-e2e-job", "ray-job")

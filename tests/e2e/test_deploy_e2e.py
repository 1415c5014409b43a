"""End to end: a RayJob entrypoint from infra/kuberay/ submitted through the Ray Jobs API.

The batch-inference RayJob's own entrypoint and runtimeEnvYAML run on the local multi-node
cluster (``infra/local-cluster.sh``) against a real MLflow server (``mlflow/server.sh``): the
command Kubernetes would run, with only the data locations and the actor sizes swapped for
local ones. The model comes from the registry by the manifest's own ``models:/NAME@champion``.

The MLflow server itself (starts on 127.0.0.1, logs a run and registers a model through a job,
stops by process id) is covered by ``tests/e2e/test_cluster.py``
(``test_cluster_job_logs_to_mlflow_through_runtime_env`` and the ``mlflow_server`` fixture).

Run alone: ``pytest tests/e2e/test_deploy_e2e.py -m slow`` (never next to tests/ray's Ray).
"""

from __future__ import annotations

import io
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from ossnet.checkpoint import PreprocessSpec, save_checkpoint
from ossnet.config import model_config
from ossnet.model import build_model
from ossnet_pipelines import jobs
from ossnet_cli import parse_entrypoint
from ossnet_pipelines.tracking import RunLogger, register_and_promote
from ossnet_pipelines.synthetic import ellipsoid_scan

if TYPE_CHECKING:
    from conftest import LocalCluster, MlflowServer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RAYJOB_INFER = REPO / "infra" / "kuberay" / "rayjob-infer.yaml"
GRID = (24, 24, 16)
# Odd sizes and a non-trivial affine: the masks must come back in each scan's own geometry.
SCANS = {"case-a": ((37, 41, 29), np.diag([1.2, 1.0, 1.5, 1.0])), "case-b": ((26, 22, 19), np.eye(4))}
JOB_TIMEOUT_S = 900


def _with_overrides(argv: Sequence[str], command: str, positional: str, flags: dict[str, str]) -> list[str]:
    """``argv`` with the subcommand's first positional and the values of ``flags`` replaced.

    Every flag must already be in ``argv``: the test changes the manifest's values, never its
    shape, so a flag renamed in the manifest fails here rather than being silently added.
    """
    out = list(argv)
    at = out.index(command) + 1
    assert not out[at].startswith("-"), f"{command} has no positional input in {shlex.join(argv)}"
    out[at] = positional
    for flag, value in flags.items():
        assert flag in out, f"{flag} is not in the manifest's entrypoint"
        out[out.index(flag) + 1] = value
    return out


def _register_champion(server: MlflowServer, name: str, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny single-channel OSS-Net C logged as a bundle, registered as ``name@champion``."""
    # MLflow resolves a version's models:/<id> source through the global URI, not the client's.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setenv("OSSNET_HOME", str(root / "client-home"))
    torch.manual_seed(0)
    model = build_model(model_config("C", "tiny", in_channels=1, volume_shape=GRID)).eval()
    ckpt = save_checkpoint(root / "model.pt", model, PreprocessSpec(modalities=("t1",), volume_shape=GRID))
    with RunLogger("deploy-e2e-model", experiment="ossnet-deploy-e2e", tracking_uri=server.uri) as run:
        info = run.log_model_bundle(ckpt, name="model")
    promotion = register_and_promote(info.model_uri, name, 0.5, "test_dice", tracking_uri=server.uri)
    assert (promotion.version, promotion.promoted) == (1, True)


def test_rayjob_infer_entrypoint_runs_as_a_ray_job(local_cluster: LocalCluster, mlflow_server: MlflowServer,
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = yaml.safe_load(RAYJOB_INFER.read_text())["spec"]
    entrypoint: str = manifest["entrypoint"]
    runtime_env_yaml = yaml.safe_load(manifest["runtimeEnvYAML"])
    args = parse_entrypoint(entrypoint)
    assert args.command == "infer"
    match = re.fullmatch(r"models:/([^@/]+)@champion", args.override_model)
    assert match, f"the infer RayJob should use a champion model, not {args.override_model}"
    _register_champion(mlflow_server, match.group(1), tmp_path, monkeypatch)

    scans = tmp_path / "scans"
    scans.mkdir()
    for i, (case_id, (shape, affine)) in enumerate(SCANS.items()):
        nib.save(nib.Nifti1Image(ellipsoid_scan(shape, i), affine), str(scans / f"{case_id}.nii.gz"))
    out = tmp_path / "predictions"
    argv = _with_overrides(shlex.split(entrypoint), "infer", str(scans), {
        "--output": str(out), "--actors": "1", "--gpus-per-actor": "0", "--cpus-per-actor": "1",
    })
    # The manifest's runtime_env, with the project uploaded from this checkout (as the image's
    # copy is on Kubernetes) and the tracking URI of the test server instead of the Service.
    env_vars = dict(runtime_env_yaml["env_vars"])
    env_vars.update(MLFLOW_TRACKING_URI=mlflow_server.uri, OSSNET_HOME=str(tmp_path / "job-home"))
    runtime_env = {
        "working_dir": str(REPO),
        "excludes": sorted({*jobs.DEFAULT_EXCLUDES, *runtime_env_yaml.get("excludes", [])}),
        "env_vars": env_vars,
    }
    job_id = jobs.submit_job(local_cluster.address, shlex.join(argv), runtime_env,
                             auth_token=local_cluster.auth_token)
    log = io.StringIO()
    status = jobs.follow_logs(local_cluster.address, job_id, log, auth_token=local_cluster.auth_token)
    assert str(status) == "SUCCEEDED", log.getvalue()[-4000:]

    report = pd.read_csv(out / "report.csv")
    assert sorted(report["case_id"]) == sorted(SCANS)
    assert set(report["status"]) == {"ok"}, report.to_string()
    # The alias was resolved through the server's registry to the version registered above.
    assert set(report["model"]) == {f"models:/{match.group(1)}/1"}
    for case_id, (shape, affine) in SCANS.items():
        mask = nib.load(str(out / "masks" / f"{case_id}.nii.gz"))
        assert mask.shape == shape and np.allclose(mask.affine, affine)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}

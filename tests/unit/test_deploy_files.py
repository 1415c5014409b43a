"""Deployment files (infra/, mlflow/) checked against the project: no Kubernetes, cloud or Docker.

What is checked: every YAML parses; each RayJob entrypoint goes through the ``ossnet`` parser and
its dry run; the Ray and Python versions of the images and manifests agree with the installed
Ray and ``pyproject.toml``; the clusters can place what each entrypoint asks Ray for; the
``ray up`` file passes Ray's own schema validation; the compose stack has health checks, named
volumes, loopback-only ports and no committed secrets.
"""

from __future__ import annotations

import argparse
import configparser
import copy
import fnmatch
import importlib.metadata
import io
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from ossnet_cli import dry_run, parse_entrypoint
from ossnet_tune.sweep import trial_actor_resources

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"
MLFLOW_DIR = REPO / "mlflow"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
RAY_UP = INFRA / "aws" / "cluster.yaml"
COMPOSE = MLFLOW_DIR / "compose.yaml"

YAML_FILES = sorted(p for d in (INFRA, MLFLOW_DIR) for p in d.rglob("*") if p.suffix in (".yaml", ".yml"))
RAYJOBS = sorted(KUBERAY.glob("rayjob-*.yaml"))
# Environment variable names that hold credentials (key ids included: they name an account).
SECRET_NAME = re.compile(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|_KEY_ID|CREDENTIAL)", re.IGNORECASE)
SECRET_VALUE_NAME = re.compile(r"(PASSWORD|SECRET)", re.IGNORECASE)
QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")
_UNITS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


# --------------------------------------------------------------------------- project facts


def _pyproject() -> dict[str, Any]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _requirement(name: str) -> Requirement:
    for dep in _pyproject()["project"]["dependencies"]:
        req = Requirement(dep)
        if req.name == name:
            return req
    raise AssertionError(f"pyproject.toml does not depend on {name}")


RAY_VERSION = importlib.metadata.version("ray")
MLFLOW_VERSION = importlib.metadata.version("mlflow")
PY_TAG = f"py{sys.version_info.major}{sys.version_info.minor}"
PROJECT_VERSION = _pyproject()["project"]["version"]
IMAGE_TAG = f"{PROJECT_VERSION}-ray{RAY_VERSION}-{PY_TAG}-gpu"


def _load(path: Path) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path}: expected one YAML document, found {len(docs)}"
    return docs[0]


def _dockerfile(path: Path) -> tuple[dict[str, str], str, list[str]]:
    """(global ARG defaults, resolved FROM image, instruction lines) of a Dockerfile."""
    lines, buf = [], ""
    for raw in path.read_text().splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        buf += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            lines.append(buf.strip())
            buf = ""
    args: dict[str, str] = {}
    base = ""
    for line in lines:
        word, _, rest = line.partition(" ")
        if word == "ARG" and not base and "=" in rest:
            key, _, value = rest.partition("=")
            args[key.strip()] = value.strip().strip('"')
        elif word == "FROM" and not base:
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest.split()[0])
    return args, base, lines


# --------------------------------------------------------------------------- cluster model


def _quantity(value: Any) -> float:
    m = QUANTITY.match(str(value))
    assert m, f"not a Kubernetes quantity: {value!r}"
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass(frozen=True)
class PodGroup:
    """What Ray sees of one head or worker group (KubeRay derives it from the container limits)."""

    name: str
    cpus: float
    gpus: float
    memory: float
    min_replicas: int
    max_replicas: int
    pod: Mapping[str, Any]

    @property
    def container(self) -> Mapping[str, Any]:
        return self.pod["containers"][0]

    def volume_mounts(self) -> dict[str, Mapping[str, Any]]:
        """mountPath -> volume definition."""
        volumes = {v["name"]: v for v in self.pod.get("volumes", [])}
        return {m["mountPath"]: volumes[m["name"]] for m in self.container.get("volumeMounts", [])}


def _group(name: str, group: Mapping[str, Any], head: bool) -> PodGroup:
    pod = group["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    params = group.get("rayStartParams") or {}
    cpus = _quantity(params["num-cpus"]) if "num-cpus" in params else _quantity(limits["cpu"])
    return PodGroup(
        name=name, cpus=cpus, gpus=_quantity(limits.get("nvidia.com/gpu", 0)), memory=_quantity(limits["memory"]),
        min_replicas=1 if head else int(group["minReplicas"]), max_replicas=1 if head else int(group["maxReplicas"]),
        pod=pod,
    )


def _groups(spec: Mapping[str, Any]) -> tuple[PodGroup, list[PodGroup]]:
    head = _group("head", spec["headGroupSpec"], head=True)
    return head, [_group(g["groupName"], g, head=False) for g in spec["workerGroupSpecs"]]


def _cluster_specs() -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(file name, RayClusterSpec) of the RayCluster and of every RayJob."""
    yield "raycluster.yaml", _load(KUBERAY / "raycluster.yaml")["spec"]
    for path in RAYJOBS:
        yield path.name, _load(path)["spec"]["rayClusterSpec"]


def _place(groups: list[PodGroup], bundles: list[dict[str, float]]) -> list[list[float]] | None:
    """Greedy first-fit of resource bundles onto every pod the groups can scale to.

    Returns the free [CPU, GPU] of each pod afterwards, or None when a bundle does not fit.
    GPU bundles go to GPU pods, CPU-only bundles prefer pods without GPUs.
    """
    pods = [[g.cpus, g.gpus] for g in groups for _ in range(g.max_replicas)]
    for bundle in sorted(bundles, key=lambda b: -b.get("GPU", 0.0)):
        cpu, gpu = bundle.get("CPU", 0.0), bundle.get("GPU", 0.0)
        order = sorted(range(len(pods)), key=lambda i: (pods[i][1] > 0) != (gpu > 0))
        for i in order:
            if pods[i][0] >= cpu - 1e-9 and pods[i][1] >= gpu - 1e-9:
                pods[i][0] -= cpu
                pods[i][1] -= gpu
                break
        else:
            return None
    return pods


def _demand(args: argparse.Namespace, job: Any, groups: list[PodGroup]) -> tuple[list[dict[str, float]], float]:
    """(resource bundles the entrypoint's job asks Ray for, CPUs its CPU tasks need at least)."""
    if args.command == "train":
        return [job.scaling.worker_resources()] * job.scaling.world_size, job.data.cpus_per_task
    if args.command == "infer":
        has_gpus = any(g.gpus > 0 for g in groups)
        gpus = job.gpus_per_actor if job.gpus_per_actor is not None else (1.0 if has_gpus else 0.0)
        return [{"CPU": job.cpus_per_actor, "GPU": gpus}] * job.actors, 1.0
    if args.command == "tune":
        # Each trial: its Train driver (a Tune actor) and its Train workers; as many trials at
        # once as the sweep asks for (at least one must fit).
        base = job.base
        trial = [trial_actor_resources(base, job.sweep.trial_cpus)]
        trial += [base.scaling.worker_resources()] * base.scaling.num_workers
        return trial * (job.sweep.max_concurrent_trials or 1), base.data.cpus_per_task
    raise AssertionError(f"no resource model for `ossnet {args.command}`")


def _validated(entrypoint: str, monkeypatch: pytest.MonkeyPatch) -> tuple[argparse.Namespace, Any]:
    monkeypatch.chdir(REPO)  # entrypoints use paths relative to the project (the job's working_dir)
    args = parse_entrypoint(entrypoint)
    return args, args.validate(args)


def _runtime_env(path: Path) -> dict[str, Any]:
    return yaml.safe_load(_load(path)["spec"]["runtimeEnvYAML"])


# --------------------------------------------------------------------------- every file


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_file_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) and d for d in docs), f"{path}: empty or not a mapping"


def test_the_expected_deployment_files_exist() -> None:
    names = {str(p.relative_to(REPO)) for p in YAML_FILES}
    assert {"infra/kuberay/raycluster.yaml", "infra/kuberay/rayjob-train.yaml", "infra/kuberay/rayjob-tune.yaml",
            "infra/kuberay/rayjob-infer.yaml", "infra/aws/cluster.yaml", "mlflow/compose.yaml"} <= names
    assert (MLFLOW_DIR / ".env.example").is_file() and (MLFLOW_DIR / "server.sh").is_file()


def test_mlflow_folder_holds_no_python_package() -> None:
    # A package named `mlflow` in the repo root would shadow the mlflow library.
    assert not list(MLFLOW_DIR.rglob("*.py")), "mlflow/ must not contain Python files"


# --------------------------------------------------------------------------- versions


def test_dockerfile_base_is_the_ray_image_of_the_project_versions() -> None:
    args, base, _ = _dockerfile(DOCKERFILE)
    repo, _, tag = base.partition(":")
    assert repo == "rayproject/ray"
    assert tag == f"{args['RAY_VERSION']}-{args['PYTHON_TAG']}-{args['RAY_PLATFORM']}"
    assert args["RAY_VERSION"] == RAY_VERSION, "the image's Ray differs from the installed Ray"
    assert _requirement("ray").specifier.contains(args["RAY_VERSION"])
    assert args["PYTHON_TAG"] == PY_TAG, "the image's Python differs from the project's environment"
    py = f"{args['PYTHON_TAG'][2]}.{args['PYTHON_TAG'][3:]}"
    assert SpecifierSet(_pyproject()["project"]["requires-python"]).contains(f"{py}.0")
    assert re.fullmatch(r"gpu|cu\d{3}", args["RAY_PLATFORM"]), "the image must be a GPU variant"


def test_dockerfile_installs_the_project_at_the_runtime_env_working_dir() -> None:
    _, _, lines = _dockerfile(DOCKERFILE)
    text = "\n".join(lines)
    assert "ray.__version__ == '${RAY_VERSION}'" in text, "the build must fail when Ray moves off the base image's"
    setuptools = _pyproject()["tool"]["setuptools"]
    folders = {setuptools["package-dir"].get(p, p) for p in setuptools["packages"] if "." not in p}
    copied = {line.split()[-1].removeprefix("./") for line in lines if line.startswith("COPY")}
    assert folders | {"configs"} <= copied, f"COPY misses {folders | {'configs'} - copied}"
    assert any("import ossnet_pipelines" in line or "ossnet_pipelines," in line for line in lines)
    workdirs = [line.split()[1] for line in lines if line.startswith("WORKDIR")]
    for path in RAYJOBS:
        assert _runtime_env(path)["working_dir"] == workdirs[-1], f"{path.name}: working_dir is not the project"
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    assert {".venv/", ".git/", "**/.env", "**/*.zarr"} <= set(ignore)


def test_manifests_use_the_project_image_and_ray_version() -> None:
    for name, spec in _cluster_specs():
        assert spec["rayVersion"] == RAY_VERSION, f"{name}: rayVersion"
        head, workers = _groups(spec)
        for group in (head, *workers):
            for container in group.pod["containers"]:
                assert container["image"].rsplit(":", 1)[1] == IMAGE_TAG, f"{name}/{group.name}: {container['image']}"
    ray_up = _load(RAY_UP)["docker"]
    assert ray_up["image"].rsplit(":", 1)[1] == IMAGE_TAG
    images = {c["image"] for _, s in _cluster_specs() for g in (_groups(s)[0], *_groups(s)[1])
              for c in g.pod["containers"]} | {ray_up["image"]}
    assert len(images) == 1, f"one image for every node, found {sorted(images)}"


def test_mlflow_image_matches_the_project_mlflow() -> None:
    args, base, _ = _dockerfile(MLFLOW_DIR / "Dockerfile")
    assert base == f"ghcr.io/mlflow/mlflow:v{MLFLOW_VERSION}"
    assert args["MLFLOW_VERSION"] == MLFLOW_VERSION and _requirement("mlflow").specifier.contains(MLFLOW_VERSION)
    build = _load(COMPOSE)["services"]["mlflow"]["build"]
    assert build["args"]["MLFLOW_VERSION"] == MLFLOW_VERSION
    assert (MLFLOW_DIR / build["dockerfile"]).is_file()


# --------------------------------------------------------------------------- KubeRay clusters


def test_clusters_autoscale_gpu_workers_from_zero_with_token_auth() -> None:
    for name, spec in _cluster_specs():
        assert spec["enableInTreeAutoscaling"] is True, name
        assert spec["authOptions"]["mode"] == "token", name
        head, workers = _groups(spec)
        assert head.cpus == 0, f"{name}: tasks must not land on the head (num-cpus: 0)"
        assert head.gpus == 0
        gpu_groups = [g for g in workers if g.gpus > 0]
        assert gpu_groups, f"{name}: no GPU worker group"
        for g in gpu_groups:
            assert g.min_replicas == 0 and g.max_replicas >= 1, f"{name}/{g.name}: must scale from 0"
            limits, requests = g.container["resources"]["limits"], g.container["resources"].get("requests", {})
            # Kubernetes schedules GPUs by limits; a request, if any, must be the same.
            assert requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"], name


def test_every_ray_pod_has_an_object_store_shared_memory_volume() -> None:
    for name, spec in _cluster_specs():
        head, workers = _groups(spec)
        for g in (head, *workers):
            shm = g.volume_mounts().get("/dev/shm")
            assert shm is not None, f"{name}/{g.name}: no /dev/shm volume"
            assert shm["emptyDir"]["medium"] == "Memory", f"{name}/{g.name}"
            # Ray's default object store is 30% of the memory; /dev/shm must hold it.
            assert _quantity(shm["emptyDir"]["sizeLimit"]) >= 0.3 * g.memory, f"{name}/{g.name}: /dev/shm too small"


def _env(container: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(container.get("env") or [])


def test_secrets_come_from_kubernetes_secrets_never_from_literals_or_runtime_env() -> None:
    for name, spec in _cluster_specs():
        head, workers = _groups(spec)
        for g in (head, *workers):
            names = set()
            for var in _env(g.container):
                names.add(var["name"])
                if SECRET_NAME.search(var["name"]):
                    assert "value" not in var, f"{name}/{g.name}: {var['name']} is a literal"
                    assert "secretKeyRef" in var["valueFrom"], f"{name}/{g.name}: {var['name']}"
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD"} <= names, f"{name}/{g.name}"
    for path in RAYJOBS:
        env_vars = _runtime_env(path)["env_vars"]
        leaked = [k for k in env_vars if SECRET_NAME.search(k)]
        assert not leaked, f"{path.name}: secrets in runtimeEnvYAML (visible in the dashboard): {leaked}"


def test_rayjobs_pass_tracking_and_object_store_settings_through_runtime_env() -> None:
    compose_env = _load(COMPOSE)["services"]["mlflow"]["environment"]
    allowed = ["localhost", "localhost:*", "127.0.0.1", "127.0.0.1:*",
               *compose_env["OSSNET_MLFLOW_ALLOWED_HOSTS"].split(",")]
    for path in RAYJOBS:
        env_vars = _runtime_env(path)["env_vars"]
        assert all(isinstance(v, str) for v in env_vars.values()), f"{path.name}: env_vars must be strings"
        uri = urlsplit(env_vars["MLFLOW_TRACKING_URI"])
        assert uri.scheme in ("http", "https"), f"{path.name}: jobs need a tracking server, not a local store"
        # The Host header the jobs send must pass the server's --allowed-hosts check.
        assert any(fnmatch.fnmatch(uri.netloc, pattern) for pattern in allowed), f"{path.name}: {uri.netloc}"
        for key in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
            assert urlsplit(env_vars[key]).scheme in ("http", "https"), f"{path.name}: {key}"
        spec = _load(path)["spec"]
        assert spec["shutdownAfterJobFinishes"] is True, f"{path.name}: the job's cluster must go away"


# --------------------------------------------------------------------------- entrypoints


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_entrypoint_passes_the_ossnet_dry_run(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entrypoint = _load(path)["spec"]["entrypoint"]
    monkeypatch.chdir(REPO)
    args = parse_entrypoint(entrypoint)
    assert args.command == path.stem.removeprefix("rayjob-"), f"{path.name} runs `ossnet {args.command}`"
    assert getattr(args, "validate", None) is not None, f"`ossnet {args.command}` registers no validator"
    out, err = io.StringIO(), io.StringIO()
    assert dry_run(args, out, err) == 0, err.getvalue()
    assert out.getvalue().startswith("# valid; would run: ossnet " + args.command)


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_cluster_fits_what_the_entrypoint_asks_ray_for(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = _load(path)["spec"]
    args, job = _validated(manifest["entrypoint"], monkeypatch)
    for name, spec in (("own cluster", manifest["rayClusterSpec"]),
                       ("raycluster.yaml", _load(KUBERAY / "raycluster.yaml")["spec"])):
        _, workers = _groups(spec)
        bundles, task_cpus = _demand(args, job, workers)
        if any(b.get("GPU", 0) > 0 for b in bundles):
            assert all("nvidia.com/gpu" in g.container["resources"]["limits"] for g in workers if g.gpus > 0)
        free = _place(workers, bundles)
        assert free is not None, f"{path.name} on {name}: {len(bundles)} x {bundles[0]} do not fit the worker groups"
        assert max(cpu for cpu, _ in free) >= task_cpus, f"{path.name} on {name}: no CPU left for data tasks"


@pytest.mark.parametrize("path", [p for p in RAYJOBS if p.stem in ("rayjob-train", "rayjob-tune")], ids=lambda p: p.name)
def test_training_checkpoints_go_to_a_volume_shared_by_every_pod(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = _load(path)["spec"]
    args, job = _validated(manifest["entrypoint"], monkeypatch)
    # Train writes to run.storage_path; a sweep keeps its state and every trial's Train run
    # under sweep.storage_path.
    storage = job.run.storage_path if args.command == "train" else job.sweep.storage_path
    if "://" in storage:
        return  # a URL (s3://...) is shared by construction
    head, workers = _groups(manifest["rayClusterSpec"])
    for g in (head, *workers):
        mounts = [(m, v) for m, v in g.volume_mounts().items() if storage.startswith(m.rstrip("/") + "/")]
        assert mounts, f"{path.name}/{g.name}: --storage-path {storage} is on no volume of the pod"
        assert "persistentVolumeClaim" in mounts[0][1], f"{path.name}/{g.name}: {storage} must be a shared PVC"


def test_resource_check_rejects_a_cluster_that_is_too_small(monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = _load(KUBERAY / "rayjob-train.yaml")["spec"]
    args, job = _validated(manifest["entrypoint"], monkeypatch)
    spec = copy.deepcopy(manifest["rayClusterSpec"])
    gpu = next(g for g in spec["workerGroupSpecs"] if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0][
        "resources"]["limits"])
    gpu["maxReplicas"] = job.scaling.world_size - 1
    _, workers = _groups(spec)
    assert _place(workers, _demand(args, job, workers)[0]) is None
    gpu["maxReplicas"] = job.scaling.world_size
    gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "2"  # < 4 CPUs per worker
    _, workers = _groups(spec)
    assert _place(workers, _demand(args, job, workers)[0]) is None


# --------------------------------------------------------------------------- the dry run itself


def test_parse_entrypoint_accepts_the_cli_prefixes_and_rejects_others() -> None:
    for prefix in ("ossnet", "/home/ray/anaconda3/bin/ossnet", "python -m ossnet_cli"):
        args = parse_entrypoint(f"{prefix} infer 'in dir' --output out --actors 3")
        assert (args.command, args.input, args.override_actors, args.raw_argv[0]) == ("infer", "in dir", 3, "infer")
    with pytest.raises(ValueError, match="not an ossnet command"):
        parse_entrypoint("python train.py --config configs/brats2020.yaml")
    with pytest.raises(ValueError, match="rejected by the ossnet parser"):
        parse_entrypoint("ossnet train --config configs/brats2020.yaml --epoch 3")  # strict: no abbreviations


def test_dry_run_reports_an_invalid_config_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    out, err = io.StringIO(), io.StringIO()
    args = parse_entrypoint("ossnet train --config configs/brats2020.yaml --num-workers 3 --use-gpu")
    assert dry_run(args, out, err) == 2
    assert err.getvalue() == ("error: ossnet train: train.batch_size: must be a multiple of "
                              "scaling.num_workers (3), got 8\n")
    assert out.getvalue() == ""
    err = io.StringIO()
    assert dry_run(parse_entrypoint("ossnet train --config configs/missing.yaml"), out, err) == 2
    assert err.getvalue().startswith("error: ossnet train: ") and "missing.yaml" in err.getvalue()
    assert err.getvalue().count("\n") == 1


def test_dry_run_starts_nothing() -> None:
    # A fresh interpreter: the dry run must not import Ray or MLflow, let alone start them.
    code = (
        "import sys\n"
        "from ossnet_cli import main\n"
        "rc = main(['--dry-run', 'train', '--config', 'configs/brats2020.yaml', '--store', 's3://b/x.zarr',"
        " '--num-workers', '4', '--use-gpu'])\n"
        "print('RC', rc, sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow'}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "store: s3://b/x.zarr" in proc.stdout and "num_workers: 4" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "RC 0 []"


# --------------------------------------------------------------------------- ray up


def test_ray_up_config_passes_rays_own_schema_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load(RAY_UP)
    config = prepare_config(copy.deepcopy(raw))  # what `ray up` does before validating
    validate_config(config)
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu"]["min_worker"] = 0  # a typo must not pass
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(broken))


def test_ray_up_config_has_a_cpu_head_and_gpu_workers_from_zero_with_spot() -> None:
    config = _load(RAY_UP)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert all(v["min_workers"] == 0 for v in workers.values())
    assert any(v["max_workers"] >= 1 and "InstanceMarketOptions" not in v["node_config"] for v in workers.values())
    assert any(v["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for v in workers.values())
    options = " ".join(config["docker"]["run_options"])
    assert "RAY_AUTH_MODE=token" in options
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, "the dashboard is reached through `ray dashboard` (SSH)"


def test_ray_up_nodes_boot_an_ami_whose_driver_runs_the_image_and_workers_reach_s3() -> None:
    """Ray's default AMI (CUDA 11.2's driver) cannot run the CUDA 13 torch of the image, and Ray
    gives only the head an instance profile; the workers do every s3:// read and write."""
    config = _load(RAY_UP)
    dlami = "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
    for name, node_type in config["available_node_types"].items():
        assert node_type["node_config"].get("ImageId") == dlami, name
        if name != config["head_node_type"]:
            assert node_type["node_config"].get("IamInstanceProfile", {}).get("Name"), name
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.search(r"driver\s*>=?\s*580", dockerfile, flags=re.IGNORECASE), "the image states its minimum driver"


# --------------------------------------------------------------------------- Kubernetes: the tracking stack

K8S_MLFLOW = INFRA / "kubernetes" / "mlflow.yaml"


@pytest.mark.parametrize("version", ["1.31", "1.34", "1.37"])
def test_tracking_stack_manifests_pass_the_kubernetes_schemas(version: str) -> None:
    """Strict validation (unknown fields are errors) against the bundled Kubernetes schemas, offline."""
    import kubernetes_validate

    docs = list(yaml.safe_load_all(K8S_MLFLOW.read_text()))
    assert {d["kind"] for d in docs} >= {"Service", "StatefulSet", "Deployment", "Job"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)
    broken = copy.deepcopy(next(d for d in docs if d["kind"] == "Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"  # a typo must not pass
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_the_ray_manifests_reach_the_tracking_stacks_services() -> None:
    """Every http://<service>:<port> the RayClusters and RayJobs use is a Service of the stack."""
    services = {(d["metadata"]["name"], p["port"]) for d in yaml.safe_load_all(K8S_MLFLOW.read_text())
                if d["kind"] == "Service" for p in d["spec"]["ports"]}
    used = set()
    for path in sorted(KUBERAY.glob("*.yaml")):
        for host, port in re.findall(r"http://([a-z0-9-]+):(\d+)", path.read_text()):
            used.add((host, int(port)))
    assert {("mlflow", 5000), ("s3", 8333)} <= used
    assert used <= services, f"not served by infra/kubernetes/mlflow.yaml: {sorted(used - services)}"
    for doc in yaml.safe_load_all(K8S_MLFLOW.read_text()):
        if doc["kind"] == "Service":
            assert doc["spec"]["type"] == "ClusterIP", doc["metadata"]["name"]  # nothing exposed outside
    images = re.findall(r"image: (\S+)", K8S_MLFLOW.read_text())
    assert any(re.fullmatch(r"chrislusf/seaweedfs:[0-9.]+@sha256:[0-9a-f]{64}", i) for i in images)
    assert _compose()["services"]["s3"]["image"] in images  # compose and Kubernetes run the same store


# --------------------------------------------------------------------------- compose


def _compose() -> dict[str, Any]:
    return _load(COMPOSE)


def test_compose_services_have_health_checks_and_wait_for_each_other() -> None:
    services = _compose()["services"]
    long_running = {k: v for k, v in services.items() if v.get("restart") != "no"}
    assert set(long_running) == {"postgres", "s3", "mlflow"}
    for name, service in long_running.items():
        test = service["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name
    deps = services["mlflow"]["depends_on"]
    assert deps["postgres"]["condition"] == "service_healthy"
    assert deps["s3-init"]["condition"] == "service_completed_successfully"
    assert services["s3-init"]["depends_on"]["s3"]["condition"] == "service_healthy"


def test_compose_uses_named_volumes_only() -> None:
    compose = _compose()
    declared = set(compose["volumes"])
    used = set()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert not source.startswith((".", "/", "~")), f"{name}: bind mount {source}"
            used.add(source)
    assert used == declared and {"postgres-data", "s3-data"} <= used


def test_compose_images_are_pinned_and_no_unmaintained_object_store_is_left() -> None:
    """Third-party images carry a version, the object store also its digest; MinIO (no images
    published any more, the last one vulnerable) is not used."""
    services = _compose()["services"]
    for name, service in services.items():
        image = service["image"]
        assert ":" in image.split("/")[-1] and not image.endswith(":latest"), f"{name}: {image} is not pinned"
        assert "minio" not in image, name
    assert re.fullmatch(r"chrislusf/seaweedfs:[0-9.]+@sha256:[0-9a-f]{64}", services["s3"]["image"])
    # The MLflow image's own additions (psycopg2, boto3) are pinned with hashes: tests/unit/test_lock.py.


def test_compose_publishes_ports_on_loopback_only() -> None:
    published = []
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name}: {port} is not loopback-only"
            published.append(port)
    assert "127.0.0.1:5000:5000" in published
    assert "ports" not in _compose()["services"]["postgres"], "the database is never published"


def test_compose_credentials_come_from_the_env_file() -> None:
    text = COMPOSE.read_text()
    referenced = set(re.findall(r"\$\{(\w+)", text))
    example = {}
    for line in (MLFLOW_DIR / ".env.example").read_text().splitlines():
        line = line.strip().removeprefix("# ")
        if re.match(r"^[A-Z][A-Z0-9_]*=", line):
            key, _, value = line.partition("=")
            example[key] = value
    assert referenced <= set(example), f"not documented in .env.example: {referenced - set(example)}"
    for name, service in _compose()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", str(value)), f"{name}: {key} must be ${{VAR:?...}}"
    for key, value in example.items():
        if SECRET_VALUE_NAME.search(key):
            assert value == "change-me", f".env.example: {key} must be a placeholder"
    assert ".env" in (MLFLOW_DIR / ".gitignore").read_text().split()
    assert "*" in (MLFLOW_DIR / ".dockerignore").read_text().split(), "only named files go into the image"
    # The database password is interpolated into the URI, never written there.
    uri = _compose()["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert uri.startswith("postgresql://mlflow:${POSTGRES_PASSWORD:?")


def test_compose_runs_the_server_through_server_sh_with_basic_auth() -> None:
    mlflow = _compose()["services"]["mlflow"]
    assert mlflow["command"] == ["--", "--app-name", "basic-auth"]
    env = mlflow["environment"]
    assert env["OSSNET_MLFLOW_HOST"] == "0.0.0.0" and mlflow["ports"] == ["127.0.0.1:5000:5000"]
    assert "/health" in " ".join(mlflow["healthcheck"]["test"])
    _, _, lines = _dockerfile(MLFLOW_DIR / "Dockerfile")
    assert any(line.startswith("ENTRYPOINT") and "server.sh" in line for line in lines)
    ini = configparser.ConfigParser()
    ini.read(MLFLOW_DIR / "basic_auth.ini")
    assert "admin_password" not in ini["mlflow"], "the admin password comes from mlflow/.env"
    assert ini["mlflow"]["database_uri"].startswith("sqlite:////var/lib/mlflow-auth/")  # the named volume
    assert env["MLFLOW_AUTH_CONFIG_PATH"].endswith("basic_auth.ini")

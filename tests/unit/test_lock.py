"""The hash-pinned lock files: complete, consistent with each other, and what the builds install."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
REQ = REPO / "requirements"
LOCK_DEV = REQ / "lock-dev.txt"
LOCK_DEV_CPU = REQ / "lock-dev-cpu.txt"
LOCK_IMAGE = REQ / "lock.txt"
LOCK_MLFLOW = REPO / "mlflow" / "requirements.txt"
GPU_ONLY = ("nvidia-", "cuda-", "triton")


def _lock_module():
    spec = importlib.util.spec_from_file_location("ossnet_lock", REQ / "lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _entries(lock: Path | str) -> list[tuple[Requirement, list[str]]]:
    """(requirement with its marker, sha256 hashes) per pinned release of a lock file (or its text)."""
    text = (lock.read_text() if isinstance(lock, Path) else lock).replace("\\\n", " ")
    entries = []
    for line in text.splitlines():
        if not line or line.startswith(("#", " ", "-")):
            continue
        spec, _, rest = line.partition(" --hash=")
        hashes = re.findall(r"sha256:([0-9a-f]{64})", "--hash=" + rest)
        entries.append((Requirement(spec.strip()), hashes))
    return entries


def _applicable(path: Path) -> dict[str, Version]:
    """name -> pinned version, for the releases whose marker holds on this interpreter."""
    pins: dict[str, Version] = {}
    for req, _ in _entries(path):
        if req.marker is None or req.marker.evaluate():
            (spec,) = req.specifier
            assert canonicalize_name(req.name) not in pins, f"{path.name}: {req.name} pinned twice here"
            pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def _pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in [*project["dependencies"], *extras["dev"], *extras["s3"]]]


def _explicit_pins() -> dict[str, str]:
    pins = {}
    for line in (REQ / "pins.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.strip().partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_every_lock_entry_is_an_exact_pin_with_hashes() -> None:
    for path in (LOCK_DEV, LOCK_DEV_CPU, LOCK_IMAGE, LOCK_MLFLOW):
        entries = _entries(path)
        assert len(entries) > 20, f"{path.name}: only {len(entries)} entries"
        for req, hashes in entries:
            (spec,) = req.specifier
            assert spec.operator == "==", f"{path.name}: {req} is not an exact pin"
            assert hashes, f"{path.name}: {req.name} has no hash"


def test_the_dev_lock_covers_every_declared_dependency_and_the_explicit_pins() -> None:
    """A dependency added to pyproject.toml without `make lock` fails here."""
    locked = _applicable(LOCK_DEV)
    for req in _pyproject_requirements():
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is in pyproject.toml but not in requirements/lock-dev.txt: run make lock"
        assert req.specifier.contains(locked[name], prereleases=True), f"lock pins {name}=={locked[name]}, outside {req}"
    for lock in (LOCK_DEV, LOCK_IMAGE):
        versions = _applicable(lock)
        for name, version in _explicit_pins().items():
            assert str(versions[name]) == version, f"{lock.name}: {name}=={versions[name]}, pins.txt says {version}"


def test_this_environment_was_installed_from_the_lock() -> None:
    """make (and so CI) installs requirements/lock-dev.txt, or its CPU variant, with --require-hashes."""
    torch_version = Version(importlib.metadata.version("torch"))
    lock = LOCK_DEV_CPU if torch_version.local == "cpu" else LOCK_DEV
    mismatched = []
    for name, version in _applicable(lock).items():
        try:
            installed = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            mismatched.append(f"{name}: not installed")
            continue
        if installed != version:
            mismatched.append(f"{name}: {installed} installed, {version} locked")
    assert not mismatched, "; ".join(mismatched)
    assert str(torch_version).split("+")[0] == _explicit_pins()["torch"]


def test_the_cpu_lock_is_the_dev_lock_without_torch_and_its_gpu_libraries() -> None:
    expected = _entries(_lock_module().without_torch(LOCK_DEV.read_text()))
    assert _entries(LOCK_DEV_CPU) == expected, "requirements/lock-dev-cpu.txt is stale: run make lock"
    names = {canonicalize_name(r.name) for r, _ in _entries(LOCK_DEV_CPU)}
    assert "torch" not in names and not [n for n in names if n.startswith(GPU_ONLY)]
    assert {"sympy", "networkx", "filelock", "jinja2"} <= names, "the CPU wheel of torch still needs these"
    dev_names = {canonicalize_name(r.name) for r, _ in _entries(LOCK_DEV)}
    assert {n for n in dev_names - names if n != "torch"} <= {n for n in dev_names if n.startswith(GPU_ONLY)}


def test_the_image_locks_agree_with_the_dev_lock() -> None:
    """A package shared by two locks has one version (lock.py solves them under lock-dev.txt)."""
    dev = {(canonicalize_name(r.name), str(r.marker)): r.specifier for r, _ in _entries(LOCK_DEV)}
    dev_names = {name for name, _ in dev}
    for path in (LOCK_IMAGE, LOCK_MLFLOW):
        for req, _ in _entries(path):
            name = canonicalize_name(req.name)
            if name in dev_names and (name, str(req.marker)) in dev:
                assert dev[(name, str(req.marker))] == req.specifier, f"{path.name}: {req} differs from lock-dev.txt"
    mlflow_pins = _applicable(LOCK_MLFLOW)
    assert {"mlflow", "psycopg2-binary", "boto3"} <= set(mlflow_pins)
    assert "torch" not in mlflow_pins, "the tracking server does not need torch"
    image = {canonicalize_name(r.name) for r, _ in _entries(LOCK_IMAGE)}
    assert {"torch", "ray", "s3fs", "boto3"} <= image and not {"pytest", "ruff", "mypy"} & image


def test_builds_install_the_locks_with_hash_checking() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "pip install --quiet --require-hashes -r $(LOCK)" in makefile
    assert "LOCK := requirements/lock-dev.txt" in makefile and "LOCK := requirements/lock-dev-cpu.txt" in makefile
    assert "--no-deps -e ." in makefile
    dockerfile = (REPO / "infra" / "docker" / "Dockerfile").read_text()
    assert "pip install --require-hashes -r requirements/lock.txt" in dockerfile
    assert "pip install --no-deps ." in dockerfile
    mlflow_dockerfile = (REPO / "mlflow" / "Dockerfile").read_text()
    assert "--require-hashes -r /opt/ossnet/mlflow/requirements.txt" in mlflow_dockerfile
    assert "!requirements.txt" in (REPO / "mlflow" / ".dockerignore").read_text().split()
    mlflow_arg = re.search(r"ARG MLFLOW_VERSION=(\S+)", mlflow_dockerfile)
    assert mlflow_arg and str(_applicable(LOCK_MLFLOW)["mlflow"]) == mlflow_arg.group(1)


def test_the_image_labels_its_torch_build_and_minimum_driver() -> None:
    """The torch flavour is pinned explicitly and the driver it needs stands next to it."""
    dockerfile = (REPO / "infra" / "docker" / "Dockerfile").read_text()
    labels = dict(re.findall(r'(org\.ossnet\.[a-z-]+)="([^"]+)"', dockerfile))
    assert labels["org.ossnet.torch"] == _explicit_pins()["torch"]
    assert labels["org.ossnet.torch-cuda"] == "13.0" and int(labels["org.ossnet.min-nvidia-driver"]) >= 580
    # PyPI's Linux wheel of this torch is the CUDA 13.0 build: its CUDA runtime is 13.0.x.
    runtime = [r for r, _ in _entries(LOCK_IMAGE) if canonicalize_name(r.name) == "nvidia-cuda-runtime"]
    assert runtime and all(str(next(iter(r.specifier)).version).startswith("13.0.") for r in runtime)
    assert f"torch {labels['org.ossnet.torch']}, CUDA {labels['org.ossnet.torch-cuda']}" in dockerfile


@pytest.mark.parametrize("torch", ["cuda", "cpu"])
def test_make_installs_the_lock_of_the_chosen_torch_flavour(torch: str, tmp_path: Path) -> None:
    """What `make venv TORCH=...` would run on a fresh machine (make -n: printed, not run)."""
    venv = tmp_path / "venv"
    out = subprocess.run(["make", "-n", "venv", f"TORCH={torch}", f"VENV={venv}"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    commands = [line.removeprefix(f"{venv}/bin/python -m ") for line in out.stdout.splitlines()]
    lock = LOCK_DEV_CPU if torch == "cpu" else LOCK_DEV
    installs = [c for c in commands if c.startswith("pip install")]
    assert installs[1] == f"pip install --quiet --require-hashes -r {lock.relative_to(REPO)}"
    cpu_index = "https://download.pytorch.org/whl/cpu"
    cpu_torch = f"pip install --quiet --no-deps --index-url {cpu_index} 'torch=={_explicit_pins()['torch']}'"
    assert (cpu_torch in installs) == (torch == "cpu")
    assert any("torch.version.cuda" in c for c in commands) == (torch == "cpu")
    assert installs[-1] == "pip install --quiet --no-deps -e ."
    if torch == "cpu":
        other = subprocess.run(["make", "-n", "venv", "TORCH=cpu", "TORCH_VERSION=2.13.0", f"VENV={venv}"], cwd=REPO,
                               capture_output=True, text=True, timeout=60)
        assert f"--index-url {cpu_index} 'torch==2.13.0'" in other.stdout, other.stdout
    bad = subprocess.run(["make", "-n", "venv", "TORCH=gpu", f"VENV={venv}"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode != 0 and "TORCH must be cuda or cpu, not 'gpu'" in bad.stderr

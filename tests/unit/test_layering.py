"""The import graph keeps its layers: ossnet <- pipelines <- tune <- ossnet_cli, bench on the side.

The folders ``pipelines/``, ``tune/`` and ``bench/`` install as ``ossnet_pipelines``,
``ossnet_tune`` and ``ossnet_bench`` (``package-dir`` in pyproject.toml): the plain names are
taken on PyPI, so nothing may import them by their folder names.

``docs/architecture.md`` states the rules; this test reads every module's imports (module level
and inside functions, ``TYPE_CHECKING`` blocks excepted) with ``ast`` and fails on a broken one.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
# Import name -> folder.
PACKAGES = {"ossnet": "ossnet", "ossnet_pipelines": "pipelines", "ossnet_tune": "tune", "ossnet_cli": "ossnet_cli",
            "ossnet_bench": "bench"}
FOLDER_NAMES = {"pipelines", "tune", "bench"}  # not importable once installed
# What each package may import from the project (itself included).
ALLOWED: dict[str, set[str]] = {
    "ossnet": {"ossnet"},
    "ossnet_pipelines": {"ossnet", "ossnet_pipelines"},
    "ossnet_tune": {"ossnet", "ossnet_pipelines", "ossnet_tune"},
    "ossnet_cli": {"ossnet", "ossnet_pipelines", "ossnet_tune", "ossnet_cli"},
    "ossnet_bench": {"ossnet", "ossnet_pipelines", "ossnet_tune", "ossnet_bench"},
}
OSSNET_FORBIDDEN_THIRD_PARTY = {"ray", "mlflow", "zarr"}
MODULE_STRING = re.compile(r"^(ossnet|ossnet_pipelines|ossnet_tune|ossnet_cli|ossnet_bench|pipelines|tune|bench)"
                           r"(\.[A-Za-z_]\w*)+$")


def _module_name(name: str, path: Path) -> str:
    parts = [name, *path.relative_to(ROOT / PACKAGES[name]).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(name, p): p for name, folder in PACKAGES.items() for p in sorted((ROOT / folder).rglob("*.py"))}


def _imports(name: str, path: Path) -> tuple[set[str], set[str]]:
    """(absolute names imported anywhere outside ``if TYPE_CHECKING``, module-path string literals)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names: set[str] = set()
    strings: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                names.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in child.names)
            elif isinstance(child, ast.Constant) and isinstance(child.value, str) and MODULE_STRING.match(child.value):
                strings.add(child.value)
            visit(child)

    visit(tree)
    return names, strings


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in modules:
            return ".".join(parts[:k])
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, tuple[set[str], set[str], set[str]]]:
    """module -> (project modules it imports, top-level names it imports, module strings)."""
    modules = _modules()
    out = {}
    for name, path in modules.items():
        names, strings = _imports(name, path)
        project = {r for r in (_resolve(n, modules) for n in names) if r and r != name}
        out[name] = (project, {n.split(".")[0] for n in names}, strings)
    return out


def test_every_package_imports_only_the_layers_below_it(graph) -> None:
    broken = []
    for module, (project, _, strings) in graph.items():
        allowed = ALLOWED[module.split(".")[0]]
        broken += [f"{module} imports {t}" for t in project if t.split(".")[0] not in allowed]
        broken += [f"{module} names {s!r}" for s in strings if s.split(".")[0] not in allowed]
    assert not broken, "\n".join(sorted(broken))


def test_nothing_imports_a_folder_name_that_is_not_installed(graph) -> None:
    # From the repository root "import pipelines" would work and hide the mistake until installed.
    bad = {m: sorted(top & FOLDER_NAMES) for m, (_, top, _) in graph.items() if top & FOLDER_NAMES}
    bad.update({m: sorted(strings) for m, (_, _, strings) in graph.items()
                if any(s.split(".")[0] in FOLDER_NAMES for s in strings)})
    assert not bad, bad


def test_the_distribution_installs_every_package_under_its_import_name() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {name: setuptools["package-dir"].get(name, name) for name in PACKAGES}
    assert folders == PACKAGES
    expected = {name + "".join("." + part for part in p.parent.relative_to(ROOT / folder).parts)
                for name, folder in PACKAGES.items() for p in (ROOT / folder).rglob("__init__.py")}
    assert set(setuptools["packages"]) == expected


def test_the_library_never_imports_ray_mlflow_or_zarr(graph) -> None:
    bad = {m: sorted(top & OSSNET_FORBIDDEN_THIRD_PARTY) for m, (_, top, _) in graph.items()
           if m.split(".")[0] == "ossnet" and top & OSSNET_FORBIDDEN_THIRD_PARTY}
    assert not bad, bad


def test_there_are_no_import_cycles(graph) -> None:
    # A package re-exporting its own submodules is not a cycle; anything else closing a loop is.
    edges = {m: {t for t in project if not t.startswith(m + ".")} for m, (project, _, _) in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    assert not cycles, cycles


def test_the_checker_sees_a_planted_violation(tmp_path: Path) -> None:
    """The reader is not vacuous: an upward import, a string import and TYPE_CHECKING."""
    path = tmp_path / "x.py"
    path.write_text("from typing import TYPE_CHECKING\nimport importlib\nif TYPE_CHECKING:\n    import ossnet_tune.job\n"
                    "def f():\n    from ossnet_pipelines.store import open_store\n"
                    "    importlib.import_module('ossnet_tune.cli')\n")
    names, strings = _imports("ossnet_pipelines.x", path)
    assert "ossnet_pipelines.store" in names and "ossnet_tune.job" not in names and strings == {"ossnet_tune.cli"}

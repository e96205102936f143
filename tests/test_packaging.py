"""Packaging: probe-dpo is a library a researcher installs into the environment they already have.

- every third-party package probe_dpo imports is declared (core, an extra, or the testbed's
  --no-deps data step), and what a module imports at load time is a core dependency;
- pyproject.toml declares compatible ranges (no exact pins in the core, an upper bound on
  everything), and constraints.txt pins every dependency to the version installed here, so the
  tested set is the one written down; the Makefile, the Dockerfile and the docker base image
  take torch's and Ray's versions from it;
- installing probe-dpo into an environment that already has compatible versions replaces none
  of them (pip's own resolver, dry run);
- ``probe-dpo --version``.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
CONSTRAINTS = ROOT / "constraints.txt"
ASSETS = ROOT / "requirements-assets.txt"
CORE = [Requirement(r) for r in PYPROJECT["dependencies"]]
EXTRAS = {name: [Requirement(r) for r in reqs] for name, reqs in PYPROJECT["optional-dependencies"].items()}


def _pins(path: Path) -> dict[str, str]:
    """``name==version`` lines of a requirements/constraints file: canonical name -> version."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            spec = list(req.specifier)
            assert len(spec) == 1 and spec[0].operator == "==", f"{path.name}: {line!r} is not an exact pin"
            pins[canonicalize_name(req.name)] = spec[0].version
    return pins


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """Top-level names of absolute imports in a module: (at load time, inside functions or
    ``if TYPE_CHECKING`` / ``try`` blocks)."""
    eager, lazy = set(), set()

    def visit(node: ast.AST, deferred: bool) -> None:
        for child in ast.iter_child_nodes(node):
            later = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.Try)) or (
                isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module]
            for name in names:
                (lazy if later else eager).add(name.split(".")[0])
            visit(child, later)

    visit(ast.parse(path.read_text()), False)
    return eager, lazy


def _third_party(names: set[str]) -> set[str]:
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("probe_dpo", "__future__")}


@functools.cache
def _packages_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _distributions(module: str) -> set[str]:
    dists = _packages_distributions().get(module)
    assert dists, f"probe_dpo imports {module!r}, which no installed distribution provides"
    return {canonicalize_name(d) for d in dists}


def test_every_imported_package_is_declared():
    core = {canonicalize_name(r.name) for r in CORE}
    optional = {canonicalize_name(r.name) for reqs in EXTRAS.values() for r in reqs}
    assets = set(_pins(ASSETS))  # the testbed's data packages, installed with --no-deps
    missing, not_core = [], []
    for path in sorted((ROOT / "probe_dpo").rglob("*.py")):
        eager, lazy = _imports(path)
        where = path.relative_to(ROOT)
        for module in sorted(_third_party(eager)):
            if not _distributions(module) & core:
                not_core.append(f"{where}: {module}")
        for module in sorted(_third_party(lazy)):
            if not _distributions(module) & (core | optional | assets):
                missing.append(f"{where}: {module}")
    assert not missing, f"imported but not declared in pyproject.toml or requirements-assets.txt: {missing}"
    assert not not_core, f"imported when the module loads, so it must be a core dependency: {not_core}"


def test_dependencies_are_ranges_with_upper_bounds():
    exact = [str(r) for r in CORE if any(s.operator in ("==", "===") for s in r.specifier)]
    assert not exact, f"core dependencies pinned exactly (the pins belong in constraints.txt): {exact}"
    for req in CORE + [r for reqs in EXTRAS.values() for r in reqs]:
        ops = {s.operator for s in req.specifier}
        assert ops & {"<", "<=", "==", "~="}, f"{req}: no upper bound"
        assert ops & {">=", ">", "==", "~="}, f"{req}: no lower bound"
    core_names = [canonicalize_name(r.name) for r in CORE]
    assert len(core_names) == len(set(core_names)), "a core dependency is listed twice"


def test_constraints_pin_every_dependency_at_the_installed_version():
    pins = _pins(CONSTRAINTS)
    wrong = []
    for req in CORE + [r for reqs in EXTRAS.values() for r in reqs]:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req}: no exact pin in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject.toml's {req}"
    for name, pinned in pins.items():
        installed = Version(importlib.metadata.version(name))
        if Version(installed.public) != Version(pinned):  # torch's +cpu local label is the same release
            wrong.append(f"{name}: constraints.txt {pinned}, installed {installed}")
    assert not wrong, f"the tested set differs from constraints.txt: {wrong}"
    declared = {canonicalize_name(r.name) for r in CORE} | {
        canonicalize_name(r.name) for reqs in EXTRAS.values() for r in reqs}
    assert not set(pins) - declared, f"constraints.txt pins undeclared packages: {sorted(set(pins) - declared)}"


def test_makefile_and_dockerfile_install_the_constrained_set():
    pins = _pins(CONSTRAINTS)
    makefile = (ROOT / "Makefile").read_text()
    assert "install -q -c $(CONSTRAINTS) -e \".[dev,tracking,testbed,search]\"" in makefile
    assert re.search(r"^CONSTRAINTS := constraints\.txt$", makefile, re.M)
    assert not re.search(r"torch==\d", makefile), "the Makefile's torch version comes from constraints.txt"
    docker = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.findall(r"torch==([\w.+]+)", docker) == [pins["torch"]], "Dockerfile's torch pin != constraints.txt's"
    base = re.search(r"^ARG BASE_IMAGE=rayproject/ray:([^-\s]+)-", docker, re.M)
    assert base and base.group(1) == pins["ray"], "Dockerfile's base image Ray != constraints.txt's ray pin"
    assert re.search(r"^COPY .*\bconstraints\.txt\b", docker, re.M)
    assert re.search(r"pip install [^\n]*-c constraints\.txt \"\.\[testbed,search\]\"", docker)


def test_license_is_apache_2():
    assert PYPROJECT["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text


def test_version_flag():
    expected = importlib.metadata.version("probe-dpo")
    assert expected == PYPROJECT["version"]
    from probe_dpo import __version__

    assert __version__ == expected
    script = Path(sys.executable).parent / "probe-dpo"
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"probe-dpo {expected}\n"


def _dry_run(tmp_path: Path, *args: str) -> tuple[list[tuple[str, str]], float]:
    report = tmp_path / "report.json"
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PIP_CONSTRAINT", None)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-build-isolation",
                           "--report", str(report), *args, ".[dev,tracking,testbed,search]"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - start
    if done.returncode != 0:
        return [("<pip failed>", (done.stdout + done.stderr)[-4000:])], seconds
    items = json.loads(report.read_text())["install"]
    return [(canonicalize_name(i["metadata"]["name"]), i["metadata"]["version"]) for i in items], seconds


def test_installing_into_an_environment_with_the_tested_versions_replaces_nothing(tmp_path):
    """The environment running this test has every dependency at a compatible version: pip,
    asked to install probe-dpo (all extras, no constraints file) into it, would install
    probe-dpo alone. --no-index: resolved from what is installed, offline (about 2 s)."""
    would_install, seconds = _dry_run(tmp_path, "--no-index")
    assert would_install == [("probe-dpo", PYPROJECT["version"])], would_install
    assert seconds < 60


def test_installing_next_to_other_compatible_versions_keeps_them(tmp_path):
    """A user's environment with newer releases inside the ranges (transformers 5.25, accelerate
    1.16: this environment has 5.23 and 1.15): pip adds those and probe-dpo, and replaces
    nothing else. Reads the package index (about 4 s); skipped when it is unreachable."""
    other = tmp_path / "other.txt"
    other.write_text("transformers==5.25.0\naccelerate==1.16.0\n")
    would_install, _ = _dry_run(tmp_path, "-c", str(other), "--retries", "0", "--timeout", "15")
    if would_install and would_install[0][0] == "<pip failed>":
        err = would_install[0][1]
        offline = re.search(r"NewConnectionError|Failed to establish|Temporary failure in name resolution|"
                            r"Could not find a version that satisfies|no matching distributions available", err)
        if offline:
            pytest.skip(f"package index unreachable (pip: {offline.group(0)})")
        pytest.fail(err)
    names = dict(would_install)
    assert names.pop("probe-dpo") == PYPROJECT["version"]
    assert names.pop("transformers") == "5.25.0" and names.pop("accelerate") == "1.16.0"
    replaced = {n: v for n, v in names.items() if _installed(n)}
    assert not replaced, f"pip would replace installed packages: {replaced}"


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False

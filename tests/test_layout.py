"""The house rules, checked on the source: imports run one way, modules stay readable."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "probe_dpo"
MAX_LINES = 500


def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every probe_dpo module a file imports, at module level or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("probe_dpo")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("probe_dpo"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path) if m in modules and m != name}
    return graph


def _library(name: str) -> bool:
    return not (name == "probe_dpo.cli" or name.startswith("probe_dpo.workflows"))


def test_the_library_never_imports_a_workflow_or_the_cli():
    bad = {name: sorted(m for m in deps if not _library(m))
           for name, deps in _graph().items() if _library(name)}
    assert {k: v for k, v in bad.items() if v} == {}
    workflows = {name: sorted(m for m in deps if m == "probe_dpo.cli")
                 for name, deps in _graph().items() if name.startswith("probe_dpo.workflows")}
    assert {k: v for k, v in workflows.items() if v} == {}


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_modules_are_small_enough_to_read_in_one_sitting():
    """Library and workflow modules alike: a workflow holds configs and orchestration."""
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_no_module_imports_another_modules_private_name():
    """A name with a leading underscore is its module's own: another module that needs it gets a
    public name (a building block), so a reader can tell a module's interface from its insides."""
    private = sorted((str(p.relative_to(PACKAGE.parent)), node.module, a.name)
                     for p in PACKAGE.rglob("*.py") for node in ast.walk(ast.parse(p.read_text()))
                     if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("probe_dpo")
                     for a in node.names if a.name.startswith("_") and not a.name.startswith("__"))
    assert private == []



# Every workflow module is a script with the same entry points (``run(cfg)``, ``main(argv)``), as the
# CLI is one (``main``): the convention, not a clash.
ENTRY_POINTS = {"main", "run"}


def test_no_two_modules_define_a_public_function_of_one_name():
    """A public function's name says which one it is across the package (``model_facts`` is the
    model's, ``evaluate_model`` the experiment's): a reader who greps a name finds one definition."""
    where: dict[str, list[str]] = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(p.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                where.setdefault(node.name, []).append(str(p.relative_to(PACKAGE.parent)))
    assert {name: files for name, files in where.items() if len(files) > 1 and name not in ENTRY_POINTS} == {}

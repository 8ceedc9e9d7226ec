"""The layout tells the story: one-way imports between the stages, read from the source.

Every import counts, including those inside functions (the CLI imports its stages lazily), so
a cycle hidden by a lazy import is still a cycle here.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "mtrank"
"""The one import name the distribution installs; the stages are its subpackages."""
STAGES = ("training", "export", "service", "bench")
ENTRY_POINTS = {"mtrank.cli", "mtrank.demo"}
"""The command line: the one place that may reach every stage, and that nothing imports."""
ALLOWED = {
    "contracts": set(),
    "training": {"contracts"},
    "export": {"contracts", "training"},
    "service": {"contracts"},
    "bench": {"contracts", "service", "training", "export"},
    "cli": {"contracts", "training", "export", "service", "bench"},
}
"""Layer → the project layers its modules may import (besides its own)."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _layer(module: str) -> str:
    """``cli`` for the entry points, the stage for ``mtrank.<stage>...``, else ``contracts`` (the
    torch-free modules at the top of the package: spec, manifest, transform, store keys, fusion)."""
    if module in ENTRY_POINTS:
        return "cli"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else "contracts"


def _imports(module: str, path: Path) -> Iterator[str]:
    """Absolute names of everything ``module`` imports (relative imports resolved)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _project_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        graph[module] = {name for name in _imports(module, path) if name in modules and name != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_module_import_graph_is_acyclic():
    assert _cycles(_project_graph()) == []


def test_stages_import_only_the_stages_before_them():
    wrong = [
        f"{module} imports {dep}"
        for module, deps in _project_graph().items()
        for dep in deps
        if _layer(dep) != _layer(module) and _layer(dep) not in ALLOWED[_layer(module)]
    ]
    assert wrong == []


def test_the_contracts_import_no_stage_and_nothing_imports_the_cli():
    graph = _project_graph()
    contracts = [m for m in graph if _layer(m) == "contracts"]
    assert {"mtrank.spec", "mtrank.manifest", "mtrank.transform", "mtrank.store_keys", "mtrank.fusion"} <= {
        *contracts}
    assert [f"{m} imports {d}" for m in contracts for d in graph[m] if _layer(d) != "contracts"] == []
    assert [f"{m} imports {d}" for m, deps in graph.items() for d in deps
            if d in ENTRY_POINTS and m not in ENTRY_POINTS] == []


def test_the_layer_rule_sees_a_contract_importing_a_stage():
    assert _layer("mtrank.service.app") == "service" and _layer("mtrank.spec") == "contracts"
    assert "contracts" in ALLOWED["service"] and "service" not in ALLOWED["contracts"]


def test_nothing_packaged_imports_the_tests():
    offenders = [
        f"{module} imports {name}"
        for module, path in _modules().items()
        for name in _imports(module, path)
        if name == "tests" or name.startswith("tests.")
    ]
    assert offenders == []


def test_service_and_the_shared_contracts_never_import_torch():
    offenders = [
        f"{module} imports {name}"
        for module, path in _modules().items()
        if _layer(module) in ("service", "contracts")
        for name in _imports(module, path)
        if name.split(".")[0] in ("torch", "pandas") or (name in _modules() and _layer(name) in ("training", "export"))
    ]
    assert offenders == []


def test_one_feature_transform():
    """Dense standardisation and vocabulary lookups are written once, in mtrank/transform.py."""
    needles = ("np.log1p(np.maximum(", "get_indexer(")
    offenders = [
        str(path.relative_to(ROOT))
        for path in _modules().values()
        if path != ROOT / "mtrank" / "transform.py" and any(n in path.read_text() for n in needles)
    ]
    assert offenders == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
LONG_ON_PURPOSE: dict[str, str] = {}
"""Functions and modules allowed over the limits, each with the place its reason is written."""


def _too_long() -> list[str]:
    found = []
    for module, path in _modules().items():
        source = path.read_text()
        if len(source.splitlines()) > MAX_MODULE_LINES and module not in LONG_ON_PURPOSE:
            found.append(f"{module}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and f"{module}.{node.name}" not in LONG_ON_PURPOSE:
                    found.append(f"{module}.{node.name}: {lines} lines")
    return found


def test_modules_and_functions_fit_in_a_head():
    assert _too_long() == []


def test_every_long_one_has_its_reason_in_the_architecture_page():
    page = (ROOT / "docs" / "architecture.md").read_text()
    assert [name for name in LONG_ON_PURPOSE if f"`{name}`" not in page] == []

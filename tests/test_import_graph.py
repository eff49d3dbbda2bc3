"""The package's import graph, built from the sources: no circle anywhere (imports inside
functions counted), and the core never imports the training front end (``agents/``).

Edges are file -> file: ``from ..errors import X`` is an edge to ``windquant_gym/errors.py``,
``from . import code_version`` to that module, ``from ..envs import ENV_ID`` to
``envs/__init__.py``. The implicit import of a parent package is not an edge (as in
import-linter and pydeps): every module would otherwise sit in a circle with its package's
``__init__``. Imports under ``if TYPE_CHECKING:`` never run and are left out."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "windquant_gym"
# agents/ installs as windquant_gym.agents (setup.cfg package_dir)
ROOTS = {PACKAGE: REPO / "windquant_gym", f"{PACKAGE}.agents": REPO / "agents"}
#: The front ends: command-line entry points that may drive training.
FRONT_ENDS = ("windquant_gym.cli", "windquant_gym.harness.bench", "windquant_gym.sweep")


def _modules() -> Dict[str, Path]:
    modules = {}
    for prefix, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([prefix, *parts])] = path
    return modules


def _is_package(name: str, modules: Dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _type_checking_lines(tree: ast.AST) -> Set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _resolve(name: str, modules: Dict[str, Path]) -> Optional[str]:
    """The module a dotted name lands on (its longest prefix that is one of ours)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> Dict[str, Set[str]]:
    modules = _modules()
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skipped = _type_checking_lines(tree)
        package = name if _is_package(name, modules) else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skipped:
                continue
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:  # a submodule by name, else a name from the module
                    full = f"{source}.{alias.name}"
                    targets.append(full if full in modules else source)
            for target in targets:
                resolved = _resolve(target, modules)
                if resolved is not None and resolved != name:
                    graph[name].add(resolved)
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_imports_it_must():
    graph = import_graph()
    # a module-level import, a deferred one, a relative submodule import, agents/ mapped
    assert "windquant_gym.errors" in graph["windquant_gym.allocators.base"]
    assert "windquant_gym.agents.train" in graph["windquant_gym.cli"]  # inside a function
    assert "windquant_gym.quant.code_version" in graph["windquant_gym.quant.build"]  # from . import code_version
    assert "windquant_gym.allocators.calibrated_knapsack" in graph["windquant_gym.agents.train"]


def test_the_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_anywhere():
    found = cycles(import_graph())
    assert found == [], "import circles (break each by moving what both sides need below them):\n" + "\n".join(
        " <-> ".join(c) for c in found)


def test_the_core_never_imports_agents():
    graph = import_graph()
    offenders = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if target.startswith(f"{PACKAGE}.agents")
        and not module.startswith(f"{PACKAGE}.agents")
        and not module.startswith(FRONT_ENDS)
    )
    assert offenders == [], "only the front ends (cli, bench, sweep) may import agents/:\n" + "\n".join(offenders)

"""The import graph of `internlm`: no cycle, and the lower packages never import the config or the trainer.

The graph is read statically from every module's `import` statements (module level and inside functions), so
a cycle that only a lazy import would close is found too.
"""

import ast
import os
from typing import Dict, List, Set

import internlm

ROOT = os.path.dirname(os.path.abspath(internlm.__file__))
LOWER = ("internlm.model", "internlm.data", "internlm.parallel", "internlm.optim", "internlm.checkpoint")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(ROOT))[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def import_graph() -> Dict[str, Set[str]]:
    """``module -> internlm modules it imports`` (``from pkg import sub`` counts as importing ``pkg.sub``; importing
    a submodule counts as importing the packages above it, whose ``__init__`` runs first)."""
    files = {}
    for folder, _, names in os.walk(ROOT):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                files[_module_name(path)] = path
    graph: Dict[str, Set[str]] = {}
    for module, path in files.items():
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        edges: Set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    anchor = ".".join(parts[: len(parts) - node.level + 1])
                    base = f"{anchor}.{base}" if base else anchor
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            else:
                continue
            for target in targets:
                if target not in files or target == module:
                    continue
                edges.add(target)
                # importing a.b.c first runs the packages a.b and a; those the importer is inside are already running
                parts = target.split(".")
                for cut in range(1, len(parts)):
                    parent = ".".join(parts[:cut])
                    if parent in files and not (module + ".").startswith(parent + ".") and parent != package:
                        edges.add(parent)
        graph[module] = edges
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import cycle as a list of modules (first == last), or [] when the graph is acyclic."""
    state: Dict[str, int] = {}  # 1: on the DFS stack, 2: done
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_graph_is_read():
    graph = import_graph()
    assert "internlm.parallel.layout" in graph["internlm.parallel.process_groups"]
    assert "internlm.optim.flat_buffer" in graph["internlm.optim.hybrid_zero"]
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle == [], "import cycle: " + " -> ".join(cycle)


def test_lower_packages_do_not_import_config_or_trainer():
    graph = import_graph()
    bad = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        if module.startswith(LOWER)
        for target in targets
        if target.startswith(("internlm.config", "internlm.train"))
    )
    assert bad == []


def test_planning_does_not_import_the_trainer():
    graph = import_graph()
    assert any(module.startswith("internlm.planning") for module in graph)
    bad = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        if module.startswith("internlm.planning")
        for target in targets
        if target.startswith("internlm.train")
    )
    assert bad == []


def test_only_the_command_line_imports_the_simulation():
    """`internlm.simulation` runs the trainer's collaborators: it sits above them, and only `train.py`'s command line
    (internlm.train.cli, lazily for --simulate) reaches it."""
    graph = import_graph()
    assert any(module.startswith("internlm.simulation") for module in graph)
    bad = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        if not module.startswith("internlm.simulation") and module != "internlm.train.cli"
        for target in targets
        if target.startswith("internlm.simulation")
    )
    assert bad == []

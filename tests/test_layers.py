"""The package's layers import downward only (issue 24): a new upward import fails here, naming file and line.

Layers, bottom to top: base (config, errors, registry, utils, hardware, distributed, masks, checkpoint, rundir) -> data, models -> train ->
methods -> engine, report, export -> stages -> recipe -> api, cli. KNOWN_UPWARD lists the edges still to be removed; each is
a function-local import (never at module level, so no import-time cycle), and the list may only shrink.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "sparseforge"
LAYER = {"config": 0, "errors": 0, "registry": 0, "utils": 0, "hardware": 0, "distributed": 0, "masks": 0,
         "checkpoint": 0, "rundir": 0,
         "data": 1, "models": 1, "train": 2,
         "sparsity": 3, "structured": 3, "distill": 3, "regularize": 3, "lowbit": 3, "tickets": 3,
         "engine": 4, "report": 4, "export": 4, "stages": 5, "recipe": 6, "api": 7, "cli": 7, "demo": 7,
         "__main__": 7}
KNOWN_UPWARD: set[tuple[str, str]] = set()


def _imports():
    """(file, imported top-level module of the package, line, at module level?) for every internal import."""
    for f in sorted(ROOT.rglob("*.py")):
        rel = f.relative_to(ROOT)
        tree = ast.parse(f.read_text())
        top_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = list(rel.parts[:-1])
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                target = base + (node.module.split(".") if node.module else [])
                names = [target[0]] if target else [a.name for a in node.names]
            elif node.module and node.module.split(".")[0] == "sparseforge":
                parts = node.module.split(".")
                names = [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
            else:
                continue
            for n in names:
                yield str(rel), n, node.lineno, id(node) in top_level


def test_every_module_has_a_layer():
    tops = {p.parts[0].removesuffix(".py") for p in (q.relative_to(ROOT) for q in ROOT.rglob("*.py"))}
    assert tops - {"__init__"} <= set(LAYER), f"place these in LAYER: {sorted(tops - {'__init__'} - set(LAYER))}"


def test_imports_go_downward_only():
    up, stale = [], set(KNOWN_UPWARD)
    for f, target, line, module_level in _imports():
        src = f.split("/")[0].removesuffix(".py")
        if src == "__init__" or target not in LAYER:
            continue                      # the package root re-exports everything; __version__ is not a module
        if LAYER[target] > LAYER[src]:
            if (f, target) in KNOWN_UPWARD and not module_level:
                stale.discard((f, target))
                continue
            up.append(f"{f}:{line} imports {target} (layer {LAYER[src]} -> {LAYER[target]})")
    assert not up, "upward imports:\n" + "\n".join(up)
    assert not stale, f"KNOWN_UPWARD entries no longer needed (remove them): {sorted(stale)}"


def _file_graph() -> dict[str, set[str]]:
    """File -> files it imports (module level or inside functions; not under ``if TYPE_CHECKING``)."""
    graph: dict[str, set[str]] = {}
    for f in sorted(ROOT.rglob("*.py")):
        rel = f.relative_to(ROOT)
        tree = ast.parse(f.read_text())
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING"
                       for n in ast.walk(node)}
        out = graph.setdefault(str(rel), set())
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or id(node) in typing_only:
                continue
            if node.level:
                base = list(rel.parts[:-1])
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                targets = ([base + node.module.split(".")] if node.module else [base + [a.name] for a in node.names])
            elif node.module and node.module.split(".")[0] == "sparseforge":
                targets = [node.module.split(".")[1:]]
            else:
                continue
            for parts in targets:
                for cand in ([ROOT.joinpath(*parts).with_suffix(".py")] if parts else []) + [ROOT.joinpath(*parts, "__init__.py")]:
                    if cand.exists():
                        out.add(str(cand.relative_to(ROOT)))
                        break
    return graph


def test_no_import_cycles():
    """No two modules import each other, directly or through others (function-local imports included)."""
    graph = _file_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:            # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"

"""The package's layers import downward only (issue 24): a new upward import fails here, naming file and line.

Layers, bottom to top: base (config, errors, registry, utils, hardware, distributed) -> data, models -> train ->
methods -> engine, report, export -> recipe -> api, cli. KNOWN_UPWARD lists the edges still to be removed; each is
a function-local import (never at module level, so no import-time cycle), and the list may only shrink.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "sparseforge"
LAYER = {"config": 0, "errors": 0, "registry": 0, "utils": 0, "hardware": 0, "distributed": 0,
         "data": 1, "models": 1, "train": 2,
         "sparsity": 3, "structured": 3, "distill": 3, "regularize": 3, "lowbit": 3, "tickets": 3,
         "engine": 4, "report": 4, "export": 4, "recipe": 5, "api": 6, "cli": 6, "demo": 6, "__main__": 6}
KNOWN_UPWARD = {("models/__init__.py", "structured"), ("models/__init__.py", "train"),
                ("models/__init__.py", "sparsity"), ("train/loop.py", "sparsity")}


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

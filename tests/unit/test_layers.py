"""The layout is the architecture: who may import whom, and no import cycles."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("broker", "targetgen", "executor")

# Layers, lowest first. A module may import its own layer and the ones below, never above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("broker.errors", "broker.models", "broker.core")),
    ("disk", ("broker.disk",)),
    ("targetgen", ("targetgen",)),
    ("seam", ("broker.seam",)),
    ("shim", ("broker.client", "broker.holders")),
    ("executor", ("executor",)),
    ("http", ("broker.http",)),
    ("actors", ("broker.actors",)),
    ("surfaces", ("broker.cli", "broker.devtools", "broker")),
]


def layer_of(module: str) -> int:
    best = -1, ""
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best[1]):
                best = index, prefix
    return best[0]


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(path: Path) -> set[str]:
    """Modules imported at any depth (lazy imports count too: a cycle hidden in a function is a cycle)."""
    names = set()
    tree = ast.parse(path.read_text())
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue  # annotations only: not an import at run time
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {name for name in names if name.split(".")[0] in PACKAGES}


def test_no_module_imports_a_layer_above_its_own():
    known = modules()
    wrong = []
    for module, path in known.items():
        own = layer_of(module)
        for target in imports(path):
            if layer_of(target) > own:
                wrong.append(f"{module} ({LAYERS[own][0]}) imports {target} ({LAYERS[layer_of(target)][0]})")
    assert wrong == []


def test_the_pure_core_imports_no_io_layer():
    for module, path in modules().items():
        if module.startswith("broker.core"):
            assert all(layer_of(target) == 0 for target in imports(path)), module


def test_module_imports_have_no_cycle():
    known = modules()
    graph = {module: {t for t in imports(path) if t in known and t != module} for module, path in known.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, trail: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle.extend(trail[trail.index(nxt) :] + [node, nxt] if nxt in trail else [node, nxt])
                return True
            if nxt not in state and visit(nxt, [*trail, node]):
                return True
        state[node] = 2
        return False

    for module in sorted(graph):
        if module not in state and visit(module, []):
            break
    assert cycle == []

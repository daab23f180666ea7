"""Every third-party package our code imports is one pyproject.toml names (not one that only happens to
arrive with another: aiohttp came only through ray[default] while the HTTP API imported it)."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = {"broker", "targetgen", "executor"}
# Imported, yet not ours to pin: part of another package's own API, in the version it installs with it —
# Ray Serve's request and response types (broker/http/serve.py), the MCP SDK's types and its async runtime.
BROUGHT_BY_WHAT_NEEDS_THEM = {"starlette": "ray", "mcp_types": "mcp", "anyio": "mcp"}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_top_levels() -> dict[str, str]:
    found: dict[str, str] = {}
    for package in sorted(OURS):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return {name: where for name, where in found.items() if name not in OURS and name not in sys.stdlib_module_names}


def test_every_imported_third_party_package_is_declared():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    declared = {_normal(re.match(r"[A-Za-z0-9_.-]+", req).group(0)) for req in requirements}  # type: ignore[union-attr]
    distributions = packages_distributions()
    missing = []
    for module, where in sorted(_imported_top_levels().items()):
        if module in BROUGHT_BY_WHAT_NEEDS_THEM:
            assert _normal(BROUGHT_BY_WHAT_NEEDS_THEM[module]) in declared
            continue
        names = {_normal(dist) for dist in distributions.get(module, [module])}
        if not names & declared:
            missing.append(f"{module} (imported by {where}; distribution {', '.join(sorted(names))})")
    assert missing == [], "imported but not declared in pyproject.toml: " + "; ".join(missing)

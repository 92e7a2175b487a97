"""The engine's modules import each other without a circle, and each imports on its own."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sworndisk")
MODULES = sorted(f[:-3] for f in os.listdir(PKG) if f.endswith(".py"))


def _imports(name: str) -> set[str]:
    """The sworndisk modules `name` imports anywhere (type-checking blocks and function
    bodies included: a circle there is a circle still)."""
    tree = ast.parse(open(os.path.join(PKG, name + ".py")).read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sworndisk."):
            out.add(node.module.split(".")[1])
    return out & set(MODULES)


def test_no_import_circle():
    graph = {m: _imports(m) - {"__init__"} for m in MODULES if m != "__init__"}
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            pytest.fail("import circle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        for n in sorted(graph.get(m, ())):
            visit(n, path + [m])
        done.add(m)

    for m in graph:
        visit(m, [])


def test_each_module_imports_alone():
    """Each module imported first, with no other sworndisk module loaded before it."""
    script = (
        "import importlib, sys\n"
        f"for name in {[m for m in MODULES if m != '__init__']!r}:\n"
        "    for k in [k for k in sys.modules if k == 'sworndisk' or k.startswith('sworndisk.')]:\n"
        "        del sys.modules[k]\n"
        "    importlib.import_module('sworndisk.' + name)\n")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=os.path.dirname(PKG))

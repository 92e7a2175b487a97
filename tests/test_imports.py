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


# What a crypto worker imports (cryptoworker.py, run with -I as the pool runs it): the file,
# cryptography where it builds its Cipher, and ublk_shim.uring where it reads the device.
_WORKER_IMPORTS = r'''
import importlib.util, sys
spec = importlib.util.spec_from_file_location("cryptoworker", sys.argv[1])
worker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(worker)
worker.Cipher(-1)
sys.path.insert(0, sys.argv[2])
import ublk_shim.uring
print(" ".join(sorted(sys.modules)))
'''


def test_a_crypto_worker_imports_only_what_it_needs():
    """Every worker pays for its imports in start-up time and RSS (the issue's memory
    target counts them), and one that imports subprocess may run programs: ctypes.util's
    find_library once ran ldconfig in every worker."""
    root = os.path.dirname(PKG)
    done = subprocess.run([sys.executable, "-I", "-c", _WORKER_IMPORTS,
                           os.path.join(PKG, "cryptoworker.py"), root],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    mods = set(done.stdout.split())
    assert {"cryptography", "ublk_shim.uring"} <= mods
    heavy = {"subprocess", "ctypes.util", "numpy", "sworndisk", "threading", "multiprocessing",
             "shutil", "tempfile"}
    assert not mods & heavy, sorted(mods & heavy)

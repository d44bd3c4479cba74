"""The package's layout: every stage module imports without fairseq, and imports only go
down (wiring -> stages -> plain helpers), in the order of docs/architecture.md.

Run: python -m pytest -q tests/test_layout.py
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fairseq_knnlm"
# bottom to top; a module may import its own layer and the layers before it
LAYERS = [("errors", "progress", "flags"), ("store",), ("index",), ("scoring",),
          ("adaptive",), ("search",), ("offline", "explain"), ("plugin",), ("cli",)]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
STAGES = ["store", "index", "scoring", "adaptive", "search", "offline", "explain"]


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if p.name != "__init__.py" or p.parent != PKG)


def _unit(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> set[str]:
    """The package units (first component under fairseq_knnlm) a module imports."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = path.relative_to(PKG).parent.parts
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                parts = [*base, *(node.module.split(".") if node.module else [])]
                if not parts:  # from . import x (package level)
                    parts = [a.name for a in node.names]
                out.add(parts[0])
            elif node.module and node.module.startswith("fairseq_knnlm."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("fairseq_knnlm."):
                    out.add(a.name.split(".")[1])
    return out


def test_every_unit_has_a_layer():
    units = {_unit(p) for p in _modules()}
    assert units <= set(RANK), units - set(RANK)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_only_go_down(path):
    unit = _unit(path)
    bad = [u for u in _imports(path) if u in RANK and RANK[u] > RANK[unit]]
    assert not bad, f"{path.relative_to(PKG)} ({unit}) imports {bad}, which sit above it"


def test_stages_import_without_fairseq():
    """Each stage module imports with fairseq made unimportable."""
    mods = [".".join(["fairseq_knnlm", *p.relative_to(PKG).with_suffix("").parts])
            for p in _modules() if _unit(p) in STAGES + ["errors", "progress", "flags"]]
    mods = [m[:-len(".__init__")] if m.endswith(".__init__") else m for m in mods]
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('fairseq', 'fairseq_cli'):\n"
            "            raise ImportError('fairseq blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import importlib\n"
            f"for m in {mods!r}:\n"
            "    importlib.import_module(m)\n"
            "assert not any(k == 'fairseq' or k.startswith('fairseq.') for k in sys.modules)\n"
            "print('ok', len(" + repr(mods) + "))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr[-3000:]


def test_tests_mirror_the_package():
    """Each test folder names a subpackage (tests/store/ tests fairseq_knnlm/store/, ...)."""
    dirs = {p.name for p in (ROOT / "tests").iterdir()
            if p.is_dir() and p.name not in ("golden", "__pycache__")}
    pkgs = {p.name for p in PKG.iterdir() if (p / "__init__.py").exists()}
    assert dirs and dirs <= pkgs, f"test folders without a subpackage: {sorted(dirs - pkgs)}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_imports(path: Path, names: set[str]) -> set[str]:
    """The package modules (dotted, under fairseq_knnlm) a module imports at its top level
    or inside functions; a `from pkg import name` counts pkg.name when that is a module."""
    tree = ast.parse(path.read_text())
    here = _module_name(path).split(".")
    pkg = here if path.name == "__init__.py" else here[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                mod = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.startswith("fairseq_knnlm"):
                mod = node.module.split(".")[1:]
            else:
                continue
            dotted = ".".join(mod)
            for a in node.names:
                sub = f"{dotted}.{a.name}" if dotted else a.name
                out.add(sub if sub in names else dotted)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("fairseq_knnlm."):
                    out.add(".".join(a.name.split(".")[1:]))
    return {m for m in out if m in names and m != _module_name(path)}


def test_no_import_cycles():
    """No two modules import each other, directly or through others (package __init__s
    that re-export their own modules aside)."""
    paths = {_module_name(p): p for p in _modules()}
    names = set(paths)
    graph = {m: {d for d in _module_imports(p, names)
                 if not (p.name == "__init__.py" and d.startswith(m + "."))}
             for m, p in paths.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, stack: list[str]) -> bool:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle.extend(stack[stack.index(d):] + [m, d] if d in stack else [m, d])
                return True
            if d not in state and visit(d, stack + [m]):
                return True
        state[m] = 2
        return False

    for m in sorted(graph):
        if m not in state and visit(m, []):
            break
    assert not cycle, " -> ".join(cycle)


def test_ruff_clean():
    """The code passes the ruff config in pyproject.toml (ruff is in the dev extra)."""
    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.exists():
        pytest.skip("ruff not installed (pip install -e .[dev])")
    p = subprocess.run([str(ruff), "check", "fairseq_knnlm", "tests", "examples", "benchmarks"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:]

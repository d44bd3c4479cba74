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

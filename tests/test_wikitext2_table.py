"""examples/wikitext2/table.py's rows: k and T blank on the rows that use no kNN.

Run: python -m pytest -q tests/test_wikitext2_table.py
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _table():
    spec = importlib.util.spec_from_file_location("wt2_table", ROOT / "examples/wikitext2/table.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rows_without_knn_leave_k_and_t_blank():
    t = _table()
    ppl = {"valid": 300.0, "test": 290.0}
    base = t.format_row("Base LM", {"lambda": 0.0, "k": 1, "temperature": 1.0,
                                    "cache_lambda": 0.0}, ppl, None)
    assert base == "| Base LM | 0 |  |  | 0 | 300.00 | 290.00 |"
    cache = t.format_row("+Continuous cache", {"lambda": 0.0, "k": 1, "temperature": 1.0,
                                               "cache_lambda": 0.3}, ppl, 300.0)
    assert cache.split("|")[3:5] == ["  ", "  "] and "| 0.3 |" in cache
    knn = t.format_row("+kNN-LM", {"lambda": 0.25, "k": 1024, "temperature": 10.0,
                                   "cache_lambda": 0.0}, ppl, 300.0)
    assert "| 0.25 | 1024 | 10 | 0 |" in knn and "(3.3% lower)" in knn

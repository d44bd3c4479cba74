"""benchmarks/speed.py's row selection (--only) and its per-round results (issue #25).

Run: python -m pytest -q tests/test_speed_bench.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import speed  # noqa: E402

ROWS = {name: (index, [name]) for name, index in [
    ("eval-lm (stock, no plugin)", ""), ("plugin, no kNN", ""),
    ("ivfpq: full search", "ivfpq"), ("ivfpq: pointers 64", "ivfpq"),
    ("ivfpq: pointers 64, stream 32", "ivfpq"), ("fastscan: full search", "fastscan"),
    ("fastscan: pointers 64, stream 32", "fastscan"), ("rabitq: full search", "rabitq"),
    ("rabitq: pointers 64, stream 32", "rabitq"),
    ("ivfpq: clusters 512, stream 32, limit 1024", "ivfpq"),
    ("fastscan: full search, FAISS distances", "fastscan"),
    ("fastscan: full search, FAISS distances, probe 16", "fastscan")]}


def test_only_keeps_baselines_and_the_full_search_each_kept_row_needs() -> None:
    assert list(speed.keep_rows(ROWS, "")) == list(ROWS)
    got = list(speed.keep_rows(ROWS, "fastscan: pointers 64, stream;limit 1024"))
    assert got == ["eval-lm (stock, no plugin)", "plugin, no kNN", "ivfpq: full search",
                   "fastscan: full search", "fastscan: pointers 64, stream 32",
                   "ivfpq: clusters 512, stream 32, limit 1024"]
    # a whole name picks that row alone; a part picks every row that holds it
    got = speed.keep_rows(ROWS, "fastscan: full search, FAISS distances")
    assert "fastscan: full search, FAISS distances, probe 16" not in got
    got = speed.keep_rows(ROWS, "FAISS distances")
    assert "fastscan: full search, FAISS distances, probe 16" in got
    got = speed.keep_rows(ROWS, "pointers 64;limit 1024")
    assert "rabitq: full search" in got and "rabitq: pointers 64, stream 32" in got
    assert "ivfpq: clusters 512, stream 32, limit 1024" in got


def test_results_are_written_after_each_round(tmp_path: Path) -> None:
    rows = speed.keep_rows(ROWS, "ivfpq: pointers 64, stream")
    assert len(rows) == 4
    run = {"tokens": 1000, "ppl": 10.0, "searches": 800}
    runs = {n: [dict(run, seconds=s)] for n, s in zip(rows, (1.0, 1.2, 4.0, 3.0))}
    a = argparse.Namespace(repeats=3, label="x")
    speed.write_result(tmp_path, speed.summarise(runs, rows), a, rows, ["data"], 0.0, 1,
                       ["a note"])
    res = json.loads((tmp_path / "speed.json").read_text())
    assert res["rounds"] == 1
    ptr = next(r for r in res["rows"] if r["row"] == "ivfpq: pointers 64, stream 32")
    assert abs(ptr["vs_full"] - 4.0 / 3.0) < 1e-9
    assert abs(ptr["overhead"] - (3.0 - 1.2) / (4.0 - 1.2)) < 1e-9
    md = (tmp_path / "speed.md").read_text()
    assert md.startswith("1 of 3 rounds") and "\na note\n" in md
    assert res["notes"] == ["a note"]


def _report(ppls: list[float], base: float = 100.0) -> dict:
    taus = [0.0, 0.05, 0.1, 0.2, 0.5][:len(ppls)]
    return {"held_out_ppl": {"model": base}, "held_out_skips": [
        {"skip_below": t, "search_fraction": 1.0 - t, "ppl": p} for t, p in zip(taus, ppls)]}


def test_the_gate_threshold_is_the_largest_within_the_tolerance() -> None:
    tau, why = speed.pick_skip_below(_report([100.0, 100.2, 100.9, 103.0, 101.0]), 0.01)
    assert tau == 0.5 and "widen" in why  # 101.0 is within 1%, and the grid's last
    tau, why = speed.pick_skip_below(_report([100.0, 100.2, 100.9, 103.0, 120.0]), 0.01)
    assert tau == 0.1 and "widen" not in why and "90.0%" in why
    tau, why = speed.pick_skip_below(_report([100.0, 102.0, 105.0]), 0.01)
    assert tau == 0.0 and "no gate threshold" in why

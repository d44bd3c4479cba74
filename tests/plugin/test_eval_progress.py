"""Progress lines of eval-lm passes (eval_progress.py): throttling, rate, ETA and counters,
with a fake clock (no fairseq, no waiting).

Run: python -m pytest -q tests/plugin/test_eval_progress.py
"""

from __future__ import annotations

from fairseq_knnlm.plugin.eval_progress import EvalProgress, eval_progress_line


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_line_with_total_rate_eta_and_counters():
    line = eval_progress_line("dump", 1_000, 4_000, elapsed=10.0,
                              counters={"datastore entries": 1_000, "kNN searches": 0})
    assert line == ("dump: 1,000 of 4,000 tokens (25.0%), 100 tokens/s, ETA 30s, "
                    "datastore entries 1,000, kNN searches 0")
    assert eval_progress_line("kNN-LM", 120, None, elapsed=2.0) == \
        "kNN-LM: 120 tokens, 60 tokens/s"
    assert "ETA ?" in eval_progress_line("kNN-LM", 0, 10, elapsed=0.0)


def test_logs_at_most_once_per_interval():
    clock, lines = Clock(), []
    p = EvalProgress(total=1_000, what="dump", interval=30.0, clock=clock, log=lines.append)
    clock.t += 10
    assert not p.update(100)
    clock.t += 20  # 30 s since the start
    assert p.update(200, {"datastore entries": 300})
    assert lines == ["dump: 300 of 1,000 tokens (30.0%), 10 tokens/s, ETA 1m10s, "
                     "datastore entries 300"]
    clock.t += 29
    assert not p.update(100)
    clock.t += 1
    assert p.update(0)
    assert p.done == 400 and p.lines == 2 and lines[-1].startswith("dump: 400 of 1,000")


def test_interval_defaults_to_the_module_constant(monkeypatch):
    from fairseq_knnlm.plugin import eval_progress

    monkeypatch.setattr(eval_progress, "PROGRESS_INTERVAL_S", 0.0)
    lines: list[str] = []
    p = EvalProgress(total=None, clock=Clock(), log=lines.append)
    p.update(5)
    p.update(5)
    assert lines == ["kNN-LM: 5 tokens, 0 tokens/s", "kNN-LM: 10 tokens, 0 tokens/s"]

"""Progress of long build stages: log lines off a terminal (keys done of total, keys/s, ETA),
a tqdm bar on one, nothing when disabled."""

from __future__ import annotations

import io
import logging

from fairseq_knnlm import progress
from fairseq_knnlm.progress import Progress, format_duration, progress_line


def test_progress_line():
    assert progress_line("add", 1200, 20000, 100.0) == (
        "add: 1,200 of 20,000 keys (6.0%), 100 keys/s, ETA 3m08s")
    assert progress_line("add", 0, 10, 0.0).endswith("ETA ?")
    assert format_duration(3 * 3600 + 61) == "3h01m01s" and format_duration(5) == "5s"


def test_logs_every_interval_when_not_a_terminal(caplog, monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="fairseq_knnlm.progress"):
        p = Progress("add", 300, initial=100, stream=io.StringIO())
        p.update(100)
        p.update(100)
        p.close()
    msgs = [r.getMessage() for r in caplog.records]
    assert [m.split(" keys (")[0] for m in msgs] == ["add: 200 of 300", "add: 300 of 300"]
    assert all("keys/s, ETA" in m for m in msgs)


def test_quiet_between_intervals_and_when_disabled(caplog, monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 3600.0)
    with caplog.at_level(logging.INFO, logger="fairseq_knnlm.progress"):
        p = Progress("add", 300, stream=io.StringIO())
        p.update(100)
        monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
        q = Progress("add", 300, enabled=False, stream=io.StringIO())
        q.update(100)
    assert not caplog.records


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_on_a_terminal(caplog, monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    tty = _Tty()
    with caplog.at_level(logging.INFO, logger="fairseq_knnlm.progress"):
        p = Progress("add", 300, stream=tty)
        p.update(300)
        p.close()
    assert "add" in tty.getvalue() and "300/300" in tty.getvalue()
    assert not caplog.records

"""Progress lines of a long fairseq-eval-lm pass (a datastore dump or a kNN-LM evaluation).

fairseq's progress bar says nothing useful when output goes to a file, and a 100M-token dump
runs for hours: ``EvalProgress`` logs, at most once per ``interval`` seconds (default
``PROGRESS_INTERVAL_S``), the tokens done of the total, tokens/s, the time left and the
counters the caller passes (datastore entries written, kNN searches so far). Unlike
``progress.Progress`` (index builds) it never draws a bar: eval-lm draws its own. Plain
Python: clock and log function are parameters, so it is tested without fairseq or waiting.

    prog = EvalProgress(total=2_000_000, what="dump")
    for batch in batches:
        ...
        prog.update(len(batch), {"datastore entries": writer.size})
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

from fairseq_knnlm.progress import progress_line

logger = logging.getLogger(__name__)

# seconds between two progress lines; tests set it to 0 to get one line per batch
PROGRESS_INTERVAL_S = 30.0


def eval_progress_line(what: str, done: int, total: Optional[int], elapsed: float,
                       counters: Optional[dict[str, int]] = None) -> str:
    """'dump: 1,200 of 20,000 tokens (6.0%), 3,456 tokens/s, ETA 5s, datastore entries 1,200'
    (without a total: tokens done and tokens/s only)."""
    rate = done / elapsed if elapsed > 0 else 0.0
    if total:
        head = progress_line(what, done, total, rate, unit="tokens")
    else:
        head = f"{what}: {done:,} tokens, {rate:,.0f} tokens/s"
    return head + "".join(f", {name} {value:,}" for name, value in (counters or {}).items())


class EvalProgress:
    """Counts scored tokens; logs a progress line at most every ``interval`` seconds."""

    def __init__(self, total: Optional[int], what: str = "kNN-LM",
                 interval: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic,
                 log: Optional[Callable[[str], None]] = None) -> None:
        self.total = int(total) if total else None
        self.what = what
        self.interval = PROGRESS_INTERVAL_S if interval is None else float(interval)
        self.clock = clock
        self.log = log or logger.info
        self.done = 0
        self.lines = 0
        self.start = self._last = clock()

    def update(self, tokens: int, counters: Optional[dict[str, int]] = None) -> bool:
        """Add ``tokens`` done; log a line if ``interval`` seconds passed since the last one
        (or since the start). Returns whether a line was logged."""
        self.done += int(tokens)
        now = self.clock()
        if now - self._last < self.interval:
            return False
        self._last = now
        self.lines += 1
        self.log(eval_progress_line(self.what, self.done, self.total, now - self.start,
                                    counters))
        return True

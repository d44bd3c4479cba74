"""Progress of long stages (reading the training sample, adding keys, building parts): a
tqdm bar when stderr is a terminal, else a log line every LOG_EVERY_S seconds with the keys
done of the total, keys/s and the time left, which is what a log file of a cluster job needs
(tqdm's carriage-return redraws are unreadable there).

    p = Progress("add", total=ds.size, initial=start, enabled=progress)
    p.update(n); ...; p.close()
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Optional

logger = logging.getLogger(__name__)

LOG_EVERY_S = 30.0  # seconds between progress log lines off a terminal (tests set it lower)


def format_duration(seconds: float) -> str:
    s = int(round(max(0.0, seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def progress_line(desc: str, done: int, total: int, rate: float, unit: str = "keys") -> str:
    """'add: 1,200 of 20,000 keys (6.0%), 3,456 keys/s, ETA 5s' (ETA '?' at rate 0)."""
    pct = 100.0 * done / total if total else 100.0
    eta = format_duration((total - done) / rate) if rate > 0 else "?"
    return (f"{desc}: {done:,} of {total:,} {unit} ({pct:.1f}%), {rate:,.0f} {unit}/s, "
            f"ETA {eta}")


class Progress:
    """Counts items done of ``total``; draws a tqdm bar on a terminal, logs otherwise, and
    does nothing when not enabled."""

    def __init__(self, desc: str, total: int, initial: int = 0, enabled: bool = True,
                 unit: str = "keys", stream: Optional[Any] = None) -> None:
        self.desc, self.total, self.unit, self.enabled = desc, int(total), unit, enabled
        self.start = self.done = int(initial)
        self.t0 = self.last_log = time.monotonic()
        self.bar = None
        stream = stream if stream is not None else sys.stderr
        if enabled and getattr(stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.start, unit=unit, unit_scale=True,
                            desc=desc, file=stream)

    def rate(self, now: Optional[float] = None) -> float:
        elapsed = (now if now is not None else time.monotonic()) - self.t0
        return (self.done - self.start) / elapsed if elapsed > 0 else 0.0

    def update(self, n: int) -> None:
        self.done += int(n)
        if self.bar is not None:
            self.bar.update(n)
            return
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last_log >= LOG_EVERY_S:
            self.last_log = now
            logger.info("%s", progress_line(self.desc, self.done, self.total, self.rate(now),
                                            self.unit))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

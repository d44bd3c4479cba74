"""The running totals of an eval-lm run (tokens scored, log-probabilities before and after
the interpolation, tokens by search mode), their sum over distributed ranks, progress lines
and the summary lines at the end."""

from __future__ import annotations

import logging
from typing import Optional

import torch

from fairseq_knnlm.offline.sweep import ppl_from_nll
from fairseq_knnlm.plugin.eval_progress import EvalProgress
from fairseq_knnlm.plugin.run import RunInfo

logger = logging.getLogger(__name__)


def distributed() -> bool:
    """Whether this process is one rank of several joined by torch.distributed."""
    dist = torch.distributed
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sum over all ranks (float64: token counts stay exact); also a barrier."""
    dist = torch.distributed
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend() == "nccl" else torch.device("cpu"))
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class RunSummary:
    def __init__(self, run: RunInfo, dump: bool, knnlm: bool, cache: bool) -> None:
        self.run = run
        self.parts = {"dump": dump, "kNN-LM": knnlm, "cache": cache}
        self.n_scored = 0
        self.sum_logp = {"lm": 0.0, "final": 0.0}
        self.progress: Optional[EvalProgress] = None

    @property
    def started(self) -> bool:
        return self.progress is not None

    def start(self, total_tokens: Optional[int]) -> None:
        what = " + ".join(name for name, on in self.parts.items() if on)
        if self.run.sharded:
            what += f", shard {self.run.shard_id} of {self.run.num_shards}"
        self.progress = EvalProgress(total_tokens, what=f"progress ({what})")

    def add(self, lm: torch.Tensor, final: torch.Tensor) -> None:
        self.sum_logp["lm"] += float(lm.sum())
        self.sum_logp["final"] += float(final.sum())
        self.n_scored += len(final)

    def report_progress(self, tokens: int, counters: dict[str, int]) -> None:
        assert self.progress is not None
        self.progress.update(tokens, counters)

    def totals(self, entries: int, mode_counts: dict[str, int]) -> tuple[dict[str, float], bool]:
        """This process's totals, summed over the ranks when distributed (every rank's
        files are finished once this returns), and whether they were."""
        totals = {"tokens": float(self.n_scored), "lm": self.sum_logp["lm"],
                  "final": self.sum_logp["final"], "entries": float(entries),
                  **{f"mode_{m}": float(c) for m, c in mode_counts.items()}}
        dist = distributed()
        if dist:
            totals = dict(zip(totals, sum_over_ranks(list(totals.values()))))
        return totals, dist

    def log(self, totals: dict[str, float], dist: bool) -> bool:
        """The 'kNN-LM: N tokens; LM ppl .. -> final ppl ..' line (the cache's for a cache
        pass, both for both); False when no token was scored."""
        n = int(totals["tokens"])
        if not n:
            return False
        world = torch.distributed.get_world_size() if dist else 1
        what = " + ".join(name for name, on in (("kNN-LM", self.parts["kNN-LM"]),
                                                ("continuous cache", self.parts["cache"]))
                          if on)
        logger.info("%s%s: %d tokens; LM ppl %.4f -> final ppl %.4f", what,
                    self.run.where(dist, world), n, ppl_from_nll(-totals["lm"] / n),
                    ppl_from_nll(-totals["final"] / n))
        return True

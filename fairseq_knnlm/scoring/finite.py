"""No non-finite score printed as a result: the check of each scored token's final
log-probability, and the one line that says which of p_LM, p_kNN, lambda or the cache made
it non-finite.

A probability of 0 reaches the final score as ``knn.KNN_LOGP_FLOOR`` (-10000 nats), not as
-inf (p_kNN of a target missing from its neighbours, p_cache of one missing from the
history): a single such token puts eval-lm's mean loss past float32's range within ~100
tokens and prints ``Perplexity: inf``. So a final log-probability at or below half the floor
counts as non-finite too: it is the floor standing in for log 0.

Plain torch: no fairseq.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from fairseq_knnlm.errors import KNNLMError
from fairseq_knnlm.scoring.knn import KNN_LOGP_FLOOR

ZERO_LOGP = KNN_LOGP_FLOOR / 2  # at or below: probability 0 in effect


class NonFiniteScore(KNNLMError):
    """A scored token whose interpolated log-probability is not finite (or log 0)."""


def nonfinite_rows(logp: torch.Tensor) -> torch.Tensor:
    """(m,) indices of the tokens whose log-probability is NaN, +-inf or at most ZERO_LOGP."""
    lp = logp.float()
    bad = ~torch.isfinite(lp) | (lp <= ZERO_LOGP)
    return bad.nonzero()[:, 0]


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if x <= ZERO_LOGP:
        return f"0 (log p <= {ZERO_LOGP:g})" if math.isfinite(x) else "0"
    return f"exp({x:.4g})"


def nonfinite_reason(lm: float, knn: Optional[float], lmbda: Optional[float],
                     cache: Optional[float] = None, cache_lmbda: Optional[float] = None,
                     lambda_source: str = "--lmbda") -> str:
    """Why one token's final log-probability is not finite: its log p_LM, log p_kNN (None
    without --knnlm), lambda (None: unknown), log p_cache and --cache-lmbda (None without the
    cache); ``lambda_source`` names where lambda came from (a flag or the model file)."""
    if not math.isfinite(lm):
        return f"p_LM(target) is {_fmt(lm)}: the language model's own score is not finite"
    if lmbda is not None and math.isnan(lmbda):
        return f"lambda is nan ({lambda_source}: a non-finite feature or parameter)"
    if knn is not None and math.isnan(knn):
        return ("p_kNN(target) is nan: the neighbours' distances are not finite (does the "
                "datastore or the index hold NaN or inf keys?)")
    if knn is not None and knn <= ZERO_LOGP and lmbda is not None and lmbda >= 1.0:
        return (f"p_kNN(target) = 0 (the target is not among its neighbours) and lambda = 1 "
                f"({lambda_source}) gives p_LM no weight: use a lambda below 1")
    if cache is not None and math.isnan(cache):
        return "p_cache(target) is nan: the cached hidden states are not finite"
    if (cache is not None and cache <= ZERO_LOGP and cache_lmbda is not None
            and cache_lmbda >= 1.0):
        return ("p_cache(target) = 0 (the target is not in the cache's history) and "
                "--cache-lmbda 1 gives the rest no weight: use a --cache-lmbda below 1")
    parts = [f"p_LM {_fmt(lm)}"]
    if knn is not None:
        parts.append(f"p_kNN {_fmt(knn)}")
    if lmbda is not None:
        parts.append(f"lambda {lmbda:.6g} ({lambda_source})")
    if cache is not None:
        parts.append(f"p_cache {_fmt(cache)}, --cache-lmbda {cache_lmbda:g}")
    return "the interpolation is not finite (" + ", ".join(parts) + ")"


def check_finite(final: torch.Tensor, describe: Callable[[int], str]) -> None:
    """Raise NonFiniteScore for the first token of ``final`` (n,) that is not finite, with
    ``describe(i)``'s line (its position and reason)."""
    bad = nonfinite_rows(final)
    if len(bad):
        raise NonFiniteScore(describe(int(bad[0])) + f" ({len(bad)} such tokens in this batch)")

"""The continuous cache of an eval-lm run (--knn-cache, Grave et al. 2017): each scored
token's cache log-probability over the positions before it in its row, and its
interpolation into the score."""

from __future__ import annotations

from typing import Any

import torch

from fairseq_knnlm.plugin.batch import Batch
from fairseq_knnlm.scoring.cache import cache_log_prob, interpolate_cache, next_tokens


class CacheScorer:
    def __init__(self, t: Any) -> None:
        self.theta = float(t.cache_theta)
        self.length = int(t.cache_length)
        self.lmbda = float(t.cache_lmbda)

    def log_prob(self, sample: dict, b: Batch, pad: int) -> torch.Tensor:
        """log p_cache of the targets, each row's history being the positions before it."""
        src, tgt = sample["net_input"]["src_tokens"], sample["target"]
        vals = next_tokens(src, tgt, pad)
        parts = []
        for i, s, n in b.spans:
            length = s + n
            lp = cache_log_prob(b.feats[i, :length], vals[i, :length], tgt[i, :length],
                                self.theta, self.length)
            parts.append(lp[s:s + n])
        return torch.cat(parts)

    def interpolate(self, final: torch.Tensor, cache_lp: torch.Tensor) -> torch.Tensor:
        return interpolate_cache(final, cache_lp, self.lmbda)

"""The sequence scorer that eval-lm uses when the plugin is loaded.

It runs fairseq's own ``SequenceScorer`` (same forward pass, same LM probabilities) and,
when a kNN-LM run is active, hands the batch to it, which dumps keys and/or replaces each
hypothesis' ``positional_scores`` by the interpolated log-probabilities. With no active run
it is exactly the stock scorer.
"""

from __future__ import annotations

from typing import Any

from fairseq.sequence_scorer import SequenceScorer

from .runtime import active_runtime


class KNNSequenceScorer(SequenceScorer):
    def generate(self, models: list, sample: dict, **kwargs: Any) -> list:
        rt = active_runtime()
        if rt is None or not rt.bound:
            return super().generate(models, sample, **kwargs)
        if len(models) != 1:
            raise ValueError("kNN-LM options do not support ensembles: one model only")
        hypos = super().generate(models, sample, **kwargs)
        rt.process(sample, hypos)
        return hypos

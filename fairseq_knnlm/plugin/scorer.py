"""The sequence scorer that eval-lm uses when the plugin is loaded.

With no active kNN-LM run it *is* fairseq's ``SequenceScorer`` (stock results, bit for bit).
With one, it runs the same forward pass but normalises the LM output only at the scored
positions (targets that are not pad): ``--context-window`` positions are fed to the model but
never scored, and fairseq's scorer spends up to half its time building full-vocabulary
distributions for them. The per-position maths is fairseq's own ``get_normalized_probs``, so
the LM log-probabilities are the stock ones. The run then dumps keys and/or replaces each
hypothesis' ``positional_scores`` by the interpolated log-probabilities.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Optional

import torch
from fairseq import utils
from fairseq.sequence_scorer import SequenceScorer

from fairseq_knnlm.adaptive.lambda_features import lm_features_argmax, logp_at, logp_at_rows
from fairseq_knnlm.errors import FlagError
from fairseq_knnlm.plugin.runtime import active_runtime

DEFAULT_SOFTMAX_ROWS = 2048  # rows normalised at once when --softmax-batch is not set
# with LM features wanted, the batch's full log-distributions are kept up to this size for the
# lambda model's agreement features (log p_LM at the neighbours' values), instead of a second
# full softmax (an adaptive softmax computes every cluster for it); larger: recomputed
LM_LOGP_KEEP_BYTES = 1 << 30


class KNNSequenceScorer(SequenceScorer):
    def generate(self, models: list, sample: dict, **kwargs: Any) -> list:
        rt = active_runtime()
        if rt is None or not rt.bound:
            return super().generate(models, sample, **kwargs)
        if len(models) != 1:
            raise FlagError("kNN-LM options do not support ensembles: one model only")
        hypos = self._score_targets_only(models[0], sample, rt.wants_lm_features,
                                         rt.knn.retriever.timing if rt.knn else None)
        rt.process(sample, hypos)
        return hypos

    @torch.no_grad()
    def _score_targets_only(self, model: torch.nn.Module, sample: dict,
                            with_features: bool = False,
                            timing: Optional[dict[str, float]] = None) -> list:
        """fairseq's hypotheses for the scored positions; ``with_features`` adds, per
        hypothesis, ``lm_features`` (n, 2): the entropy and the max log-prob of p_LM there
        (lambda_model.lm_features), and ``lm_argmax`` (n,), read off the same distributions:
        then one call without targets computes every cluster of an adaptive softmax (given
        targets it fills only the targets' clusters), and the targets' log-probs are read
        from it too (the same numbers as the targets-only call); the first hypothesis also
        gets ``lm_logp_at``, a function giving log p_LM of any tokens at the batch's scored
        positions (``lm_logp_at``), each hypothesis its first position's ``lm_offset``
        there. ``timing`` (the retriever's stage times) gets the features' time as
        ``lm_features`` (the full softmax they need is the LM's)."""
        model.eval()
        decoder_out = model(**sample["net_input"])
        target = sample["target"]
        bsz = target.size(0)
        starts = sample.get("start_indices", [0] * bsz)
        mask = target.ne(self.pad)
        feats = decoder_out[0][mask]  # (n, C or V), scored positions in row-major order
        tgt = target[mask]
        rows = self.softmax_batch if self.softmax_batch < 1 << 40 else DEFAULT_SOFTMAX_ROWS
        lp = feats.new_empty(tgt.shape, dtype=torch.float32)
        lmf = feats.new_empty((len(tgt), 2), dtype=torch.float32) if with_features else None
        top = torch.empty(len(tgt), dtype=torch.long, device=feats.device) if with_features \
            else None
        # the full log-distributions (rows, V) of each chunk of positions, kept (not copied
        # into one (n, V) tensor) when all of them fit in LM_LOGP_KEEP_BYTES
        kept: list[torch.Tensor] | None = None
        for s in range(0, len(tgt), rows):
            e = min(len(tgt), s + rows)
            # given targets, an adaptive softmax fills only their clusters' log-probs; the
            # features need every cluster: then one call without targets gives both (the
            # targets' log-probs are the same numbers: tests/offline/test_lambda_replay.py)
            probs = model.get_normalized_probs(
                (feats[s:e].unsqueeze(0),) + tuple(decoder_out[1:]), log_probs=True,
                sample=None if lmf is not None else {"target": tgt[s:e].unsqueeze(0)})
            lp[s:e] = probs[0].gather(-1, tgt[s:e].unsqueeze(-1)).squeeze(-1).float()
            if lmf is not None:
                assert top is not None
                t0 = time.perf_counter()
                full = probs[0]
                lmf[s:e], top[s:e] = lm_features_argmax(full)
                if s == 0 and len(tgt) * full.shape[-1] * 4 <= LM_LOGP_KEEP_BYTES:
                    kept = []
                if kept is not None:
                    kept.append(full.float())
                if timing is not None:
                    timing["lm_features"] += time.perf_counter() - t0
        hypos, o = [], 0
        for i in range(bsz):
            ref = utils.strip_pad(target[i, starts[i]:], self.pad)
            n = ref.numel()
            if int(mask[i].sum()) != n or (n and not bool(mask[i, starts[i]:starts[i] + n].all())):
                raise RuntimeError("scored positions of a row are not one contiguous span")
            scores = lp[o:o + n]
            hypo = {"tokens": ref, "score": scores.sum() / max(1, n), "attention": None,
                    "alignment": None, "positional_scores": scores}
            if lmf is not None and top is not None:
                hypo["lm_features"], hypo["lm_argmax"] = lmf[o:o + n], top[o:o + n]
                hypo["lm_offset"] = o
                if i == 0:
                    hypo["lm_logp_at"] = (
                        functools.partial(lm_logp_kept, kept, rows) if kept is not None else
                        functools.partial(lm_logp_at, model, feats, tuple(decoder_out[1:]),
                                          rows))
            o += n
            hypos.append([hypo])
        return hypos


def lm_logp_kept(kept: list[torch.Tensor], rows: int, positions: torch.Tensor,
                 tokens: torch.Tensor) -> torch.Tensor:
    """``lm_logp_at`` from the batch's kept full log-distributions: ``kept[c]`` (rows, V)
    those of the scored positions c * rows ... (c + 1) * rows - 1 (the last chunk shorter)."""
    dev = kept[0].device
    pos, tok = positions.to(dev).long(), tokens.to(dev).long()
    if len(kept) == 1:
        return logp_at_rows(kept[0], pos, tok)
    out = torch.empty(tok.shape, dtype=torch.float32, device=dev)
    chunk = pos // rows
    for c, full in enumerate(kept):
        sel = (chunk == c).nonzero()[:, 0]
        if len(sel):
            out[sel] = logp_at_rows(full, pos[sel] - c * rows, tok[sel])
    return out


@torch.no_grad()
def lm_logp_at(model: torch.nn.Module, feats: torch.Tensor, extra: tuple, rows: int,
               positions: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(m, k) float32 log p_LM(tokens[i, j] | scored position positions[i]) from the decoder's
    output ``feats`` (n, C) at the scored positions: the full distribution (the adaptive
    softmax's every cluster), ``rows`` positions at a time; tokens < 0 (no neighbour) give 0."""
    out = torch.zeros(tokens.shape, dtype=torch.float32, device=feats.device)
    pos = positions.to(feats.device).long()
    tok = tokens.to(feats.device).long()
    for s in range(0, len(pos), rows):
        e = min(len(pos), s + rows)
        probs = model.get_normalized_probs((feats[pos[s:e]].unsqueeze(0),) + extra,
                                           log_probs=True, sample=None)[0]
        out[s:e] = logp_at(probs, tok[s:e])
    return out

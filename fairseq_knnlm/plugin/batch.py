"""One scored batch as the runtime sees it: the scored positions gathered from eval-lm's
hypotheses (``collect``), the numbers handed to observers (``ScoredBatch``), each token's
offset in the subset's token stream (``StreamPositions``), and the write-back of the final
scores where eval-lm reads them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from fairseq_knnlm.search.retriever import Retrieved

logger = logging.getLogger(__name__)


@dataclass
class Batch:
    """The scored positions of one batch, in row-major order."""

    feats: torch.Tensor  # (B, T, C) the captured hidden states
    spans: list[tuple[int, int, int]]  # (row, first scored position, number scored)
    queries: torch.Tensor  # (n, C) float32 keys of the scored positions
    targets: torch.Tensor  # (n,) int64 the tokens scored there
    skip: int  # leading positions of each hypothesis that eval-lm does not score (bos)
    fresh: Optional[np.ndarray] = None  # (n,) uint8, with pointers: 1 where a stream starts
    prev_tokens: Optional[torch.Tensor] = None  # (n,) the input token at each scored position
    lm_feats: Optional[torch.Tensor] = None  # (n, 2) LM entropy and max log-prob, if wanted
    lm_top: Optional[torch.Tensor] = None  # (n,) the LM's argmax, if wanted
    # log p_LM of tokens (m, k) at m of the scored positions (rows (m,) int64: indices into
    # the batch's scored tokens; scorer.lm_logp_at), if wanted
    lm_logp_at: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
    lm_logp_nbrs: Optional[torch.Tensor] = None  # (n, k) once computed

    def lm_at_neighbors(self, nbr_vals: torch.Tensor) -> torch.Tensor:
        """(n, k) log p_LM at the neighbours' values (0 where none), computed once and only
        for the tokens with neighbours (not those the gate skipped)."""
        if self.lm_logp_nbrs is None:
            assert self.lm_logp_at is not None
            rows = (nbr_vals >= 0).any(dim=1).nonzero()[:, 0].cpu()
            if len(rows) == len(nbr_vals):  # every token has neighbours: no copy
                self.lm_logp_nbrs = self.lm_logp_at(rows, nbr_vals).to(nbr_vals.device)
                return self.lm_logp_nbrs
            out = torch.zeros(nbr_vals.shape, dtype=torch.float32, device=nbr_vals.device)
            if len(rows):
                out[rows.to(out.device)] = self.lm_logp_at(rows, nbr_vals[rows.to(
                    nbr_vals.device)]).to(out.device)
            self.lm_logp_nbrs = out
        return self.lm_logp_nbrs


@dataclass
class ScoredBatch:
    """The scorer's numbers for the scored tokens of one batch (row-major order), handed to
    observers (``KNNEvalRuntime.add_observer``) after the batch is scored."""

    sample_ids: np.ndarray  # (n,) the block (``sample['id']``) each token belongs to
    positions: np.ndarray  # (n,) offset of each target in the subset's token stream (-1 unknown)
    targets: torch.Tensor  # (n,) int64 target token ids
    lm_logp: torch.Tensor  # (n,) float32 log p_LM(target)
    knn_logp: Optional[torch.Tensor]  # (n,) float32 log p_kNN(target), None without --knnlm
    cache_logp: Optional[torch.Tensor]  # (n,) float32 log p_cache(target), None without cache
    final_logp: torch.Tensor  # (n,) float32 the interpolated log p that eval-lm scores
    retrieved: Optional[Retrieved]  # the neighbours behind knn_logp (ids, distances, values)


BatchObserver = Callable[[ScoredBatch], None]


def collect(feats: torch.Tensor, sample: dict, hypos: list, add_bos: bool) -> Batch:
    """The captured states ``feats`` (B, T, C), and the keys and targets of the scored
    positions."""
    bsz = len(hypos)
    if feats.shape[0] != bsz:
        raise RuntimeError(f"captured states for {feats.shape[0]} rows, batch has {bsz}")
    starts = sample.get("start_indices", [0] * bsz)
    skip = 1 if add_bos else 0  # eval-lm drops the score of the leading bos
    spans = [(i, int(starts[i]) + skip, h[0]["tokens"].numel() - skip)
             for i, h in enumerate(hypos)]
    queries = torch.cat([feats[i, s:s + n] for i, s, n in spans]).float()
    targets = torch.cat([h[0]["tokens"][skip:] for h in hypos]).long()
    src = sample["net_input"]["src_tokens"]
    prev = torch.cat([src[i, s:s + n] for i, s, n in spans]).long()
    return Batch(feats=feats, spans=spans, queries=queries, targets=targets, skip=skip,
                 prev_tokens=prev)


def lm_log_probs(b: Batch, hypos: list) -> torch.Tensor:
    """(n,) float32 log p_LM of the batch's scored targets (eval-lm's positional scores)."""
    return torch.cat([h[0]["positional_scores"][b.skip:] for h in hypos]).float()


def take_lm_features(b: Batch, hypos: list) -> None:
    """The scorer's LM features of the batch's scored tokens (scorer._score_targets_only)."""
    b.lm_feats = torch.cat([h[0]["lm_features"][b.skip:] for h in hypos]).float()
    b.lm_top = torch.cat([h[0]["lm_argmax"][b.skip:] for h in hypos]).long()
    at = hypos[0][0]["lm_logp_at"] if hypos else None
    pos = torch.cat([torch.arange(h[0]["lm_offset"] + b.skip,
                                  h[0]["lm_offset"] + h[0]["tokens"].numel())
                     for h in hypos]) if hypos else torch.zeros(0, dtype=torch.long)
    b.lm_logp_at = (lambda rows, tokens: at(pos[rows], tokens)) if at is not None else None


def write_back(hypos: list, b: Batch, final: torch.Tensor) -> None:
    """Put the interpolated scores where eval-lm reads them."""
    o = 0
    for (_, _, n), h in zip(b.spans, hypos):
        ps = h[0]["positional_scores"].float().clone()
        ps[b.skip:] = final[o:o + n].to(ps.device)
        h[0]["positional_scores"] = ps
        h[0]["score"] = ps.sum() / max(1, ps.numel())
        o += n


def stream_offsets(dataset: Any) -> Optional[np.ndarray]:
    """Start offset in the subset's token stream of each block (TokenBlockDataset)."""
    seen = 0
    while dataset is not None and seen < 10:
        si = getattr(dataset, "slice_indices", None)
        if si is not None:
            return np.asarray(si)[:, 0].astype(np.int64)
        dataset = getattr(dataset, "dataset", None)
        seen += 1
    return None


class StreamPositions:
    """Each scored target's offset in the subset's token stream, from the blocks' offsets
    (read from the task's dataset on first use; -1 where unknown)."""

    def __init__(self, task: Any, subset: str) -> None:
        self.task, self.subset = task, subset
        self._offsets: Optional[np.ndarray] = None

    def _block_offsets(self, ids: torch.Tensor) -> np.ndarray:
        if self._offsets is None:
            off = stream_offsets(self.task.dataset(self.subset))
            if off is None:
                logger.warning("cannot map rows to token offsets: position map will be -1")
                off = np.full(0, -1, dtype=np.int64)
            self._offsets = off
        idx = ids.cpu().numpy()
        if len(self._offsets) == 0:
            return np.full(len(idx), -1, dtype=np.int64)
        return self._offsets[idx]

    def __call__(self, sample: dict, b: Batch) -> np.ndarray:
        """(n,) offset of each scored target in the subset's token stream (-1 if unknown)."""
        block_off = self._block_offsets(sample["id"])
        return np.concatenate([block_off[i] + np.arange(n) if block_off[i] >= 0
                               else np.full(n, -1) for i, _, n in b.spans]).astype(np.int64)

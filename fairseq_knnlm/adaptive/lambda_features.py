"""The features a lambda model reads (lambda_model.py's design note): before the search, from
p_LM and the text (``PRE_FEATURES``: ``lm_features``, ``pre_features``, ``freq_table``), and after
it, from the neighbours (``POST_FEATURES``: ``knn_features``, ``agreement_features``). The same
float32 functions serve eval-lm, the replay and the fitter. Plain numpy and torch.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

logger = logging.getLogger(__name__)
PathLike = Union[str, Path]


PRE_FEATURES = {
    "lm_entropy": "entropy of p_LM(.|context) in nats",
    "lm_max_logp": "max_v log p_LM(v|context)",
    "prev_log_freq": "log(1 + count in the datastore's values of the context's last token)",
}
POST_FEATURES = {
    "knn_min_dist": "the nearest neighbour's distance (the model's distance and k)",
    "knn_weight_entropy": "entropy of the neighbours' softmax(-d/T) weights, nats",
    "knn_top_mass": "max_v p_kNN(v): the weight of the neighbours' most common value",
    "knn_log_count": "log(1 + number of neighbours): log(1 + k) when searched, the live "
                     "pointers' count when scored from pointers (models fitted with pointers)",
    "knn_lm_agreement": "log sum_v p_kNN(v) p_LM(v): how much p_LM the neighbours' values get",
    "lm_logp_knn_top": "log p_LM(v*), v* = argmax_v p_kNN(v) (the neighbours' best guess)",
    "knn_mass_lm_top": "p_kNN(argmax_v p_LM(v)): the neighbours' weight on the LM's best guess",
}
# POST features that compare the neighbours with p_LM: they need p_LM at the neighbours' values
# and the LM's argmax (saved as PREFIX_lm_logp_nbrs / PREFIX_lm_argmax)
AGREEMENT_FEATURES = ("knn_lm_agreement", "lm_logp_knn_top", "knn_mass_lm_top")
# POST features that only vary when some tokens are scored from pointers (--knn-min-pointers)
POINTER_FEATURES = ("knn_log_count",)
FEATURES = {**PRE_FEATURES, **POST_FEATURES}


# ---- features ----

def lm_features(logp: torch.Tensor) -> torch.Tensor:
    """(n, 2) float32 [entropy, max log-prob] of n log-distributions (n, V)."""
    return lm_features_argmax(logp)[0]


def logp_at(logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(m, k) float32 log-probabilities of ``tokens`` (m, k) in the log-distributions ``logp``
    (m, V) of the same rows; tokens < 0 (no neighbour) give 0."""
    return logp.gather(-1, tokens.clamp_min(0)).float().masked_fill(tokens < 0, 0.0)


def logp_at_rows(logp: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``logp_at(logp[rows], tokens)`` without copying the rows (m, V): one flat gather."""
    flat = logp.contiguous().view(-1)
    at = rows.long()[:, None] * logp.shape[-1] + tokens.clamp_min(0)
    return flat[at].float().masked_fill(tokens < 0, 0.0)


def lm_features_argmax(logp: torch.Tensor, rows: int = 128
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``lm_features`` and the argmax (n,) int64 (the first of ties, as torch.max) of the same
    distributions, with one max.

    The entropy is -sum_v p log p with log p the given log-distribution (one exp per entry,
    no log: 3x faster than ``torch.special.entr`` over a 14K vocabulary), ``rows`` rows at a
    time into one buffer so that the temporaries stay in cache and no chunk allocates (a
    fresh (rows, V) tensor costs its page faults every time); rows with -inf entries (p = 0)
    take ``entr``'s 0 log 0 = 0 instead of 0 * -inf. On the CPU the argmax is numpy's (the
    first of ties too, 5x faster than torch's max with indices) and the max is read at it."""
    n = logp.shape[0]
    ent = torch.empty(n, dtype=torch.float32, device=logp.device)
    mx = torch.empty(n, dtype=torch.float32, device=logp.device)
    top = torch.empty(n, dtype=torch.long, device=logp.device)
    buf = torch.empty((min(rows, n), logp.shape[-1]), dtype=torch.float32, device=logp.device)
    for s in range(0, n, rows):
        lp = logp[s:s + rows].float()
        if lp.device.type == "cpu" and not lp.requires_grad:
            at = torch.from_numpy(lp.numpy().argmax(-1))
            top[s:s + rows] = at
            mx[s:s + rows] = lp.gather(1, at[:, None])[:, 0]
        else:
            m = lp.max(-1)
            mx[s:s + rows], top[s:s + rows] = m.values, m.indices
        e = torch.exp(lp, out=buf[:len(lp)]).mul_(lp).sum(-1).neg_()
        bad = torch.isnan(e)
        if bool(bad.any()):
            e[bad] = torch.special.entr(lp[bad].exp()).sum(-1)
        ent[s:s + rows] = e
    return torch.stack([ent, mx], dim=1), top


def freq_table(vals: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> np.ndarray:
    """(V,) float32 log(1 + count) of each token among the datastore's values."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for s in range(0, len(vals), chunk):
        v = np.asarray(vals[s:s + chunk]).reshape(-1).astype(np.int64)
        counts += np.bincount(v, minlength=vocab_size)[:vocab_size]
    return np.log1p(counts).astype(np.float32)


def top_value(weights: torch.Tensor, values: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) max over values v of the summed weights of a row's neighbours whose value is v, and
    that v (the smallest of ties; -1 for a row without neighbours), for weights (n, k), 0
    where no neighbour, and values (n, k) int."""
    if not values.shape[1]:
        return torch.zeros(len(values)), torch.full((len(values),), -1, dtype=torch.long)
    vs, order = values.int().sort(dim=1, stable=True)  # int32 sorts faster; same order
    vs = vs.long()
    ws = weights.gather(1, order)
    c = ws.cumsum(1)
    start = torch.ones_like(vs, dtype=torch.bool)
    start[:, 1:] = vs[:, 1:] != vs[:, :-1]
    # the cumulative weight before each run of equal values, carried along the run
    base = torch.where(start, c - ws, torch.zeros_like(c)).cummax(dim=1).values
    mass, at = (c - base).max(dim=1)
    return mass, vs.gather(1, at[:, None])[:, 0]


def top_value_mass(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(n,) the mass of ``top_value``."""
    return top_value(weights, values)[0]


def agreement_features(logw: torch.Tensor, values: torch.Tensor, top: torch.Tensor,
                       lm_logp_nbrs: torch.Tensor, lm_top: torch.Tensor,
                       weights: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """AGREEMENT_FEATURES of rows with neighbours: ``logw`` (n, k) log softmax weights (-inf
    where no neighbour), ``values`` (n, k) their values (-1 there), ``top`` (n,) the value of
    ``top_value``, ``lm_logp_nbrs`` (n, k) log p_LM at each neighbour's value, ``lm_top`` (n,)
    the LM's argmax; ``weights`` the masked exp of ``logw`` where the caller has it."""
    finite = torch.isfinite(logw)
    w = logw.exp().masked_fill(~finite, 0.0) if weights is None else weights
    lp = lm_logp_nbrs.float().masked_fill(~finite, float("-inf"))
    agree = torch.logsumexp(logw.masked_fill(~finite, float("-inf")) + lp, dim=1)
    first = (values == top[:, None]) & finite
    at = first.float().argmax(dim=1, keepdim=True)  # a neighbour holding v*
    lm_top_lp = lm_logp_nbrs.float().gather(1, at)[:, 0]
    mass_lm = (w * (values == lm_top.long()[:, None]).float()).sum(1)
    return {"knn_lm_agreement": agree, "lm_logp_knn_top": lm_top_lp, "knn_mass_lm_top": mass_lm}


def knn_features(dists: torch.Tensor, temperature: float,
                 values: Optional[torch.Tensor] = None,
                 lm_logp_nbrs: Optional[torch.Tensor] = None,
                 lm_top: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """POST_FEATURES of (n, k) float32 distances (inf where no neighbour), the neighbours'
    values (n, k) (knn_top_mass), and p_LM at them with the LM's argmax (AGREEMENT_FEATURES);
    those without their inputs are left out. A row without neighbours gets 0 for all (it is
    not searched, so no lambda is applied to it). On the CPU one compiled pass per row
    (feature_kernel.py), elsewhere ``knn_features_torch``; (n,) float32 each."""
    if dists.device.type != "cpu":
        return knn_features_torch(dists, temperature, values, lm_logp_nbrs, lm_top)
    from fairseq_knnlm.adaptive import feature_kernel as fk  # numba: lambda-model runs only

    d = np.ascontiguousarray(dists.detach().float().numpy())
    n = len(d)
    none2, none1 = np.zeros((0, 0), dtype=np.int64), np.zeros(0, dtype=np.int64)
    vals, lmn, top = none2, np.zeros((0, 0), dtype=np.float32), none1
    if values is not None:
        vals = np.ascontiguousarray(values.detach().cpu().numpy(), dtype=np.int64)
        assert vals.shape == d.shape, (vals.shape, d.shape)
        if lm_logp_nbrs is not None and lm_top is not None:
            lmn = np.ascontiguousarray(lm_logp_nbrs.detach().cpu().float().numpy())
            top = np.ascontiguousarray(lm_top.detach().cpu().numpy(), dtype=np.int64)
    size = max(int(vals.max()) + 1 if vals.size else 1, 1)
    out = np.empty((n, fk.COLUMNS), dtype=np.float64)

    def rows(s: int, e: int) -> None:  # the kernel releases the GIL: row ranges in threads
        fk.neighbour_features(d[s:e], float(temperature), vals[s:e], lmn[s:e], top[s:e],
                              np.zeros(size, dtype=np.float64), np.zeros(size, dtype=bool),
                              out[s:e])

    parts = max(1, min(torch.get_num_threads(), n // 256))
    cuts = [n * p // parts for p in range(parts + 1)]
    if parts == 1:
        rows(0, n)
    else:
        list(_pool(parts).map(rows, cuts[:-1], cuts[1:]))
    col = torch.from_numpy(out.astype(np.float32))
    feats = {"knn_min_dist": col[:, fk.MIN_DIST], "knn_weight_entropy": col[:, fk.WEIGHT_ENTROPY],
             "knn_log_count": col[:, fk.LOG_COUNT]}
    if values is not None:
        feats["knn_top_mass"] = col[:, fk.TOP_MASS]
        if lmn.shape[0] == n:
            feats.update(knn_lm_agreement=col[:, fk.AGREEMENT],
                         lm_logp_knn_top=col[:, fk.LM_LOGP_TOP],
                         knn_mass_lm_top=col[:, fk.MASS_LM_TOP])
    return {f: v.contiguous() for f, v in feats.items()}


@functools.cache
def _pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="knn-features")


def knn_features_torch(dists: torch.Tensor, temperature: float,
                 values: Optional[torch.Tensor] = None,
                 lm_logp_nbrs: Optional[torch.Tensor] = None,
                 lm_top: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """``knn_features`` in whole-(n, k) torch operations, on any device (the definition
    the compiled kernel is compared with, and the GPU path): POST_FEATURES of (n, k) float32
    distances (inf where no neighbour), the neighbours'
    values (n, k) (knn_top_mass), and p_LM at them with the LM's argmax (AGREEMENT_FEATURES);
    those without their inputs are left out. A row without neighbours gets 0 for all (it is
    not searched, so no lambda is applied to it)."""
    d = dists.float()
    finite = torch.isfinite(d)
    dmin = d.min(dim=1).values
    logits = (-d / temperature).masked_fill(~finite, float("-inf"))
    logw = torch.log_softmax(logits, dim=1)
    w = logw.exp().masked_fill(~finite, 0.0)  # 0 where no neighbour
    ent = -(w * logw.masked_fill(~finite, 0.0)).sum(1)
    any_ = finite.any(dim=1)
    zero = torch.zeros_like(dmin)
    out = {"knn_min_dist": torch.where(any_, dmin, zero),
           "knn_weight_entropy": torch.where(any_, ent, zero),
           "knn_log_count": torch.log1p(finite.sum(1).float())}
    if values is not None:
        vals = values.to(d.device)
        mass, top = top_value(w, vals)
        out["knn_top_mass"] = torch.where(any_, mass, zero)
        if lm_logp_nbrs is not None and lm_top is not None:
            rows = any_.nonzero()[:, 0]
            agree = agreement_features(logw[rows], vals[rows], top[rows],
                                       lm_logp_nbrs.to(d.device)[rows],
                                       lm_top.to(d.device)[rows], weights=w[rows])
            for f, v in agree.items():
                out[f] = zero.clone().index_put_((rows,), v.float())
    return out


def needs_agreement(features: Sequence[str]) -> bool:
    return any(f in AGREEMENT_FEATURES for f in features)


def pre_features(lm_feats: torch.Tensor, prev_tokens: torch.Tensor, freq: np.ndarray
                 ) -> dict[str, torch.Tensor]:
    """PRE_FEATURES from ``lm_features`` (n, 2) and the context's last tokens (n,)."""
    table = torch.from_numpy(np.asarray(freq, dtype=np.float32))
    prev = prev_tokens.long().cpu().clamp(0, len(table) - 1)
    return {"lm_entropy": lm_feats[:, 0].float().cpu(),
            "lm_max_logp": lm_feats[:, 1].float().cpu(),
            "prev_log_freq": table[prev]}

"""kNN-LM maths as plain torch functions (CPU or GPU, no fairseq): paper Eqs. 2 and 3.

    p_kNN(y|x) = sum_{(k_i, v_i) in N, v_i = y} exp(-d(k_i, f(x)) / T) / Z      (Eq. 2)
    p(y|x)     = lambda p_kNN(y|x) + (1 - lambda) p_LM(y|x)                        (Eq. 3)

Everything that decides a probability runs in float32, in log space. Neighbour slots that
FAISS could not fill (id -1) are masked out, never read as the datastore's last row.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Union

import numpy as np
import torch

from fairseq_knnlm.store.shards import ConcatRows

# log p_kNN where no neighbour carries the target (the authors' code masked with the same
# -10000 "for stability"). Finite on purpose: eval-lm drops tokens scored -inf from its loss
# (with an info line), so -inf at lambda = 1 would average over the found targets only. With
# lambda < 1 the floor is harmless (exp(-10000) is 0 next to p_LM); with lambda = 1 every
# token counts and eval-lm's loss (mean NLL in bits) is a finite number. It does NOT keep the
# perplexity finite: eval-lm prints 2**loss as a float32, inf once the loss passes 128 bits,
# i.e. once about 1% of the targets are missing from their neighbours (10000 nats each);
# sweep.ppl_from_nll reports the same inf.
KNN_LOGP_FLOOR = -10000.0
def knn_log_prob(
    dists: torch.Tensor,
    nbr_vals: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    valid: Optional[torch.Tensor] = None,
    floor: float = KNN_LOGP_FLOOR,
) -> torch.Tensor:
    """log p_kNN(target) from (n, k) squared distances (or negated similarities).

    dists: (n, k) distance d (smaller is closer); nbr_vals: (n, k) token ids of the neighbours;
    targets: (n,); valid: (n, k) bool mask of real neighbours (False for FAISS's -1 slots).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = -dists.float() / temperature
    if valid is not None:
        logits = logits.masked_fill(~valid, float("-inf"))
    norm = torch.logsumexp(logits, dim=-1)
    match = nbr_vals == targets.unsqueeze(-1)
    if valid is not None:
        match = match & valid
    tgt = torch.logsumexp(logits.masked_fill(~match, float("-inf")), dim=-1)
    out = tgt - norm
    # no matching neighbour (or no neighbour at all): the finite floor
    return torch.where(match.any(dim=-1), out, torch.full_like(out, floor))


def knn_log_probs_full(
    dists: torch.Tensor,
    nbr_vals: torch.Tensor,
    vocab_size: int,
    temperature: float = 1.0,
    valid: Optional[torch.Tensor] = None,
    floor: float = KNN_LOGP_FLOOR,
) -> torch.Tensor:
    """(n, V) log p_kNN of every token of the vocabulary (Eq. 2), for generation: the
    weights softmax(-d/T) of the k neighbours scatter-added onto their values, in log space
    and float32 (per value, a log-sum-exp of its neighbours' logits). A token that no
    neighbour carries gets ``floor``, as ``knn_log_prob`` gives it; at any token this equals
    ``knn_log_prob`` with that token as the target.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = dists.shape[0]
    logits = -dists.float() / temperature
    ok = nbr_vals >= 0
    if valid is not None:
        ok = ok & valid.to(ok.device)
    logits = logits.masked_fill(~ok, float("-inf"))
    norm = torch.logsumexp(logits, dim=-1, keepdim=True)  # (n, 1)
    idx = torch.where(ok, nbr_vals, torch.zeros_like(nbr_vals)).long()
    neg = torch.full((n, vocab_size), float("-inf"), dtype=torch.float32, device=logits.device)
    top = neg.scatter_reduce(1, idx, logits, reduce="amax", include_self=True)  # per value
    shift = torch.where(ok, logits - top.gather(1, idx), torch.full_like(logits, float("-inf")))
    sums = torch.zeros_like(neg).scatter_add_(1, idx, shift.exp())
    out = sums.log() + top - norm  # -inf / nan only where no neighbour: replaced below
    has = torch.zeros(n, vocab_size, dtype=torch.bool, device=logits.device).scatter_(
        1, idx, ok)
    return torch.where(has, out, torch.full_like(out, floor))


def interpolate(lm_logp: torch.Tensor, knn_logp: torch.Tensor, lmbda: float) -> torch.Tensor:
    """log(lambda p_kNN + (1 - lambda) p_LM), computed with logaddexp in float32."""
    if not 0.0 <= lmbda <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lmbda}")
    lm = lm_logp.float()
    if lmbda == 0.0:
        return lm
    if lmbda == 1.0:
        return knn_logp.float()
    return torch.logaddexp(lm + math.log(1.0 - lmbda), knn_logp.float() + math.log(lmbda))


def as_tensor(keys: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """A torch view of a key array without copying (memmaps stay memory-mapped)."""
    if isinstance(keys, torch.Tensor):
        return keys
    with warnings.catch_warnings():  # read-only memmap: we never write through the view
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(keys))


def gather_rows(keys: Union[np.ndarray, torch.Tensor, ConcatRows],
                flat_ids: torch.Tensor) -> torch.Tensor:
    """keys[flat_ids] as a tensor in the keys' dtype.

    Keys on disk (a memmap, or a sharded datastore's memmaps) are read only where asked, each
    distinct row once and in increasing order (a datastore beyond RAM is then read in one
    forward sweep per block, not by random seeks); keys in RAM are gathered directly."""
    if isinstance(keys, (ConcatRows, np.memmap)):
        uniq, inverse = torch.unique(flat_ids, sorted=True, return_inverse=True)
        if isinstance(keys, ConcatRows):
            rows = torch.from_numpy(keys[uniq.cpu().numpy()])
        else:
            rows = as_tensor(keys).index_select(0, uniq)
        return rows.index_select(0, inverse)
    return as_tensor(keys).index_select(0, flat_ids)


def recompute_distances(
    queries: torch.Tensor,
    ids: Union[np.ndarray, torch.Tensor],
    keys: Union[np.ndarray, torch.Tensor],
    sim_func: str = "l2",
    block_bytes: int = 1 << 22,
) -> torch.Tensor:
    """Exact d(k_i, q) for the neighbours ``ids`` (n, k) from the full-precision keys.

    'l2' gives squared L2 and 'dot' the negated inner product (smaller is closer in both).
    Rows are gathered with one index_select per block of queries (at most ~``block_bytes``
    of float32 rows) and upcast to float32 before any arithmetic, so fp16 keys lose nothing.
    Small blocks (4 MB: 4 queries x 1024 neighbours x 256 dims) keep the fp32 temporaries in
    cache: on WikiText-2 neighbours, 2 cores, 3.1M rows/s against 0.8M rows/s with 128 MB
    blocks (benchmarks/gather_bench.py; benchmarks/run.py gives the end-to-end effect).
    -1 ids give +inf.
    """
    if sim_func not in ("l2", "dot"):
        raise ValueError(f"recompute_distances: sim_func must be 'l2' or 'dot', got {sim_func!r}")
    kt = keys if isinstance(keys, ConcatRows) else as_tensor(keys)
    ids_t = torch.as_tensor(ids)
    n, k = ids_t.shape
    d = kt.shape[1]
    out = torch.empty((n, k), dtype=torch.float32)
    step = max(1, block_bytes // max(1, k * d * 4))
    q_all = queries.detach().float().cpu()
    valid = ids_t >= 0
    safe = ids_t.clamp_min(0)
    for s in range(0, n, step):
        e = min(n, s + step)
        rows = gather_rows(kt, safe[s:e].reshape(-1)).float().view(e - s, k, d)
        q = q_all[s:e]
        if sim_func == "l2":
            dist = torch.linalg.vector_norm(rows.sub_(q.unsqueeze(1)), dim=-1).square_()
        else:
            dist = -torch.bmm(rows, q.unsqueeze(-1)).squeeze(-1)
        out[s:e] = dist
    out.masked_fill_(~valid, float("inf"))
    return out.to(queries.device)

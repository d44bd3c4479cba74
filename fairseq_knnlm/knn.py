"""kNN-LM maths as plain torch functions (CPU or GPU, no fairseq): paper Eqs. 2 and 3.

    p_kNN(y|x) = sum_{(k_i, v_i) in N, v_i = y} exp(-d(k_i, f(x)) / T) / Z      (Eq. 2)
    p(y|x)     = lambda p_kNN(y|x) + (1 - lambda) p_LM(y|x)                        (Eq. 3)

Everything that decides a probability runs in float32, in log space. Neighbour slots that
FAISS could not fill (id -1) are masked out, never read as the datastore's last row.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

# log p_kNN where no neighbour carries the target: finite, so that lambda = 1 still gives a
# finite (huge) perplexity instead of inf; the authors' code used the same -10000 mask.
KNN_LOGP_FLOOR = -10000.0
SIM_FUNCS = ("l2", "faiss_l2", "dot")


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


def gather_rows(keys: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Read the rows ``ids`` of a (possibly memory-mapped) key array with sorted, de-duplicated
    reads; return (unique_rows, inverse) so that keys[ids] == unique_rows[inverse]."""
    flat = ids.reshape(-1)
    uniq, inverse = np.unique(flat, return_inverse=True)
    rows = keys[uniq]  # sorted fancy index: sequential-ish page access on a memmap
    return rows, inverse.reshape(ids.shape)


def recompute_distances(
    queries: torch.Tensor,
    ids: np.ndarray,
    keys: np.ndarray,
    sim_func: str = "l2",
    block_bytes: int = 1 << 28,
) -> torch.Tensor:
    """Exact d(k_i, q) for the neighbours ``ids`` (n, k) from the full-precision keys.

    'l2' gives squared L2 and 'dot' gives the negated inner product (so smaller is closer in
    both). Keys are gathered (fp16 upcast to fp32) in blocks of queries that hold at most
    about ``block_bytes`` of gathered keys. -1 ids yield +inf.
    """
    if sim_func not in ("l2", "dot"):
        raise ValueError(f"recompute_distances: sim_func must be 'l2' or 'dot', got {sim_func!r}")
    n, k = ids.shape
    d = keys.shape[1]
    out = torch.empty((n, k), dtype=torch.float32, device=queries.device)
    step = max(1, block_bytes // max(1, k * d * 4))
    q_all = queries.float()
    for s in range(0, n, step):
        e = min(n, s + step)
        blk = ids[s:e]
        valid = blk >= 0
        rows, inv = gather_rows(keys, np.where(valid, blk, 0))
        nb = torch.from_numpy(np.asarray(rows, dtype=np.float32)).to(queries.device)
        nb = nb[torch.from_numpy(inv).to(queries.device)]  # (b, k, d)
        q = q_all[s:e].unsqueeze(1)
        if sim_func == "l2":
            dist = (nb - q).pow_(2).sum(-1)
        else:
            dist = -(nb * q).sum(-1)
        dist.masked_fill_(~torch.from_numpy(valid).to(queries.device), float("inf"))
        out[s:e] = dist
    return out

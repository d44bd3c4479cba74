"""Continuous cache (Grave et al. 2017) as plain torch functions.

For position t of a sequence with hidden states h_0..h_{T-1} and next tokens v_j = w_{j+1}:

    p_cache(y | h_t) = sum_{t-L <= j < t, v_j = y} exp(theta h_t . h_j) / Z

The pairs (h_j, w_{j+1}) for j < t only use tokens up to w_t, which the model has already
seen, so the cache never peeks at the token it predicts. In eval-lm the history is what the
sample holds: its --context-window prefix plus the earlier scored positions, so a cache length
L <= context window gives every scored position (but those at the start of the corpus) a full
history. It is interpolated last: p = (1 - lambda_c) p_base + lambda_c p_cache, where p_base is
the LM or the kNN-LM.
"""

from __future__ import annotations

import math

import torch

from fairseq_knnlm.scoring.knn import KNN_LOGP_FLOOR, knn_log_probs_full


def next_tokens(src_tokens: torch.Tensor, target: torch.Tensor, pad: int) -> torch.Tensor:
    """v_j = w_{j+1} for every position of (B, T) inputs: the target where it is known, else
    the next input token (context positions of --context-window carry pad targets)."""
    shifted = torch.cat([src_tokens[:, 1:], target[:, -1:]], dim=1)
    return torch.where(target.ne(pad), target, shifted)


def cache_log_prob(
    hidden: torch.Tensor,
    values: torch.Tensor,
    targets: torch.Tensor,
    theta: float,
    length: int,
    floor: float = KNN_LOGP_FLOOR,
) -> torch.Tensor:
    """log p_cache(targets) for every position of one sequence.

    hidden: (T, D) states; values: (T,) next tokens v_j; targets: (T,) token to score at each
    position. Positions with no history (t = 0) get the floor.
    """
    T = hidden.shape[0]
    h = hidden.float()
    scores = theta * (h @ h.t())  # (T, T): row t scores history j
    t = torch.arange(T, device=h.device)
    allowed = (t.unsqueeze(0) < t.unsqueeze(1)) & (t.unsqueeze(0) >= t.unsqueeze(1) - length)
    scores = scores.masked_fill(~allowed, float("-inf"))
    match = allowed & (values.unsqueeze(0) == targets.unsqueeze(1))
    norm = torch.logsumexp(scores, dim=-1)
    tgt = torch.logsumexp(scores.masked_fill(~match, float("-inf")), dim=-1)
    out = tgt - norm
    return torch.where(match.any(dim=-1), out, torch.full_like(out, floor))


def cache_log_probs_full(
    query: torch.Tensor,
    history: torch.Tensor,
    values: torch.Tensor,
    theta: float,
    length: int,
    vocab_size: int,
    floor: float = KNN_LOGP_FLOOR,
) -> torch.Tensor:
    """(n, V) log p_cache of every token for generation: query (n, D) the state at the
    position being predicted, history (n, T, D) the states before it and values (n, T)
    their next tokens (the last ``length`` positions count). The same distribution as
    ``cache_log_prob`` gives its target, over the whole vocabulary."""
    h = history[:, -length:].float() if length > 0 else history[:, :0].float()
    v = values[:, -length:] if length > 0 else values[:, :0]
    if h.shape[1] == 0:
        return torch.full((query.shape[0], vocab_size), floor, dtype=torch.float32,
                          device=query.device)
    scores = theta * torch.bmm(h, query.float().unsqueeze(-1)).squeeze(-1)  # (n, T)
    return knn_log_probs_full(-scores, v.long(), vocab_size, 1.0, floor=floor)


def interpolate_cache(base_logp: torch.Tensor, cache_logp: torch.Tensor,
                      lmbda: float) -> torch.Tensor:
    """log((1 - lambda_c) p_base + lambda_c p_cache) in float32."""
    if not 0.0 <= lmbda <= 1.0:
        raise ValueError(f"cache lambda must be in [0, 1], got {lmbda}")
    if lmbda == 0.0:
        return base_logp.float()
    if lmbda == 1.0:
        return cache_logp.float()
    return torch.logaddexp(base_logp.float() + math.log(1 - lmbda),
                           cache_logp.float() + math.log(lmbda))

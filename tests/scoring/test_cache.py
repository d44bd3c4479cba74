"""Continuous-cache maths (Grave et al. 2017) against a brute-force loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fairseq_knnlm.scoring.cache import (
    cache_log_prob,
    cache_log_probs_full,
    interpolate_cache,
    next_tokens,
)
from fairseq_knnlm.scoring.knn import KNN_LOGP_FLOOR


def test_cache_matches_loop_and_is_causal():
    rng = np.random.default_rng(0)
    T, D, L, theta = 12, 5, 4, 0.7
    h = rng.standard_normal((T, D)).astype(np.float32)
    vals = rng.integers(0, 4, T)
    tg = rng.integers(0, 4, T)
    got = cache_log_prob(torch.from_numpy(h), torch.from_numpy(vals), torch.from_numpy(tg),
                         theta, L).numpy()
    for t in range(T):
        js = [j for j in range(max(0, t - L), t)]
        if not js or not any(vals[j] == tg[t] for j in js):
            assert got[t] == KNN_LOGP_FLOOR
            continue
        s = np.array([theta * h[t] @ h[j] for j in js])
        p = np.exp(s - s.max())
        num = sum(p[i] for i, j in enumerate(js) if vals[j] == tg[t])
        assert got[t] == pytest.approx(math.log(num / p.sum()), rel=1e-4, abs=1e-5)


def test_next_tokens_fills_context_positions():
    pad = 1
    src = torch.tensor([[2, 10, 11, 12, 13]])
    tgt = torch.tensor([[pad, pad, 12, 13, 14]])  # first two positions are context only
    assert next_tokens(src, tgt, pad).tolist() == [[10, 11, 12, 13, 14]]


def test_interpolate_cache_zero_is_identity():
    base = torch.tensor([-1.0, -2.0])
    assert torch.equal(interpolate_cache(base, torch.tensor([-5.0, -0.1]), 0.0), base)


def test_a_cache_only_pass_logs_its_summary_as_the_cache(tiny, caplog):
    """The summary of a --knn-cache pass without --knnlm is the cache's, not 'kNN-LM'."""
    import logging

    from conftest import eval_args, eval_lm_inprocess

    caplog.set_level(logging.INFO, logger="fairseq_knnlm")
    res = eval_lm_inprocess(eval_args(tiny, "test", "--knn-cache", "--cache-lmbda", "0.2"))
    lines = [r.getMessage() for r in caplog.records if "tokens; LM ppl" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("continuous cache: "), lines
    assert f"final ppl {res['perplexity']:.2f}" in lines[0] or math.isclose(
        float(lines[0].rsplit(" ", 1)[1]), res["perplexity"], rel_tol=1e-4)


def test_full_vocab_cache_is_the_per_target_one():
    """Generation's cache over the whole vocabulary (the query against its history) equals
    cache_log_prob at the last position for every target."""
    rng = np.random.default_rng(1)
    T, D, L, theta, V = 10, 4, 6, 0.5, 7
    h = torch.from_numpy(rng.standard_normal((T, D)).astype(np.float32))
    vals = torch.from_numpy(rng.integers(0, 5, T))
    full = cache_log_probs_full(h[-1:], h[None, :-1], vals[None, :-1], theta, L, V)
    for y in range(V):
        tg = torch.full((T,), y)
        per = cache_log_prob(h, vals, tg, theta, L)[-1]
        assert float(full[0, y]) == pytest.approx(float(per), abs=1e-5)
    empty = cache_log_probs_full(h[-1:], h[None, :0], vals[None, :0], theta, L, V)
    assert (empty == KNN_LOGP_FLOOR).all()

"""The compiled pointer-stepping kernels (adaptive/kernels.py) against the numpy definitions
they replace (pointers.next_pointers, Clusters.expand and its counts), on random data:
holes in the neighbour lists, datastore stream ends, limits below and above the pointers.

Run: python -m pytest -q tests/adaptive/test_kernels.py
"""

from __future__ import annotations

import numpy as np
import pytest

from fairseq_knnlm.adaptive import kernels
from fairseq_knnlm.adaptive.pointers import Clusters, compact, next_pointers


def live_state(rng: np.random.Generator, streams: int, k: int, n: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """run_streams' pointer state: each stream's pointers (distinct rows) compacted to the
    front, -1 after them, and their counts."""
    ptrs = np.full((streams, k), -1, dtype=np.int64)
    nlive = rng.integers(0, k + 1, streams).astype(np.int64)
    nlive[0] = 0
    for s in range(streams):
        ptrs[s, :nlive[s]] = rng.choice(n, nlive[s], replace=False)
    return ptrs, nlive


@pytest.mark.parametrize("vals_dtype", [np.int64, np.int32])
def test_follow_equals_next_pointers_and_gathers_the_values(vals_dtype):
    rng = np.random.default_rng(0)
    n, k, vocab = 5000, 64, 7
    vals = rng.integers(0, vocab, n).astype(vals_dtype)
    continues = rng.random(n) < 0.8
    continues[-1] = False
    for _ in range(20):
        streams, tokens = 12, 40
        ptrs, nlive = live_state(rng, streams, k, n)
        s = int(rng.integers(1, streams + 1))
        rows = rng.choice(streams, s, replace=False).astype(np.int64)
        toks = rng.choice(tokens, s, replace=False).astype(np.int64)
        w = int(rng.integers(1, k + 1))
        ids = rng.integers(-1, n, (s, w)).astype(np.int64)  # -1 holes anywhere
        targets = rng.integers(0, vocab, tokens).astype(np.int64)
        out_v = np.full((tokens, k), -7, dtype=vals_dtype)
        want_v = out_v.copy()
        want_v[toks, :w] = np.where(ids >= 0, vals[np.where(ids >= 0, ids, 0)], -1)
        want_p = ptrs.copy()
        want_p[rows] = -1
        nxt = compact(next_pointers(ids, want_v[toks, :w], targets[toks], continues))
        want_p[rows, :nxt.shape[1]] = nxt
        kernels.follow(ids, toks, rows, targets, vals, continues, out_v, ptrs, nlive)
        assert (out_v == want_v).all()
        assert (ptrs == want_p).all()
        assert (nlive == (ptrs >= 0).sum(axis=1)).all()


def test_follow_refuses_ids_past_the_datastore():
    ptrs, nlive = np.full((1, 2), -1, dtype=np.int64), np.zeros(1, dtype=np.int64)
    with pytest.raises(IndexError, match="past the datastore"):
        kernels.follow(np.array([[0, 5]]), np.array([0]), np.array([0]), np.array([1]),
                       np.zeros(5, dtype=np.int64), np.ones(5, dtype=bool),
                       np.full((1, 2), -1, dtype=np.int64), ptrs, nlive)


def test_clear_drops_only_the_named_streams():
    rng = np.random.default_rng(1)
    ptrs, nlive = live_state(rng, 6, 16, 100)
    keep = ptrs.copy()
    kernels.clear(np.array([1, 4]), ptrs, nlive)
    assert (ptrs[[1, 4]] == -1).all() and nlive[1] == nlive[4] == 0
    assert (ptrs[[0, 2, 3, 5]] == keep[[0, 2, 3, 5]]).all()


@pytest.mark.parametrize("n,num,per,limit", [(500, 7, 128, 64), (3000, 300, 3, 50),
                                             (3000, 40, 128, 2048), (2000, 2000, 1, 20),
                                             (4000, 64, 16, 8)])
def test_cluster_kernels_equal_count_and_expand(n, num, per, limit):
    rng = np.random.default_rng(2)
    assign = rng.integers(0, num, n)
    order = np.argsort(assign, kind="stable")
    c = Clusters(assign, order, num, per_cluster=per, limit=limit)
    for _ in range(15):
        streams, k = int(rng.integers(1, 30)), int(rng.integers(1, 200))
        ptrs, nlive = live_state(rng, streams, k, n)
        rows = rng.choice(streams, int(rng.integers(0, streams + 1)), replace=False)
        want = c.expand(ptrs[rows])
        got = c.expand_live(rows, ptrs, nlive)
        assert got.shape == want.shape and (got == want).all()
        assert c.count_live(rows, ptrs, nlive).tolist() == (want >= 0).sum(axis=1).tolist()
        # the scratch is left clean for the next call
        assert not c._seen.any() and not c._mark.any()

"""lambda_model.py (issue #15, a lambda per token): features, heads, fitting and the model
file against direct numpy / float64 computations on synthetic data. No fairseq model."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from fairseq_knnlm.adaptive.lambda_features import (
    AGREEMENT_FEATURES,
    FEATURES,
    POST_FEATURES,
    PRE_FEATURES,
    freq_table,
    knn_features,
    lm_features,
    pre_features,
    top_value,
    top_value_mass,
)
from fairseq_knnlm.adaptive.lambda_file import (
    FORMAT,
    VERSION,
    check_model_flags,
    load_model,
    save_model,
)
from fairseq_knnlm.adaptive.lambda_fit import (
    best_constant,
    fit_buckets,
    fit_mlp,
    head_nll,
    mixture_nll,
)
from fairseq_knnlm.adaptive.lambda_model import (
    BucketHead,
    ConstantHead,
    LambdaModel,
    MixHead,
    MLPHead,
    interpolate_per_token,
    uses_search,
)
from fairseq_knnlm.errors import FlagError
from fairseq_knnlm.scoring.knn import KNN_LOGP_FLOOR, interpolate


@pytest.fixture(autouse=True)
def _one_thread():
    """The MLP fits are tiny: one intra-op thread is ~10x faster than two on a busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _f64(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def _model(head, gate=None, k: int = 16, temperature: float = 10.0, dist: str = "l2",
           vocab: int = 20) -> LambdaModel:
    freq = np.log1p(np.arange(vocab, dtype=np.float64)).astype(np.float32)
    return LambdaModel(kind="constant", head=head, gate=gate, k=k, temperature=temperature,
                       dist=dist, freq=freq)


# ---- features ----

def test_lm_features_match_float64_and_zero_probabilities_stay_finite():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 500, generator=g) * 3
    logits[3, :250] = -math.inf  # half the vocabulary has probability 0
    logits[7, 1:] = -math.inf  # one-hot: entropy 0, max log-prob 0
    logp = torch.log_softmax(logits, -1)
    assert torch.isinf(logp).any()
    got = lm_features(logp)
    assert got.dtype == torch.float32 and got.shape == (32, 2)
    assert torch.isfinite(got).all()
    lp = _f64(logp)
    p = np.exp(lp)
    with np.errstate(invalid="ignore"):
        ent = -np.where(p > 0, p * lp, 0.0).sum(-1)
    np.testing.assert_allclose(_f64(got[:, 0]), ent, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_f64(got[:, 1]), lp.max(-1), rtol=1e-6, atol=1e-7)
    assert float(got[7, 0]) == 0.0 and float(got[7, 1]) == 0.0
    # uniform over V: entropy log V, max log-prob -log V
    uni = lm_features(torch.full((1, 64), -math.log(64)).half())
    assert uni.dtype == torch.float32
    assert float(uni[0, 0]) == pytest.approx(math.log(64), rel=1e-3)
    assert float(uni[0, 1]) == pytest.approx(-math.log(64), rel=1e-3)


def test_freq_table_counts_and_chunking():
    vals = np.array([0, 1, 1, 3, 3, 3, 4], dtype=np.int32)
    expect = np.log1p(np.array([1, 2, 0, 3, 1, 0], dtype=np.float64)).astype(np.float32)
    got = freq_table(vals, 6)
    assert got.dtype == np.float32 and got.shape == (6,)
    np.testing.assert_array_equal(got, expect)
    for chunk in (1, 2, 3, 100):  # chunks smaller than the array: the same table
        np.testing.assert_array_equal(freq_table(vals, 6, chunk=chunk), expect)
    # the datastore's (n, 1) values, memory-mapped, read in chunks
    np.testing.assert_array_equal(freq_table(vals[:, None], 6, chunk=2), expect)


def test_freq_table_memmap_chunks(tmp_path):
    rng = np.random.default_rng(0)
    vals = rng.integers(0, 50, 1000).astype(np.int32)
    mm = np.memmap(tmp_path / "vals.npy", dtype=np.int32, mode="w+", shape=(1000, 1))
    mm[:, 0] = vals
    mm.flush()
    ro = np.memmap(tmp_path / "vals.npy", dtype=np.int32, mode="r", shape=(1000, 1))
    expect = np.log1p(np.bincount(vals, minlength=50)).astype(np.float32)
    np.testing.assert_array_equal(freq_table(ro[:, 0], 50, chunk=77), expect)


def test_freq_table_values_beyond_vocab_are_not_counted_as_another_token():
    """A value >= vocab_size has no row in the (V,) table: it is left out, never wrapped or
    clipped onto another token's count (chunked or not)."""
    vals = np.array([0, 1, 1, 3, 3, 3, 4], dtype=np.int64)
    expect = freq_table(vals, 6)
    extra = np.concatenate([vals, [6, 9, 5 + 6, 100]])
    for chunk in (1, 4, 1 << 24):
        got = freq_table(extra, 6, chunk=chunk)
        assert got.shape == (6,)
        np.testing.assert_array_equal(got, expect)


def test_top_value_mass_is_the_largest_value_group_weight():
    g = np.random.default_rng(3)
    vals = g.integers(-1, 6, size=(50, 17))
    w = g.random((50, 17)).astype(np.float32)
    w[vals < 0] = 0.0
    w /= w.sum(1, keepdims=True)
    got = top_value_mass(torch.from_numpy(w), torch.from_numpy(vals)).numpy()
    want = [max(w[i][vals[i] == v].sum() for v in set(vals[i].tolist()) if v >= 0)
            for i in range(len(vals))]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    feats = knn_features(torch.full((1, 3), 1.0), 1.0, torch.tensor([[4, 4, 7]]))
    assert feats["knn_top_mass"].item() == pytest.approx(2 / 3)
    assert "knn_top_mass" not in knn_features(torch.full((1, 3), 1.0), 1.0)  # no values


def test_knn_features_against_numpy_with_missing_neighbours():
    rng = np.random.default_rng(1)
    d = rng.uniform(0, 50, (20, 8)).astype(np.float32)
    d[2, 5:] = np.inf  # three slots without a neighbour
    d[4, [0, 3]] = np.inf
    d[9, :] = np.inf  # no neighbour at all
    temp = 7.0
    got = knn_features(torch.from_numpy(d), temp)
    # no values, no p_LM given
    assert set(got) == {"knn_min_dist", "knn_weight_entropy", "knn_log_count"}
    for v in got.values():
        assert v.shape == (20,) and v.dtype == torch.float32 and torch.isfinite(v).all()
    for i in range(20):
        row = d[i][np.isfinite(d[i])].astype(np.float64)
        assert float(got["knn_log_count"][i]) == pytest.approx(math.log1p(len(row)), rel=1e-6)
        if len(row) == 0:
            assert float(got["knn_min_dist"][i]) == 0.0
            assert float(got["knn_weight_entropy"][i]) == 0.0
            continue
        assert float(got["knn_min_dist"][i]) == float(row.min())
        z = -row / temp
        w = np.exp(z - z.max())
        w /= w.sum()
        ent = -(w * np.log(w)).sum()
        assert float(got["knn_weight_entropy"][i]) == pytest.approx(ent, rel=1e-5, abs=1e-6)
    # a huge temperature makes the weights uniform: entropy log(#neighbours)
    flat = knn_features(torch.from_numpy(d), 1e9)["knn_weight_entropy"]
    assert float(flat[0]) == pytest.approx(math.log(8), rel=1e-5)
    assert float(flat[2]) == pytest.approx(math.log(5), rel=1e-5)


def test_agreement_features_against_numpy():
    rng = np.random.default_rng(3)
    n, k, V = 30, 12, 6
    d = rng.uniform(0, 40, (n, k)).astype(np.float32)
    vals = rng.integers(0, V, (n, k))
    d[2, 7:] = np.inf
    vals[2, 7:] = -1
    d[5, :] = np.inf  # no neighbour: every feature 0
    vals[5, :] = -1
    lm_full = np.log(rng.dirichlet(np.ones(V), n)).astype(np.float32)  # p_LM per row
    lmn = np.where(vals >= 0, np.take_along_axis(lm_full, np.maximum(vals, 0), 1), 0.0)
    top = lm_full.argmax(1)
    temp = 9.0
    got = knn_features(torch.from_numpy(d), temp, torch.from_numpy(vals),
                       torch.from_numpy(lmn.astype(np.float32)), torch.from_numpy(top))
    assert set(got) == set(POST_FEATURES)
    for i in range(n):
        ok = np.isfinite(d[i])
        if not ok.any():
            for f in AGREEMENT_FEATURES:
                assert float(got[f][i]) == 0.0
            continue
        z = -d[i][ok].astype(np.float64) / temp
        w = np.exp(z - z.max())
        w /= w.sum()
        pk = {v: w[vals[i][ok] == v].sum() for v in set(vals[i][ok].tolist())}
        agree = math.log(sum(p * math.exp(lm_full[i, v]) for v, p in pk.items()))
        vstar = min(v for v, p in pk.items() if p == max(pk.values()))
        assert float(got["knn_lm_agreement"][i]) == pytest.approx(agree, rel=1e-5, abs=1e-5)
        assert float(got["lm_logp_knn_top"][i]) == pytest.approx(float(lm_full[i, vstar]))
        assert float(got["knn_mass_lm_top"][i]) == pytest.approx(pk.get(int(top[i]), 0.0),
                                                                 abs=1e-6)


def test_top_value_breaks_ties_towards_the_smallest_value():
    w = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.5, 0.0, 0.0, 0.0]])
    v = torch.tensor([[9, 3, 9, 3], [7, -1, -1, -1]])
    mass, val = top_value(w, v)
    assert mass.tolist() == [0.5, 0.5] and val.tolist() == [3, 7]


def test_pre_features_look_up_the_table():
    freq = np.log1p(np.arange(10, dtype=np.float64) * 3).astype(np.float32)
    lmf = torch.tensor([[1.5, -0.2], [0.1, -0.01], [3.0, -2.0], [2.0, -1.0]])
    prev = torch.tensor([0, 3, 9, 3], dtype=torch.int32)
    x = pre_features(lmf, prev, freq)
    assert set(x) == set(PRE_FEATURES)
    assert torch.equal(x["prev_log_freq"], torch.from_numpy(freq[[0, 3, 9, 3]]))
    assert torch.equal(x["lm_entropy"], lmf[:, 0])
    assert torch.equal(x["lm_max_logp"], lmf[:, 1])
    assert all(v.dtype == torch.float32 for v in x.values())


# ---- interpolation ----

CONSTANT_LAMBDAS = [0.0, 0.1, 0.25, 1 / 3, 0.5, 0.9, 1.0]


def _lm_knn(n: int = 5000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lm = -torch.rand(n, generator=g) * 25
    knn = -torch.rand(n, generator=g) * 25
    knn[::5] = KNN_LOGP_FLOOR  # no matching neighbour
    lm[3::7] = -1e-3  # the LM nearly sure
    return lm, knn


@pytest.mark.parametrize("lam", CONSTANT_LAMBDAS)
def test_interpolate_per_token_equals_interpolate_for_a_constant(lam):
    lm, knn = _lm_knn()
    ref = interpolate(lm, knn, lam)
    got = interpolate_per_token(lm, knn, torch.full((len(lm),), lam, dtype=torch.float64))
    assert got.dtype == torch.float32
    assert torch.equal(got, ref)


@pytest.mark.parametrize("lam", CONSTANT_LAMBDAS)
def test_constant_lambda_model_gives_the_fixed_lambda_numbers(lam):
    """A constant model's lambdas, as the runtime feeds them to interpolate_per_token, give
    exactly the numbers of --lmbda lam (knn.interpolate)."""
    lm, knn = _lm_knn(seed=1)
    model = _model(ConstantHead(lam))
    got = interpolate_per_token(lm, knn, model.lambdas({}, len(lm)))
    assert torch.equal(got, interpolate(lm, knn, lam))


def test_interpolate_per_token_mixed_lambdas_against_float64():
    lm, knn = _lm_knn(20000, seed=2)
    g = torch.Generator().manual_seed(3)
    lam = torch.rand(len(lm), generator=g)
    lam[::11] = 0.0
    lam[3::13] = 1.0
    got = interpolate_per_token(lm, knn, lam)
    assert got.dtype == torch.float32
    lam64 = _f64(lam)
    with np.errstate(divide="ignore"):
        ref = np.logaddexp(_f64(lm) + np.log1p(-lam64), _f64(knn) + np.log(lam64))
    np.testing.assert_allclose(_f64(got), ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[lam == 0], lm[lam == 0])  # lambda 0: p_LM exactly
    assert torch.equal(got[lam == 1], knn[lam == 1])  # lambda 1: p_kNN exactly


# ---- fitting ----

def test_mixture_nll_against_direct_formula():
    rng = np.random.default_rng(4)
    lm = -rng.uniform(0, 10, 100)
    knn = -rng.uniform(0, 10, 100)
    lam = rng.uniform(0, 1, 100)
    ref = -np.log(lam * np.exp(knn) + (1 - lam) * np.exp(lm))
    np.testing.assert_allclose(mixture_nll(lm, knn, lam), ref, rtol=1e-12)
    np.testing.assert_allclose(mixture_nll(lm, knn, 0.3),
                               -np.log(0.3 * np.exp(knn) + 0.7 * np.exp(lm)), rtol=1e-12)
    np.testing.assert_array_equal(mixture_nll(lm, knn, 0.0), -lm)
    np.testing.assert_array_equal(mixture_nll(lm, knn, 1.0), -knn)


def test_best_constant_matches_a_fine_grid():
    rng = np.random.default_rng(5)
    n = 300
    lm = -rng.uniform(0.5, 8, n)
    helps = rng.uniform(0, 1, n) < 0.4
    knn = np.where(helps, np.minimum(0.0, lm + rng.uniform(0, 3, n)), KNN_LOGP_FLOOR)
    knn[~helps & (rng.uniform(0, 1, n) < 0.5)] = -9.0  # a poor match rather than none
    grid = np.linspace(0, 1, 10001)
    nll = np.array([mixture_nll(lm, knn, g).mean() for g in grid])
    g_best = float(grid[nll.argmin()])
    assert 0.01 < g_best < 0.99  # an interior optimum
    lam = best_constant(lm, knn)
    assert abs(lam - g_best) <= 2e-4
    assert mixture_nll(lm, knn, lam).mean() <= nll.min() + 1e-12


def test_best_constant_ends():
    rng = np.random.default_rng(6)
    lm = -rng.uniform(0, 10, 200)
    # kNN never helps (no matching neighbour): exactly 0, so its tokens need no search
    assert best_constant(lm, np.full_like(lm, KNN_LOGP_FLOOR)) == 0.0
    # kNN always much better: exactly 1
    lm2 = -rng.uniform(10, 20, 200)
    assert best_constant(lm2, lm2 + 10.0) == 1.0
    assert best_constant(np.zeros(0), np.zeros(0)) == 0.0


def _two_point(good: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tokens where either the kNN is sure (p_kNN 1, p_LM e^-30) or has no match (p_LM 1):
    the best lambda of a group is its fraction of the first kind."""
    lm = np.where(good, -30.0, 0.0)
    knn = np.where(good, 0.0, KNN_LOGP_FLOOR)
    return lm, knn


def test_fit_buckets_recovers_a_step_function():
    rng = np.random.default_rng(7)
    q = [0.05, 0.3, 0.6, 0.95]  # the best lambda of each step of the feature
    m = 400
    xs, goods = [], []
    for g, frac in enumerate(q):
        xs.append(g + rng.uniform(0, 0.5, m))
        good = np.zeros(m, dtype=bool)
        good[: int(round(frac * m))] = True
        goods.append(rng.permutation(good))
    x, good = np.concatenate(xs), np.concatenate(goods)
    order = rng.permutation(len(x))
    x, good = x[order], good[order]
    lm, knn = _two_point(good)
    head = fit_buckets(x, lm, knn, "knn_min_dist", 4)
    assert head.features == ("knn_min_dist",)
    assert head.edges.dtype == np.float32 and head.lambdas.dtype == np.float32
    assert len(head.edges) == 3 and len(head.lambdas) == 4
    for g, e in enumerate(head.edges):  # each edge lies between two steps
        assert g + 0.5 < e < g + 1
    np.testing.assert_allclose(head.lambdas, q, atol=1e-3)
    probe = torch.tensor([0.25, 1.25, 2.25, 3.25])
    np.testing.assert_allclose(head.predict({"knn_min_dist": probe}, 4).numpy(), q, atol=1e-3)


def test_fit_buckets_edges_are_quantiles():
    rng = np.random.default_rng(8)
    x = rng.permutation(np.arange(101, dtype=np.float64))
    lm, knn = _two_point(rng.uniform(0, 1, 101) < 0.5)
    np.testing.assert_array_equal(fit_buckets(x, lm, knn, "lm_entropy", 4).edges,
                                  np.array([25, 50, 75], dtype=np.float32))
    np.testing.assert_array_equal(fit_buckets(x, lm, knn, "lm_entropy", 5).edges,
                                  np.array([20, 40, 60, 80], dtype=np.float32))
    x100 = rng.permutation(np.arange(100, dtype=np.float64))
    head = fit_buckets(x100, lm[:100], knn[:100], "lm_entropy", 4)
    np.testing.assert_allclose(head.edges, np.quantile(x100, [0.25, 0.5, 0.75]), rtol=1e-6)
    counts = np.bincount(head.buckets(torch.from_numpy(x100)).numpy(), minlength=4)
    np.testing.assert_array_equal(counts, [25, 25, 25, 25])  # equal-count buckets
    # one bucket: no edges, the best constant
    one = fit_buckets(x, lm, knn, "lm_entropy", 1)
    assert len(one.edges) == 0 and len(one.lambdas) == 1
    assert float(one.lambdas[0]) == pytest.approx(best_constant(lm, knn), abs=1e-7)
    # repeated quantiles collapse: a constant feature leaves one edge, two buckets
    same = fit_buckets(np.full(50, 3.0), lm[:50], knn[:50], "lm_entropy", 8)
    np.testing.assert_array_equal(same.edges, np.array([3.0], dtype=np.float32))
    assert len(same.lambdas) == 2
    with pytest.raises(FlagError, match="--buckets"):
        fit_buckets(x, lm, knn, "lm_entropy", 0)


def test_bucket_head_assigns_left_closed_buckets():
    """Bucket b holds edges[b-1] <= x < edges[b]: a value on an edge goes to the upper one."""
    head = BucketHead("knn_min_dist", np.array([1.0, 2.0, 3.0], dtype=np.float32),
                      np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32))
    x = torch.tensor([-math.inf, 0.5, 1.0, 1.5, 2.0, 2.999, 3.0, 100.0])
    assert head.buckets(x).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    got = head.predict({"knn_min_dist": x}, len(x))
    assert got.dtype == torch.float32
    assert torch.equal(got, torch.tensor([0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.4, 0.4]))


def _smooth(n: int, seed: int, flip: bool = False
            ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The best lambda is 0.1 + 0.8 x (x uniform in [0, 1]); flip: 0.9 - 0.8 x."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, n)
    good = rng.uniform(0, 1, n) < 0.1 + 0.8 * x
    lm, knn = _two_point(~good if flip else good)
    return {"lm_entropy": x.astype(np.float32)}, lm, knn


FEAT = ["lm_entropy"]


def _weights(h: MLPHead) -> list[np.ndarray]:
    return [h.mean, h.std, *h.weights, *h.biases]


def _same(a: MLPHead, b: MLPHead) -> bool:
    return all(np.array_equal(u, v) for u, v in zip(_weights(a), _weights(b)))


def test_fit_mlp_beats_the_best_constant_on_held_out_rows():
    fit, val, held = _smooth(2000, 1), _smooth(1000, 2), _smooth(2000, 3)
    head = fit_mlp(*fit, *val, FEAT, hidden=8, steps=100, lr=1e-2, eval_every=10)
    assert head.features == tuple(FEAT) and len(head.weights) == 3  # 2 hidden layers + out
    fixed = best_constant(fit[1], fit[2])
    const_nll = float(mixture_nll(held[1], held[2], fixed).mean())
    mlp_nll = head_nll(head, *held)
    assert mlp_nll < const_nll - 0.05, (mlp_nll, const_nll)
    # its lambda follows 0.1 + 0.8 x
    probe = {"lm_entropy": torch.tensor([0.1, 0.5, 0.9])}
    np.testing.assert_allclose(head.predict(probe, 3).numpy(), [0.18, 0.5, 0.82], atol=0.1)


def test_fit_mlp_is_deterministic_given_the_seed():
    fit, val = _smooth(500, 4), _smooth(200, 5)
    torch.manual_seed(0)
    a = fit_mlp(*fit, *val, FEAT, hidden=8, steps=20, seed=3)
    torch.manual_seed(12345)  # the global RNG plays no part
    torch.rand(7)
    b = fit_mlp(*fit, *val, FEAT, hidden=8, steps=20, seed=3)
    c = fit_mlp(*fit, *val, FEAT, hidden=8, steps=20, seed=4)
    assert _same(a, b)
    assert not _same(a, c)


def test_fit_mlp_keeps_the_best_validation_state():
    """Validation rows whose best lambda runs against the fit rows': the validation NLL
    improves while the bias moves up from init_lambda, then worsens. The head returned is the
    state of the best evaluation, kept unchanged while training goes on."""
    fit, val = _smooth(2000, 1), _smooth(2000, 1, flip=True)
    heads = [fit_mlp(*fit, *val, FEAT, hidden=8, steps=s, lr=1e-2, eval_every=10,
                     patience=10**6) for s in range(0, 101, 10)]
    val_nll = [head_nll(h, *val) for h in heads]
    j = next(i for i, h in enumerate(heads) if _same(h, heads[-1]))
    assert 0 < j < len(heads) - 2  # found part-way, not the first or the last state
    assert all(_same(h, heads[-1]) for h in heads[j:])  # later states never replace it
    assert val_nll[-1] <= min(val_nll) + 1e-6
    assert val_nll[-1] < val_nll[0] - 1e-3


def test_fit_mlp_stops_after_patience(monkeypatch):
    """With init_lambda at the fit rows' mean and flipped validation rows, every step hurts the
    validation NLL: training stops after `patience` steps and returns the initial state."""
    steps_taken = []

    class CountingAdam(torch.optim.Adam):
        def step(self, *a, **k):
            steps_taken.append(1)
            return super().step(*a, **k)

    fit, val = _smooth(2000, 1), _smooth(2000, 1, flip=True)
    init = fit_mlp(*fit, *val, FEAT, hidden=8, steps=0, init_lambda=0.5)
    monkeypatch.setattr(torch.optim, "Adam", CountingAdam)
    got = fit_mlp(*fit, *val, FEAT, hidden=8, steps=1000, init_lambda=0.5, eval_every=10,
                  patience=30)
    assert len(steps_taken) == 30
    assert _same(got, init)
    # the initial head predicts init_lambda (the last layer starts near 0)
    lam = got.predict({"lm_entropy": torch.from_numpy(fit[0]["lm_entropy"])}, 2000)
    np.testing.assert_allclose(lam.numpy(), 0.5, atol=0.02)


def _random_mlp(features: tuple[str, ...], seed: int, hidden: int = 5) -> MLPHead:
    rng = np.random.default_rng(seed)
    f = len(features)
    dims = [f, hidden, hidden, 1]
    ws = [rng.standard_normal((dims[i + 1], dims[i])).astype(np.float32) for i in range(3)]
    bs = [rng.standard_normal(dims[i + 1]).astype(np.float32) for i in range(3)]
    return MLPHead(features, rng.standard_normal(f).astype(np.float32),
                   rng.uniform(0.5, 2, f).astype(np.float32), ws, bs)


def _features(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f: rng.uniform(0, 5, n).astype(np.float32) for f in FEATURES}


def test_head_nll_is_the_mixture_nll_of_the_predicted_lambdas():
    n = 300
    x = _features(n, 9)
    rng = np.random.default_rng(10)
    lm, knn = -rng.uniform(0, 10, n), -rng.uniform(0, 10, n)
    knn[::4] = KNN_LOGP_FLOOR
    edges = np.array([1.0, 2.5, 4.0], dtype=np.float32)
    lams = np.array([0.0, 0.2, 0.6, 1.0], dtype=np.float32)
    mlp = _random_mlp(("lm_entropy", "knn_min_dist"), 11)
    h = np.stack([x["lm_entropy"], x["knn_min_dist"]], 1).astype(np.float64)
    h = (h - mlp.mean) / mlp.std
    for i, (w, b) in enumerate(zip(mlp.weights, mlp.biases)):
        h = h @ w.T.astype(np.float64) + b
        h = np.maximum(h, 0) if i < 2 else h
    cases = [
        (ConstantHead(0.3), np.full(n, 0.3)),
        (BucketHead("knn_min_dist", edges, lams),
         lams[np.searchsorted(edges, x["knn_min_dist"], side="right")].astype(np.float64)),
        (mlp, 1 / (1 + np.exp(-h[:, 0]))),
    ]
    for head, lam in cases:
        expect = float(mixture_nll(lm, knn, lam).mean())
        assert head_nll(head, x, lm, knn) == pytest.approx(expect, rel=1e-6)
    assert head_nll(mlp, {f: v[:0] for f, v in x.items()}, lm[:0], knn[:0]) == 0.0


# ---- the model file ----

def _models() -> dict[str, LambdaModel]:
    const = ConstantHead(1 / 3)  # not a float32 value: kept exactly
    gate = _random_mlp(tuple(PRE_FEATURES), 12)
    buckets = BucketHead("knn_min_dist", np.array([0.5, 1.5, 3.0], dtype=np.float32),
                         np.array([0.05, 0.2, 0.4, 0.7], dtype=np.float32))
    mlp = _random_mlp(tuple(FEATURES), 13, hidden=7)
    info = {"fitted_on": "nb/valid", "report": {"held_out_ppl": {"lm": 30.5, "model": 28.1}}}
    out = {}
    for name, kind, head, g in [("constant", "constant", const, const),
                                ("buckets", "buckets", buckets, gate),
                                ("mlp", "mlp", mlp, gate),
                                ("mlp_no_gate", "mlp", mlp, None),
                                ("mix", "mlp", _random_mix(tuple(FEATURES), 15, 3), gate)]:
        m = _model(head, g, k=32, temperature=3.5, dist="faiss_l2", vocab=40)
        m.kind = kind
        m.info = dict(info)
        if name == "mix":
            m.temps = (1.0, 3.5, 20.0)
            m.min_pointers = 4  # fitted under --knn-pointers --knn-min-pointers 4
            m.clusters = 40  # ... --knn-clusters of 40 clusters
        out[name] = m
    return out


def _random_mix(features: tuple[str, ...], seed: int, m: int) -> MixHead:
    h = _random_mlp(features, seed)
    rng = np.random.default_rng(seed + 1)
    h.weights[-1] = rng.standard_normal((1 + m, h.weights[-1].shape[1])).astype(np.float32)
    h.biases[-1] = rng.standard_normal(1 + m).astype(np.float32)
    return MixHead(h.features, h.mean, h.std, h.weights, h.biases)


@pytest.mark.parametrize("name", ["constant", "buckets", "mlp", "mlp_no_gate", "mix"])
def test_save_load_round_trip(tmp_path, name):
    model = _models()[name]
    path = tmp_path / "sub" / "lam.npz"  # the folder is created
    save_model(path, model)
    assert path.exists() and not list(path.parent.glob("*.tmp"))
    got = load_model(path)
    assert (got.kind, got.k, got.temperature, got.dist) == (model.kind, 32, 3.5, "faiss_l2")
    np.testing.assert_array_equal(got.freq, model.freq)
    assert got.freq.dtype == np.float32
    assert got.info == model.info
    assert type(got.head) is type(model.head)
    assert got.head.features == model.head.features
    assert uses_search(got.head) == uses_search(model.head)
    x = {f: torch.from_numpy(v) for f, v in _features(64, 14).items()}
    assert torch.equal(got.lambdas(x, 64), model.lambdas(x, 64))
    if model.gate is None:
        assert got.gate is None
    else:
        assert torch.equal(got.gate_lambdas(x, 64), model.gate_lambdas(x, 64))
    if name == "constant":
        assert got.head.lmbda == 1 / 3
    assert got.temps == model.temps
    assert got.min_pointers == (4 if name == "mix" else None)
    assert got.clusters == (40 if name == "mix" else None)
    if name == "mix":
        assert torch.equal(got.head.log_weights(x), model.head.log_weights(x))


def test_mix_head_with_one_temperature_weighted_is_the_lambda_interpolation():
    """A MixHead whose weights sit on (p_LM, p_kNN at one T) gives lambda interpolation at
    that T; its lambda is 1 - the LM's weight; weights are a distribution."""
    h = _random_mix(("lm_entropy",), 3, 3)
    h.weights[-1][:] = 0.0
    lam = 0.3
    h.biases[-1][:] = np.array([math.log(1 - lam), -80.0, math.log(lam), -80.0], np.float32)
    x = {"lm_entropy": torch.rand(50)}
    lm = torch.log(torch.rand(50))
    knns = torch.log(torch.rand(50, 3))
    model = _model(h)
    model.temps = (1.0, 10.0, 100.0)
    got = model.mixture_logp(x, lm, knns)
    want = interpolate_per_token(lm, knns[:, 1], torch.full((50,), lam, dtype=torch.float64))
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    torch.testing.assert_close(h.predict(x, 50), torch.full((50,), lam), rtol=0, atol=1e-6)
    r = _random_mix(("lm_entropy",), 4, 3)
    np.testing.assert_allclose(r.log_weights(x).exp().sum(1).numpy(), 1.0, rtol=1e-6)


def test_fit_mlp_over_temperatures_beats_each_single_temperature():
    """Tokens whose target only the sharp p_kNN favours, and tokens where only the flat one
    does, told apart by a feature: the fitted MixHead beats the best fixed lambda at either
    temperature."""
    rng = np.random.default_rng(0)
    n = 4000
    f = rng.integers(0, 2, n).astype(np.float32)
    lm = np.full(n, math.log(0.05))
    sharp = np.where(f == 1, math.log(0.8), math.log(0.001))
    flat = np.where(f == 1, math.log(0.01), math.log(0.3))
    knns = np.stack([sharp, flat], axis=1)
    x = {"lm_entropy": f}
    head = fit_mlp(x, lm, knns, x, lm, knns, ["lm_entropy"], hidden=8, steps=600)
    assert isinstance(head, MixHead)
    logw = head.log_weights({"lm_entropy": torch.from_numpy(f)}).numpy().astype(np.float64)
    comps = np.concatenate([lm[:, None], knns], axis=1)
    nll = -np.log(np.exp(logw + comps).sum(1)).mean()
    for j in range(2):
        fixed = mixture_nll(lm, knns[:, j], best_constant(lm, knns[:, j])).mean()
        assert nll < fixed - 0.3


def _write_text(p: Path) -> None:
    p.write_text("not a model\n")


def _write_empty(p: Path) -> None:
    p.write_bytes(b"")


def _write_npy(p: Path) -> None:
    with open(p, "wb") as f:
        np.save(f, np.arange(3))


def _write_truncated(p: Path) -> None:
    save_model(p, _models()["buckets"])
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _write_npz(**arrays: np.ndarray) -> Callable[[Path], None]:
    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez(f, **arrays)
    return write


def _meta(**meta) -> np.ndarray:
    return np.array(json.dumps(meta))


BAD_FILES = {
    "text": _write_text,
    "empty": _write_empty,
    "npy": _write_npy,
    "truncated_npz": _write_truncated,
    "npz_without_meta": _write_npz(freq=np.zeros(3, np.float32)),
    "meta_not_json": _write_npz(meta=np.array("{oops")),
    "meta_not_an_object": _write_npz(meta=np.array("[1, 2]")),
    "wrong_format": _write_npz(meta=_meta(format="something else", version=VERSION)),
    "wrong_version": _write_npz(meta=_meta(format=FORMAT, version=VERSION + 1)),
}


@pytest.mark.parametrize("bad", sorted(BAD_FILES))
def test_load_model_bad_file_is_a_flag_error(tmp_path, bad):
    path = tmp_path / "model.npz"
    BAD_FILES[bad](path)
    with pytest.raises(FlagError) as e:
        load_model(path, flag="--lambda-model")
    msg = str(e.value)
    assert "--lambda-model" in msg and str(path) in msg
    if bad.startswith("wrong_"):
        assert "version" in msg


def test_load_model_missing_file(tmp_path):
    path = tmp_path / "nope.npz"
    with pytest.raises(FlagError) as e:
        load_model(path)
    assert "--knn-lambda-model" in str(e.value) and str(path) in str(e.value)
    assert "not found" in str(e.value)


def test_check_model_flags_names_each_mismatch():
    model = _model(ConstantHead(0.25), k=16, temperature=10.0, dist="l2", vocab=20)
    check_model_flags(model, "m.npz", 16, 10.0, "l2")
    check_model_flags(model, "m.npz", 16, 10.0 * (1 + 1e-12), "l2", vocab_size=20)
    cases = [
        (dict(k=8), ["--k 8", "16"]),
        (dict(temperature=1.0), ["--knn-temp 1", "fitted for 10"]),
        (dict(sim_func="faiss_l2"), ["--knn-sim-func faiss_l2", "fitted for l2"]),
        (dict(vocab_size=21), ["dictionary of 21", "fitted for 20"]),
    ]
    base = dict(k=16, temperature=10.0, sim_func="l2", vocab_size=20)
    for change, words in cases:
        with pytest.raises(FlagError) as e:
            check_model_flags(model, "m.npz", **{**base, **change})
        msg = str(e.value)
        assert "--knn-lambda-model m.npz" in msg
        for w in words:
            assert w in msg, (w, msg)
        others = [w for c, ws in cases if c is not change for w in ws[:1]]
        assert not any(w in msg for w in others), msg
    with pytest.raises(FlagError) as e:  # all at once: all named
        check_model_flags(model, "m.npz", 8, 1.0, "dot", vocab_size=21)
    for _, words in cases[:2] + cases[3:]:
        assert words[0] in str(e.value)
    assert "--knn-sim-func dot" in str(e.value)


def test_check_model_flags_wants_the_pointer_policy_the_model_was_fitted_under():
    plain = _model(ConstantHead(0.25), k=16, temperature=10.0, dist="l2", vocab=20)
    check_model_flags(plain, "m.npz", 16, 10.0, "l2", min_pointers=8)  # as before: allowed
    model = _model(ConstantHead(0.25), k=16, temperature=10.0, dist="l2", vocab=20)
    model.min_pointers = 1
    check_model_flags(model, "m.npz", 16, 10.0, "l2", min_pointers=1)
    for kw, words in [({}, "no --knn-pointers (fitted for --knn-pointers --knn-min-pointers 1)"),
                      ({"min_pointers": 8}, "--knn-min-pointers 8 (fitted for"),
                      ({"min_pointers": 1, "clusters": 40},
                       "--knn-clusters of 40 clusters (fitted on plain pointers)")]:
        with pytest.raises(FlagError) as e:
            check_model_flags(model, "m.npz", 16, 10.0, "l2", **kw)
        assert words in str(e.value) and "--knn-lambda-model m.npz" in str(e.value)
    model.clusters = 40  # fitted with --knn-clusters of 40 clusters
    check_model_flags(model, "m.npz", 16, 10.0, "l2", min_pointers=1, clusters=40)
    for n, words in [(None, "no --knn-clusters (fitted with --knn-clusters of 40 clusters)"),
                     (30, "--knn-clusters of 30 clusters (fitted with --knn-clusters of 40")]:
        with pytest.raises(FlagError, match=re.escape(words)):
            check_model_flags(model, "m.npz", 16, 10.0, "l2", min_pointers=1, clusters=n)


def test_uses_search_needs_lm_features_and_gate():
    buckets_post = BucketHead("knn_min_dist", np.zeros(0, np.float32),
                              np.array([0.3], np.float32))
    buckets_freq = BucketHead("prev_log_freq", np.zeros(0, np.float32),
                              np.array([0.3], np.float32))
    buckets_lm = BucketHead("lm_max_logp", np.zeros(0, np.float32),
                            np.array([0.3], np.float32))
    gate = _random_mlp(tuple(PRE_FEATURES), 15)
    assert not uses_search(ConstantHead(0.2))
    assert uses_search(buckets_post)
    assert not uses_search(buckets_freq)
    assert not uses_search(gate)
    assert uses_search(_random_mlp(("lm_entropy", "knn_weight_entropy"), 16))

    assert not _model(ConstantHead(0.2)).needs_lm_features
    assert not _model(buckets_post).needs_lm_features
    assert not _model(buckets_freq, buckets_freq).needs_lm_features
    assert _model(buckets_lm).needs_lm_features
    assert _model(buckets_post, gate).needs_lm_features  # the gate reads the LM's features
    assert _model(_random_mlp(("lm_entropy",), 17)).needs_lm_features

    x = {f: torch.from_numpy(v) for f, v in _features(10, 18).items()}
    with pytest.raises(FlagError, match="no gate"):
        _model(buckets_post).gate_lambdas(x, 10)
    g = _model(buckets_post, gate).gate_lambdas(x, 10)
    assert g.dtype == torch.float32 and torch.equal(g, gate.predict(x, 10).float())

"""kNN maths against hand-computed / brute-force numpy values (paper Eqs. 2-3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fairseq_knnlm.scoring.knn import (
    KNN_LOGP_FLOOR,
    interpolate,
    knn_log_prob,
    knn_log_probs_full,
    recompute_distances,
)


def test_knn_log_prob_hand_table():
    d = torch.tensor([[1.0, 2.0, 3.0]])
    vals = torch.tensor([[5, 7, 5]])
    w = np.exp(-np.array([1.0, 2.0, 3.0]))
    expect = math.log((w[0] + w[2]) / w.sum())
    got = knn_log_prob(d, vals, torch.tensor([5]))
    assert float(got) == pytest.approx(expect, rel=1e-6)
    # temperature divides the distance
    w2 = np.exp(-np.array([1.0, 2.0, 3.0]) / 10)
    got2 = knn_log_prob(d, vals, torch.tensor([7]), temperature=10.0)
    assert float(got2) == pytest.approx(math.log(w2[1] / w2.sum()), rel=1e-6)


def test_missing_target_gets_finite_floor_and_invalid_slots_are_masked():
    d = torch.tensor([[1.0, 2.0, 0.0]])
    vals = torch.tensor([[5, 7, 9]])
    valid = torch.tensor([[True, True, False]])  # FAISS id -1: never a neighbour
    assert float(knn_log_prob(d, vals, torch.tensor([9]), valid=valid)) == KNN_LOGP_FLOOR
    w = np.exp(-np.array([1.0, 2.0]))
    got = knn_log_prob(d, vals, torch.tensor([5]), valid=valid)
    assert float(got) == pytest.approx(math.log(w[0] / w.sum()), rel=1e-6)


def test_interpolation_log_space():
    lm = torch.tensor([math.log(0.2)])
    knn = torch.tensor([math.log(0.6)])
    assert float(interpolate(lm, knn, 0.25)) == pytest.approx(math.log(0.25 * 0.6 + 0.75 * 0.2))
    assert torch.equal(interpolate(lm, knn, 0.0), lm)  # lambda = 0 is exactly the LM
    with pytest.raises(ValueError):
        interpolate(lm, knn, 1.2)


def test_recompute_distances_fp16_memmap_and_minus_one(tmp_path):
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((500, 64)).astype(np.float16)
    path = tmp_path / "k.npy"
    keys.tofile(path)
    mm = np.memmap(path, dtype=np.float16, mode="r", shape=(500, 64))
    q = torch.from_numpy(rng.standard_normal((7, 64)).astype(np.float32))
    ids = rng.integers(0, 500, (7, 20))
    ids[3, 5] = -1
    d = recompute_distances(q, ids, mm, "l2", block_bytes=4096)  # many small blocks
    k32 = keys.astype(np.float32)
    ref = ((k32[ids] - q.numpy()[:, None]) ** 2).sum(-1)
    ok = ids >= 0
    np.testing.assert_allclose(d.numpy()[ok], ref[ok], rtol=1e-5, atol=1e-4)
    assert math.isinf(float(d[3, 5]))
    dots = recompute_distances(q, ids, mm, "dot")
    np.testing.assert_allclose(dots.numpy()[ok], -(k32[ids] * q.numpy()[:, None]).sum(-1)[ok],
                               rtol=1e-4, atol=1e-4)


def test_recompute_distances_memmap_sorted_reads_equal_in_ram(tmp_path):
    """Memmapped keys go through the sorted, de-duplicated read path; same numbers."""
    rng = np.random.default_rng(3)
    keys = rng.standard_normal((2000, 24)).astype(np.float16)
    mm = np.memmap(tmp_path / "k.npy", dtype=np.float16, mode="w+", shape=keys.shape)
    mm[:] = keys
    mm.flush()
    ro = np.memmap(tmp_path / "k.npy", dtype=np.float16, mode="r", shape=keys.shape)
    ids = rng.integers(-1, 50, (40, 64))  # many repeats within and across queries
    q = torch.from_numpy(rng.standard_normal((40, 24)).astype(np.float32))
    torch.testing.assert_close(recompute_distances(q, ids, ro), recompute_distances(q, ids, keys),
                               rtol=0, atol=0)


def test_sim_func_names_and_alias():
    from fairseq_knnlm.errors import FlagError
    from fairseq_knnlm.flags import normalize_sim_func

    assert [normalize_sim_func(s) for s in ("l2", "faiss_l2", "dot", "do_not_recomp_l2")] == [
        "l2", "faiss_l2", "dot", "faiss_l2"]
    with pytest.raises(FlagError, match="--knn-sim-func must be one of .*do_not_recomp_l2"):
        normalize_sim_func("cosine")


def test_full_vocab_knn_is_the_per_target_one_and_sums_to_one():
    """Generation's p_kNN over the whole vocabulary (scatter-added weights): at every token
    it equals knn_log_prob with that token as the target (the floor where no neighbour
    carries it), sums to 1, and matches a numpy loop; -1 slots and rows without any
    neighbour are masked."""
    rng = np.random.default_rng(3)
    n, k, V, T = 6, 9, 13, 3.0
    d = torch.from_numpy(rng.uniform(0, 40, (n, k)).astype(np.float32))
    vals = torch.from_numpy(rng.integers(0, 5, (n, k)))  # values repeat: weights add up
    valid = torch.ones(n, k, dtype=torch.bool)
    valid[1, :3] = False
    vals[2, 4] = -1
    valid[2, 4] = False
    valid[5] = False  # no neighbour at all
    full = knn_log_probs_full(d, vals, V, T, valid)
    assert full.shape == (n, V) and full.dtype == torch.float32
    for y in range(V):
        per = knn_log_prob(d, vals, torch.full((n,), y), T, valid)
        assert torch.allclose(full[:, y], per, atol=1e-5), y
    sums = torch.logsumexp(full[:5], dim=1)
    assert torch.allclose(sums, torch.zeros(5), atol=1e-5)
    assert (full[5] == KNN_LOGP_FLOOR).all()
    for i in range(5):
        w = np.where(valid[i].numpy(), np.exp(-d[i].double().numpy() / T), 0.0)
        p = np.zeros(V)
        np.add.at(p, np.where(valid[i].numpy(), vals[i].numpy(), 0), w)
        p /= w.sum()
        got = np.exp(full[i].double().numpy())
        assert np.allclose(got, np.where(p > 0, p, 0.0), atol=1e-6)

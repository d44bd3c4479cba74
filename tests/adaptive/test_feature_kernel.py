"""The compiled neighbour features (feature_kernel.py) against their torch definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fairseq_knnlm.adaptive import lambda_features as lf
from fairseq_knnlm.adaptive.lambda_features import (
    AGREEMENT_FEATURES,
    knn_features,
    knn_features_torch,
)


def _case(seed: int, n: int = 600, k: int = 64, vocab: int = 40):
    g = torch.Generator().manual_seed(seed)
    d = torch.rand(n, k, generator=g) * 50 + 1
    d[:, ::7] = d[:, :1].expand(-1, d[:, ::7].shape[1])  # equal distances: tied weights
    vals = torch.randint(0, vocab, (n, k), generator=g)
    lmn = -torch.rand(n, k, generator=g) * 12
    lmn[3, :5] = float("-inf")  # p_LM 0 at some neighbours' values
    top = torch.randint(0, vocab, (n,), generator=g)
    skip = torch.rand(n, generator=g) < 0.25  # rows the gate skipped: no neighbours
    d[skip], vals[skip], lmn[skip] = float("inf"), -1, 0.0
    short = (~skip).nonzero()[:10, 0]  # rows with fewer than k neighbours (pointers)
    d[short, k // 3:], vals[short, k // 3:], lmn[short, k // 3:] = float("inf"), -1, 0.0
    return d, vals, lmn, top, skip


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kernel_equals_the_torch_definition(seed):
    d, vals, lmn, top, skip = _case(seed)
    want = knn_features_torch(d, 5.0, vals, lmn, top)
    got = knn_features(d, 5.0, vals, lmn, top)
    assert set(got) == set(want)
    for f in want:
        assert got[f].dtype == torch.float32 and got[f].shape == (len(d),)
        np.testing.assert_allclose(got[f].numpy(), want[f].numpy(), rtol=2e-5, atol=2e-6,
                                   err_msg=f)
        assert (got[f][skip] == 0).all(), f  # a row without neighbours: 0


def test_kernel_leaves_out_what_has_no_inputs():
    d, vals, lmn, top, _ = _case(3, n=20)
    assert set(knn_features(d, 2.0)) == {"knn_min_dist", "knn_weight_entropy", "knn_log_count"}
    no_agree = knn_features(d, 2.0, vals)
    assert "knn_top_mass" in no_agree and not set(AGREEMENT_FEATURES) & set(no_agree)
    np.testing.assert_allclose(no_agree["knn_top_mass"].numpy(),
                               knn_features_torch(d, 2.0, vals)["knn_top_mass"].numpy(),
                               rtol=2e-5, atol=2e-6)


def test_top_value_ties_go_to_the_smallest_value():
    d = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    vals = torch.tensor([[9, 4, 9, 4]])  # two values with equal mass
    lmn = torch.tensor([[-1.0, -2.0, -1.0, -2.0]])
    got = knn_features(d, 1.0, vals, lmn, torch.tensor([9]))
    assert got["knn_top_mass"].item() == pytest.approx(0.5)
    assert got["lm_logp_knn_top"].item() == -2.0  # p_LM at value 4, the smaller
    assert got["knn_mass_lm_top"].item() == pytest.approx(0.5)
    agree = np.log(0.5 * np.exp(-1) + 0.5 * np.exp(-2))
    assert got["knn_lm_agreement"].item() == pytest.approx(agree)


def test_row_ranges_in_threads_change_nothing(monkeypatch):
    d, vals, lmn, top, _ = _case(4, n=2048)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    split = knn_features(d, 5.0, vals, lmn, top)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    whole = knn_features(d, 5.0, vals, lmn, top)
    for f in whole:
        assert torch.equal(split[f], whole[f]), f


def test_int32_values_and_non_contiguous_inputs():
    d, vals, lmn, top, _ = _case(5, n=50)
    want = knn_features(d, 5.0, vals, lmn, top)
    got = knn_features(d.t().contiguous().t(), 5.0, vals.int(), lmn.t().contiguous().t(), top)
    for f in want:
        assert torch.equal(got[f], want[f]), f


def test_torch_path_off_the_cpu(monkeypatch):
    """A tensor on another device takes the torch definition (here faked on the CPU)."""
    d, vals, lmn, top, _ = _case(6, n=10)
    seen = []
    monkeypatch.setattr(lf, "knn_features_torch", lambda *a: seen.append(a) or {})

    class Dev:
        type = "cuda"

    class Fake(torch.Tensor):
        @property
        def device(self):
            return Dev()

    knn_features(d.as_subclass(Fake), 5.0, vals, lmn, top)
    assert len(seen) == 1

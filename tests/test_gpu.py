"""CUDA paths of the maths (queries and LM scores on the GPU, as with a model on GPU and
--fp16): same numbers as on the CPU. Skipped where no GPU is visible (CI has none)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fairseq_knnlm.cache import cache_log_prob, interpolate_cache
from fairseq_knnlm.knn import interpolate, knn_log_prob, recompute_distances

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_knn_and_interpolation_on_cuda_match_cpu():
    g = torch.Generator().manual_seed(0)
    d = torch.rand(64, 1024, generator=g) * 50
    vals = torch.randint(0, 30, (64, 1024), generator=g)
    tg = torch.randint(0, 30, (64,), generator=g)
    valid = torch.rand(64, 1024, generator=g) > 0.1
    cpu = knn_log_prob(d, vals, tg, 7.0, valid)
    gpu = knn_log_prob(d.cuda().half(), vals.cuda(), tg.cuda(), 7.0, valid.cuda())
    assert gpu.dtype == torch.float32 and gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), knn_log_prob(d.half().float(), vals, tg, 7.0, valid))
    lm = torch.log_softmax(torch.randn(64, 5, generator=g), -1)[:, 0]
    torch.testing.assert_close(interpolate(lm.cuda().half(), gpu, 0.25).cpu(),
                               interpolate(lm.half().float(), cpu, 0.25), rtol=1e-4, atol=1e-4)


def test_recompute_distances_with_cuda_queries():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((5000, 128)).astype(np.float16)
    ids = rng.integers(-1, 5000, (32, 256))
    q = torch.from_numpy(rng.standard_normal((32, 128)).astype(np.float32))
    cpu = recompute_distances(q, ids, keys)
    gpu = recompute_distances(q.cuda().half(), ids, keys)
    assert gpu.is_cuda
    ref = recompute_distances(q.half().float(), ids, keys)
    torch.testing.assert_close(gpu.cpu(), ref)
    assert torch.isinf(cpu[torch.from_numpy(ids < 0)]).all()


def test_cache_on_cuda_matches_cpu():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(300, 64, generator=g)
    v = torch.randint(0, 20, (300,), generator=g)
    t = torch.randint(0, 20, (300,), generator=g)
    cpu = cache_log_prob(h, v, t, 0.05, 100)
    gpu = cache_log_prob(h.cuda(), v.cuda(), t.cuda(), 0.05, 100)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)
    base = torch.full((300,), -3.0)
    torch.testing.assert_close(interpolate_cache(base.cuda(), gpu, 0.1).cpu(),
                               interpolate_cache(base, cpu, 0.1), rtol=1e-4, atol=1e-4)

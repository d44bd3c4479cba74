"""CUDA paths of the maths (queries and LM scores on the GPU, as with a model on GPU and
--fp16): same numbers as on the CPU. Skipped where no GPU is visible (CI has none)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fairseq_knnlm.scoring.cache import cache_log_prob, interpolate_cache
from fairseq_knnlm.scoring.knn import interpolate, knn_log_prob, recompute_distances

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


def test_recompute_distances_from_sharded_keys_with_cuda_queries():
    from fairseq_knnlm.store.shards import ConcatRows

    rng = np.random.default_rng(1)
    keys = rng.standard_normal((3000, 64)).astype(np.float16)
    ids = rng.integers(-1, 3000, (16, 128))
    q = torch.from_numpy(rng.standard_normal((16, 64)).astype(np.float32))
    ref = recompute_distances(q, ids, keys)
    gpu = recompute_distances(q.cuda(), ids, ConcatRows([keys[:1000], keys[1000:2500],
                                                        keys[2500:]]))
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), ref)


def test_faiss_gpu_index_and_shards():
    """--knn-gpu: the index on one GPU, and split over GPUs with IndexShards (exercised with
    the GPUs there are, one included), gives the CPU index's neighbours."""
    faiss = pytest.importorskip("faiss")
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        pytest.skip("FAISS has no GPU support here (faiss-cpu build)")
    from fairseq_knnlm.index.kinds import _to_gpu
    from fairseq_knnlm.index.load import set_probe

    rng = np.random.default_rng(0)
    x = rng.standard_normal((20000, 64)).astype(np.float32)
    cpu = faiss.index_factory(64, "IVF64,PQ16")
    cpu.train(x)
    cpu.add(x)
    set_probe(cpu, 16)
    d0, i0 = cpu.search(x[:100], 32)
    one = _to_gpu(cpu)
    set_probe(one, 16)
    co = faiss.GpuMultipleClonerOptions()
    co.useFloat16, co.shard = True, True
    shards = faiss.index_cpu_to_all_gpus(cpu, co, ngpu=faiss.get_num_gpus())
    set_probe(shards, 16)
    for gi in (one, shards):
        d1, i1 = gi.search(x[:100], 32)
        overlap = np.mean([len(set(a) & set(b)) / 32 for a, b in zip(i0, i1)])
        assert overlap > 0.95, overlap  # fp16 lookup tables: near-identical, not bit-equal

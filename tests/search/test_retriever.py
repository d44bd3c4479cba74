"""KNNRetriever on a small synthetic datastore: flag checks (FlagError naming the flag, before
any file is opened), the authors' --knn-sim-func alias, and retrieval against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fairseq_knnlm.errors import FlagError
from fairseq_knnlm.index.build import build_index
from fairseq_knnlm.index.kinds import IndexSettings
from fairseq_knnlm.search.retriever import KNNRetriever
from fairseq_knnlm.store.datastore import DatastoreWriter


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("ret")
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((500, 8)).astype(np.float32)
    w = DatastoreWriter(d / "ds", 8, "float32")
    w.add(keys, rng.integers(0, 20, 500), np.arange(500))
    w.finish(keytype="ffn_input_after_ln")
    build_index(d / "ds", d / "flat.index", IndexSettings(index_type="flat"), progress=False)
    return d, keys


@pytest.mark.parametrize("kwargs,flag", [
    ({"probe": 0}, "--probe"),
    ({"probe": -3}, "--probe"),
    ({"k": 0}, "--k"),
    ({"temperature": 0.0}, "--knn-temp"),
    ({"temperature": float("nan")}, "--knn-temp"),
    ({"sim_func": "cosine"}, "--knn-sim-func"),
    ({"sim_func": "l2", "load_keys": False}, "--no-load-keys"),
])
def test_bad_flags_are_flag_errors_before_any_file(tmp_path, kwargs, flag):
    with pytest.raises(FlagError, match=flag):  # the paths do not exist: not even looked at
        KNNRetriever(tmp_path / "nope", tmp_path / "nope.index", **kwargs)


def test_k_larger_than_datastore(small):
    d, _ = small
    with pytest.raises(FlagError, match="--k 501 is larger than the datastore"):
        KNNRetriever(d / "ds", d / "flat.index", k=501)


def test_do_not_recomp_l2_is_faiss_l2_and_needs_no_keys(small):
    d, keys = small
    r = KNNRetriever(d / "ds", d / "flat.index", k=10, sim_func="do_not_recomp_l2",
                     load_keys=False)
    assert r.sim_func == "faiss_l2" and r.ds.keys is None
    q = torch.from_numpy(keys[:4] + 0.01)
    got = r.retrieve(q)
    exact = ((keys[None] - q.numpy()[:, None]) ** 2).sum(-1)
    assert np.array_equal(got.ids, np.argsort(exact, axis=1)[:, :10])
    np.testing.assert_allclose(got.dists.numpy(), got.faiss_dists, rtol=0, atol=0)
    ref = KNNRetriever(d / "ds", d / "flat.index", k=10, sim_func="faiss_l2", load_keys=False)
    tg = torch.tensor([1, 2, 3, 4])
    assert torch.equal(r.score(q, tg)[0], ref.score(q, tg)[0])


def test_torch_threads_sets_and_restores():
    """The exact-distance stages run with torch on one thread; the LM's setting comes back,
    also after an error inside the block."""
    from fairseq_knnlm.search.retriever import torch_threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError):
            with torch_threads(1):
                raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_faiss_searches_keep_their_threads_inside_torch_threads(small, monkeypatch):
    """torch and FAISS may share one OpenMP runtime (they do with the pip wheels): the pointer
    stepping's torch_threads(1) block must not leave FAISS's searches one thread."""
    import faiss

    import fairseq_knnlm.search.retriever as ret

    d, keys = small
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        r = KNNRetriever(d / "ds", d / "flat.index", k=5)
        assert r.search_threads == faiss.omp_get_max_threads() == 2
        seen = []
        real = ret.search

        def spy(index, q, k):
            seen.append(faiss.omp_get_max_threads())
            return real(index, q, k)

        monkeypatch.setattr(ret, "search", spy)
        with ret.torch_threads(1):
            pre = faiss.omp_get_max_threads()  # 1 where the runtime is shared
            r.search(torch.from_numpy(keys[:3]))
            assert faiss.omp_get_max_threads() == pre  # the block's setting, restored
        assert seen == [2]  # FAISS searched on both threads
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)

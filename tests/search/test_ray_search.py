"""Sharded search on Ray (search/ray_search.py, --knn-engine ray), on one local Ray of 2 CPUs
shared by the session (conftest.ray_local): the same ids, FAISS distances and exact distances
as the single-process search over the same shards at 1, 2 and 3 shards (flat: as the
unsharded flat index), pointers unchanged on top; a killed actor is restarted and its request
retried; a shard that cannot be served stops the search with one line naming it; a shard too
big for every node is refused before any actor starts; the default engine imports no Ray."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from fairseq_knnlm.adaptive.pointers import MinPointers
from fairseq_knnlm.errors import FlagError
from fairseq_knnlm.index.build import build_index
from fairseq_knnlm.index.kinds import IndexSettings
from fairseq_knnlm.index.sharded import build_index_sharded
from fairseq_knnlm.search.retriever import KNNRetriever
from fairseq_knnlm.store.datastore import DatastoreError, DatastoreWriter

IVF = IndexSettings(ncentroids=8, code_size=4, train_size=2000)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("raysearch")
    rng = np.random.default_rng(0)
    n, dim = 1200, 8
    keys = rng.integers(-2, 3, (n, dim)).astype(np.float32)  # ties across shards
    keys[n - 5:] = keys[:5]
    w = DatastoreWriter(d / "ds", dim, "float32")
    w.add(keys, rng.integers(0, 30, n), np.arange(n))
    w.finish(keytype="ffn_input_after_ln")
    build_index(d / "ds", d / "flat.index", IndexSettings(index_type="flat"), progress=False)
    for s in (1, 2, 3):
        build_index_sharded(d / "ds", d / f"flat{s}.index", IndexSettings(index_type="flat"),
                            num_shards=s, progress=False)
        build_index_sharded(d / "ds", d / f"ivf{s}.index", IVF, num_shards=s, progress=False)
    q = torch.from_numpy(keys[rng.integers(0, n, 48)] + rng.normal(0, 0.3, (48, dim))
                         .astype(np.float32))
    return d, q


def same(a, b):
    assert np.array_equal(a.ids, b.ids)
    assert np.array_equal(a.faiss_dists, b.faiss_dists)
    assert torch.equal(a.dists, b.dists)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
@pytest.mark.parametrize("shards", [1, 2, 3])
def test_ray_equals_single_process(ray_local, store, kind, shards):
    d, q = store
    path = d / f"{kind}{shards}.index"
    ray_r = KNNRetriever(d / "ds", path, k=64, probe=4, engine="ray")
    try:
        got = ray_r.retrieve(q)
        same(KNNRetriever(d / "ds", path, k=64, probe=4).retrieve(q), got)
        if kind == "flat":
            same(KNNRetriever(d / "ds", d / "flat.index", k=64).retrieve(q), got)
        tg = torch.arange(len(q)) % 30
        assert torch.equal(ray_r.score(q, tg)[0],
                           KNNRetriever(d / "ds", path, k=64, probe=4).score(q, tg)[0])
    finally:
        ray_r.index.close()


@pytest.mark.parametrize("mode", ["owners", "driver"])
def test_exact_distances_elsewhere_are_the_same(ray_local, store, monkeypatch, mode):
    """Exact distances asked of the shards owning the merged ids, or computed here."""
    d, q = store
    monkeypatch.setenv("FAIRSEQ_KNNLM_RAY_EXACT", mode)
    r = KNNRetriever(d / "ds", d / "ivf3.index", k=64, probe=4, engine="ray")
    try:
        assert r.index.exact == mode
        same(KNNRetriever(d / "ds", d / "ivf3.index", k=64, probe=4).retrieve(q), r.retrieve(q))
    finally:
        r.index.close()


def test_pointers_run_on_top_unchanged(ray_local, store):
    d, q = store
    tg = torch.arange(len(q)) % 30
    args = (q, tg, [0, 24], [24, 24], [None, None], MinPointers(4))
    local = KNNRetriever(d / "ds", d / "ivf3.index", k=32, probe=4)
    remote = KNNRetriever(d / "ds", d / "ivf3.index", k=32, probe=4, engine="ray")
    try:
        a_lp, a, a_fin = local.score_streams(*args)
        b_lp, b, b_fin = remote.score_streams(*args)
    finally:
        remote.index.close()
    assert torch.equal(a_lp, b_lp) and np.array_equal(a.modes, b.modes)
    same(a, b)
    assert all(np.array_equal(x, y) for x, y in zip(a_fin, b_fin))


def test_killed_actor_is_restarted_and_its_request_retried(ray_local, store):
    from fairseq_knnlm.search.ray_search import RayShardedIndex

    d, q = store
    qn = q.numpy()
    idx = RayShardedIndex(d / "ivf2.index", d / "ds", probe=4)
    try:
        ref = idx.search(qn, 16)
        pid = ray_local.get(idx.actors[1].ready.remote())
        pending = idx.actors[1].search.remote(qn, 16)  # in flight when the actor dies
        ray_local.kill(idx.actors[1], no_restart=False)
        d1, i1, _ = ray_local.get(pending)
        got = idx.search(qn, 16)
        assert ray_local.get(idx.actors[1].ready.remote()) != pid  # a new process
        assert np.array_equal(ref[1], got[1]) and np.array_equal(ref[0], got[0])
        assert i1.shape == (len(qn), 16)
    finally:
        idx.close()


def test_shard_that_cannot_be_served_fails_naming_it(ray_local, store):
    from fairseq_knnlm.search.ray_search import RayShardedIndex, ShardUnavailable

    d, q = store
    idx = RayShardedIndex(d / "ivf3.index", d / "ds", probe=4, max_restarts=0)
    try:
        ray_local.kill(idx.actors[2], no_restart=True)
        with pytest.raises(ShardUnavailable, match=r"shard 2 of 3 \(.*ivf3.index.shard2of3\) "
                                                   r"cannot be served on Ray"):
            idx.search(q.numpy(), 8)
    finally:
        idx.close()


def test_shard_bigger_than_any_node_is_refused_before_actors(ray_local, store, monkeypatch):
    import fairseq_knnlm.search.ray_search as rs

    d, _ = store
    monkeypatch.setattr(rs, "node_memory", lambda ray: [100.0])
    with pytest.raises(DatastoreError, match=r"shard 0 of 2 .* needs .* GB in one actor, the "
                                             r"largest node of the Ray cluster offers"):
        rs.RayShardedIndex(d / "ivf2.index", d / "ds", probe=4)


def test_ray_engine_needs_a_sharded_index(ray_local, store):
    d, _ = store
    with pytest.raises(FlagError, match="--knn-engine ray serves a sharded index"):
        KNNRetriever(d / "ds", d / "flat.index", k=8, engine="ray")


@pytest.mark.parametrize("kwargs,msg", [
    ({"engine": "spark"}, "--knn-engine must be one of local, ray"),
    ({"ray_address": "h:1"}, "--ray-address names the Ray cluster"),
    ({"engine": "ray", "gpu": True}, "drop --knn-gpu"),
])
def test_engine_flag_errors_before_any_file(tmp_path, kwargs, msg):
    with pytest.raises(FlagError, match=msg):
        KNNRetriever(tmp_path / "nope", tmp_path / "nope.index", **kwargs)


def test_default_engine_imports_no_ray(store):
    d, q = store
    code = ("import sys, torch\n"
            "from fairseq_knnlm.search.retriever import KNNRetriever\n"
            "import fairseq_knnlm.cli.build_index, fairseq_knnlm.index.sharded\n"
            f"r = KNNRetriever({str(d / 'ds')!r}, {str(d / 'ivf3.index')!r}, k=8, probe=4)\n"
            "r.retrieve(torch.zeros(2, 8))\n"
            "assert 'ray' not in sys.modules, 'ray imported'\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]

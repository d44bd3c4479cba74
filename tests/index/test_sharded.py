"""Sharded indexes without Ray (index/sharded.py): one index file per slice tied by a manifest,
searched in one process as faiss IndexShards; a sharded flat index answers as the unsharded
one (ties included); the build resumes without redoing finished shards; a shard that does not
match its keys is refused naming it."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from fairseq_knnlm.cli.build_index import cli_main
from fairseq_knnlm.index.build import build_index
from fairseq_knnlm.index.kinds import IndexBuildError, IndexSettings, _faiss, meta_path
from fairseq_knnlm.index.sharded import (
    ShardError,
    build_index_sharded,
    check_capacity,
    merge_topk,
    read_manifest,
    shard_path,
    slice_ranges,
)
from fairseq_knnlm.search.retriever import KNNRetriever
from fairseq_knnlm.store.datastore import DatastoreError, DatastoreWriter, open_datastore

IVF = IndexSettings(ncentroids=8, code_size=4, train_size=2000)


def make_store(path, n=1200, dim=8, seed=0):
    """Integer-valued keys (many equal distances: ties across shards) and some duplicates."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(-2, 3, (n, dim)).astype(np.float32)
    keys[n - 5:] = keys[:5]  # the same rows in the first and the last shard
    w = DatastoreWriter(path, dim, "float32")
    w.add(keys, rng.integers(0, 30, n), np.arange(n))
    w.finish(keytype="ffn_input_after_ln")
    return keys


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("sharded")
    keys = make_store(d / "ds")
    build_index(d / "ds", d / "flat.index", IndexSettings(index_type="flat"), progress=False)
    for n in (1, 2, 3):
        build_index_sharded(d / "ds", d / f"flat{n}.index", IndexSettings(index_type="flat"),
                            num_shards=n, progress=False)
        build_index_sharded(d / "ds", d / f"ivf{n}.index", IVF, num_shards=n, progress=False)
    return d, keys


def queries(keys, n=40):
    rng = np.random.default_rng(1)
    return torch.from_numpy(keys[rng.integers(0, len(keys), n)] + 0.0)


def same(a, b):
    assert np.array_equal(a.ids, b.ids)
    assert np.array_equal(a.faiss_dists, b.faiss_dists)
    assert torch.equal(a.dists, b.dists)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_sharded_flat_equals_unsharded_flat(store, n):
    d, keys = store
    q = queries(keys)
    ref = KNNRetriever(d / "ds", d / "flat.index", k=64).retrieve(q)
    got = KNNRetriever(d / "ds", d / f"flat{n}.index", k=64).retrieve(q)
    same(ref, got)
    assert (np.diff(ref.faiss_dists, axis=1) == 0).any()  # the test has ties


@pytest.mark.parametrize("n", [2, 3])
def test_merge_topk_is_indexshards(store, n):
    """merge_topk over each shard's own results = faiss IndexShards over the shards."""
    d, keys = store
    faiss = _faiss()
    man = read_manifest(d / f"ivf{n}.index")
    shards = [faiss.read_index(str(s.path)) for s in man.shards]
    whole = faiss.IndexShards(man.dim, False, False)
    for s in shards:
        s.nprobe = 4
        whole.add_shard(s)
    q = np.ascontiguousarray(queries(keys).numpy())
    ref_d, ref_i = whole.search(q, 50)
    per = [s.search(q, 50) for s in shards]
    md, mi, ex = merge_topk([p[0] for p in per], [p[1] for p in per], 50,
                            [p[0] * 2 for p in per])
    assert np.array_equal(mi, ref_i) and np.array_equal(md, ref_d)
    assert np.array_equal(ex, np.where(mi >= 0, md * 2, np.inf))  # carried with their ids


def test_ids_are_global_and_contiguous(store):
    d, _ = store
    man = read_manifest(d / "ivf3.index")
    assert [(s.lo, s.hi) for s in man.shards] == [(0, 400), (400, 800), (800, 1200)]
    faiss = _faiss()
    for s in man.shards:
        index = faiss.read_index(str(s.path))  # kept alive while its lists are read
        ivf = faiss.extract_index_ivf(index)
        ids = np.concatenate([faiss.rev_swig_ptr(ivf.invlists.get_ids(j),
                                                 ivf.invlists.list_size(j)).copy()
                              for j in range(ivf.nlist)])
        assert np.array_equal(np.sort(ids), np.arange(s.lo, s.hi))


def test_slice_ranges_follow_the_datastore(store):
    d, _ = store
    ds = open_datastore(d / "ds")
    assert slice_ranges(ds, None) == [(0, 1200)]
    assert slice_ranges(ds, 5)[-1] == (960, 1200)
    with pytest.raises(IndexBuildError, match="--shards"):
        slice_ranges(ds, 0)


def test_resume_keeps_finished_shards(tmp_path, caplog):
    make_store(tmp_path / "ds")
    with pytest.raises(KeyboardInterrupt):
        build_index_sharded(tmp_path / "ds", tmp_path / "x.index", IVF, num_shards=3,
                            progress=False, stop_after_shards=1)
    first = shard_path(tmp_path / "x.index", 0, 3)
    assert first.exists() and not meta_path(tmp_path / "x.index").exists()
    stamp = first.stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        build_index_sharded(tmp_path / "ds", tmp_path / "x.index", IVF, num_shards=3,
                            progress=False)
    assert "resuming: 1 of 3 shards already built" in caplog.text
    assert first.stat().st_mtime_ns == stamp
    build_index_sharded(tmp_path / "ds", tmp_path / "y.index", IVF, num_shards=3,
                        progress=False)
    q = queries(np.asarray(open_datastore(tmp_path / "ds").keys))
    same(KNNRetriever(tmp_path / "ds", tmp_path / "x.index", k=16).retrieve(q),
         KNNRetriever(tmp_path / "ds", tmp_path / "y.index", k=16).retrieve(q))


def test_shard_not_matching_its_keys_is_refused(tmp_path):
    make_store(tmp_path / "ds")
    idx = tmp_path / "x.index"
    build_index_sharded(tmp_path / "ds", idx, IVF, num_shards=3, progress=False)
    rec_path = meta_path(shard_path(idx, 1, 3))
    rec = json.loads(rec_path.read_text())
    rec_path.write_text(json.dumps({**rec, "ntotal": 399}))
    with pytest.raises(ShardError, match=r"shard 1 of 3 .* holds 399 keys"):
        KNNRetriever(tmp_path / "ds", idx, k=8)
    rec_path.write_text(json.dumps({**rec, "datastore": {**rec["datastore"],
                                                         "dump_id": "other"}}))
    with pytest.raises(ShardError, match=r"shard 1 of 3 .*another dump"):
        KNNRetriever(tmp_path / "ds", idx, k=8)
    # a rebuild redoes that shard only (its record is stale) and the index serves again
    build_index_sharded(tmp_path / "ds", idx, IVF, num_shards=3, progress=False)
    KNNRetriever(tmp_path / "ds", idx, k=8)
    shard_path(idx, 2, 3).unlink()
    with pytest.raises(ShardError, match=r"shard 2 of 3 .* file not found"):
        KNNRetriever(tmp_path / "ds", idx, k=8)


def test_index_from_another_dump_is_refused(tmp_path):
    make_store(tmp_path / "ds")
    build_index_sharded(tmp_path / "ds", tmp_path / "x.index", IVF, num_shards=2,
                        progress=False)
    make_store(tmp_path / "ds", seed=3)  # dumped again
    with pytest.raises(DatastoreError, match="does not belong to datastore"):
        KNNRetriever(tmp_path / "ds", tmp_path / "x.index", k=8)


def test_cli_shards_and_on_disk_merge(tmp_path):
    keys = make_store(tmp_path / "ds")
    base = ["--dstore-mmap", str(tmp_path / "ds"), "--ncentroids", "8", "--code-size", "4",
            "--no-progress"]
    assert cli_main(base + ["--faiss-index", str(tmp_path / "s.index"), "--shards", "2"]) == 0
    assert len(read_manifest(tmp_path / "s.index").shards) == 2
    assert cli_main(base + ["--faiss-index", str(tmp_path / "m.index"), "--shards", "2",
                            "--on-disk"]) == 0
    rec = json.loads(meta_path(tmp_path / "m.index").read_text())
    assert rec["on_disk"] and rec["ntotal"] == 1200
    assert not shard_path(tmp_path / "m.index", 0, 2).exists()
    q = queries(keys)
    a = KNNRetriever(tmp_path / "ds", tmp_path / "s.index", k=16, probe=8).retrieve(q)
    b = KNNRetriever(tmp_path / "ds", tmp_path / "m.index", k=16, probe=8).retrieve(q)
    assert np.array_equal(np.sort(a.ids, 1), np.sort(b.ids, 1))  # all lists probed


@pytest.mark.parametrize("extra,msg", [
    (["--shards", "-1"], "--shards must be >= 1"),
    (["--shards", "2", "--gpu"], "drop --gpu"),
    (["--ray-address", "x:1"], "--ray-address"),
])
def test_cli_flag_errors(tmp_path, capsys, extra, msg):
    rc = cli_main(["--dstore-mmap", str(tmp_path / "none"), "--faiss-index",
                   str(tmp_path / "x.index"), *extra])
    assert rc == 2 and msg in capsys.readouterr().err


def test_capacity_refused_before_work():
    check_capacity([5, 5], [10.0, 10.0], "here")
    with pytest.raises(DatastoreError, match=r"shard 1 of 2 needs 0.00 GB in one actor"):
        check_capacity([5, 11], [10.0, 10.0], "here")
    with pytest.raises(DatastoreError, match="need 0.00 GB in all"):
        check_capacity([8, 8, 8], [10.0, 10.0], "here")

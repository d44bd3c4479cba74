"""knnlm-build-index --engine ray (index/ray_build.py) on the session's local Ray: the shards
built as Ray tasks equal those built in one process; the build resumes without redoing
finished shards; a task whose worker dies is retried by Ray."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from fairseq_knnlm.cli.build_index import cli_main
from fairseq_knnlm.index.kinds import IndexSettings, meta_path
from fairseq_knnlm.index.ray_build import ray_runner
from fairseq_knnlm.index.sharded import KILL_SHARD_ENV, build_index_sharded, shard_path
from fairseq_knnlm.search.retriever import KNNRetriever
from fairseq_knnlm.store.datastore import DatastoreWriter

IVF = IndexSettings(ncentroids=8, code_size=4, train_size=2000)


@pytest.fixture()
def ds(tmp_path):
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((900, 8)).astype(np.float32)
    w = DatastoreWriter(tmp_path / "ds", 8, "float32")
    w.add(keys, rng.integers(0, 30, 900), np.arange(900))
    w.finish(keytype="ffn_input_after_ln")
    return tmp_path, torch.from_numpy(keys[:20] + 0.05)


def same_search(d, a, b, q):
    ra = KNNRetriever(d / "ds", a, k=16, probe=8).retrieve(q)
    rb = KNNRetriever(d / "ds", b, k=16, probe=8).retrieve(q)
    assert np.array_equal(ra.ids, rb.ids) and torch.equal(ra.dists, rb.dists)


def test_ray_build_equals_local_build(ray_local, ds):
    d, q = ds
    assert cli_main(["--dstore-mmap", str(d / "ds"), "--faiss-index", str(d / "r.index"),
                     "--engine", "ray", "--shards", "3", "--ncentroids", "8", "--code-size",
                     "4", "--no-progress"]) == 0
    build_index_sharded(d / "ds", d / "l.index", IVF, num_shards=3, progress=False)
    # the same trained quantizer (INDEX.trained is trained on the same sample, seed 1)
    same_search(d, d / "r.index", d / "l.index", q)


def test_ray_build_resumes_without_redoing_finished_shards(ray_local, ds, caplog):
    d, q = ds
    idx = d / "x.index"
    with pytest.raises(KeyboardInterrupt):
        build_index_sharded(d / "ds", idx, IVF, num_shards=3, runner=ray_runner(), threads=1,
                            progress=False, stop_after_shards=1)
    # finished shards have their record (a shard cut off between its file and its record
    # is built again, with a warning)
    built = [i for i in range(3) if meta_path(shard_path(idx, i, 3)).exists()]
    assert built
    stamps = {i: shard_path(idx, i, 3).stat().st_mtime_ns for i in built}
    with caplog.at_level(logging.INFO):
        build_index_sharded(d / "ds", idx, IVF, num_shards=3, runner=ray_runner(),
                            threads=1, progress=False)
    assert f"resuming: {len(built)} of 3 shards already built" in caplog.text
    assert all(shard_path(idx, i, 3).stat().st_mtime_ns == s for i, s in stamps.items())
    build_index_sharded(d / "ds", d / "y.index", IVF, num_shards=3, progress=False)
    same_search(d, idx, d / "y.index", q)


def test_ray_build_retries_a_task_whose_worker_dies(ray_local, ds, monkeypatch):
    d, q = ds
    idx = d / "k.index"
    monkeypatch.setenv(KILL_SHARD_ENV, "1")  # shard 1's worker exits on its first attempt
    build_index_sharded(d / "ds", idx, IVF, num_shards=3, runner=ray_runner(), threads=1,
                        progress=False)
    assert shard_path(idx, 1, 3).with_name(shard_path(idx, 1, 3).name + ".killed").exists()
    monkeypatch.delenv(KILL_SHARD_ENV)  # (in this process it would end the test run)
    build_index_sharded(d / "ds", d / "y.index", IVF, num_shards=3, progress=False)
    same_search(d, idx, d / "y.index", q)

"""Sharded dumps: N workers' shards read as one datastore through the manifest, with exactly
the entries of a single-worker dump; ConcatRows against numpy; manifest validation.

Run: python -m pytest -q tests/store/test_shards.py
"""

from __future__ import annotations

import json
import os
import socket
import subprocess

import numpy as np
import pytest
from conftest import BIN, eval_args, eval_lm_inprocess

from fairseq_knnlm.cli.manifest import cli_main as manifest_cli
from fairseq_knnlm.store.datastore import DatastoreError, DatastoreWriter, open_datastore
from fairseq_knnlm.store.shards import (
    ConcatRows,
    contiguous_range,
    left_context,
    manifest_path,
    shard_prefix,
    write_manifest,
)


def _by_pos(ds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pos = np.asarray(ds.pos[:])
    order = np.argsort(pos, kind="stable")
    return np.asarray(ds.keys[:])[order], np.asarray(ds.vals[:])[order, 0], pos[order]


def _assert_same_entries(single, sharded) -> None:
    assert sharded.size == single.size
    k1, v1, p1 = _by_pos(single)
    k2, v2, p2 = _by_pos(sharded)
    np.testing.assert_array_equal(p1, p2)
    assert len(np.unique(p1)) == len(p1)  # every target token exactly once
    np.testing.assert_array_equal(v1, v2)
    # same inputs and context, so the same keys, bit for bit (measured here; only the batch
    # shapes differ, and a BLAS that blocks by batch size could move the last bits)
    np.testing.assert_array_equal(k1, k2)


def test_contiguous_range_and_left_context():
    spans = [contiguous_range(10, 3, i) for i in range(3)]
    assert spans == [(0, 4), (4, 7), (7, 10)]
    assert contiguous_range(2, 3, 2) == (2, 2)  # more shards than items: an empty shard
    with pytest.raises(ValueError):
        contiguous_range(10, 2, 2)
    blocks = [np.array([1, 2, 3]), np.array([4, 5, 0, 0])]  # 0 = pad
    np.testing.assert_array_equal(left_context(blocks, 4, pad=0), [2, 3, 4, 5])
    np.testing.assert_array_equal(left_context(blocks, 10, pad=0), [1, 2, 3, 4, 5])
    assert len(left_context([], 4, pad=0)) == 0


def test_concat_rows_matches_numpy():
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, 3)).astype(np.float32) for n in (5, 0, 7, 2)]
    whole = np.concatenate(parts)
    c = ConcatRows(parts)
    assert len(c) == 14 and c.shape == (14, 3) and c.dtype == np.float32
    for key in (slice(None), slice(3, 9), slice(6, 6), slice(0, 14, 3), 4, -1, 13):
        np.testing.assert_array_equal(c[key], whole[key])
    ids = rng.integers(0, 14, size=(4, 6))
    np.testing.assert_array_equal(c[ids], whole[ids])
    np.testing.assert_array_equal(c[ids[0], 1], whole[ids[0], 1])
    np.testing.assert_array_equal(c[:, 2], whole[:, 2])
    with pytest.raises(IndexError):
        c[np.array([14])]


@pytest.fixture(scope="module")
def sharded(tiny, tmp_path_factory):
    """The tiny train split dumped by 3 separate --num-shards 3 --shard-id I runs."""
    prefix = tmp_path_factory.mktemp("sharded") / "train"
    for i in range(3):
        eval_lm_inprocess(eval_args(tiny, "train", "--save-knnlm-dstore", "--dstore-mmap",
                                    str(prefix), "--num-shards", "3", "--shard-id", str(i)))
    return prefix


def test_num_shards_dump_equals_single_dump(dstore, sharded):
    prefix = sharded
    m = json.loads(manifest_path(prefix).read_text())  # written by the last shard to finish
    assert m["num_shards"] == 3 and [s["prefix"] for s in m["shards"]] == [
        f"train_shard{i}of3" for i in range(3)]
    single, sharded = open_datastore(dstore), open_datastore(prefix)
    # the same fingerprint but for the dump id (each dump draws its own)
    assert sharded.meta.dump_id not in (None, single.meta.dump_id)
    assert ({**sharded.meta.fingerprint(), "dump_id": None} ==
            {**single.meta.fingerprint(), "dump_id": None})
    _assert_same_entries(single, sharded)
    # shards are contiguous runs of the stream: shard i's positions all precede shard i+1's
    pos = [np.asarray(open_datastore(shard_prefix(prefix, i, 3)).pos) for i in range(3)]
    assert all(a.max() < b.min() for a, b in zip(pos, pos[1:]))


def test_manifest_errors_are_clear(tiny, tmp_path):
    prefix = tmp_path / "x"
    for i in range(2):
        w = DatastoreWriter(shard_prefix(prefix, i, 2), 4)
        w.add(np.ones((3, 4), np.float32), np.arange(3), np.arange(3) + 3 * i)
        w.finish(keytype="ffn_input_after_ln", shard_id=i, num_shards=2, dict_sha256="d")
    with pytest.raises(DatastoreError, match="shard 0 of 3 is not ready"):
        write_manifest(prefix, 3)
    assert manifest_cli([str(prefix), "--num-shards", "3"]) == 2  # the CLI: error, no traceback
    assert manifest_cli([str(prefix), "--num-shards", "2"]) == 0
    ds = open_datastore(prefix)
    assert ds.size == 6 and list(ds.pos[:]) == list(range(6))
    # a shard that changed after the manifest was written is refused
    m = json.loads(manifest_path(prefix).read_text())
    m["shards"][1]["size"] = 4
    manifest_path(prefix).write_text(json.dumps(m))
    with pytest.raises(DatastoreError, match="manifest says 4"):
        open_datastore(prefix)
    # shards from different dumps do not make one datastore
    w = DatastoreWriter(shard_prefix(prefix, 1, 2), 4)
    w.add(np.ones((3, 4), np.float32), np.arange(3), np.arange(3))
    w.finish(keytype="ffn_input_before_ln", shard_id=1, num_shards=2, dict_sha256="d")
    with pytest.raises(DatastoreError, match="keytype"):
        write_manifest(prefix, 2)


def test_sharded_datastore_scores_like_single(tiny, dstore, sharded):
    """kNN-LM over the 3-shard datastore (flat index, exact L2 read through the shards) gives
    the single datastore's perplexity."""
    from fairseq_knnlm.index.build import build_index
    from fairseq_knnlm.index.kinds import IndexSettings

    prefix = sharded
    build_index(prefix, f"{prefix}.flat", IndexSettings(index_type="flat"), progress=False)
    knn = ("--knnlm", "--k", "16", "--lmbda", "0.5", "--knn-temp", "2")
    a = eval_lm_inprocess(eval_args(tiny, "valid", *knn, "--dstore-filename", str(dstore),
                                    "--indexfile", f"{dstore}.flat"))
    b = eval_lm_inprocess(eval_args(tiny, "valid", *knn, "--dstore-filename", str(prefix),
                                    "--indexfile", f"{prefix}.flat"))
    assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-4)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return int(sock.getsockname()[1])


def test_two_worker_distributed_dump_equals_single_dump(tiny, dstore, tmp_path):
    """fairseq's own distributed options: 2 CPU workers joined by torch.distributed (gloo),
    one process per rank as on separate machines (fairseq's torchrun/spawn paths assume GPUs:
    spawn starts min(#GPUs, world size) processes and torchrun's init divides by #GPUs)."""
    prefix = tmp_path / "dist" / "train"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    init = f"tcp://localhost:{_free_port()}"
    procs = [subprocess.Popen(
        [str(BIN / "fairseq-eval-lm"),
         *eval_args(tiny, "train", "--save-knnlm-dstore", "--dstore-mmap", str(prefix),
                    "--distributed-world-size", "2", "--distributed-backend", "gloo",
                    "--distributed-init-method", init, "--distributed-rank", str(r),
                    "--distributed-no-spawn")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    assert "initialized host" in outs[1] and "as rank 1" in outs[1]
    assert manifest_path(prefix).exists()
    _assert_same_entries(open_datastore(dstore), open_datastore(prefix))

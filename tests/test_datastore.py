"""Datastore writer/reader: round trip, fp16, validation against the meta file, and a killed
dump that must never look finished. No fairseq needed."""

from __future__ import annotations

import numpy as np
import pytest

from fairseq_knnlm.datastore import (
    DatastoreError,
    DatastoreWriter,
    keys_path,
    meta_path,
    open_datastore,
)


def _write(prefix, n=1000, d=16, key_dtype="float32", chunk=97, initial_capacity=64):
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((n, d)).astype(np.float32)
    vals = rng.integers(0, 300_000, n)  # > int16: the original's fp16 datastores overflowed
    pos = np.arange(n) * 2
    w = DatastoreWriter(prefix, d, key_dtype, initial_capacity=initial_capacity)
    for s in range(0, n, chunk):
        w.add(keys[s:s + chunk], vals[s:s + chunk], pos[s:s + chunk])
    w.finish(keytype="ffn_input_after_ln", dict_size=10, dict_sha256="abc")
    return keys, vals, pos


def test_round_trip_growth_and_exact_size(tmp_path):
    keys, vals, pos = _write(tmp_path / "ds")
    ds = open_datastore(tmp_path / "ds")
    assert ds.size == 1000 and ds.dim == 16
    assert np.array_equal(ds.keys, keys) and np.array_equal(ds.vals[:, 0], vals)
    assert np.array_equal(ds.pos, pos) and ds.vals.dtype == np.int32
    # truncated to the rows written: no zero-filled tail rows
    assert keys_path(tmp_path / "ds").stat().st_size == 1000 * 16 * 4
    assert isinstance(ds.keys, np.memmap)
    assert not isinstance(open_datastore(tmp_path / "ds", keys_in_memory=True).keys, np.memmap)
    assert open_datastore(tmp_path / "ds", load_keys=False).keys is None


def test_fp16_keys(tmp_path):
    keys, _, _ = _write(tmp_path / "ds", key_dtype="float16")
    ds = open_datastore(tmp_path / "ds")
    assert ds.keys.dtype == np.float16
    np.testing.assert_allclose(ds.keys.astype(np.float32), keys, rtol=1e-3, atol=1e-3)


def test_truncated_file_is_an_error(tmp_path):
    _write(tmp_path / "ds")
    with open(keys_path(tmp_path / "ds"), "r+b") as f:
        f.truncate(1000)
    with pytest.raises(DatastoreError, match="truncated"):
        open_datastore(tmp_path / "ds")


def test_meta_disagreeing_with_arrays_is_an_error(tmp_path):
    import json

    _write(tmp_path / "ds")
    m = json.loads(meta_path(tmp_path / "ds").read_text())
    m["size"] = 2000  # a hand-typed size
    meta_path(tmp_path / "ds").write_text(json.dumps(m))
    with pytest.raises(DatastoreError, match="disagrees with its meta file"):
        open_datastore(tmp_path / "ds")


def test_killed_dump_is_not_a_datastore(tmp_path):
    w = DatastoreWriter(tmp_path / "ds", 8)
    w.add(np.ones((10, 8), np.float32), np.arange(10), np.arange(10))
    # the process dies here: no finish()
    with pytest.raises(DatastoreError, match="did not finish"):
        open_datastore(tmp_path / "ds")
    w.abort()
    with pytest.raises(DatastoreError, match="no datastore"):
        open_datastore(tmp_path / "ds")


def test_rewriting_invalidates_the_old_datastore_first(tmp_path):
    _write(tmp_path / "ds")
    DatastoreWriter(tmp_path / "ds", 16)  # a new dump starts and is killed
    with pytest.raises(DatastoreError):
        open_datastore(tmp_path / "ds")


def test_keys_without_meta_explain_themselves(tmp_path):
    np.zeros((4, 4), np.float16).tofile(keys_path(tmp_path / "old"))
    with pytest.raises(DatastoreError, match="carry no metadata"):
        open_datastore(tmp_path / "old")


def test_bad_rows_rejected(tmp_path):
    w = DatastoreWriter(tmp_path / "ds", 8)
    with pytest.raises(ValueError):
        w.add(np.ones((3, 7), np.float32), np.arange(3), np.arange(3))
    with pytest.raises(ValueError):
        w.add(np.ones((3, 8), np.float32), np.arange(2), np.arange(3))

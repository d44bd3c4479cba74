"""Datastore writer/reader: round trip, fp16, validation against the meta file, and a killed
dump that must never look finished. No fairseq needed."""

from __future__ import annotations

import numpy as np
import pytest

from fairseq_knnlm.store.datastore import (
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


# ---- concurrent dumps, dump identity, in-RAM keys, heads, full disks ------------------------

_DUMP_SCRIPT = """
import os, sys, time
import numpy as np
from fairseq_knnlm.store.datastore import DatastoreError, DatastoreWriter
prefix, marker, go, hold = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
open(f"{go}.ready{marker}", "w").close()
while not os.path.exists(go):
    time.sleep(0.005)
try:
    w = DatastoreWriter(prefix, 4, initial_capacity=8)
except DatastoreError as e:
    print(e, file=sys.stderr)
    sys.exit(3)
print("writing", flush=True)
for i in range(10):  # rows in chunks, slowly: the other run has time to start meanwhile
    w.add(np.full((5, 4), marker, np.float32), np.full(5, marker), np.arange(5) + 5 * i)
    time.sleep(hold / 10)
w.finish(keytype="ffn_input_after_ln", context_window=marker)
"""


def _dump_proc(prefix, marker, go, hold=1.0):
    import os
    import subprocess
    import sys

    env = {**os.environ, "FAIRSEQ_KNNLM_NO_FAIRSEQ": "1"}
    return subprocess.Popen([sys.executable, "-c", _DUMP_SCRIPT, str(prefix), str(marker),
                             str(go), str(hold)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_concurrent_dumps_to_one_prefix_never_mix(tmp_path):
    """Two processes start dumping to the same prefix at the same moment: one writes the
    datastore, the other fails at once with one line naming the prefix and the holder."""
    import time

    prefix, go = tmp_path / "ds", tmp_path / "go"
    procs = [_dump_proc(prefix, m, go, hold=2.0) for m in (1, 2)]
    deadline = time.time() + 60
    while time.time() < deadline and not all(
            (tmp_path / f"go.ready{m}").exists() for m in (1, 2)):
        time.sleep(0.01)
    go.touch()  # both are ready: they start at the same moment
    outs = [p.communicate(timeout=120) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 3], [o[1][-2000:] for o in outs]
    loser = outs[[p.returncode for p in procs].index(3)][1].strip()
    assert len(loser.splitlines()) == 1 and str(prefix) in loser and "pid" in loser
    ds = open_datastore(prefix)
    marker = ds.meta.context_window
    assert ds.size == 50 and np.all(np.asarray(ds.keys) == marker)
    assert np.all(ds.vals[:, 0] == marker)
    assert sorted(f.name for f in tmp_path.iterdir() if f.name.startswith("ds")) == [
        "ds_keys.npy", "ds_meta.json", "ds_pos.npy", "ds_vals.npy"]  # lock released, removed


def test_a_killed_dump_does_not_block_the_next(tmp_path):
    """The kernel drops the lock of a killed writer: the next dump starts at once."""
    prefix, go = tmp_path / "ds", tmp_path / "go"
    go.touch()
    p = _dump_proc(prefix, 1, go, hold=60)
    assert p.stdout.readline().strip() == "writing"
    p.kill()
    p.communicate(timeout=60)
    with pytest.raises(DatastoreError, match="did not finish .*or is still running: ds.lock "
                                             "names pid"):
        open_datastore(prefix)
    keys, _, _ = _write(prefix)
    assert np.array_equal(open_datastore(prefix).keys, keys)


def test_second_writer_in_one_process_is_refused(tmp_path):
    w = DatastoreWriter(tmp_path / "ds", 8)
    with pytest.raises(DatastoreError, match=f"{tmp_path / 'ds'} is being written"):
        DatastoreWriter(tmp_path / "ds", 8)
    w.abort()
    DatastoreWriter(tmp_path / "ds", 8).abort()  # released by abort


def test_every_dump_gets_its_own_id(tmp_path):
    import json

    _write(tmp_path / "ds")
    a = open_datastore(tmp_path / "ds").meta
    _write(tmp_path / "ds")
    b = open_datastore(tmp_path / "ds").meta
    assert a.dump_id and b.dump_id and a.dump_id != b.dump_id
    assert a.fingerprint() != b.fingerprint() and b.fingerprint()["dump_id"] == b.dump_id
    assert {"subset", "context_window", "tokens_per_sample",
            "sample_break_mode"} <= set(b.fingerprint())
    # a meta written before dump ids existed still opens (dump id None)
    m = json.loads(meta_path(tmp_path / "ds").read_text())
    del m["dump_id"]
    meta_path(tmp_path / "ds").write_text(json.dumps(m))
    assert open_datastore(tmp_path / "ds").meta.dump_id is None


def test_keys_in_memory_are_a_real_copy(tmp_path):
    """--move-dstore-to-mem: an in-RAM array, not a view of the mapped file (also sharded)."""
    from fairseq_knnlm.store.shards import shard_prefix, write_manifest

    keys, _, _ = _write(tmp_path / "ds")
    ds = open_datastore(tmp_path / "ds", keys_in_memory=True)
    assert not isinstance(ds.keys, np.memmap) and ds.keys.base is None
    assert ds.keys.flags.owndata and ds.keys.flags.writeable
    assert np.array_equal(ds.keys, keys)
    for i in range(2):
        w = DatastoreWriter(shard_prefix(tmp_path / "sh", i, 2), 16)
        w.add(keys[i * 500:(i + 1) * 500], np.arange(500), np.arange(500))
        w.finish(keytype="ffn_input_after_ln", shard_id=i, num_shards=2)
    write_manifest(tmp_path / "sh", 2)
    sh = open_datastore(tmp_path / "sh", keys_in_memory=True)
    assert isinstance(sh.keys, np.ndarray) and not isinstance(sh.keys, np.memmap)
    assert sh.keys.base is None and np.array_equal(sh.keys, keys)


def test_head_of_a_sharded_datastore_is_a_plain_one(tmp_path):
    from fairseq_knnlm.store.datastore import head_datastore
    from fairseq_knnlm.store.shards import shard_prefix, write_manifest

    keys, vals, pos = _write(tmp_path / "full")
    for i, (a, b) in enumerate(((0, 600), (600, 1000))):
        w = DatastoreWriter(shard_prefix(tmp_path / "sh", i, 2), 16)
        w.add(keys[a:b], vals[a:b], pos[a:b])
        w.finish(keytype="ffn_input_after_ln", shard_id=i, num_shards=2, context_window=3)
    write_manifest(tmp_path / "sh", 2)
    src = open_datastore(tmp_path / "sh")
    meta = head_datastore(tmp_path / "sh", tmp_path / "head", 700)
    assert (meta.num_shards, meta.shard_id, meta.size) == (1, 0, 700)
    assert "shards" not in meta.extra and meta.context_window == 3
    assert meta.dump_id not in (None, src.meta.dump_id)
    head = open_datastore(tmp_path / "head")
    assert head.size == 700 and head.meta.num_shards == 1
    np.testing.assert_array_equal(head.keys, keys[:700])
    np.testing.assert_array_equal(head.vals[:, 0], vals[:700])
    np.testing.assert_array_equal(head.pos, pos[:700])


def test_manifest_dump_id_follows_its_shards(tmp_path):
    """The manifest's dump id is derived from its shards' ids: re-dumping one shard changes
    it, and a shard re-dumped after the manifest was written is refused until it is
    rewritten."""
    from fairseq_knnlm.store.shards import shard_prefix, write_manifest

    def dump(i):
        w = DatastoreWriter(shard_prefix(tmp_path / "sh", i, 2), 4)
        w.add(np.full((3, 4), i, np.float32), np.arange(3), np.arange(3) + 3 * i)
        w.finish(keytype="ffn_input_after_ln", shard_id=i, num_shards=2)

    dump(0)
    dump(1)
    write_manifest(tmp_path / "sh", 2)
    before = open_datastore(tmp_path / "sh").meta
    assert before.dump_id is not None
    dump(1)  # shard 1 dumped again, same size
    with pytest.raises(DatastoreError, match="shard 1 .* dumped again after the manifest"):
        open_datastore(tmp_path / "sh")
    write_manifest(tmp_path / "sh", 2)
    after = open_datastore(tmp_path / "sh").meta
    assert after.dump_id != before.dump_id and after.size == before.size


def test_full_disk_is_a_clear_error_not_a_bus_error(tmp_path, monkeypatch):
    """Growing reserves blocks: ENOSPC at grow time becomes one DatastoreError naming the
    prefix; the unfinished files are removed and the prefix is free again."""
    import errno

    from fairseq_knnlm.store import memmaps

    _write(tmp_path / "ds")  # an older datastore at the prefix
    w = DatastoreWriter(tmp_path / "ds", 16, initial_capacity=8)
    w.add(np.ones((8, 16), np.float32), np.arange(8), np.arange(8))

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(memmaps, "_fallocate", full)
    with pytest.raises(DatastoreError) as e:
        w.add(np.ones((8, 16), np.float32), np.arange(8), np.arange(8))
    msg = str(e.value)
    assert str(tmp_path / "ds") in msg and "No space left" in msg and "\n" not in msg
    assert not list(tmp_path.glob("*.tmp")) and not meta_path(tmp_path / "ds").exists()
    with pytest.raises(DatastoreError, match="carry no metadata"):  # never looks finished
        open_datastore(tmp_path / "ds")
    monkeypatch.undo()
    _write(tmp_path / "ds")  # the lock was released


def test_expected_rows_checks_free_space_first(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 100_000, 100_000))
    with pytest.raises(DatastoreError) as e:
        DatastoreWriter(tmp_path / "ds", 1024, "float16", expected_rows=1000)
    msg = str(e.value)
    # 1000 rows x (2048 key + 4 value + 8 position bytes)
    assert str(tmp_path / "ds") in msg and "2060000 bytes" in msg and "100000 bytes" in msg
    assert not list(tmp_path.iterdir())  # refused before anything was written
    w = DatastoreWriter(tmp_path / "ds", 8, expected_rows=1000)  # 1000 x 44 bytes fit
    assert w._rows.capacity == 1000  # reserved at once
    w.add(np.ones((10, 8), np.float32), np.arange(10), np.arange(10))
    assert w.finish(keytype="k").size == 10


def test_file_size_limit_in_a_real_process(tmp_path):
    """The kernel path: with RLIMIT_FSIZE (SIGXFSZ ignored) growing fails with EFBIG, which
    becomes one DatastoreError; nothing that looks like a datastore is left."""
    import os
    import subprocess
    import sys

    script = """
import resource, signal, sys
import numpy as np
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
from fairseq_knnlm.store.datastore import DatastoreError, DatastoreWriter
w = DatastoreWriter(sys.argv[1], 16, initial_capacity=64)
try:
    for _ in range(100):
        w.add(np.ones((100, 16), np.float32), np.arange(100), np.arange(100))
except DatastoreError as e:
    print(e, file=sys.stderr)
    sys.exit(3)
"""
    env = {**os.environ, "FAIRSEQ_KNNLM_NO_FAIRSEQ": "1"}
    p = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ds")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 3, p.stderr[-2000:]
    assert str(tmp_path / "ds") in p.stderr and "File too large" in p.stderr
    assert sorted(f.name for f in tmp_path.iterdir()) == []

"""Growable memmaps and the writer lock: blocks reserved as files grow (a full disk is an
error at grow time, never a SIGBUS), free space checked up front, the lock held for a
writer's life, in-RAM copies that are copies. No fairseq needed."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest

from fairseq_knnlm.errors import KNNLMError
from fairseq_knnlm.store import memmaps
from fairseq_knnlm.store.memmaps import (
    DiskFullError,
    LockBusy,
    RowWriter,
    WriterLock,
    copy_to_memory,
)


def _specs(d):
    return {"a": (d / "x_a.npy", np.float32, (8,)), "b": (d / "x_b.npy", np.int64, ())}


def test_growing_reserves_blocks_not_a_sparse_file(tmp_path):
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    fd = os.open(probe, os.O_RDWR)
    try:
        can_reserve = memmaps._fallocate(fd, 0, 1 << 20)
    finally:
        os.close(fd)
    w = RowWriter(_specs(tmp_path), initial_capacity=1000)
    w.add(a=np.ones((1001, 8), np.float32), b=np.arange(1001))  # grows to 2000 rows
    st = os.stat(memmaps.tmp_path(tmp_path / "x_a.npy"))
    assert st.st_size == w.capacity * 32 == 64000  # half of it not written yet
    if can_reserve:  # ext4, xfs, tmpfs, ...: every byte has its block before it is mapped
        assert st.st_blocks * 512 >= st.st_size
    else:  # a filesystem without fallocate: the old sparse growth
        assert st.st_blocks * 512 < st.st_size
    assert w.finish() == 1001
    assert os.path.getsize(tmp_path / "x_a.npy") == 1001 * 32


def test_no_space_at_grow_time_is_one_clear_error(tmp_path, monkeypatch):
    w = RowWriter(_specs(tmp_path), initial_capacity=4, label="neighbours out/nbrs")
    w.add(a=np.ones((4, 8), np.float32), b=np.arange(4))

    def full(fd, offset, length):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(memmaps, "_fallocate", full)
    with pytest.raises(DiskFullError) as e:
        w.add(a=np.ones((4, 8), np.float32), b=np.arange(4))
    assert isinstance(e.value, KNNLMError)
    msg = str(e.value)
    assert msg.startswith("neighbours out/nbrs: no space to grow x_a.npy.tmp")
    assert "Disk quota exceeded" in msg and "removed" in msg and "\n" not in msg
    assert not list(tmp_path.iterdir())  # the unfinished files are gone
    w.abort()  # safe to call again


def test_other_grow_errors_are_not_disguised(tmp_path, monkeypatch):
    w = RowWriter(_specs(tmp_path), initial_capacity=4)

    def broken(fd, offset, length):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(memmaps, "_fallocate", broken)
    with pytest.raises(OSError) as e:
        w.add(a=np.ones((8, 8), np.float32), b=np.arange(8))
    assert not isinstance(e.value, DiskFullError)


def test_free_space_is_checked_against_expected_rows(tmp_path, monkeypatch):
    (tmp_path / "x_a.npy.tmp").write_bytes(b"\0" * 3200)  # a killed run's leftovers count
    monkeypatch.setattr(memmaps, "free_bytes", lambda folder: 800)
    with pytest.raises(DiskFullError, match=r"101 rows need 4.0 kB \(4040 bytes\) but .* "
                                            r"has 4.0 kB \(4000 bytes\) free"):
        RowWriter(_specs(tmp_path), expected_rows=101)
    assert (tmp_path / "x_a.npy.tmp").stat().st_size == 3200  # refused before touching it
    w = RowWriter(_specs(tmp_path), expected_rows=100)
    assert w.capacity == 100


def test_writer_lock(tmp_path):
    lock = WriterLock(tmp_path / "out.lock", {"dump_id": "abc"})
    rec = json.loads((tmp_path / "out.lock").read_text())
    assert rec["pid"] == os.getpid() and rec["dump_id"] == "abc"
    with pytest.raises(LockBusy, match=f"held by pid {os.getpid()} on "):
        WriterLock(tmp_path / "out.lock")
    lock.release()
    assert not (tmp_path / "out.lock").exists()
    lock.release()  # idempotent
    again = WriterLock(tmp_path / "out.lock")
    del again  # dropped without release: the lock goes with it
    WriterLock(tmp_path / "out.lock").release()


def test_copy_to_memory_is_a_copy(tmp_path):
    a = np.arange(1000 * 4, dtype=np.float32).reshape(1000, 4)
    a.tofile(tmp_path / "a")
    mm = np.memmap(tmp_path / "a", dtype=np.float32, mode="r", shape=(1000, 4))
    assert np.ascontiguousarray(mm).base is mm  # the trap: a view of the mapped file
    c = copy_to_memory(mm, chunk_bytes=160)  # several chunks
    assert type(c) is np.ndarray and c.base is None and np.array_equal(c, a)


def test_tmp_path():
    assert memmaps.tmp_path("d/x_keys.npy").name == "x_keys.npy.tmp"


def test_json_written_by_two_writers_at_once(tmp_path):
    """The last two shards of a dump may write the manifest at the same moment: each write
    has its own temporary name, so neither fails and the file is always whole."""
    import threading

    errors: list[BaseException] = []

    def write(tag: int) -> None:
        try:
            for i in range(200):
                memmaps.write_json_atomic(tmp_path / "m.json", {"tag": tag, "i": i})
        except BaseException as e:  # noqa: BLE001  (reported by the assert below)
            errors.append(e)

    threads = [threading.Thread(target=write, args=(t,)) for t in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:1]
    assert json.loads((tmp_path / "m.json").read_text())["i"] == 199
    assert [f.name for f in tmp_path.iterdir()] == ["m.json"]

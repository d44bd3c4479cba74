"""FAISS index build on small synthetic datastores: exactness of flat, recall of IVFPQ
against exact search, resume after a simulated crash, and clear errors for bad inputs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from fairseq_knnlm.index.build import build_index
from fairseq_knnlm.index.kinds import IndexBuildError, IndexSettings, check_settings, meta_path
from fairseq_knnlm.index.load import load_index, search
from fairseq_knnlm.store.datastore import DatastoreError, DatastoreWriter


def _clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Keys around 50 centres, like LM states (they cluster by context), not uniform noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((50, d)) * 3
    return (centres[rng.integers(0, 50, n)] + rng.standard_normal((n, d))).astype(np.float32)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("idx")
    keys = _clustered(20000, 32)
    w = DatastoreWriter(d / "ds", 32, "float16")
    w.add(keys, np.arange(len(keys)) % 97, np.arange(len(keys)))
    w.finish(keytype="ffn_input_after_ln")
    queries = _clustered(200, 32, seed=1)
    return d, keys.astype(np.float16).astype(np.float32), queries


def _exact(keys, q, k):
    d = ((q[:, None, :] - keys[None]) ** 2).sum(-1)
    return np.argsort(d, axis=1)[:, :k]


def test_flat_is_exact(synth):
    d, keys, q = synth
    build_index(d / "ds", d / "flat.index", IndexSettings(index_type="flat"), progress=False)
    _, ids = search(load_index(d / "flat.index"), q, 10)
    assert np.array_equal(ids, _exact(keys, q, 10))


def test_ivfpq_recall_against_exact(synth):
    d, keys, q = synth
    s = IndexSettings(index_type="ivfpq", ncentroids=64, code_size=8, train_size=20000)
    build_index(d / "ds", d / "ivf.index", s, add_chunk=3000, progress=False)
    _, ids = search(load_index(d / "ivf.index", probe=16), q, 64)
    truth = _exact(keys, q, 64)
    recall = np.mean([len(set(a) & set(b)) / 64 for a, b in zip(ids, truth)])
    assert recall >= 0.5, recall  # 8-byte codes over 32 dims; 64-byte codes do far better
    rec = json.loads(meta_path(d / "ivf.index").read_text())
    assert rec["datastore"]["size"] == 20000 and rec["complete"]


def test_resume_after_crash_equals_uninterrupted(synth):
    d, _, q = synth
    s = IndexSettings(index_type="ivfpq", ncentroids=32, code_size=8, train_size=5000)
    build_index(d / "ds", d / "full.index", s, add_chunk=2500, progress=False)
    with pytest.raises(KeyboardInterrupt):
        build_index(d / "ds", d / "crash.index", s, add_chunk=2500, checkpoint_every=2500,
                    stop_after=7500, progress=False)
    assert not (d / "crash.index").exists() and not meta_path(d / "crash.index").exists()
    with pytest.raises(IndexBuildError, match="starting-point"):
        build_index(d / "ds", d / "crash.index", s, starting_point=0, progress=False)
    build_index(d / "ds", d / "crash.index", s, add_chunk=2500, progress=False)  # resumes
    a = search(load_index(d / "full.index", probe=8), q, 20)
    b = search(load_index(d / "crash.index", probe=8), q, 20)
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])
    assert not os.path.exists(f"{d / 'crash.index'}.partial")


def test_bad_inputs(synth, tmp_path):
    d, _, _ = synth
    with pytest.raises(DatastoreError, match="no datastore"):
        build_index(tmp_path / "missing", tmp_path / "x.index", progress=False)
    with pytest.raises(IndexBuildError, match="must divide the dimension 32"):
        build_index(d / "ds", tmp_path / "x.index", IndexSettings(code_size=7), progress=False)
    with pytest.raises(IndexBuildError, match="does not exist"):
        build_index(d / "ds", tmp_path / "nodir" / "x.index", IndexSettings(code_size=8),
                    progress=False)
    assert not (tmp_path / "x.index").exists()
    w = DatastoreWriter(tmp_path / "small", 32)
    w.add(np.ones((100, 32), np.float32), np.arange(100), np.arange(100))
    w.finish(keytype="ffn_input_after_ln")
    with pytest.raises(IndexBuildError, match="index-type flat"):
        build_index(tmp_path / "small", tmp_path / "x.index", IndexSettings(code_size=8),
                    progress=False)


def test_small_datastore_gets_fewer_centroids(caplog):
    s = check_settings(IndexSettings(ncentroids=4096, code_size=8), 20000, 32)
    assert s.ncentroids == 512 and "using --ncentroids 512" in caplog.text


def test_memory_mapped_index_gives_the_same_results(synth):
    d, _, q = synth
    s = IndexSettings(index_type="ivfpq", ncentroids=32, code_size=8, train_size=5000)
    if not (d / "full.index").exists():
        build_index(d / "ds", d / "full.index", s, add_chunk=2500, progress=False)
    a = search(load_index(d / "full.index", probe=8), q, 20)
    b = search(load_index(d / "full.index", probe=8, mmap=True), q, 20)
    assert np.array_equal(a[1], b[1])


def test_ondisk_sharded_build_equals_one_piece(synth, tmp_path):
    """Parts added in 2 worker processes and merged into OnDiskInvertedLists return the same
    neighbours and distances as one index built in one piece from the same trained index;
    the on-disk index still loads after the pair is moved (INDEX.ivfdata found next to it)."""
    import shutil

    from fairseq_knnlm.index.ondisk import build_index_ondisk, ivfdata_path, parts_dir

    d, keys, q = synth
    s = IndexSettings(index_type="ivfpq", ncentroids=64, code_size=8, train_size=20000)
    one = build_index(d / "ds", tmp_path / "one.index", s, progress=False)
    shutil.copy(f"{one}.trained", tmp_path / "disk.index.trained")  # the same trained index
    shutil.copy(f"{one}.trained.json", tmp_path / "disk.index.trained.json")
    disk = build_index_ondisk(d / "ds", tmp_path / "disk.index", s, shard_size=6000, workers=2,
                              add_chunk=2500, progress=False)
    assert ivfdata_path(disk).exists() and not parts_dir(disk).exists()
    rec = json.loads(meta_path(disk).read_text())
    assert rec["on_disk"] and rec["parts"] == 4 and rec["ntotal"] == len(keys)
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in (disk, ivfdata_path(disk), meta_path(disk)):
        shutil.move(str(f), moved / f.name)
    for mmap in (False, True):
        d1, i1 = search(load_index(one, probe=16), q, 32)
        d2, i2 = search(load_index(moved / "disk.index", probe=16, mmap=mmap), q, 32)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_allclose(d1, d2, rtol=1e-6)


def test_ondisk_build_resumes_after_a_crash(synth, tmp_path):
    from fairseq_knnlm.index.ondisk import build_index_ondisk, parts_dir

    d, _, q = synth
    s = IndexSettings(index_type="ivfpq", ncentroids=64, code_size=8, train_size=20000)
    with pytest.raises(KeyboardInterrupt):
        build_index_ondisk(d / "ds", tmp_path / "a.index", s, shard_size=5000,
                           progress=False, stop_after_parts=2)
    assert len(list(parts_dir(tmp_path / "a.index").glob("part*.index"))) == 2
    assert not meta_path(tmp_path / "a.index").exists()  # unfinished: not usable
    build_index_ondisk(d / "ds", tmp_path / "a.index", s, shard_size=5000, progress=False)
    build_index_ondisk(d / "ds", tmp_path / "b.index", s, shard_size=5000, progress=False)
    r = [search(load_index(tmp_path / f"{n}.index", probe=8), q, 16) for n in "ab"]
    np.testing.assert_array_equal(r[0][1], r[1][1])
    with pytest.raises(IndexBuildError, match="not flat"):
        build_index_ondisk(d / "ds", tmp_path / "c.index", IndexSettings(index_type="flat"))


def test_fastscan_recall_and_its_limits(synth, tmp_path):
    """ivfpq-fastscan: same bytes per vector as ivfpq, 4-bit SIMD-scanned codes; usable
    recall on clustered keys, and clear errors where FAISS cannot follow (GPU, on-disk)."""
    from fairseq_knnlm.index.ondisk import build_index_ondisk

    d, keys, q = synth
    s = IndexSettings(index_type="ivfpq-fastscan", ncentroids=64, code_size=8,
                      train_size=20000)
    assert s.describe(32) == "IVF64,PQ16x4fs"
    build_index(d / "ds", tmp_path / "fs.index", s, progress=False)
    _, ids = search(load_index(tmp_path / "fs.index", probe=16), q, 64)
    truth = _exact(keys, q, 64)
    recall = np.mean([len(set(a) & set(b)) / 64 for a, b in zip(ids, truth)])
    assert recall >= 0.4, recall
    with pytest.raises(IndexBuildError, match="sub-quantizers"):
        check_settings(IndexSettings(index_type="ivfpq-fastscan", code_size=24), 20000, 32)
    with pytest.raises(IndexBuildError, match="GPU"):
        build_index(d / "ds", tmp_path / "g.index", s, gpu=True, progress=False)
    with pytest.raises(IndexBuildError, match="GPU"):
        load_index(tmp_path / "fs.index", gpu=True)
    with pytest.raises(IndexBuildError, match="not ivfpq-fastscan"):
        build_index_ondisk(d / "ds", tmp_path / "od.index", s, progress=False)


def test_rabitq_recall_and_its_limits(synth, tmp_path):
    """ivf-rabitq: RaBitQ codes in the IVF lists (one bit per dim); usable recall on clustered
    keys, its own describe string, and the same refusals as fast-scan (GPU, on-disk)."""
    from fairseq_knnlm.index.ondisk import build_index_ondisk

    d, keys, q = synth
    s = IndexSettings(index_type="ivf-rabitq", ncentroids=64, train_size=20000)
    assert s.describe(32) == "IVF64,RaBitQ"
    check_settings(IndexSettings(index_type="ivf-rabitq", code_size=24), 20000, 32)  # n/a
    build_index(d / "ds", tmp_path / "rq.index", s, progress=False)
    index = load_index(tmp_path / "rq.index", probe=16)
    assert type(index).__name__ == "IndexIVFRaBitQ" and index.nprobe == 16
    _, ids = search(index, q, 64)
    truth = _exact(keys, q, 64)
    recall = np.mean([len(set(a) & set(b)) / 64 for a, b in zip(ids, truth)])
    assert recall >= 0.3, recall  # 32 bits a key here (fast-scan: 64); chance is 0.003
    with pytest.raises(IndexBuildError, match="GPU"):
        build_index(d / "ds", tmp_path / "g.index", s, gpu=True, progress=False)
    with pytest.raises(IndexBuildError, match="GPU"):
        load_index(tmp_path / "rq.index", gpu=True)
    with pytest.raises(IndexBuildError, match="not ivf-rabitq"):
        build_index_ondisk(d / "ds", tmp_path / "od.index", s, progress=False)


# ---- dump identity: stale indexes and stale build state are never used --------------------

def _dump(prefix, seed: int, context_window: int, n: int = 6000, d: int = 16) -> np.ndarray:
    """(Re-)dump a datastore at prefix: same size and dim every time, other keys."""
    keys = _clustered(n, d, seed=seed)
    w = DatastoreWriter(prefix, d)
    w.add(keys, np.arange(n) % 89, np.arange(n))
    w.finish(keytype="ffn_input_after_ln", subset="train", context_window=context_window)
    return keys


SMALL = IndexSettings(index_type="ivfpq", ncentroids=16, code_size=8, train_size=6000)


def test_index_of_an_earlier_dump_is_refused(tmp_path):
    from fairseq_knnlm.index.load import check_index_matches
    from fairseq_knnlm.store.datastore import open_datastore

    _dump(tmp_path / "ds", seed=0, context_window=0)
    build_index(tmp_path / "ds", tmp_path / "ds.index", IndexSettings(index_type="flat"),
                progress=False)
    check_index_matches(tmp_path / "ds.index", open_datastore(tmp_path / "ds"))
    _dump(tmp_path / "ds", seed=5, context_window=16)  # same size, dim, model, dictionary
    ds = open_datastore(tmp_path / "ds")
    with pytest.raises(DatastoreError) as e:
        check_index_matches(tmp_path / "ds.index", ds)
    msg = str(e.value)
    assert "dump_id" in msg and ds.meta.dump_id in msg and "context_window" in msg
    assert "dumped again" in msg and "\n" not in msg


def test_index_recorded_before_dump_ids_still_matches_an_old_datastore(tmp_path):
    from fairseq_knnlm.index.load import check_index_matches
    from fairseq_knnlm.store.datastore import meta_path as ds_meta_path
    from fairseq_knnlm.store.datastore import open_datastore

    _dump(tmp_path / "ds", seed=0, context_window=0, n=500)
    build_index(tmp_path / "ds", tmp_path / "ds.index", IndexSettings(index_type="flat"),
                progress=False)
    m = json.loads(ds_meta_path(tmp_path / "ds").read_text())
    del m["dump_id"]
    ds_meta_path(tmp_path / "ds").write_text(json.dumps(m))
    rec = json.loads(meta_path(tmp_path / "ds.index").read_text())
    rec["datastore"] = {k: rec["datastore"][k] for k in
                        ("prefix", "size", "dim", "keytype", "dict_sha256", "model_sha256")}
    meta_path(tmp_path / "ds.index").write_text(json.dumps(rec))
    check_index_matches(tmp_path / "ds.index", open_datastore(tmp_path / "ds"))
    rec["datastore"]["size"] = 499
    meta_path(tmp_path / "ds.index").write_text(json.dumps(rec))
    with pytest.raises(DatastoreError, match="size"):
        check_index_matches(tmp_path / "ds.index", open_datastore(tmp_path / "ds"))


def _results(index_path, q):
    return search(load_index(index_path, probe=8), q, 20)


def test_resumed_build_after_a_redump_starts_again(tmp_path, caplog):
    """Stopped build, then the datastore is dumped again (same size): the checkpoint and the
    trained index are discarded (logged), and the result equals a fresh build of the new
    dump. An explicit --starting-point into the stale checkpoint is refused before work."""
    q = _clustered(100, 16, seed=9)
    _dump(tmp_path / "ds", seed=0, context_window=0)
    with pytest.raises(KeyboardInterrupt):
        build_index(tmp_path / "ds", tmp_path / "a.index", SMALL, add_chunk=1500,
                    checkpoint_every=1500, stop_after=3000, progress=False)
    _dump(tmp_path / "ds", seed=5, context_window=16)
    with pytest.raises(IndexBuildError, match="--starting-point 3000 but a.index.partial was "
                                              "built from another dump"):
        build_index(tmp_path / "ds", tmp_path / "a.index", SMALL, starting_point=3000,
                    progress=False)
    build_index(tmp_path / "ds", tmp_path / "a.index", SMALL, add_chunk=1500, progress=False)
    assert "a.index.partial was built from another dump" in caplog.text
    assert "starting again" in caplog.text and "training again" in caplog.text
    build_index(tmp_path / "ds", tmp_path / "fresh.index", SMALL, add_chunk=1500,
                progress=False)
    (d1, i1), (d2, i2) = _results(tmp_path / "a.index", q), _results(tmp_path / "fresh.index", q)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)


def test_ondisk_parts_of_an_earlier_dump_are_not_merged(tmp_path, caplog):
    from fairseq_knnlm.index.ondisk import build_index_ondisk, parts_dir

    q = _clustered(100, 16, seed=9)
    _dump(tmp_path / "ds", seed=0, context_window=0)
    with pytest.raises(KeyboardInterrupt):
        build_index_ondisk(tmp_path / "ds", tmp_path / "a.index", SMALL, shard_size=2000,
                           progress=False, stop_after_parts=2)
    assert len(list(parts_dir(tmp_path / "a.index").glob("part*.index"))) == 2
    _dump(tmp_path / "ds", seed=5, context_window=16)
    build_index_ondisk(tmp_path / "ds", tmp_path / "a.index", SMALL, shard_size=2000,
                       progress=False)
    assert "a.index.parts/ was built from another dump" in caplog.text
    build_index_ondisk(tmp_path / "ds", tmp_path / "fresh.index", SMALL, shard_size=2000,
                       progress=False)
    (d1, i1), (d2, i2) = _results(tmp_path / "a.index", q), _results(tmp_path / "fresh.index", q)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)


def test_ondisk_parts_of_another_trained_index_are_not_merged(tmp_path, caplog):
    """Parts are built from INDEX.trained: if it is trained again (deleted, say), the parts
    made from the old one are rebuilt too."""
    from fairseq_knnlm.index.ondisk import build_index_ondisk

    _dump(tmp_path / "ds", seed=0, context_window=0)
    with pytest.raises(KeyboardInterrupt):
        build_index_ondisk(tmp_path / "ds", tmp_path / "a.index", SMALL, shard_size=2000,
                           progress=False, stop_after_parts=1)
    os.unlink(f"{tmp_path / 'a.index'}.trained")
    build_index_ondisk(tmp_path / "ds", tmp_path / "a.index", SMALL, shard_size=2000,
                       progress=False)
    assert "made for another build (different trained_id)" in caplog.text


# ---- flags out of range: refused before any work, by the Python API too ---------------------

@pytest.mark.parametrize("field,value,flag", [
    ("ncentroids", 0, "--ncentroids"), ("ncentroids", -4, "--ncentroids"),
    ("code_size", 0, "--code-size"), ("train_size", 0, "--train-size"),
    ("probe", -1, "--probe"), ("pca_dim", 0, "--pca-dim")])
def test_bad_settings_are_refused(tmp_path, field, value, flag):
    from dataclasses import replace

    s = replace(IndexSettings(), **{field: value})
    with pytest.raises(IndexBuildError, match=f"^{flag} must be positive, got {value}$"):
        check_settings(s, 20000, 32)
    with pytest.raises(ValueError, match=flag):  # also a ValueError (FlagError)
        build_index(tmp_path / "missing", tmp_path / "x.index", s, progress=False)


@pytest.mark.parametrize("kwargs,flag", [
    ({"add_chunk": 0}, "--num-keys-to-add-at-a-time"),
    ({"add_chunk": -5}, "--num-keys-to-add-at-a-time"),
    ({"checkpoint_every": 0}, "--checkpoint-every"),
    ({"starting_point": -1}, "--starting-point")])
def test_bad_build_args_are_refused_before_any_work(tmp_path, kwargs, flag):
    # the datastore does not even exist: the flag is refused first
    with pytest.raises(IndexBuildError, match=f"^{flag} must"):
        build_index(tmp_path / "missing", tmp_path / "x.index", progress=False, **kwargs)


@pytest.mark.parametrize("kwargs,flag", [
    ({"workers": 0}, "--workers"), ({"shard_size": -1}, "--add-shard-size"),
    ({"shard_size": 0}, "--add-shard-size"), ({"add_chunk": 0}, "--num-keys-to-add-at-a-time")])
def test_bad_ondisk_args_are_refused_before_any_work(tmp_path, kwargs, flag):
    from fairseq_knnlm.index.ondisk import build_index_ondisk

    with pytest.raises(IndexBuildError, match=f"^{flag} must"):
        build_index_ondisk(tmp_path / "missing", tmp_path / "x.index", progress=False, **kwargs)


# ---- progress off a terminal, and workers that outlive their parent -------------------------

def test_progress_is_logged_when_stderr_is_not_a_terminal(tmp_path, caplog, monkeypatch):
    import logging

    from fairseq_knnlm import progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    _dump(tmp_path / "ds", seed=0, context_window=0, n=3000)
    with caplog.at_level(logging.INFO):
        build_index(tmp_path / "ds", tmp_path / "a.index", SMALL, add_chunk=1000)
    lines = [r.getMessage() for r in caplog.records if r.name == "fairseq_knnlm.progress"]
    assert "add: 1,000 of 3,000 keys (33.3%)" in lines[-3] and "ETA" in lines[-3]
    assert lines[-1].startswith("add: 3,000 of 3,000 keys (100.0%)")
    assert any(x.startswith("read training sample: 3,000 of 3,000 keys") for x in lines)
    assert all("keys/s" in x for x in lines)


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc to find the workers")
def test_ondisk_workers_exit_when_the_build_is_killed(tmp_path):
    """SIGKILL the parent of `knnlm-build-index --on-disk --workers 2` (workers slowed by a
    test hook): its workers and multiprocessing's resource tracker are gone within seconds."""
    import signal
    import subprocess
    import sys
    import time

    from fairseq_knnlm.index.ondisk import WORKER_DELAY_ENV

    _dump(tmp_path / "ds", seed=0, context_window=0, n=3000)
    env = {**os.environ, "FAIRSEQ_KNNLM_NO_FAIRSEQ": "1", WORKER_DELAY_ENV: "300"}
    p = subprocess.Popen(
        [sys.executable, "-m", "fairseq_knnlm.cli.build_index", "--dstore-mmap",
         str(tmp_path / "ds"), "--faiss-index", str(tmp_path / "a.index"), "--on-disk",
         "--workers", "2", "--add-shard-size", "1000", "--ncentroids", "16", "--code-size", "8",
         "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kids: list[int] = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(kids) < 3:  # 2 workers + the resource tracker
            time.sleep(0.2)
            kids = _children(p.pid)
        assert len(kids) >= 3, kids
        time.sleep(2)  # let the workers reach their initializer and the slowed task
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        deadline = time.time() + 15
        while time.time() < deadline and any(_alive(k) for k in kids):
            time.sleep(0.2)
        assert not [k for k in kids if _alive(k)]
    finally:
        for k in kids + [p.pid]:
            try:
                os.kill(k, signal.SIGKILL)
            except OSError:
                pass

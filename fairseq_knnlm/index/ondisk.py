"""On-disk build (``build_index_ondisk``, ``knnlm-build-index --on-disk``) for datastores whose
index does not fit in RAM: train once (build.py), add each range of rows (``--add-shard-size``)
to its own IVF index in a worker process (``--workers``), then merge the inverted lists into one
``OnDiskInvertedLists`` file with faiss.contrib.ondisk.merge_ondisk:
    INDEX               the index: quantizer + PQ tables; lists live in INDEX.ivfdata
    INDEX.ivfdata       the merged inverted lists, memory-mapped at query time
    INDEX.parts/        the per-range indexes (kept until the merge is done: resumable)
Workers exit when the building process dies (PR_SET_PDEATHSIG on Linux, plus a thread that
polls the parent's pid).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Union

import numpy as np

from fairseq_knnlm.index.build import (
    _check_output,
    _datastore_record,
    _read_json,
    _read_keys,
    _trained_index,
    _trained_path,
    _write_index_atomic,
    stale_reason,
)
from fairseq_knnlm.index.kinds import (
    CPU_ONLY_TYPES,
    IndexBuildError,
    IndexSettings,
    _faiss,
    check_settings,
    meta_path,
    validate_build_args,
    validate_settings,
)
from fairseq_knnlm.progress import Progress
from fairseq_knnlm.store.datastore import (
    Datastore,
    open_datastore,
)
from fairseq_knnlm.store.memmaps import write_json_atomic

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

# testing aid: seconds each --on-disk worker sleeps before adding (a build slow enough to kill)
WORKER_DELAY_ENV = "FAIRSEQ_KNNLM_TEST_WORKER_DELAY_S"
PARENT_POLL_S = 1.0  # how often an --on-disk worker checks that its parent is alive


def ivfdata_path(index_path: PathLike) -> Path:
    return Path(f"{index_path}.ivfdata")


def parts_dir(index_path: PathLike) -> Path:
    return Path(f"{index_path}.parts")


def add_ranges(ds: Datastore, shard_size: Optional[int]) -> list[tuple[int, int]]:
    """Row ranges added by separate workers: ``shard_size`` rows each, or (None) the
    datastore's own shards (one range for an unsharded datastore)."""
    if shard_size is None:
        shards = ds.meta.extra.get("shards")
        sizes = [int(r["size"]) for r in shards] if shards else [ds.size]
        bounds = np.cumsum([0] + sizes)
        return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    validate_build_args(shard_size=shard_size)
    return [(a, min(ds.size, a + shard_size)) for a in range(0, ds.size, shard_size)]


def _set_parent_death_signal(sig: int) -> bool:
    """Linux: have the kernel send ``sig`` to this process when its parent dies."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, int(sig), 0, 0, 0) == 0  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int, every: float) -> None:
    while True:
        time.sleep(every)
        if os.getppid() != parent_pid:
            os._exit(1)


def _worker_init(parent_pid: int) -> None:
    """Initializer of --on-disk worker processes: exit when the building process dies
    (killed, OOM), instead of adding keys for nobody. PR_SET_PDEATHSIG on Linux, and a
    thread that polls the parent pid everywhere (the portable fallback)."""
    _set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent_pid:  # it died before the signal was set
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid, PARENT_POLL_S), daemon=True,
                     name="watch-parent").start()


def _add_range_worker(dstore_prefix: str, trained: str, lo: int, hi: int, out: str,
                      add_chunk: int, threads: int) -> int:
    """Worker process: add rows [lo, hi) (ids lo..hi-1) to a copy of the trained index."""
    delay = float(os.environ.get(WORKER_DELAY_ENV) or 0)
    if delay > 0:
        time.sleep(delay)
    faiss = _faiss()
    if threads > 0:
        faiss.omp_set_num_threads(threads)
    ds = open_datastore(dstore_prefix)
    index = faiss.read_index(trained)
    for a in range(lo, hi, add_chunk):
        b = min(hi, a + add_chunk)
        index.add_with_ids(_read_keys(ds, slice(a, b)), np.arange(a, b, dtype=np.int64))
    _write_index_atomic(index, Path(out))
    return int(index.ntotal)


def build_index_ondisk(
    dstore_prefix: PathLike,
    index_path: PathLike,
    settings: Optional[IndexSettings] = None,
    shard_size: Optional[int] = 5_000_000,
    workers: int = 1,
    add_chunk: int = 500_000,
    progress: bool = True,
    keep_parts: bool = False,
    stop_after_parts: Optional[int] = None,
) -> Path:
    """Build INDEX with its inverted lists on disk (INDEX.ivfdata), shard by shard.

    RAM is bounded by the flags, not by the datastore: the training sample (train_size x dim
    floats), and per worker one chunk of keys (add_chunk x dim floats) plus its range's codes
    (shard_size x (code_size + 8) bytes). Finished parts survive an interruption: a rerun
    adds only the missing ones, then merges, if they were made from this dump of the
    datastore with the same settings and trained index (else they are discarded, with a
    warning). Workers exit when this process dies. stop_after_parts (testing aid) stops, as
    a crash would, after that many parts are written.
    """
    import concurrent.futures as cf
    import multiprocessing as mp

    settings = settings or IndexSettings()
    validate_settings(settings)
    validate_build_args(add_chunk=add_chunk, shard_size=shard_size, workers=workers)
    index_path = Path(index_path)
    ds = open_datastore(dstore_prefix)
    settings = check_settings(settings, ds.size, ds.dim)
    if settings.index_type in ("flat", *CPU_ONLY_TYPES):
        raise IndexBuildError(f"--on-disk merges IVF inverted lists of 8-bit PQ codes: use "
                              f"ivfpq, opq-ivfpq or pca-ivfpq, not {settings.index_type}")
    _check_output(index_path)
    ranges = add_ranges(ds, shard_size)
    record = {"datastore": _datastore_record(ds), "settings": asdict(settings)}
    fin_meta = meta_path(index_path)
    if fin_meta.exists():
        fin_meta.unlink()
    faiss = _faiss()
    _, trained_id = _trained_index(ds, settings, index_path, record, gpu=False,
                                   progress=progress)
    trained = _trained_path(index_path)

    pdir = parts_dir(index_path)
    pdir.mkdir(exist_ok=True)
    plan_rec = json.loads(json.dumps({**record, "ranges": ranges, "trained_id": trained_id}))
    plan_file = pdir / "plan.json"
    old_parts = sorted(pdir.glob("part*.index"))
    saved = _read_json(plan_file) if plan_file.exists() else None
    why = (stale_reason(saved, plan_rec, f"{pdir.name}/") if saved is not None else
           f"{pdir.name}/ has no plan.json" if old_parts else None)
    if why is not None and old_parts:
        logger.warning("%s: starting its %d parts again", why, len(old_parts))
        for f in old_parts:
            f.unlink()
    write_json_atomic(plan_file, plan_rec)
    parts = [pdir / f"part{i:05d}.index" for i in range(len(ranges))]
    todo = [i for i, f in enumerate(parts) if not f.exists()]
    if len(todo) < len(parts):
        logger.info("resuming: %d of %d parts already built", len(parts) - len(todo), len(parts))
    threads = max(1, (os.cpu_count() or 1) // workers)
    t0 = time.time()
    bar = Progress("add (parts)", ds.size,
                   initial=ds.size - sum(ranges[i][1] - ranges[i][0] for i in todo),
                   enabled=progress)
    done = 0
    args = [(str(dstore_prefix), str(trained), ranges[i][0], ranges[i][1], str(parts[i]),
             add_chunk, threads) for i in todo]
    if workers == 1:
        results = (_add_range_worker(*a) for a in args)
        pool = None
    else:
        from fairseq_knnlm import NO_FAIRSEQ_ENV

        pool = cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                      initializer=_worker_init, initargs=(os.getpid(),))
        old_env = os.environ.get(NO_FAIRSEQ_ENV)
        os.environ[NO_FAIRSEQ_ENV] = "1"  # workers need faiss and numpy only
        try:
            futures = [pool.submit(_add_range_worker, *a) for a in args]
        finally:
            if old_env is None:
                del os.environ[NO_FAIRSEQ_ENV]
            else:
                os.environ[NO_FAIRSEQ_ENV] = old_env
        results = (f.result() for f in futures)
    try:
        for i, n in zip(todo, results):
            lo, hi = ranges[i]
            if n != hi - lo:
                raise IndexBuildError(f"part {i} holds {n} keys, expected {hi - lo}")
            bar.update(n)
            done += 1
            if stop_after_parts is not None and done >= stop_after_parts and done < len(todo):
                raise KeyboardInterrupt(f"stopped after {done} parts (stop_after_parts)")
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    add_time = time.time() - t0

    # merge: the lists of all parts, in range order, into one on-disk file
    from faiss.contrib.ondisk import merge_ondisk

    t1 = time.time()
    ivf = ivfdata_path(index_path)
    if ivf.exists():
        ivf.unlink()  # a merge that was interrupted: redo it
    index = faiss.read_index(str(trained))
    merge_ondisk(index, [str(f) for f in parts], str(ivf.resolve()))
    if int(index.ntotal) != ds.size:
        raise IndexBuildError(f"merged index holds {index.ntotal} keys, datastore {ds.size}")
    _write_index_atomic(index, index_path)
    write_json_atomic(fin_meta, {**record, "ntotal": int(index.ntotal), "complete": True,
                                 "on_disk": True, "ivfdata": ivf.name, "parts": len(parts)})
    if not keep_parts:
        for f in parts + [plan_file]:
            f.unlink()
        pdir.rmdir()
    logger.info("wrote %s + %s: %d keys in %d parts, added in %.1fs (%.0f keys/s), merged in "
                "%.1fs", index_path, ivf.name, ds.size, len(parts), add_time,
                sum(ranges[i][1] - ranges[i][0] for i in todo) / max(1e-9, add_time),
                time.time() - t1)
    return index_path

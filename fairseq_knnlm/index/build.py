"""FAISS index over a datastore: build (train -> save trained -> add in chunks, resumable)
in RAM.

Paper settings (Section 3): IVFPQ with 4096 coarse centroids trained on 1M keys sampled
without replacement, 64-byte PQ codes (64 sub-quantizers of 8 bits), 32 lists probed.

Files next to INDEX:
    INDEX               the finished index (faiss.write_index)
    INDEX.meta.json     what it was built from (datastore fingerprint) and with which settings
    INDEX.trained       the trained, empty index (kept: shard-wise builds reuse it)
    INDEX.partial(.json) the last checkpoint of an interrupted build (removed when done)

Every record holds the datastore's fingerprint, dump id included (DatastoreMeta): an index
built from an earlier dump of the prefix is refused by ``check_index_matches`` (the scorer),
and saved state from an earlier dump or other settings (INDEX.trained, INDEX.partial,
INDEX.parts/) is discarded with a warning, never mixed into this build; an explicit
``--starting-point N > 0`` into such stale state is refused before any work. Flags out of
range are refused before any file is read (``validate_settings``, ``validate_build_args``).
Progress: a tqdm bar on a terminal, else a log line every ``progress.LOG_EVERY_S`` seconds.

The on-disk build is index/ondisk.py, loading and search index/load.py, settings and
kinds index/kinds.py.

CLI: ``knnlm-build-index --dstore-mmap PREFIX --faiss-index PREFIX.index`` (cli/build_index.py).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from fairseq_knnlm.index.kinds import (
    CPU_ONLY_TYPES,
    IndexBuildError,
    IndexSettings,
    _faiss,
    _require,
    _to_gpu,
    check_settings,
    meta_path,
    new_index,
    require_gpu,
    validate_build_args,
    validate_settings,
)
from fairseq_knnlm.progress import Progress
from fairseq_knnlm.store.datastore import (
    Datastore,
    check_finite_keys,
    open_datastore,
)
from fairseq_knnlm.store.memmaps import release_pages, write_json_atomic

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]



def _trained_path(index_path: PathLike) -> Path:
    return Path(f"{index_path}.trained")


def _partial_path(index_path: PathLike) -> Path:
    return Path(f"{index_path}.partial")


def _write_index_atomic(index: Any, path: Path) -> None:
    faiss = _faiss()
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


def sample_train_ids(ntotal: int, train_size: int, seed: int) -> np.ndarray:
    """Training rows drawn without replacement with a fixed seed, sorted for memmap reads."""
    rng = np.random.default_rng(seed)
    n = min(train_size, ntotal)
    if n == ntotal:
        return np.arange(ntotal)
    return np.sort(rng.choice(ntotal, size=n, replace=False))


def _read_keys(ds: Datastore, ids_or_slice: Any, window: int = 1 << 20,
               progress: Optional[Progress] = None) -> np.ndarray:
    """Rows as float32; sorted id arrays are read window by window, releasing the memmap's
    pages after each, so RSS stays at the rows returned, not the pages touched."""
    assert ds.keys is not None
    if isinstance(ids_or_slice, slice):
        out = np.ascontiguousarray(ds.keys[ids_or_slice], dtype=np.float32)
        release_pages(ds.keys)
        check_finite_keys(ds, out, ids_or_slice.indices(ds.size)[0])
        return out
    ids = np.asarray(ids_or_slice)
    out = np.empty((len(ids), ds.dim), dtype=np.float32)
    bounds = np.searchsorted(ids, np.arange(0, ds.size + window, window))
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            out[a:b] = ds.keys[ids[a:b]]
            release_pages(ds.keys)
            if progress is not None:
                progress.update(int(b - a))
    check_finite_keys(ds, out, ids)
    return out


def _datastore_record(ds: Datastore) -> dict[str, Any]:
    return {"prefix": str(ds.prefix), **ds.meta.fingerprint()}


def stale_reason(saved: dict[str, Any], record: dict[str, Any], what: str) -> Optional[str]:
    """None if a saved state (INDEX.trained, INDEX.partial, INDEX.parts/) was made for this
    build's ``record`` (datastore fingerprint + settings + ...); else why not, in one line."""
    if all(saved.get(k) == v for k, v in record.items()):
        return None
    old, new = saved.get("datastore") or {}, record.get("datastore") or {}
    prefix = new.get("prefix")
    if old.get("dump_id") != new.get("dump_id"):
        return (f"{what} was built from another dump of {prefix} (dump id {old.get('dump_id')}, "
                f"now {new.get('dump_id')})")
    diffs = [f"{k} {old.get(k)!r}, now {v!r}" for k, v in new.items() if old.get(k) != v]
    if diffs:
        return f"{what} was built from another datastore ({'; '.join(diffs)})"
    sold, snew = saved.get("settings") or {}, record.get("settings") or {}
    diffs = [f"{k} {sold.get(k)!r}, now {v!r}" for k, v in snew.items() if sold.get(k) != v]
    if diffs:
        return f"{what} was built with other settings ({'; '.join(diffs)})"
    diffs = [k for k, v in record.items() if saved.get(k) != v]
    return f"{what} was made for another build (different {', '.join(diffs)})"


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def train_index(ds: Datastore, settings: IndexSettings, gpu: bool = False,
                progress: bool = False) -> Any:
    """Train (no keys added) on a fixed-seed sample of the datastore's keys."""
    index = new_index(settings, ds.dim)
    if index.is_trained:
        return index
    ids = sample_train_ids(ds.size, settings.train_size, settings.seed)
    t0 = time.time()
    bar = Progress("read training sample", len(ids), enabled=progress)
    x = _read_keys(ds, ids, progress=bar)
    bar.close()
    logger.info("training %s on %d keys (read in %.1fs)", settings.describe(ds.dim), len(x),
                time.time() - t0)
    t0 = time.time()
    if gpu and settings.index_type == "ivfpq":
        gi = _to_gpu(index)
        gi.train(x)
        index = _faiss().index_gpu_to_cpu(gi)
    else:
        index.train(x)
    logger.info("trained in %.1fs (%.0f keys/s)", time.time() - t0, len(x) / max(1e-9,
                time.time() - t0))
    return index


def _trained_index(ds: Datastore, settings: IndexSettings, index_path: Path,
                   record: dict[str, Any], gpu: bool, progress: bool = False
                   ) -> tuple[Any, str]:
    """INDEX.trained if it was trained from this dump of the datastore with these settings,
    else train (and save) it. Returns the index and its trained id (random per training:
    parts of an --on-disk build must come from one trained index)."""
    faiss = _faiss()
    trained = _trained_path(index_path)
    trained_rec = Path(f"{trained}.json")
    saved = _read_json(trained_rec) if trained.exists() else None
    if saved is not None:
        why = stale_reason(saved, record, trained.name)
        if why is None and saved.get("trained_id"):
            logger.info("reusing trained index %s", trained)
            return faiss.read_index(str(trained)), str(saved["trained_id"])
        logger.warning("%s: training again", why or f"{trained_rec.name} has no trained id")
    index = train_index(ds, settings, gpu=gpu, progress=progress)
    trained_id = uuid.uuid4().hex
    _write_index_atomic(index, trained)
    write_json_atomic(trained_rec, {**record, "trained_id": trained_id})
    return index, trained_id


def _check_output(index_path: Path) -> None:
    out_dir = index_path.parent if str(index_path.parent) else Path(".")
    if not out_dir.exists():
        raise IndexBuildError(f"output folder {out_dir} does not exist")
    if not os.access(out_dir, os.W_OK):
        raise IndexBuildError(f"output folder {out_dir} is not writable")


def _resume_state(index_path: Path, record: dict[str, Any]) -> tuple[int, Optional[str]]:
    """(keys held by a usable INDEX.partial, or 0; why an INDEX.partial there is stale)."""
    partial, partial_rec = _partial_path(index_path), Path(f"{_partial_path(index_path)}.json")
    if not partial.exists():
        return 0, None
    saved = _read_json(partial_rec)
    if saved is None:
        return 0, f"{partial.name} has no readable {partial_rec.name}"
    why = stale_reason(saved, record, partial.name)
    if why is not None:
        return 0, why
    return int(saved.get("added", 0)), None


def build_index(
    dstore_prefix: PathLike,
    index_path: PathLike,
    settings: Optional[IndexSettings] = None,
    add_chunk: int = 500_000,
    starting_point: Optional[int] = None,
    checkpoint_every: int = 5_000_000,
    gpu: bool = False,
    progress: bool = True,
    stop_after: Optional[int] = None,
) -> Path:
    """Build INDEX from a datastore; resumes from INDEX.partial / INDEX.trained if present
    and made from this dump of the datastore with these settings (else they are discarded,
    with a warning; an explicit starting_point > 0 is then refused).

    stop_after (testing aid) stops, as a crash would, once that many keys are added and
    checkpointed. Returns the path of the finished index.
    """
    settings = settings or IndexSettings()
    validate_settings(settings)
    validate_build_args(add_chunk=add_chunk, checkpoint_every=checkpoint_every)
    if starting_point is not None:
        _require(starting_point >= 0, "--starting-point", starting_point, "must be >= 0")
    index_path = Path(index_path)
    ds = open_datastore(dstore_prefix)  # validates the datastore before any work
    settings = check_settings(settings, ds.size, ds.dim)
    if gpu:
        if settings.index_type in CPU_ONLY_TYPES:
            raise IndexBuildError(f"FAISS has no GPU version of {settings.index_type}: drop --gpu")
        require_gpu()
    _check_output(index_path)
    record = {"datastore": _datastore_record(ds), "settings": asdict(settings)}
    partial, partial_rec = _partial_path(index_path), Path(f"{_partial_path(index_path)}.json")

    # 1. resume point, from the saved state's record (before any work: a bad
    #    --starting-point is refused at once)
    start, stale = _resume_state(index_path, record)
    if starting_point is not None and starting_point != start:
        if stale is not None:
            raise IndexBuildError(
                f"--starting-point {starting_point} but {stale}: there is nothing to resume; "
                "omit --starting-point to build from key 0")
        raise IndexBuildError(
            f"--starting-point {starting_point} but the saved state holds {start} keys; "
            "omit --starting-point to resume from the saved state")
    if stale is not None:
        logger.warning("%s: starting again", stale)
        for p in (partial, partial_rec):
            if p.exists():
                p.unlink()
    fin_meta = meta_path(index_path)
    if fin_meta.exists():
        fin_meta.unlink()  # the old index no longer describes what is being built
    faiss = _faiss()

    # 2. the index to add to: the checkpoint, or the trained index (reused if it was trained
    #    from this dump with the same settings)
    if start > 0:
        index = faiss.read_index(str(partial))
        logger.info("resuming %s from key %d of %d", index_path, start, ds.size)
    else:
        index, _ = _trained_index(ds, settings, index_path, record, gpu, progress=progress)
    if int(index.ntotal) != start:
        raise IndexBuildError(f"{partial} holds {index.ntotal} keys, its record says {start}: "
                              f"delete {partial} and build again")

    # 3. add in chunks, with sequential ids, checkpointing now and then
    index_on = _to_gpu(index) if gpu and settings.index_type != "pca-ivfpq" else index
    bar = Progress("add", ds.size, initial=start, enabled=progress)
    t0, last_ckpt = time.time(), start
    pos = start
    try:
        while pos < ds.size:
            end = min(ds.size, pos + add_chunk)
            index_on.add(_read_keys(ds, slice(pos, end)))
            bar.update(end - pos)
            pos = end
            if pos < ds.size and (pos - last_ckpt >= checkpoint_every or
                                  (stop_after is not None and pos >= stop_after)):
                cpu = faiss.index_gpu_to_cpu(index_on) if index_on is not index else index
                _write_index_atomic(cpu, partial)
                write_json_atomic(partial_rec, {**record, "added": pos})
                last_ckpt = pos
                if stop_after is not None and pos >= stop_after:
                    raise KeyboardInterrupt(f"stopped after {pos} keys (stop_after)")
    finally:
        bar.close()
    add_time = time.time() - t0
    if index_on is not index:
        index = faiss.index_gpu_to_cpu(index_on)
    if int(index.ntotal) != ds.size:
        raise IndexBuildError(f"index holds {index.ntotal} keys, datastore {ds.size}")
    _write_index_atomic(index, index_path)
    write_json_atomic(fin_meta, {**record, "ntotal": int(index.ntotal), "complete": True})
    for p in (partial, partial_rec):
        if p.exists():
            p.unlink()
    logger.info("wrote %s: %d keys added in %.1fs (%.0f keys/s)", index_path, ds.size - start,
                add_time, (ds.size - start) / max(1e-9, add_time))
    return index_path

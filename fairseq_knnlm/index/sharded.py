"""Sharded indexes: one FAISS index file per slice of the datastore, tied by a manifest at the
index path, built shard by shard (in this process, or as Ray tasks: index/ray_build.py) and
searched as one (faiss ``IndexShards`` in this process, or one Ray actor per shard:
search/ray_search.py).

Files (INDEX is the ``--faiss-index`` / ``--indexfile`` path, whatever the engine):

    INDEX                        the manifest (JSON): format, shards [{path, lo, hi, ntotal}],
                                 trained id, settings, datastore fingerprint
    INDEX.meta.json              the usual sidecar ("sharded": true), so every loader's
                                 datastore check (``check_index_matches``) applies unchanged
    INDEX.shard{I}of{N}          shard I: rows [lo, hi) of the datastore added, with their
                                 global ids (lo..hi-1), to a copy of the trained index
    INDEX.shard{I}of{N}.meta.json  what shard I was built from (rows, count, fingerprint,
                                 trained id); a shard whose record disagrees is rebuilt (build)
                                 or refused (search), naming the shard
    INDEX.trained(.json)         the trained, empty index (trained once, on the sample)

Ids are global and contiguous across shards (shard 0 holds 0..n0-1, shard 1 n0.., ...), so
pointers step to id + 1 as in an unsharded index. The k nearest of all shards are merged as
FAISS's ``IndexShards`` does (``merge_topk``: faiss.merge_knn_results, the same C++ merge,
ties included), so a sharded flat index answers exactly as the unsharded one.

Plain numpy + FAISS (lazily); no Ray here.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

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
    set_probe,
    validate_build_args,
    validate_settings,
)
from fairseq_knnlm.progress import Progress
from fairseq_knnlm.store.datastore import Datastore, DatastoreError, open_datastore
from fairseq_knnlm.store.memmaps import write_json_atomic

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

MANIFEST_FORMAT = "fairseq-knnlm-sharded-index"
MANIFEST_VERSION = 1
# testing aid: the shard whose first build attempt dies (os._exit), as a killed worker would
KILL_SHARD_ENV = "FAIRSEQ_KNNLM_TEST_KILL_SHARD"


class ShardError(IndexBuildError):
    """A shard of a sharded index that is missing, unfinished or does not match its keys."""


def shard_path(index_path: PathLike, i: int, n: int) -> Path:
    return Path(f"{index_path}.shard{i}of{n}")


def slice_ranges(ds: Datastore, num: Optional[int]) -> list[tuple[int, int]]:
    """Row ranges of the shards: ``num`` contiguous slices of sizes differing by at most 1,
    or (None) the datastore's own shards (one range for an unsharded datastore)."""
    if num is None:
        shards = ds.meta.extra.get("shards")
        sizes = [int(r["size"]) for r in shards] if shards else [ds.size]
        bounds = np.cumsum([0] + sizes)
        return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if num < 1:
        raise IndexBuildError(f"--shards must be >= 1 (or 0: the datastore's own shards), "
                              f"got {num}")
    if num > ds.size:
        raise IndexBuildError(f"--shards {num} exceeds the datastore's {ds.size} entries")
    base, rem = divmod(ds.size, num)
    out, lo = [], 0
    for i in range(num):
        hi = lo + base + (1 if i < rem else 0)
        out.append((lo, hi))
        lo = hi
    return out


# ---- the manifest ----

@dataclass
class ShardEntry:
    path: Path  # absolute (resolved against the manifest's folder)
    lo: int
    hi: int

    @property
    def ntotal(self) -> int:
        return self.hi - self.lo


@dataclass
class IndexManifest:
    path: Path
    shards: list[ShardEntry]
    ntotal: int
    dim: int
    trained_id: str
    record: dict[str, Any]  # {"datastore": ..., "settings": ...}

    def name(self, i: int) -> str:
        return f"shard {i} of {len(self.shards)} ({self.shards[i].path})"


def is_sharded(index_path: PathLike) -> bool:
    """Whether INDEX is a sharded index's manifest (its sidecar says so)."""
    rec = _read_json(meta_path(index_path)) or {}
    return bool(rec.get("sharded"))


def read_manifest(index_path: PathLike) -> IndexManifest:
    """The manifest at INDEX, checked for shape (contiguous rows from 0, counts adding up);
    ShardError in one line otherwise."""
    index_path = Path(index_path)
    try:
        man = json.loads(index_path.read_text())
    except (OSError, ValueError) as e:
        raise ShardError(f"{index_path}: not a readable sharded-index manifest ({e})") from e
    if not isinstance(man, dict) or man.get("format") != MANIFEST_FORMAT:
        raise ShardError(f"{index_path}: not a sharded-index manifest (format "
                         f"{man.get('format') if isinstance(man, dict) else None!r})")
    try:
        shards = [ShardEntry(index_path.parent / str(s["path"]), int(s["lo"]), int(s["hi"]))
                  for s in man["shards"]]
        ntotal, dim, trained_id = int(man["ntotal"]), int(man["dim"]), str(man["trained_id"])
    except (KeyError, TypeError, ValueError) as e:
        raise ShardError(f"{index_path}: lacks shards[].path/lo/hi, ntotal, dim or trained_id "
                         f"({e})") from e
    pos = 0
    for i, s in enumerate(shards):
        if s.lo != pos or s.hi <= s.lo:
            raise ShardError(f"{index_path}: shard {i} holds rows [{s.lo}, {s.hi}), expected "
                             f"rows from {pos} (shards must be contiguous and non-empty)")
        pos = s.hi
    if not shards or pos != ntotal:
        raise ShardError(f"{index_path}: the shards hold {pos} rows, the manifest says {ntotal}")
    return IndexManifest(path=index_path, shards=shards, ntotal=ntotal, dim=dim,
                         trained_id=trained_id,
                         record={"datastore": man.get("datastore"),
                                 "settings": man.get("settings")})


def check_shard(man: IndexManifest, i: int) -> dict[str, Any]:
    """Shard i exists, finished, and was built from the manifest's rows, datastore dump and
    trained index; returns its record. ShardError naming the shard otherwise."""
    s = man.shards[i]
    rec_path = meta_path(s.path)
    if not s.path.exists():
        raise ShardError(f"{man.name(i)}: file not found (listed in {man.path})")
    rec = _read_json(rec_path)
    if rec is None or not rec.get("complete"):
        raise ShardError(f"{man.name(i)}: {rec_path.name} missing or unfinished: build it "
                         "again with knnlm-build-index")
    if (int(rec.get("lo", -1)), int(rec.get("hi", -1))) != (s.lo, s.hi) or \
            int(rec.get("ntotal", -1)) != s.ntotal:
        raise ShardError(f"{man.name(i)} holds {rec.get('ntotal')} keys of rows "
                         f"[{rec.get('lo')}, {rec.get('hi')}), {man.path} lists {s.ntotal} "
                         f"keys of rows [{s.lo}, {s.hi}): rebuild the index")
    why = stale_reason(rec, {"datastore": man.record["datastore"],
                             "trained_id": man.trained_id}, man.name(i))
    if why is not None:
        raise ShardError(f"{why}: rebuild the index")
    return rec


def check_loaded_shard(man: IndexManifest, i: int, index: Any) -> None:
    """A shard's FAISS index holds the rows the manifest says (count and dimension)."""
    s = man.shards[i]
    if int(index.ntotal) != s.ntotal or int(index.d) != man.dim:
        raise ShardError(f"{man.name(i)} holds {index.ntotal} keys of dim {index.d}, "
                         f"{man.path} lists {s.ntotal} keys of dim {man.dim}: rebuild the index")


# ---- merging the shards' top-k ----

def merge_topk(dists: list[np.ndarray], ids: list[np.ndarray], k: int,
               extra: Optional[list[np.ndarray]] = None
               ) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """The k nearest of every shard's (n, k) results, as FAISS's IndexShards merges them
    (faiss.merge_knn_results: a heap over the shards' sorted lists, smallest distance first,
    equal distances in shard order, -1 ids skipped, missing slots -1 / +inf). ``extra``
    (n, k) arrays per shard (the exact distances) are carried along with their ids."""
    faiss = _faiss()
    all_d = np.ascontiguousarray(np.stack(dists), dtype=np.float32)
    all_i = np.ascontiguousarray(np.stack(ids), dtype=np.int64)
    if all_d.shape[0] == 1:
        d, i = all_d[0], all_i[0]
    else:
        d, i = faiss.merge_knn_results(all_d, all_i, keep_max=False)
    if extra is None:
        return d, i, None
    return d, i, carry_along(all_i, np.stack(extra), i)


def carry_along(ids: np.ndarray, values: np.ndarray, merged: np.ndarray) -> np.ndarray:
    """For each merged id (n, k), the value its shard returned with it: ids (S, n, k) are
    unique per row across shards (global ids); -1 ids give +inf."""
    S, n, k = ids.shape
    flat_ids = ids.transpose(1, 0, 2).reshape(n, S * k)
    flat_vals = values.transpose(1, 0, 2).reshape(n, S * k)
    order = np.argsort(flat_ids, axis=1, kind="stable")
    sid = np.take_along_axis(flat_ids, order, axis=1)
    pos = np.stack([np.searchsorted(sid[r], merged[r]) for r in range(n)]) if n else \
        np.zeros((0, merged.shape[1]), dtype=np.int64)
    pos = np.minimum(pos, S * k - 1)
    out = np.take_along_axis(flat_vals, np.take_along_axis(order, pos, axis=1), axis=1)
    return np.where(merged >= 0, out, np.inf).astype(np.float32)


# ---- loading in this process ----

def load_shard(man: IndexManifest, i: int, probe: int, mmap: bool = False) -> Any:
    """Shard i's FAISS index, checked against the manifest, with nprobe set."""
    faiss = _faiss()
    check_shard(man, i)
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
        index = faiss.read_index(str(man.shards[i].path), flags)
    except RuntimeError as e:
        raise ShardError(f"{man.name(i)}: FAISS cannot read it ({str(e).splitlines()[0]})"
                         ) from e
    check_loaded_shard(man, i, index)
    set_probe(index, probe)
    return index


def load_sharded_local(index_path: PathLike, probe: int, mmap: bool = False) -> Any:
    """All shards in this process as one faiss ``IndexShards`` (global ids kept): the
    single-process search over the shards."""
    faiss = _faiss()
    man = read_manifest(index_path)
    shards = [load_shard(man, i, probe, mmap) for i in range(len(man.shards))]
    index = faiss.IndexShards(man.dim, False, False)  # not threaded, ids kept as built
    for s in shards:
        index.add_shard(s)
    # faiss's add_shard keeps a reference to each shard (referenced_objects)
    return index


# ---- building ----

def _shard_record(record: dict[str, Any], trained_id: str, i: int, n: int, lo: int, hi: int
                  ) -> dict[str, Any]:
    return {**record, "trained_id": trained_id, "shard_id": i, "num_shards": n, "lo": lo,
            "hi": hi}


def add_shard(dstore_prefix: str, trained: str, lo: int, hi: int, out: str, add_chunk: int,
              threads: int, record: dict[str, Any]) -> int:
    """Add rows [lo, hi) of the datastore, with ids lo..hi-1, to a copy of the trained index;
    write it to ``out`` and its record (``out``.meta.json, "complete") after it. A task of
    the sharded build (in this process or a Ray worker). Returns the keys added."""
    kill = os.environ.get(KILL_SHARD_ENV)
    if kill is not None and int(kill.split(":")[0]) == record["shard_id"]:
        marker = Path(f"{out}.killed")
        if not marker.exists():  # the first attempt dies as a killed worker would
            marker.write_text("1")
            os._exit(1)
    faiss = _faiss()
    if threads > 0:
        faiss.omp_set_num_threads(threads)
    ds = open_datastore(dstore_prefix)
    index = faiss.read_index(trained)
    if isinstance(faiss.downcast_index(index), faiss.IndexFlat):
        index = faiss.IndexIDMap(index)  # a flat index keeps no ids of its own (the wrapper
        #                                  keeps a reference to the flat index it wraps)
    for a in range(lo, hi, add_chunk):
        b = min(hi, a + add_chunk)
        index.add_with_ids(_read_keys(ds, slice(a, b)), np.arange(a, b, dtype=np.int64))
    n = int(index.ntotal)
    _write_index_atomic(index, Path(out))
    write_json_atomic(meta_path(out), {**record, "ntotal": n, "complete": True})
    return n


Runner = Callable[[list[tuple]], Iterable[tuple[int, int]]]


def run_local(tasks: list[tuple]) -> Iterable[tuple[int, int]]:
    """The shards one after the other in this process: yields (task index, keys added)."""
    for j, t in enumerate(tasks):
        yield j, add_shard(*t)


def _done_shards(index_path: Path, ranges: list[tuple[int, int]], record: dict[str, Any],
                 trained_id: str) -> list[bool]:
    """Which shards are finished and made for this build (rows, count, dump, settings,
    trained index); stale ones are deleted, with a warning."""
    n, done = len(ranges), []
    for i, (lo, hi) in enumerate(ranges):
        p = shard_path(index_path, i, n)
        rec = _read_json(meta_path(p)) if p.exists() else None
        want = {**_shard_record(record, trained_id, i, n, lo, hi), "ntotal": hi - lo,
                "complete": True}
        ok = rec is not None and stale_reason(rec, want, f"shard {i} of {n} ({p.name})") is None
        if not ok and (p.exists() or meta_path(p).exists()):
            why = (stale_reason(rec, want, f"shard {i} of {n} ({p.name})") if rec else
                   f"shard {i} of {n} ({p.name}) has no finished record")
            logger.warning("%s: building it again", why)
            for f in (p, meta_path(p)):
                f.unlink(missing_ok=True)
        done.append(ok)
    return done


def build_index_sharded(
    dstore_prefix: PathLike,
    index_path: PathLike,
    settings: Optional[IndexSettings] = None,
    num_shards: Optional[int] = None,
    add_chunk: int = 500_000,
    runner: Optional[Runner] = None,
    threads: int = 0,
    merge_on_disk: bool = False,
    progress: bool = True,
    stop_after_shards: Optional[int] = None,
) -> Path:
    """Train once (or reuse INDEX.trained), add each shard's rows to a copy of it (``runner``:
    in this process by default; index/ray_build.py runs them as Ray tasks), then write the
    manifest at INDEX (or, ``merge_on_disk``, merge the shards' lists into one on-disk IVF
    index, INDEX + INDEX.ivfdata, as ``--on-disk`` does). Finished shards made for this build
    are not redone. stop_after_shards (testing aid) stops, as a crash would, after that many
    shards are written."""
    settings = settings or IndexSettings()
    validate_settings(settings)
    validate_build_args(add_chunk=add_chunk)
    index_path = Path(index_path)
    ds = open_datastore(dstore_prefix)
    settings = check_settings(settings, ds.size, ds.dim)
    if merge_on_disk and settings.index_type in ("flat", *CPU_ONLY_TYPES):
        raise IndexBuildError(f"--on-disk merges IVF inverted lists of 8-bit PQ codes: use "
                              f"ivfpq, opq-ivfpq or pca-ivfpq, not {settings.index_type}")
    _check_output(index_path)
    ranges = slice_ranges(ds, num_shards)
    record = {"datastore": _datastore_record(ds), "settings": asdict(settings)}
    fin_meta = meta_path(index_path)
    if fin_meta.exists():
        fin_meta.unlink()  # the old index no longer describes what is being built
    _, trained_id = _trained_index(ds, settings, index_path, record, gpu=False,
                                   progress=progress)
    trained = _trained_path(index_path)
    n = len(ranges)
    done = _done_shards(index_path, ranges, record, trained_id)
    todo = [i for i in range(n) if not done[i]]
    if len(todo) < n:
        logger.info("resuming: %d of %d shards already built", n - len(todo), n)
    tasks = [(str(dstore_prefix), str(trained), ranges[i][0], ranges[i][1],
              str(shard_path(index_path, i, n)), add_chunk, threads,
              _shard_record(record, trained_id, i, n, *ranges[i])) for i in todo]
    bar = Progress("add (shards)", ds.size,
                   initial=ds.size - sum(ranges[i][1] - ranges[i][0] for i in todo),
                   enabled=progress)
    t0, finished = time.time(), 0
    try:
        for j, added in (runner or run_local)(tasks):
            i = todo[j]
            lo, hi = ranges[i]
            if added != hi - lo:
                raise ShardError(f"shard {i} of {n} holds {added} keys, expected {hi - lo}")
            bar.update(added)
            finished += 1
            if stop_after_shards is not None and finished >= stop_after_shards and \
                    finished < len(todo):
                raise KeyboardInterrupt(f"stopped after {finished} shards (stop_after_shards)")
    finally:
        bar.close()
    add_time = time.time() - t0
    entries = [{"path": shard_path(index_path, i, n).name, "lo": lo, "hi": hi,
                "ntotal": hi - lo} for i, (lo, hi) in enumerate(ranges)]
    man = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "num_shards": n,
           "ntotal": ds.size, "dim": ds.dim, "trained_id": trained_id, **record,
           "shards": entries}
    if merge_on_disk:
        _merge_on_disk(index_path, [shard_path(index_path, i, n) for i in range(n)], trained,
                       record, ds.size)
    else:
        # the manifest, then its sidecar (what marks the index finished), both atomic
        write_json_atomic(index_path, man)
        write_json_atomic(fin_meta, {**record, "ntotal": ds.size, "complete": True,
                                     "sharded": True, "num_shards": n,
                                     "trained_id": trained_id})
    logger.info("wrote %s: %d keys in %d shards (%d built now in %.1fs, %.0f keys/s)%s",
                index_path, ds.size, n, len(todo), add_time,
                sum(ranges[i][1] - ranges[i][0] for i in todo) / max(1e-9, add_time),
                " merged into one on-disk index" if merge_on_disk else "")
    return index_path


def _merge_on_disk(index_path: Path, shards: list[Path], trained: Path,
                   record: dict[str, Any], size: int) -> None:
    """The shards' inverted lists merged into INDEX.ivfdata (faiss.contrib.ondisk), as the
    --on-disk build does; the shard files are removed after."""
    from faiss.contrib.ondisk import merge_ondisk

    from fairseq_knnlm.index.ondisk import ivfdata_path

    faiss = _faiss()
    ivf = ivfdata_path(index_path)
    ivf.unlink(missing_ok=True)
    index = faiss.read_index(str(trained))
    merge_ondisk(index, [str(f) for f in shards], str(ivf.resolve()))
    if int(index.ntotal) != size:
        raise IndexBuildError(f"merged index holds {index.ntotal} keys, datastore {size}")
    _write_index_atomic(index, index_path)
    write_json_atomic(meta_path(index_path), {**record, "ntotal": int(index.ntotal),
                                              "complete": True, "on_disk": True,
                                              "ivfdata": ivf.name, "parts": len(shards)})
    for f in shards:
        f.unlink()
        meta_path(f).unlink(missing_ok=True)


def shard_needs(man: IndexManifest, keys_in_memory: bool, key_bytes: int, mmap: bool
                ) -> list[int]:
    """Bytes of RAM each shard's server holds: its index file (unless memory-mapped) and,
    with --move-dstore-to-mem, its rows of keys."""
    out = []
    for s in man.shards:
        size = 0 if mmap else (s.path.stat().st_size if s.path.exists() else 0)
        out.append(size + (s.ntotal * man.dim * key_bytes if keys_in_memory else 0))
    return out


def check_capacity(needs: list[int], node_memory: list[float], where: str,
                   names: Optional[list[str]] = None) -> None:
    """Refuse, before any work, shards that no node can hold (each needs one actor with its
    bytes) or more than the cluster holds in all. One line naming the shard."""
    if not node_memory:
        raise DatastoreError(f"{where}: the Ray cluster reports no node memory")
    biggest = max(node_memory)
    for i, need in enumerate(needs):
        if need > biggest:
            name = names[i] if names else f"shard {i} of {len(needs)}"
            raise DatastoreError(
                f"{name} needs {need / 1e9:.2f} GB in one actor, the largest node of {where} "
                f"offers {biggest / 1e9:.2f} GB: build more shards (knnlm-build-index "
                "--shards N) or add bigger nodes")
    if sum(needs) > sum(node_memory):
        raise DatastoreError(
            f"the {len(needs)} shards need {sum(needs) / 1e9:.2f} GB in all, {where} offers "
            f"{sum(node_memory) / 1e9:.2f} GB: add nodes")

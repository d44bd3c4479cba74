"""FAISS index over a datastore: build (train -> save trained -> add in chunks, resumable)
and load (with nprobe, optional memory mapping and GPU).

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

On-disk build (``build_index_ondisk``, ``knnlm-build-index --on-disk``) for datastores whose
index does not fit in RAM: train once, add each range of rows (``--add-shard-size``) to its
own IVF index in a worker process (``--workers``), then merge the inverted lists into one
``OnDiskInvertedLists`` file with faiss.contrib.ondisk.merge_ondisk:
    INDEX               the index: quantizer + PQ tables; lists live in INDEX.ivfdata
    INDEX.ivfdata       the merged inverted lists, memory-mapped at query time
    INDEX.parts/        the per-range indexes (kept until the merge is done: resumable)
Workers exit when the building process dies (PR_SET_PDEATHSIG on Linux, plus a thread that
polls the parent's pid).

CLI: ``knnlm-build-index --dstore-mmap PREFIX --faiss-index PREFIX.index`` (cli/build_index.py).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from fairseq_knnlm.errors import FlagError, KNNLMError
from fairseq_knnlm.progress import Progress
from fairseq_knnlm.store.datastore import (
    Datastore,
    DatastoreError,
    check_finite_keys,
    open_datastore,
)
from fairseq_knnlm.store.memmaps import release_pages, write_json_atomic

logger = logging.getLogger(__name__)

INDEX_TYPES = ("ivfpq", "flat", "opq-ivfpq", "pca-ivfpq", "ivfpq-fastscan")
# ivfpq-fastscan: the same IVF lists and bytes per vector, but 2 x code_size sub-quantizers of
# 4 bits scanned with SIMD (faiss "PQ{M}x4fs"): on WikiText-2 (2 cores) ~5x the queries/s of
# the paper's 8-bit PQ at recall@1024 0.80 instead of 0.89 (benchmarks/search_bench.py).
# CPU only, not --on-disk.
MIN_POINTS_PER_CENTROID = 39  # below this FAISS warns that k-means is under-trained
PathLike = Union[str, os.PathLike]
# testing aid: seconds each --on-disk worker sleeps before adding (a build slow enough to kill)
WORKER_DELAY_ENV = "FAIRSEQ_KNNLM_TEST_WORKER_DELAY_S"
PARENT_POLL_S = 1.0  # how often an --on-disk worker checks that its parent is alive


class IndexBuildError(KNNLMError):
    """Bad settings or inputs for an index build, reported before any work is done."""


class IndexFlagError(IndexBuildError, FlagError):
    """A build flag out of range (also a ValueError)."""


@dataclass
class IndexSettings:
    index_type: str = "ivfpq"
    ncentroids: int = 4096
    code_size: int = 64
    train_size: int = 1_000_000
    probe: int = 32
    seed: int = 1
    pca_dim: int = 512

    def describe(self, dim: int) -> str:
        if self.index_type == "flat":
            return "Flat"
        if self.index_type == "ivfpq-fastscan":
            return f"IVF{self.ncentroids},PQ{2 * self.code_size}x4fs"
        pre = {"ivfpq": "", "opq-ivfpq": f"OPQ{self.code_size},",
               "pca-ivfpq": f"PCA{self.pca_dim},"}[self.index_type]
        return f"{pre}IVF{self.ncentroids},PQ{self.code_size}"


def _faiss():
    import faiss  # imported lazily: the datastore and maths modules do not need it

    return faiss


def meta_path(index_path: PathLike) -> Path:
    return Path(f"{index_path}.meta.json")


def _trained_path(index_path: PathLike) -> Path:
    return Path(f"{index_path}.trained")


def _partial_path(index_path: PathLike) -> Path:
    return Path(f"{index_path}.partial")


def _write_index_atomic(index: Any, path: Path) -> None:
    faiss = _faiss()
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


def _require(ok: bool, flag: str, value: Any, rule: str = "must be positive") -> None:
    if not ok:
        raise IndexFlagError(f"{flag} {rule}, got {value}")


def validate_settings(settings: IndexSettings) -> None:
    """Refuse settings no datastore can make sense of (before any file is read): FAISS would
    segfault (--ncentroids 0) or raise a SWIG traceback (negative values)."""
    if settings.index_type not in INDEX_TYPES:
        raise IndexFlagError(f"--index-type must be one of {INDEX_TYPES}, "
                             f"got {settings.index_type!r}")
    for flag, v in (("--ncentroids", settings.ncentroids), ("--code-size", settings.code_size),
                    ("--train-size", settings.train_size), ("--probe", settings.probe),
                    ("--pca-dim", settings.pca_dim)):
        _require(v > 0, flag, v)
    _require(settings.seed >= 0, "--seed", settings.seed, "must be >= 0")  # numpy's rule


def validate_build_args(add_chunk: int = 1, checkpoint_every: int = 1,
                        shard_size: Optional[int] = None, workers: int = 1) -> None:
    """Refuse build arguments out of range (--num-keys-to-add-at-a-time 0 would loop forever)."""
    _require(add_chunk > 0, "--num-keys-to-add-at-a-time", add_chunk)
    _require(checkpoint_every > 0, "--checkpoint-every", checkpoint_every)
    _require(workers > 0, "--workers", workers)
    if shard_size is not None:
        _require(shard_size > 0, "--add-shard-size", shard_size,
                 "must be positive (or 0 on the command line: one part per datastore shard)")


def check_settings(settings: IndexSettings, ntotal: int, dim: int) -> IndexSettings:
    """Validate settings against the datastore; pick a smaller ncentroids if needed (logged)."""
    validate_settings(settings)
    if ntotal <= 0:
        raise IndexBuildError("the datastore is empty")
    if settings.index_type == "flat":
        return settings
    eff_dim = settings.pca_dim if settings.index_type == "pca-ivfpq" else dim
    if settings.index_type == "pca-ivfpq" and settings.pca_dim > dim:
        raise IndexBuildError(f"--pca-dim {settings.pca_dim} exceeds the key dimension {dim}")
    if settings.index_type == "ivfpq-fastscan":
        m = 2 * settings.code_size  # 4-bit sub-quantizers: two per byte
        if settings.code_size <= 0 or eff_dim % m != 0:
            ok = [c for c in (8, 16, 32, 48, 64, 96, 128) if eff_dim % (2 * c) == 0]
            raise IndexBuildError(
                f"--index-type ivfpq-fastscan uses 2 x --code-size = {m} sub-quantizers of 4 "
                f"bits, which must divide the dimension {eff_dim}; try --code-size in {ok}")
    elif settings.code_size <= 0 or eff_dim % settings.code_size != 0:
        divisors = [m for m in (8, 16, 32, 48, 64, 96, 128) if eff_dim % m == 0]
        raise IndexBuildError(
            f"--code-size {settings.code_size} must divide the dimension {eff_dim} (one "
            f"sub-quantizer per {eff_dim}/M dims); try one of {divisors}")
    n_train = min(settings.train_size, ntotal)
    if n_train < 256:
        raise IndexBuildError(
            f"only {n_train} keys to train on: PQ needs at least 256 (2^8 codes); use "
            "--index-type flat for a datastore this small")
    nc = settings.ncentroids
    if n_train < nc * MIN_POINTS_PER_CENTROID:
        best = 1 << max(0, int(np.log2(max(1, n_train // MIN_POINTS_PER_CENTROID))))
        logger.warning(
            "%d training keys are too few for %d centroids (FAISS wants ~%d per centroid): "
            "using --ncentroids %d; pass it explicitly to silence this", n_train, nc,
            MIN_POINTS_PER_CENTROID, best)
        settings = IndexSettings(**{**asdict(settings), "ncentroids": best})
    return settings


def new_index(settings: IndexSettings, dim: int) -> Any:
    """An untrained FAISS index for the settings (L2 metric throughout, as in the paper)."""
    faiss = _faiss()
    if settings.index_type == "flat":
        return faiss.IndexFlatL2(dim)
    if settings.index_type == "ivfpq":
        quantizer = faiss.IndexFlatL2(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, settings.ncentroids, settings.code_size, 8)
        index.own_fields = True
        quantizer.this.disown()
        return index
    return faiss.index_factory(dim, settings.describe(dim), faiss.METRIC_L2)


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


def _gpu_available() -> bool:
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def require_gpu() -> None:
    if not _gpu_available():
        raise IndexBuildError(
            "--gpu needs a CUDA build of FAISS and a visible GPU; this faiss has "
            f"{'no GPU support' if not hasattr(_faiss(), 'StandardGpuResources') else '0 GPUs'}"
            " (pip install 'fairseq-knnlm[gpu]' on a CUDA machine)")


def _to_gpu(index: Any, all_gpus: bool = False) -> Any:
    """A GPU copy of the index: on GPU 0, or (all_gpus, more than one visible) split over
    every GPU with faiss's IndexShards, each GPU holding 1/N of the vectors."""
    faiss = _faiss()
    ngpu = faiss.get_num_gpus()
    if all_gpus and ngpu > 1:
        co = faiss.GpuMultipleClonerOptions()
        co.useFloat16 = True
        co.shard = True  # IndexShards rather than replicas: the index need not fit one GPU
        logger.info("sharding the index over %d GPUs", ngpu)
        return faiss.index_cpu_to_all_gpus(index, co, ngpu=ngpu)
    res = faiss.StandardGpuResources()
    co = faiss.GpuClonerOptions()
    co.useFloat16 = True  # fp16 lookup tables: needed for 64-byte PQ codes on GPU
    gi = faiss.index_cpu_to_gpu(res, 0, index, co)
    gi._res = res  # keep the resources alive as long as the index
    return gi


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
        if settings.index_type == "ivfpq-fastscan":
            raise IndexBuildError("FAISS has no GPU version of ivfpq-fastscan: drop --gpu")
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
    if settings.index_type in ("flat", "ivfpq-fastscan"):
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


def read_index_record(index_path: PathLike) -> dict[str, Any]:
    """The sidecar of a finished index; raises if the index is missing or unfinished."""
    index_path = Path(index_path)
    if not index_path.exists():
        raise DatastoreError(f"FAISS index {index_path} not found")
    mp = meta_path(index_path)
    if not mp.exists():
        raise DatastoreError(f"{mp} not found: {index_path} was not built by knnlm-build-index "
                             "(or its build did not finish); rebuild it")
    return json.loads(mp.read_text())


def check_index_matches(index_path: PathLike, ds: Datastore) -> dict[str, Any]:
    """Refuse an index that was built from another datastore, or from another dump of this
    one (dump id), naming both sides. An index recorded before dump ids existed is checked
    on the fields it recorded, as long as the datastore is that old too (no dump id)."""
    rec = read_index_record(index_path)
    built = rec.get("datastore", {})
    have = ds.meta.fingerprint()
    legacy = "dump_id" not in built and ds.meta.dump_id is None
    diffs = [f"{k}: index built from {built.get(k)!r}, datastore has {v!r}"
             for k, v in have.items() if built.get(k) != v and not (legacy and k not in built)]
    if diffs:
        hint = ("the datastore was dumped again after the index was built: rebuild it with "
                "knnlm-build-index" if built.get("dump_id") != have["dump_id"] else "")
        raise DatastoreError(f"{index_path} does not belong to datastore {ds.prefix}: "
                             + "; ".join(diffs) + (f" ({hint})" if hint else ""))
    return rec


def load_index(index_path: PathLike, probe: int = 32, gpu: bool = False,
               mmap: bool = False) -> Any:
    """Read an index, set nprobe, optionally memory-map it (IO_FLAG_MMAP: the inverted lists
    stay on disk; an on-disk index's lists are always memory-mapped from INDEX.ivfdata) or
    move it to the GPU(s)."""
    faiss = _faiss()
    mp = meta_path(index_path)
    rec = json.loads(mp.read_text()) if mp.exists() else {}
    on_disk = bool(rec.get("on_disk"))
    if gpu and rec.get("settings", {}).get("index_type") == "ivfpq-fastscan":
        raise IndexBuildError(f"{index_path} is an ivfpq-fastscan index, which FAISS cannot "
                              "move to a GPU: drop --knn-gpu or build an ivfpq index")
    if on_disk:
        # the lists are memory-mapped from INDEX.ivfdata already (IO_FLAG_MMAP would crash
        # faiss here), found next to INDEX wherever the pair was moved
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR
    else:
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    index = faiss.read_index(str(index_path), flags)
    set_probe(index, probe)
    if gpu:
        require_gpu()
        index = _to_gpu(index, all_gpus=True)
        set_probe(index, probe)
    return index


def set_probe(index: Any, probe: int) -> None:
    """Set nprobe on an IVF index (also under a pre-transform, on GPU, or sharded over
    GPUs); no-op for flat indexes."""
    faiss = _faiss()
    try:
        faiss.extract_index_ivf(index).nprobe = probe
        return
    except (RuntimeError, AttributeError):
        pass
    if hasattr(faiss, "GpuParameterSpace") and not hasattr(index, "nprobe"):
        try:  # IndexShards / IndexReplicas of GPU indexes
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", probe)
            return
        except RuntimeError:
            pass
    if hasattr(index, "nprobe"):
        index.nprobe = probe


def search(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Batched search; float32 C-contiguous queries, returns (dists (n,k), ids (n,k))."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    return index.search(q, k)

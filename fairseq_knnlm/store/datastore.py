"""Datastore files for kNN-LM: a writer that fills growable memmaps and finishes
atomically, and a reader that returns validated, read-only memmap views.

A datastore with prefix PREFIX is four raw (headerless) arrays and one JSON file:

    PREFIX_keys.npy   float16 or float32, shape (N, D)   f(c_t), the context vectors
    PREFIX_vals.npy   int32, shape (N, 1)                 w_t, the token predicted from c_t
    PREFIX_pos.npy    int64, shape (N,)                   offset of w_t in the subset's token stream
    PREFIX_meta.json  size, dim, dtypes, key type, model and dictionary hashes, ...

The arrays keep the authors' raw memmap layout so their tools can read them; the meta file
is new and is written last: a dump that was killed leaves only ``*.tmp`` files and no meta
file, so it can never be taken for a finished datastore. While a dump runs it holds
PREFIX.lock, so a second dump to the same prefix fails at once instead of mixing its rows in.
Every dump has a random ``dump_id`` (in the meta and its fingerprint): indexes and resumable
index builds recognise a prefix that was dumped again.

A sharded dump (one datastore per worker) is read as one through PREFIX_manifest.json: see
shards.py. ``read_meta`` and ``open_datastore`` accept either kind of prefix. File names, the
meta record and the errors are defined in dstore_meta.py and re-exported here.

Usage (read side, as the index builder and the scorer do):

    ds = open_datastore("runs/wt2/dstore/train")
    ds.keys[123], ds.vals[123, 0], ds.pos[123]
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from fairseq_knnlm.store.memmaps import (
    DiskFullError,
    LockBusy,
    RowWriter,
    WriterLock,
    copy_to_memory,
    open_rows,
    write_json_atomic,
)
from fairseq_knnlm.store.meta import (  # noqa: F401  (re-exported: the public names of the datastore)
    FINGERPRINT_FIELDS,
    FORMAT_VERSION,
    KEY_DTYPES,
    POS_DTYPE,
    SHARED_FIELDS,
    VAL_DTYPE,
    DatastoreError,
    DatastoreMeta,
    ShardNotReady,
    combined_dump_id,
    keys_path,
    lock_path,
    manifest_path,
    meta_path,
    pos_path,
    read_meta,
    vals_path,
)
from fairseq_knnlm.store.shards import ConcatRows

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def sha256_file(path: PathLike, chunk: int = 1 << 24) -> str:
    """Content hash of a file, streamed so that multi-GB checkpoints are fine."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def dictionary_sha256(symbols: list[str]) -> str:
    """Hash of a fairseq dictionary's symbol list, in index order (counts do not matter)."""
    h = hashlib.sha256()
    for s in symbols:
        h.update(s.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


class DatastoreWriter:
    """Appends (key, value, position) rows; ``finish`` makes them a datastore.

    Rows go straight into memmapped ``*.tmp`` files that grow by doubling (blocks reserved
    as they grow, so a full disk is a DatastoreError, not a SIGBUS); ``finish`` truncates them
    to the rows actually written (no zero-filled rows at the end), renames them, and writes
    the meta file last.

    The writer holds PREFIX.lock (flock) from start to finish or abort: a second writer of
    the same prefix (another job, a re-run started too early) fails at once with a
    DatastoreError naming the prefix and the holder, so two dumps can never mix their rows.
    The kernel drops the lock when the process dies. Each writer draws a random ``dump_id``
    that goes into the meta (and so into every index built from this dump).

    expected_rows (optional): the rows the dump will write; the folder's free space is
    checked against them before the first row, and reserved.
    """

    def __init__(self, prefix: PathLike, dim: int, key_dtype: str = "float32",
                 initial_capacity: int = 1 << 20, expected_rows: Optional[int] = None) -> None:
        if key_dtype not in KEY_DTYPES:
            raise ValueError(f"key_dtype must be one of {sorted(KEY_DTYPES)}, got {key_dtype!r}")
        self.prefix = Path(prefix)
        self.dim = int(dim)
        self.key_dtype = KEY_DTYPES[key_dtype]
        self.dump_id = uuid.uuid4().hex
        try:
            self._lock = WriterLock(lock_path(self.prefix), {"dump_id": self.dump_id})
        except LockBusy as e:
            raise DatastoreError(
                f"datastore {self.prefix} is being written by another dump ({e}); wait for it "
                "to finish or dump to another --dstore-mmap") from e
        try:
            self._rows = RowWriter({
                "keys": (keys_path(self.prefix), self.key_dtype, (self.dim,)),
                "vals": (vals_path(self.prefix), VAL_DTYPE, (1,)),
                "pos": (pos_path(self.prefix), POS_DTYPE, ()),
            }, initial_capacity, expected_rows=expected_rows, label=f"datastore {self.prefix}")
        except DiskFullError as e:
            self._lock.release()
            raise DatastoreError(str(e)) from e
        except BaseException:
            self._lock.release()
            raise
        if meta_path(self.prefix).exists():
            # an earlier datastore here stops being valid the moment we start writing
            logger.warning("overwriting the datastore at %s", self.prefix)
            meta_path(self.prefix).unlink()

    @property
    def size(self) -> int:
        return self._rows.size

    def add(self, keys: np.ndarray, vals: np.ndarray, pos: np.ndarray) -> None:
        """Append n rows: keys (n, D), vals (n,) next-token ids, pos (n,) stream offsets."""
        try:
            self._rows.add(keys=keys, vals=np.asarray(vals).reshape(-1, 1), pos=pos)
        except DiskFullError as e:  # the rows' files are gone already
            self.abort()
            raise DatastoreError(str(e)) from e

    def finish(self, **meta_fields: Any) -> DatastoreMeta:
        """Truncate to the rows written, rename into place, then write the meta file."""
        size = self._rows.finish()
        meta = DatastoreMeta(size=size, dim=self.dim, key_dtype=self.key_dtype.name,
                             created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                             dump_id=self.dump_id, **meta_fields)
        write_json_atomic(meta_path(self.prefix), meta.to_json())
        self._lock.release()
        logger.info("datastore %s: %d entries of dim %d (%s keys, dump id %s)", self.prefix,
                    size, self.dim, meta.key_dtype, self.dump_id)
        return meta

    def abort(self) -> None:
        """Remove the temporary files of an unfinished dump and release the prefix (safe to
        call more than once)."""
        self._rows.abort()
        self._lock.release()


@dataclass
class Datastore:
    """Read-only views of a finished datastore. ``keys`` may be a memmap or an in-RAM copy."""

    prefix: Path
    meta: DatastoreMeta
    keys: Optional[Any]  # np.ndarray (memmap or in RAM), or ConcatRows for a sharded one
    vals: Any
    pos: Any

    @property
    def size(self) -> int:
        return self.meta.size

    @property
    def dim(self) -> int:
        return self.meta.dim


def check_finite_keys(ds: Datastore, keys: np.ndarray, rows: Union[int, np.ndarray]) -> None:
    """DatastoreError naming the datastore and the first bad row if ``keys`` (n, D), rows of
    ``ds.keys`` the caller has read (``rows``: their ids, or the id of the first of
    consecutive rows), hold NaN or inf: FAISS's k-means fails on such keys and searches give
    NaN distances, so no tool indexes or clusters them. Costs no extra read."""
    bad = ~np.isfinite(keys).all(axis=1)
    if not bad.any():
        return
    i = int(np.argmax(bad))
    row = rows + i if isinstance(rows, (int, np.integer)) else int(np.asarray(rows)[i])
    raise DatastoreError(
        f"datastore {ds.prefix}: the key of row {row} is not finite (NaN or inf; "
        f"{int(bad.sum())} such rows among the {len(bad)} read): the dump is broken (e.g. an "
        "fp16 overflow in the model); dump it again")


def _open_sharded(prefix: Path, meta: DatastoreMeta, load_keys: bool,
                  keys_in_memory: bool) -> Datastore:
    shards = []
    for i, rec in enumerate(meta.extra["shards"]):
        sp = prefix.parent / rec["prefix"]
        ds = open_datastore(sp, load_keys=load_keys)
        if ds.size != rec["size"]:
            raise DatastoreError(f"{manifest_path(prefix)}: shard {i} ({sp}) has {ds.size} "
                                 f"entries, the manifest says {rec['size']}; rewrite it with "
                                 f"knnlm-manifest {prefix}")
        if "dump_id" in rec and ds.meta.dump_id != rec["dump_id"]:
            raise DatastoreError(
                f"{manifest_path(prefix)}: shard {i} ({sp}) was dumped again after the "
                f"manifest was written (dump id {ds.meta.dump_id}, the manifest says "
                f"{rec['dump_id']}); rewrite it with knnlm-manifest {prefix} --num-shards "
                f"{meta.num_shards}")
        for f in SHARED_FIELDS:
            if getattr(ds.meta, f) != getattr(meta, f):
                raise DatastoreError(f"{sp}: {f} is {getattr(ds.meta, f)!r}, the manifest says "
                                     f"{getattr(meta, f)!r}")
        shards.append(ds)
    keys: Any = None
    if load_keys:
        keys = ConcatRows([s.keys for s in shards])
        if keys_in_memory:
            logger.info("loading %d keys from %d shards into memory", meta.size, len(shards))
            keys = copy_to_memory(keys)
    return Datastore(prefix=prefix, meta=meta, keys=keys, vals=ConcatRows([s.vals for s in shards]),
                     pos=ConcatRows([s.pos for s in shards]))


def open_datastore(
    prefix: PathLike, load_keys: bool = True, keys_in_memory: bool = False
) -> Datastore:
    """Open a finished datastore read-only, checking every file against the meta file.

    load_keys=False skips the keys (enough for FAISS distances); keys_in_memory=True copies
    them into RAM (the original's --move-dstore-to-mem), otherwise they stay memory-mapped.
    A sharded datastore (PREFIX_manifest.json) opens as one: its arrays are ConcatRows views.
    """
    prefix = Path(prefix)
    meta = read_meta(prefix)
    if meta.num_shards > 1 and "shards" in meta.extra:
        return _open_sharded(prefix, meta, load_keys, keys_in_memory)
    n, d = meta.size, meta.dim
    kd = KEY_DTYPES[meta.key_dtype]
    if np.dtype(meta.val_dtype) != VAL_DTYPE or np.dtype(meta.pos_dtype) != POS_DTYPE:
        raise DatastoreError(f"{prefix}: unsupported value/position dtypes "
                             f"{meta.val_dtype}/{meta.pos_dtype}")
    try:
        keys = open_rows(keys_path(prefix), kd, (d,), n)
        vals = open_rows(vals_path(prefix), VAL_DTYPE, (1,), n)
        pos = open_rows(pos_path(prefix), POS_DTYPE, (), n)
    except (FileNotFoundError, ValueError) as e:
        raise DatastoreError(f"datastore {prefix} disagrees with its meta file: {e}") from e
    if not load_keys:
        keys = None
    elif keys_in_memory:
        logger.info("loading %d keys (%.2f GB) into memory", n, n * d * kd.itemsize / 1e9)
        keys = copy_to_memory(keys)  # a copy: np.ascontiguousarray(memmap) maps the file
    return Datastore(prefix=prefix, meta=meta, keys=keys, vals=vals, pos=pos)


def head_datastore(src: PathLike, dst: PathLike, n: int, chunk: int = 1 << 20) -> DatastoreMeta:
    """Write the first n rows of datastore ``src`` as a datastore of its own at ``dst`` (for
    datastore-size ablations: a prefix of the corpus, as in the paper's Figure 2)."""
    ds = open_datastore(src)
    if not 0 < n <= ds.size:
        raise ValueError(f"n must be in [1, {ds.size}], got {n}")
    assert ds.keys is not None
    w = DatastoreWriter(dst, ds.dim, ds.meta.key_dtype, expected_rows=n)
    try:
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            w.add(ds.keys[s:e], ds.vals[s:e, 0], ds.pos[s:e])
    except BaseException:
        w.abort()
        raise
    # the head is one plain datastore of its own dump (not a shard, nor a sharded one)
    fields = {k: v for k, v in asdict(ds.meta).items()
              if k not in ("size", "dim", "key_dtype", "created", "extra", "val_dtype",
                           "pos_dtype", "complete", "format_version", "dump_id", "shard_id",
                           "num_shards")}
    extra = {k: v for k, v in ds.meta.extra.items() if k != "shards"}
    return w.finish(**fields, extra={**extra, "head_of": str(src), "head_rows": n,
                                     "head_of_dump_id": ds.meta.dump_id})

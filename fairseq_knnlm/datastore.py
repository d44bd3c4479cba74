"""Datastore files for kNN-LM: a writer that fills growable memmaps and finishes
atomically, and a reader that returns validated, read-only memmap views.

A datastore with prefix PREFIX is four raw (headerless) arrays and one JSON file:

    PREFIX_keys.npy   float16 or float32, shape (N, D)   f(c_t), the context vectors
    PREFIX_vals.npy   int32, shape (N, 1)                 w_t, the token predicted from c_t
    PREFIX_pos.npy    int64, shape (N,)                   offset of w_t in the subset's token stream
    PREFIX_meta.json  size, dim, dtypes, key type, model and dictionary hashes, ...

The arrays keep the authors' raw memmap layout so their tools can read them; the meta file
is new and is written last: a dump that was killed leaves only ``*.tmp`` files and no meta
file, so it can never be taken for a finished datastore.

A sharded dump (one datastore per worker) is read as one through PREFIX_manifest.json: see
shards.py. ``read_meta`` and ``open_datastore`` accept either kind of prefix.

Usage (read side, as the index builder and the scorer do):

    ds = open_datastore("runs/wt2/dstore/train")
    ds.keys[123], ds.vals[123, 0], ds.pos[123]
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from .memmaps import RowWriter, open_rows, tmp_path, write_json_atomic
from .shards import SHARED_FIELDS, ConcatRows, manifest_path, read_manifest

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
VAL_DTYPE = np.dtype(np.int32)  # the original used int16 with fp16 keys: overflows past 32767 types
POS_DTYPE = np.dtype(np.int64)
KEY_DTYPES = {"float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}

PathLike = Union[str, os.PathLike]


class DatastoreError(RuntimeError):
    """A datastore is missing, incomplete, or disagrees with its meta file."""


class ShardNotReady(DatastoreError):
    """A shard of a sharded dump has not finished (no manifest can be written yet)."""


def keys_path(prefix: PathLike) -> Path:
    return Path(f"{prefix}_keys.npy")


def vals_path(prefix: PathLike) -> Path:
    return Path(f"{prefix}_vals.npy")


def pos_path(prefix: PathLike) -> Path:
    return Path(f"{prefix}_pos.npy")


def meta_path(prefix: PathLike) -> Path:
    return Path(f"{prefix}_meta.json")


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


@dataclass
class DatastoreMeta:
    """Everything needed to use and validate a datastore; never typed by hand."""

    size: int
    dim: int
    key_dtype: str
    keytype: str
    val_dtype: str = "int32"
    pos_dtype: str = "int64"
    model_path: Optional[str] = None
    model_sha256: Optional[str] = None
    dict_size: Optional[int] = None
    dict_sha256: Optional[str] = None
    subset: Optional[str] = None
    context_window: Optional[int] = None
    tokens_per_sample: Optional[int] = None
    sample_break_mode: Optional[str] = None
    fairseq_version: Optional[str] = None
    plugin_version: Optional[str] = None
    shard_id: int = 0
    num_shards: int = 1
    created: str = ""
    complete: bool = True
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatastoreMeta:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            logger.warning("ignoring unknown datastore meta fields: %s", sorted(unknown))
        return cls(**{k: v for k, v in d.items() if k in known})

    def fingerprint(self) -> dict[str, Any]:
        """The fields an index or a scorer must agree with."""
        return {
            "size": self.size,
            "dim": self.dim,
            "keytype": self.keytype,
            "dict_sha256": self.dict_sha256,
            "model_sha256": self.model_sha256,
        }


class DatastoreWriter:
    """Appends (key, value, position) rows; ``finish`` makes them a datastore.

    Rows go straight into memmapped ``*.tmp`` files that grow by doubling; ``finish``
    truncates them to the rows actually written (no zero-filled rows at the end), renames
    them, and writes the meta file last.
    """

    def __init__(self, prefix: PathLike, dim: int, key_dtype: str = "float32",
                 initial_capacity: int = 1 << 20) -> None:
        if key_dtype not in KEY_DTYPES:
            raise ValueError(f"key_dtype must be one of {sorted(KEY_DTYPES)}, got {key_dtype!r}")
        self.prefix = Path(prefix)
        self.dim = int(dim)
        self.key_dtype = KEY_DTYPES[key_dtype]
        if meta_path(self.prefix).exists():
            # an earlier datastore here stops being valid the moment we start writing
            logger.warning("overwriting the datastore at %s", self.prefix)
            meta_path(self.prefix).unlink()
        self._rows = RowWriter({
            "keys": (keys_path(self.prefix), self.key_dtype, (self.dim,)),
            "vals": (vals_path(self.prefix), VAL_DTYPE, (1,)),
            "pos": (pos_path(self.prefix), POS_DTYPE, ()),
        }, initial_capacity)

    @property
    def size(self) -> int:
        return self._rows.size

    def add(self, keys: np.ndarray, vals: np.ndarray, pos: np.ndarray) -> None:
        """Append n rows: keys (n, D), vals (n,) next-token ids, pos (n,) stream offsets."""
        self._rows.add(keys=keys, vals=np.asarray(vals).reshape(-1, 1), pos=pos)

    def finish(self, **meta_fields: Any) -> DatastoreMeta:
        """Truncate to the rows written, rename into place, then write the meta file."""
        size = self._rows.finish()
        meta = DatastoreMeta(size=size, dim=self.dim, key_dtype=self.key_dtype.name,
                             created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **meta_fields)
        write_json_atomic(meta_path(self.prefix), meta.to_json())
        logger.info("datastore %s: %d entries of dim %d (%s keys)", self.prefix, size,
                    self.dim, meta.key_dtype)
        return meta

    def abort(self) -> None:
        """Remove the temporary files of an unfinished dump."""
        self._rows.abort()


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


def read_meta(prefix: PathLike) -> DatastoreMeta:
    """Load and sanity-check PREFIX_meta.json, explaining the usual ways it can be missing."""
    mp = meta_path(prefix)
    if not mp.exists() and manifest_path(prefix).exists():
        return _manifest_meta(prefix)
    if not mp.exists():
        if tmp_path(keys_path(prefix)).exists():
            raise DatastoreError(
                f"{prefix}: the dump did not finish (found {tmp_path(keys_path(prefix)).name}, no "
                f"{mp.name}); run the dump again")
        if keys_path(prefix).exists():
            raise DatastoreError(
                f"{prefix}: {keys_path(prefix).name} exists but {mp.name} does not; datastores "
                "from the original knnlm code carry no metadata: re-dump with this plugin")
        raise DatastoreError(f"no datastore at {prefix}: {mp} not found")
    try:
        meta = DatastoreMeta.from_dict(json.loads(mp.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise DatastoreError(f"{mp}: unreadable meta file ({e})") from e
    if not meta.complete:
        raise DatastoreError(f"{prefix}: meta file says the dump is incomplete")
    if meta.format_version > FORMAT_VERSION:
        raise DatastoreError(
            f"{prefix}: format version {meta.format_version} is newer than this plugin's "
            f"{FORMAT_VERSION}; upgrade fairseq-knnlm")
    if meta.key_dtype not in KEY_DTYPES:
        raise DatastoreError(f"{prefix}: unknown key dtype {meta.key_dtype!r}")
    return meta


def _manifest_meta(prefix: PathLike) -> DatastoreMeta:
    """The meta of a sharded datastore as a whole, from its manifest."""
    m = read_manifest(prefix)
    fields = {f: m[f] for f in DatastoreMeta.__dataclass_fields__ if f in m and f not in (
        "shard_id", "extra", "format_version")}
    fields["extra"] = {"shards": m["shards"]}
    meta = DatastoreMeta(**fields)
    if meta.key_dtype not in KEY_DTYPES:
        raise DatastoreError(f"{prefix}: unknown key dtype {meta.key_dtype!r}")
    return meta


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
            keys = np.concatenate([s.keys for s in shards])
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
        keys = np.ascontiguousarray(keys)
    return Datastore(prefix=prefix, meta=meta, keys=keys, vals=vals, pos=pos)


def head_datastore(src: PathLike, dst: PathLike, n: int, chunk: int = 1 << 20) -> DatastoreMeta:
    """Write the first n rows of datastore ``src`` as a datastore of its own at ``dst`` (for
    datastore-size ablations: a prefix of the corpus, as in the paper's Figure 2)."""
    ds = open_datastore(src)
    if not 0 < n <= ds.size:
        raise ValueError(f"n must be in [1, {ds.size}], got {n}")
    assert ds.keys is not None
    w = DatastoreWriter(dst, ds.dim, ds.meta.key_dtype, initial_capacity=n)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        w.add(ds.keys[s:e], ds.vals[s:e, 0], ds.pos[s:e])
    fields = {k: v for k, v in asdict(ds.meta).items()
              if k not in ("size", "dim", "key_dtype", "created", "extra", "val_dtype",
                           "pos_dtype", "complete", "format_version")}
    return w.finish(**fields, extra={**ds.meta.extra, "head_of": str(src), "head_rows": n})

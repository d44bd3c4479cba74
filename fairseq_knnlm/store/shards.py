"""Sharded datastores: several dumps (one per worker) read as one logical datastore.

A dump with ``--distributed-world-size N`` (one process per rank) or with ``--num-shards N
--shard-id I`` (separate runs, possibly on separate machines) writes one ordinary datastore
per shard, ``PREFIX_shard{I}of{N}``, holding a contiguous run of the corpus's blocks. The
shard that finishes last also writes ``PREFIX_manifest.json``; ``knnlm-manifest PREFIX`` writes
it by hand (for shards copied together from several machines). Every tool that takes a
datastore prefix takes ``PREFIX`` then: rows are numbered shard 0 first, then shard 1, ...

    PREFIX_manifest.json   {"num_shards", "size", "dim", "key_dtype", "keytype", ...,
                            "dump_id": hash of the shards' dump ids,
                            "shards": [{"prefix": "train_shard0of2", "size": 1234,
                                        "dump_id": "..."}, ...]}

Shard paths are stored relative to the manifest's folder, so the set can be moved together.
The manifest's sizes and dump ids are checked against each shard's own meta file when it is
opened (a shard dumped again after the manifest was written is refused). File names, the
manifest reader and the errors live in dstore_meta.py (below this module and datastore.py).

Also here: ``ConcatRows`` (row access across several memmaps without copying them) and
``contiguous_range`` (which blocks a shard dumps), plain numpy, no fairseq.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from fairseq_knnlm.store.memmaps import write_json_atomic
from fairseq_knnlm.store.meta import (  # noqa: F401  (manifest_path, read_manifest: re-exported)
    MANIFEST_VERSION,
    SHARED_FIELDS,
    DatastoreError,
    ShardNotReady,
    combined_dump_id,
    manifest_path,
    read_manifest,
    read_meta,
    shard_prefix,
)

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]


def contiguous_range(n_items: int, num_shards: int, shard_id: int) -> tuple[int, int]:
    """Items [lo, hi) of shard ``shard_id``: contiguous runs, sizes differing by at most 1.

    fairseq's own sharding deals batches round-robin, so each worker's previous batch is not
    the batch before: with ``--context-window`` the first block of every batch would get
    another block's context. Contiguous runs keep every block's true left context.
    """
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard id {shard_id} not in [0, {num_shards})")
    base, rem = divmod(n_items, num_shards)
    lo = shard_id * base + min(shard_id, rem)
    return lo, lo + base + (1 if shard_id < rem else 0)


def left_context(blocks: Sequence[np.ndarray], size: int, pad: int) -> np.ndarray:
    """The last ``size`` non-pad tokens of the concatenated blocks (latest block last): what
    fairseq's LMContextWindowDataset carries into the next block."""
    out: list[np.ndarray] = []
    have = 0
    for b in reversed(blocks):
        b = np.asarray(b)
        b = b[b != pad]
        out.append(b)
        have += len(b)
        if have >= size:
            break
    if not out:
        return np.empty(0, dtype=np.int64)
    return np.concatenate(out[::-1]).astype(np.int64)[-size:] if size > 0 else np.empty(0)


class ConcatRows:
    """Read-only rows of several equal-width arrays (memmaps) seen as one, without copying.

    Supports what the index builder and the scorer use: ``len``, ``shape``, ``dtype``,
    slices of rows, integer arrays of row ids (any shape, answered shard by shard with
    sorted reads), and ``x[ids, j]`` for 2-D parts.
    """

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        if not parts:
            raise ValueError("ConcatRows needs at least one part")
        tails = {p.shape[1:] for p in parts}
        dtypes = {p.dtype for p in parts}
        if len(tails) != 1 or len(dtypes) != 1:
            raise ValueError(f"parts differ in row shape or dtype: {tails}, {dtypes}")
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in parts]).astype(np.int64)
        self.dtype = parts[0].dtype
        self.shape = (int(self.offsets[-1]), *parts[0].shape[1:])
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _rows_slice(self, s: slice) -> np.ndarray:
        lo, hi, step = s.indices(len(self))
        if step != 1:
            return self._rows_ids(np.arange(lo, hi, step))
        pieces = []
        for i, p in enumerate(self.parts):
            a, b = max(lo, self.offsets[i]), min(hi, self.offsets[i + 1])
            if a < b:
                pieces.append(p[a - self.offsets[i]:b - self.offsets[i]])
        if len(pieces) == 1:
            return pieces[0]
        if not pieces:
            return np.empty((0, *self.shape[1:]), dtype=self.dtype)
        return np.concatenate(pieces)

    def _rows_ids(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        flat = ids.reshape(-1).astype(np.int64)
        n = len(self)
        if flat.size and (flat.min() < -n or flat.max() >= n):
            raise IndexError(f"row id out of range for {n} rows")
        flat = np.where(flat < 0, flat + n, flat)
        out = np.empty((flat.size, *self.shape[1:]), dtype=self.dtype)
        shard = np.searchsorted(self.offsets, flat, side="right") - 1
        for i in np.unique(shard):
            sel = np.nonzero(shard == i)[0]
            local = flat[sel] - self.offsets[i]
            order = np.argsort(local, kind="stable")  # sorted reads from the memmap
            out[sel[order]] = self.parts[i][local[order]]
        return out.reshape(*ids.shape, *self.shape[1:])

    def __getitem__(self, key: Any) -> np.ndarray:
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        if isinstance(key, slice):
            rows = self._rows_slice(key)
        elif isinstance(key, (int, np.integer)):
            k = int(key) + (len(self) if key < 0 else 0)
            i = int(np.searchsorted(self.offsets, k, side="right") - 1)
            if not 0 <= k < len(self):
                raise IndexError(f"row {key} out of range for {len(self)} rows")
            rows = self.parts[i][k - self.offsets[i]]
            return rows[rest] if rest else rows
        else:  # an array of row ids, any shape: x[ids, j] picks column j of each row
            rows = self._rows_ids(np.asarray(key))
            return rows[(Ellipsis, *rest)] if rest else rows
        return rows[(slice(None), *rest)] if rest else rows

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self._rows_slice(slice(None))
        return a.astype(dtype) if dtype is not None else a


def write_manifest(prefix: PathLike, num_shards: int) -> dict[str, Any]:
    """Check that all shards of PREFIX are finished and agree; write PREFIX_manifest.json.
    Raises ShardNotReady while a shard has not finished. Each shard's dump id is recorded
    (checked when the datastore is opened); the manifest's own is derived from them."""
    prefix = Path(prefix)
    metas = []
    for i in range(num_shards):
        sp = shard_prefix(prefix, i, num_shards)
        try:
            metas.append(read_meta(sp))
        except DatastoreError as e:
            raise ShardNotReady(f"shard {i} of {num_shards} is not ready: {e}") from e
    first = metas[0]
    for i, m in enumerate(metas):
        if (m.shard_id, m.num_shards) != (i, num_shards):
            raise DatastoreError(f"{shard_prefix(prefix, i, num_shards)}: its meta says shard "
                                 f"{m.shard_id} of {m.num_shards}, expected {i} of {num_shards}")
        diffs = [f"{f}: {getattr(first, f)!r} vs {getattr(m, f)!r}" for f in SHARED_FIELDS
                 if getattr(first, f) != getattr(m, f)]
        if diffs:
            raise DatastoreError(f"shard {i} disagrees with shard 0: " + "; ".join(diffs))
    manifest = {
        "format_version": MANIFEST_VERSION,
        "num_shards": num_shards,
        "size": int(sum(m.size for m in metas)),
        **{f: getattr(first, f) for f in SHARED_FIELDS},
        "model_path": first.model_path,
        "dump_id": combined_dump_id([m.dump_id for m in metas]),
        "shards": [{"prefix": shard_prefix(prefix, i, num_shards).name, "size": m.size,
                    "dump_id": m.dump_id} for i, m in enumerate(metas)],
    }
    write_json_atomic(manifest_path(prefix), manifest)
    logger.info("wrote %s: %d shards, %d entries", manifest_path(prefix), num_shards,
                manifest["size"])
    return manifest


def try_write_manifest(prefix: PathLike, num_shards: int) -> bool:
    """Write the manifest if every shard has finished (called by each shard as it ends);
    shards that disagree still raise."""
    try:
        write_manifest(prefix, num_shards)
    except ShardNotReady as e:  # a later shard will write it
        logger.info("%s; the last shard to finish writes %s", e, manifest_path(prefix).name)
        return False
    return True

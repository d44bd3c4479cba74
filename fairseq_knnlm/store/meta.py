"""What a datastore is on disk, below both datastore.py and shards.py: file names, the meta
record, reading it (for one datastore or a sharded one's manifest), and the errors.

datastore.py (writer, reader) and shards.py (sharded dumps) both build on this module; it
imports neither, so there is no import circle. Public names are re-exported by datastore.py
(``from fairseq_knnlm.store.datastore import DatastoreError, read_meta, ...`` keeps working).

File names of a datastore at PREFIX:

    PREFIX_keys.npy  PREFIX_vals.npy  PREFIX_pos.npy   raw arrays (see datastore.py)
    PREFIX_meta.json                                  DatastoreMeta, written last
    PREFIX_manifest.json                              a sharded datastore's shard list
    PREFIX_shard{I}of{N}                              the prefix of shard I of N
    PREFIX.lock                                       held by the dump writing PREFIX

Every dump gets a random ``dump_id`` when its writer starts; a manifest's ``dump_id`` is
derived from its shards' ids in order. The id is part of ``DatastoreMeta.fingerprint()``, so
an index (or a checkpoint of an index build) made from an earlier dump of the same prefix is
recognised as stale even when size, dim and model are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from fairseq_knnlm.errors import KNNLMError
from fairseq_knnlm.store.memmaps import lock_holder, tmp_path

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
FORMAT_VERSION = 1
MANIFEST_VERSION = 1
VAL_DTYPE = np.dtype(np.int32)  # the original used int16 with fp16 keys: overflows past 32767 types
POS_DTYPE = np.dtype(np.int64)
KEY_DTYPES = {"float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}
# fields every shard must agree on (they make the shards one datastore)
SHARED_FIELDS = ("dim", "key_dtype", "keytype", "val_dtype", "pos_dtype", "model_sha256",
                 "dict_size", "dict_sha256", "subset", "context_window", "tokens_per_sample",
                 "sample_break_mode")
# DatastoreMeta fields an index (or a scorer) must agree with: see DatastoreMeta.fingerprint
FINGERPRINT_FIELDS = ("size", "dim", "keytype", "dict_sha256", "model_sha256", "dump_id",
                      "subset", "context_window", "tokens_per_sample", "sample_break_mode")


class DatastoreError(KNNLMError):
    """A datastore is missing, incomplete, busy, or disagrees with its meta file."""


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


def lock_path(prefix: PathLike) -> Path:
    return Path(f"{prefix}.lock")


def manifest_path(prefix: PathLike) -> Path:
    return Path(f"{prefix}_manifest.json")


def shard_prefix(prefix: PathLike, shard_id: int, num_shards: int) -> Path:
    return Path(f"{prefix}_shard{shard_id}of{num_shards}")


def combined_dump_id(dump_ids: Sequence[Optional[str]]) -> Optional[str]:
    """The dump id of a sharded datastore: a hash of its shards' ids in order (None when no
    shard has one, i.e. all were dumped before dump ids existed)."""
    if all(d is None for d in dump_ids):
        return None
    h = hashlib.sha256()
    for d in dump_ids:
        h.update(f"{d}\n".encode())
    return h.hexdigest()[:32]


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
    dump_id: Optional[str] = None  # random per dump; None in metas written before it existed
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
        """The fields an index or a scorer must agree with: shape, model and dictionary, the
        settings that change the keys, and the dump's id (a re-dump changes it)."""
        return {f: getattr(self, f) for f in FINGERPRINT_FIELDS}


def read_meta(prefix: PathLike) -> DatastoreMeta:
    """Load and sanity-check PREFIX_meta.json (or PREFIX_manifest.json for a sharded
    datastore), explaining the usual ways it can be missing."""
    mp = meta_path(prefix)
    if not mp.exists() and manifest_path(prefix).exists():
        return manifest_meta(prefix)
    if not mp.exists():
        tmp = tmp_path(keys_path(prefix))
        if tmp.exists():
            running = ""
            if lock_path(prefix).exists():  # removed by a writer that finishes or aborts
                running = (f", or is still running: {lock_path(prefix).name} names "
                           f"{lock_holder(lock_path(prefix))}")
            raise DatastoreError(
                f"{prefix}: the dump did not finish (found {tmp.name}, no {mp.name}{running}); "
                "run the dump again")
        if keys_path(prefix).exists():
            raise DatastoreError(
                f"{prefix}: {keys_path(prefix).name} exists but {mp.name} does not; datastores "
                "from the original knnlm code carry no metadata: re-dump with this plugin")
        raise DatastoreError(f"no datastore at {prefix}: {mp} not found")
    try:
        raw = json.loads(mp.read_text())
        if not isinstance(raw, dict):
            raise TypeError(f"a JSON {type(raw).__name__}, not an object")
        meta = DatastoreMeta.from_dict(raw)
    except (json.JSONDecodeError, TypeError) as e:
        raise DatastoreError(f"{mp}: unreadable meta file ({e})") from e
    check_fields(meta, mp)
    if not meta.complete:
        raise DatastoreError(f"{prefix}: meta file says the dump is incomplete")
    if meta.format_version > FORMAT_VERSION:
        raise DatastoreError(
            f"{prefix}: format version {meta.format_version} is newer than this plugin's "
            f"{FORMAT_VERSION}; upgrade fairseq-knnlm")
    return meta


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_fields(meta: DatastoreMeta, path: PathLike) -> None:
    """DatastoreError naming ``path`` when a field that sizes or types the arrays has the
    wrong type or range (a hand-edited or foreign meta file)."""
    bad = []
    if not (_is_int(meta.size) and meta.size >= 0):
        bad.append(f"size {meta.size!r} (an integer >= 0)")
    if not (_is_int(meta.dim) and meta.dim >= 1):
        bad.append(f"dim {meta.dim!r} (an integer >= 1)")
    if not (isinstance(meta.key_dtype, str) and meta.key_dtype in KEY_DTYPES):
        bad.append(f"key_dtype {meta.key_dtype!r} (one of {', '.join(KEY_DTYPES)})")
    for name, want in (("val_dtype", VAL_DTYPE), ("pos_dtype", POS_DTYPE)):
        if getattr(meta, name) != want.name:
            bad.append(f"{name} {getattr(meta, name)!r} ({want.name})")
    if not _is_int(meta.format_version):
        bad.append(f"format_version {meta.format_version!r} (an integer)")
    if not (_is_int(meta.num_shards) and meta.num_shards >= 1):
        bad.append(f"num_shards {meta.num_shards!r} (an integer >= 1)")
    if bad:
        raise DatastoreError(f"{path}: not a datastore meta file this plugin wrote: "
                             + "; ".join(bad))


def read_manifest(prefix: PathLike) -> dict[str, Any]:
    mp = manifest_path(prefix)
    try:
        m = json.loads(mp.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DatastoreError(f"{mp}: unreadable manifest ({e})") from e
    if not isinstance(m, dict):
        raise DatastoreError(f"{mp}: unreadable manifest (a JSON {type(m).__name__}, not an "
                             "object)")
    if int(m.get("format_version", 0)) > MANIFEST_VERSION:
        raise DatastoreError(f"{mp}: manifest version {m['format_version']} is newer than this "
                             "plugin's; upgrade fairseq-knnlm")
    for f in ("shards", "size", "dim", "key_dtype", "num_shards"):
        if f not in m:
            raise DatastoreError(f"{mp}: manifest lacks field {f!r}")
    if len(m["shards"]) != m["num_shards"]:
        raise DatastoreError(f"{mp}: lists {len(m['shards'])} shards, says {m['num_shards']}")
    return m


def manifest_meta(prefix: PathLike) -> DatastoreMeta:
    """The meta of a sharded datastore as a whole, from its manifest (the shard list goes to
    ``extra["shards"]``; the dump id is derived from the shards' ids)."""
    m = read_manifest(prefix)
    fields = {f: m[f] for f in DatastoreMeta.__dataclass_fields__ if f in m and f not in (
        "shard_id", "extra", "format_version", "dump_id")}
    fields["extra"] = {"shards": m["shards"]}
    fields["dump_id"] = combined_dump_id([s.get("dump_id") for s in m["shards"]])
    meta = DatastoreMeta(**fields)
    check_fields(meta, manifest_path(prefix))
    return meta

"""The saved-neighbours file set: written by ``NeighborWriter``, read by ``load_neighbors``
(plain or sharded), checked on load (``check_scores``, ``check_dists``).

Saved by ``fairseq-eval-lm ... --knnlm --knn-save-neighbors PREFIX`` (one row per scored token):

    PREFIX_targets.npy  int32 (n,)      PREFIX_lm_logp.npy     float32 (n,)  log p_LM(target)
    PREFIX_ids.npy      int64 (n, k)    PREFIX_faiss_dists.npy float32 (n, k)
    PREFIX_match.npy    uint8 (n, k)    neighbour's value == target
    PREFIX_l2_dists.npy float32 (n, k)  exact squared L2 (only when keys were loaded)
    PREFIX_cache_logp.npy float32 (n,)  log p_cache(target) (only with --knn-cache)
    what the LM knew before any search (the features of a lambda model, lambda_model.py):
    PREFIX_lm_entropy.npy float32 (n,)  entropy of p_LM(.|context), nats
    PREFIX_lm_max_logp.npy float32 (n,) max_v log p_LM(v|context)
    PREFIX_prev_tokens.npy int32 (n,)   the context's last token (the input at that position)
    PREFIX_lm_argmax.npy int32 (n,)     argmax_v p_LM(v|context)
    PREFIX_lm_logp_nbrs.npy float32 (n, k) log p_LM(neighbour's value|context) (0: none)
    with --knn-pointers (what ``replay_pointers`` needs):
    PREFIX_queries.npy  float32 (n, D)  the query (key of the scored position)
    PREFIX_modes.npy    int8 (n,)       0 searched, 1 scored from pointers, 2 no kNN
    PREFIX_fresh.npy    uint8 (n,)      1 where a stream started without pointers
    PREFIX_meta.json

Columns are in FAISS's order (nearest first by FAISS's own, possibly quantized, distance;
-1 ids, where FAISS found fewer than k, last). A sharded pass writes one such file set per
shard, ``PREFIX_shard{I}of{N}_*``, and the last shard ``PREFIX_manifest.json``; loading
``PREFIX`` then reads the shards' rows one after the other (``load_neighbors``).
"""

from __future__ import annotations

import glob
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from fairseq_knnlm.errors import KNNLMError
from fairseq_knnlm.store.memmaps import RowWriter, open_rows, write_json_atomic
from fairseq_knnlm.store.shards import ConcatRows, shard_prefix

logger = logging.getLogger(__name__)
PathLike = Union[str, Path]

# what each shard of a sharded pass must agree on for its rows to be one file
SHARED_META = ("k", "arrays", "subset", "datastore", "probe", "dim")


class NeighborsError(KNNLMError):
    """A saved-neighbours file set that is missing, unfinished or inconsistent."""


def _p(prefix: PathLike, name: str) -> Path:
    return Path(f"{prefix}_{name}.npy")


class NeighborWriter:
    """Growable memmaps for the per-token retrieval results of one pass."""

    def __init__(self, prefix: PathLike, k: int, with_l2: bool, with_cache: bool,
                 query_dim: Optional[int] = None, with_lm_features: bool = False,
                 with_lm_nbrs: bool = True) -> None:
        self.prefix, self.k, self.query_dim = Path(prefix), k, query_dim
        # the files being rewritten no longer describe a finished pass (a sharded pass's
        # manifest at this prefix included: this unsharded pass replaces it)
        for stale in (meta_path(prefix), manifest_path(prefix)):
            stale.unlink(missing_ok=True)
        specs = {
            "targets": (_p(prefix, "targets"), np.int32, ()),
            "lm_logp": (_p(prefix, "lm_logp"), np.float32, ()),
            "ids": (_p(prefix, "ids"), np.int64, (k,)),
            "faiss_dists": (_p(prefix, "faiss_dists"), np.float32, (k,)),
            "match": (_p(prefix, "match"), np.uint8, (k,)),
        }
        if with_l2:
            specs["l2_dists"] = (_p(prefix, "l2_dists"), np.float32, (k,))
        if with_cache:
            specs["cache_logp"] = (_p(prefix, "cache_logp"), np.float32, ())
        if with_lm_features:
            for name in LM_FEATURE_ARRAYS + (LM_NBR_ARRAYS if with_lm_nbrs else ()):
                shape = (k,) if _SPEC[name][1] == "k" else ()
                specs[name] = (_p(prefix, name), _SPEC[name][0], shape)
        if query_dim is not None:
            specs["queries"] = (_p(prefix, "queries"), np.float32, (query_dim,))
            specs["modes"] = (_p(prefix, "modes"), np.int8, ())
            specs["fresh"] = (_p(prefix, "fresh"), np.uint8, ())
        self.rows = RowWriter(specs)

    def add(self, **rows: np.ndarray) -> None:
        self.rows.add(**rows)

    def finish(self, **meta: Any) -> None:
        n = self.rows.finish()
        dim = {"dim": self.query_dim} if self.query_dim is not None else {}
        write_json_atomic(f"{self.prefix}_meta.json",
                          {"n": n, "k": self.k, "arrays": sorted(self.rows.specs), **dim,
                           **meta})

    def abort(self) -> None:
        self.rows.abort()


@dataclass
class Neighbors:
    meta: dict[str, Any]
    arrays: dict[str, Any]  # name -> (n, ...) memmap, or ConcatRows over a sharded pass's
    prefix: Optional[Path] = None  # where it was loaded from (for messages)

    @property
    def n(self) -> int:
        return int(self.meta["n"])


# name -> (dtype, row shape: "k" per neighbour, "dim" per key component, None a scalar)
_SPEC = {"targets": (np.int32, None), "lm_logp": (np.float32, None),
         "ids": (np.int64, "k"), "faiss_dists": (np.float32, "k"), "match": (np.uint8, "k"),
         "l2_dists": (np.float32, "k"), "cache_logp": (np.float32, None),
         "queries": (np.float32, "dim"), "modes": (np.int8, None), "fresh": (np.uint8, None),
         "lm_entropy": (np.float32, None), "lm_max_logp": (np.float32, None),
         "prev_tokens": (np.int32, None), "lm_argmax": (np.int32, None),
         "lm_logp_nbrs": (np.float32, "k")}
LM_FEATURE_ARRAYS = ("lm_entropy", "lm_max_logp", "prev_tokens")
# what lambda_model.AGREEMENT_FEATURES need (saved since they exist)
LM_NBR_ARRAYS = ("lm_argmax", "lm_logp_nbrs")


def meta_path(prefix: PathLike) -> Path:
    return Path(f"{prefix}_meta.json")


def manifest_path(prefix: PathLike) -> Path:
    return Path(f"{prefix}_manifest.json")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise NeighborsError(f"{path}: unreadable ({e})") from e
    if not isinstance(obj, dict):
        raise NeighborsError(f"{path}: not a JSON object")
    return obj


def _load_plain(prefix: PathLike) -> Neighbors:
    """One finished file set PREFIX_*: its meta and read-only memmaps of its arrays."""
    meta = _read_json(meta_path(prefix))
    try:
        n, k, names = int(meta["n"]), int(meta["k"]), list(meta["arrays"])
    except (KeyError, TypeError, ValueError) as e:
        raise NeighborsError(f"{meta_path(prefix)}: lacks n, k or arrays ({e})") from e
    if n < 0 or k < 1 or not isinstance(meta["arrays"], list) or \
            not all(isinstance(a, str) for a in names):
        raise NeighborsError(f"{meta_path(prefix)}: not a neighbour file's meta (n {n}, k {k}"
                             + (")" if isinstance(meta["arrays"], list) else
                                f", arrays {meta['arrays']!r})"))
    unknown = sorted(set(names) - set(_SPEC))
    if unknown:
        raise NeighborsError(f"{meta_path(prefix)}: unknown arrays {unknown}")
    arrays = {}
    widths = {"k": k, "dim": meta.get("dim")}
    for name in names:
        dtype, per = _SPEC[name]
        if per is not None and widths[per] is None:
            raise NeighborsError(f"{meta_path(prefix)}: lists {name} but has no {per}")
        try:
            arrays[name] = open_rows(_p(prefix, name), dtype,
                                     (int(widths[per]),) if per else (), n)
        except (OSError, ValueError) as e:
            raise NeighborsError(str(e)) from e
    return Neighbors(meta=meta, arrays=arrays)


def _unfinished_shards(prefix: Path) -> list[Path]:
    pattern = f"{glob.escape(prefix.name)}_shard*of*_meta.json"
    return sorted(prefix.parent.glob(pattern))


def _load_sharded(prefix: Path) -> Neighbors:
    """The shards listed in PREFIX_manifest.json as one Neighbors: rows of shard 0, then 1, ...
    Each shard's n and k are checked against the manifest, and what makes the shards one
    pass (SHARED_META) against shard 0."""
    mp = manifest_path(prefix)
    man = _read_json(mp)
    try:
        num, total, k = int(man["num_shards"]), int(man["n"]), int(man["k"])
        listed = [(str(s["prefix"]), int(s["n"])) for s in man["shards"]]
    except (KeyError, TypeError, ValueError) as e:
        raise NeighborsError(f"{mp}: lacks num_shards, n, k or shards[].prefix/n ({e})") from e
    if len(listed) != num:
        raise NeighborsError(f"{mp}: lists {len(listed)} shards but says num_shards={num}")
    if sum(n for _, n in listed) != total:
        raise NeighborsError(f"{mp}: shard rows add up to {sum(n for _, n in listed)}, "
                             f"not n={total}")
    parts: list[Neighbors] = []
    for i, (name, n) in enumerate(listed):
        sp = mp.parent / name
        if not meta_path(sp).exists():
            raise NeighborsError(f"shard {i} of {num} is missing: {meta_path(sp)} not found "
                                 f"(listed in {mp})")
        nb = _load_plain(sp)
        if nb.n != n:
            raise NeighborsError(f"shard {i} of {num} ({sp}) has {nb.n} rows, {mp} says {n}")
        if int(nb.meta["k"]) != k:
            raise NeighborsError(f"shard {i} of {num} ({sp}) was saved with k={nb.meta['k']}, "
                                 f"{mp} says k={k}")
        if "shard_id" in nb.meta and (nb.meta["shard_id"], nb.meta.get("num_shards")) != (i, num):
            raise NeighborsError(f"{meta_path(sp)} says shard {nb.meta['shard_id']} of "
                                 f"{nb.meta.get('num_shards')}, {mp} lists it as {i} of {num}")
        if parts:
            first = parts[0].meta
            diffs = [f"{f}: {first[f]!r} vs {nb.meta[f]!r}" for f in SHARED_META
                     if f in first and f in nb.meta and _canon(first[f]) !=
                     _canon(nb.meta[f])]
            if diffs:
                raise NeighborsError(f"shard {i} of {num} ({sp}) disagrees with shard 0: "
                                     + "; ".join(diffs))
        parts.append(nb)
    names = sorted(parts[0].arrays) if parts else []
    arrays = {name: ConcatRows([p.arrays[name] for p in parts]) for name in names}
    meta = {**(parts[0].meta if parts else {}), "n": total, "k": k, "arrays": names,
            "num_shards": num, "shards": [{"prefix": name, "n": n} for name, n in listed]}
    meta.pop("shard_id", None)
    return Neighbors(meta=meta, arrays=arrays)


def _canon(x: Any) -> Any:
    return sorted(x) if isinstance(x, list) else x


def write_neighbors_manifest(prefix: PathLike, num_shards: int) -> Optional[dict[str, Any]]:
    """Write PREFIX_manifest.json over the shards PREFIX_shard{I}of{N} if all have finished
    (their meta files exist) and return it; None while some shard has not finished (the last
    shard to finish writes it). Shards saved with different k raise NeighborsError."""
    prefix = Path(prefix)
    shards = []
    for i in range(num_shards):
        sp = shard_prefix(prefix, i, num_shards)
        if not meta_path(sp).exists():
            logger.info("neighbour shard %d of %d not finished yet: the last shard to finish "
                        "writes %s", i, num_shards, manifest_path(prefix).name)
            return None
        m = _read_json(meta_path(sp))
        shards.append((sp.name, int(m["n"]), int(m["k"])))
    ks = {k for _, _, k in shards}
    if len(ks) != 1:
        raise NeighborsError(f"neighbour shards of {prefix} were saved with different k: "
                             f"{sorted(ks)}")
    man = {"num_shards": num_shards, "n": sum(n for _, n, _ in shards), "k": ks.pop(),
           "shards": [{"prefix": name, "n": n} for name, n, _ in shards]}
    write_json_atomic(manifest_path(prefix), man)
    logger.info("wrote %s: %d shards, %d rows", manifest_path(prefix), num_shards, man["n"])
    return man


def load_neighbors(prefix: PathLike) -> Neighbors:
    """The neighbours saved at PREFIX by --knn-save-neighbors: one pass's PREFIX_meta.json, or
    a sharded pass's PREFIX_manifest.json (its shards' rows concatenated in shard order).
    Raises NeighborsError (one line) for a missing, unfinished or inconsistent file set."""
    prefix = Path(prefix)
    plain, man = meta_path(prefix), manifest_path(prefix)
    if plain.exists() and man.exists():
        raise NeighborsError(f"both {plain} (an unsharded pass) and {man} (a sharded pass) "
                             "exist: delete the stale one's files")
    if man.exists() or plain.exists():
        nb = _load_sharded(prefix) if man.exists() else _load_plain(prefix)
        check_scores(nb, man if man.exists() else plain)
        nb.prefix = prefix
        return nb
    pending = _unfinished_shards(prefix)
    if pending:
        raise NeighborsError(f"{man} not found: the sharded pass has not finished: manifest "
                             f"missing ({len(pending)} shard(s) finished: "
                             f"{', '.join(p.name for p in pending)})")
    raise NeighborsError(f"{plain} not found: no finished neighbour file at {prefix}")


def check_scores(nb: Neighbors, where: PathLike) -> None:
    """NeighborsError for a pass of no tokens (nothing to score) or one whose saved
    log-probabilities (p_LM, p_cache) are not all finite: no tool scores such a file."""
    if nb.n == 0:
        raise NeighborsError(f"{where}: the pass saved 0 tokens (an empty --gen-subset?): "
                             "nothing to score")
    for name in ("lm_logp", "cache_logp"):
        if name in nb.arrays:
            bad = np.nonzero(~np.isfinite(np.asarray(nb.arrays[name][:])))[0]
            if len(bad):
                raise NeighborsError(f"{where}: {name} of token {int(bad[0])} is not finite "
                                     f"({len(bad)} such tokens): the file is damaged; save "
                                     "the pass again")


def check_dists(nb: Neighbors, d: np.ndarray, valid: np.ndarray, name: str,
                offset: int) -> None:
    """NeighborsError if a real neighbour's saved distance (``name``, rows from ``offset``)
    is NaN or -inf (+inf is FAISS's own "no distance")."""
    bad = valid & (np.isnan(d) | (d == -np.inf))
    if bad.any():
        row = offset + int(np.nonzero(bad.any(axis=1))[0][0])
        raise NeighborsError(f"{_p(nb.prefix, name) if nb.prefix else name}: the distances of "
                             f"token {row} are not finite: the file is damaged, or the "
                             "datastore or index holds NaN keys")

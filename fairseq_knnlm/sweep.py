"""Offline sweeps: save what one kNN-LM pass retrieved, then score many (lambda, k,
temperature, distance, cache weight) settings from that file without searching again.

Saved by ``fairseq-eval-lm ... --knnlm --knn-save-neighbors PREFIX`` (one row per scored token):

    PREFIX_targets.npy  int32 (n,)      PREFIX_lm_logp.npy     float32 (n,)  log p_LM(target)
    PREFIX_ids.npy      int64 (n, k)    PREFIX_faiss_dists.npy float32 (n, k)
    PREFIX_match.npy    uint8 (n, k)    neighbour's value == target
    PREFIX_l2_dists.npy float32 (n, k)  exact squared L2 (only when keys were loaded)
    PREFIX_cache_logp.npy float32 (n,)  log p_cache(target) (only with --knn-cache)
    PREFIX_meta.json

Sweep maths: for each row, neighbours sorted by the chosen distance; for every k' the
top-k' neighbours give log p_kNN = logsumexp(-d/T over matches) - logsumexp(-d/T over all).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from .knn import KNN_LOGP_FLOOR
from .memmaps import RowWriter, open_rows, write_json_atomic

logger = logging.getLogger(__name__)
PathLike = Union[str, Path]


def _p(prefix: PathLike, name: str) -> Path:
    return Path(f"{prefix}_{name}.npy")


class NeighborWriter:
    """Growable memmaps for the per-token retrieval results of one pass."""

    def __init__(self, prefix: PathLike, k: int, with_l2: bool, with_cache: bool) -> None:
        self.prefix, self.k = Path(prefix), k
        meta = Path(f"{prefix}_meta.json")
        if meta.exists():
            meta.unlink()
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
        self.rows = RowWriter(specs)

    def add(self, **rows: np.ndarray) -> None:
        self.rows.add(**rows)

    def finish(self, **meta: Any) -> None:
        n = self.rows.finish()
        write_json_atomic(f"{self.prefix}_meta.json",
                          {"n": n, "k": self.k, "arrays": sorted(self.rows.specs), **meta})

    def abort(self) -> None:
        self.rows.abort()


@dataclass
class Neighbors:
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @property
    def n(self) -> int:
        return int(self.meta["n"])


def load_neighbors(prefix: PathLike) -> Neighbors:
    mp = Path(f"{prefix}_meta.json")
    if not mp.exists():
        raise FileNotFoundError(f"{mp} not found: no finished neighbour file at {prefix}")
    meta = json.loads(mp.read_text())
    n, k = int(meta["n"]), int(meta["k"])
    spec = {"targets": (np.int32, ()), "lm_logp": (np.float32, ()), "ids": (np.int64, (k,)),
            "faiss_dists": (np.float32, (k,)), "match": (np.uint8, (k,)),
            "l2_dists": (np.float32, (k,)), "cache_logp": (np.float32, ())}
    arrays = {name: open_rows(_p(prefix, name), *spec[name], n) for name in meta["arrays"]}
    return Neighbors(meta=meta, arrays=arrays)


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.sum(np.exp(x - m), axis=axis)) + np.squeeze(m, axis)


def sort_by_distance(dists: np.ndarray, match: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by distance (inf = missing last), so that k' means the k' nearest."""
    order = np.argsort(dists, axis=1, kind="stable")
    return (np.take_along_axis(dists, order, axis=1).astype(np.float64),
            np.take_along_axis(match, order, axis=1).astype(bool))


def knn_logp_for_ks(dists: np.ndarray, match: np.ndarray, ks: Sequence[int],
                    temperature: float, presorted: bool = False) -> dict[int, np.ndarray]:
    """log p_kNN(target) for each k' in ks from (n, k) distances (inf = missing) and matches
    (neighbour value == target), using the k' nearest neighbours by this distance."""
    d, m = (dists, match.astype(bool)) if presorted else sort_by_distance(dists, match)
    logits = -d / temperature
    out = {}
    for kk in ks:
        lg, mm = logits[:, :kk], m[:, :kk]
        norm = _logsumexp(lg)
        tgt = _logsumexp(np.where(mm, lg, -np.inf))
        out[kk] = np.where(mm.any(axis=1), tgt - norm, KNN_LOGP_FLOOR)
    return out


def mix(lm_logp: np.ndarray, other_logp: np.ndarray, lmbda: float) -> np.ndarray:
    """log((1 - lambda) p_lm + lambda p_other)."""
    if lmbda == 0.0:
        return lm_logp
    if lmbda == 1.0:
        return other_logp
    return np.logaddexp(lm_logp + math.log(1 - lmbda), other_logp + math.log(lmbda))


def ppl_from_nll(mean_nll: float) -> float:
    """exp(mean NLL), inf past float range (lambda = 1 with missing targets hits the floor)."""
    return math.exp(mean_nll) if mean_nll < 709.0 else math.inf


def sweep(nb: Neighbors, lambdas: Sequence[float], ks: Sequence[int],
          temperatures: Sequence[float], dist: str = "l2",
          cache_lambdas: Sequence[float] = (0.0,), chunk: int = 32768) -> list[dict[str, Any]]:
    """Perplexity for every (temperature, k, lambda, cache lambda); one row per setting."""
    key = {"l2": "l2_dists", "faiss_l2": "faiss_dists"}[dist]
    if key not in nb.arrays:
        raise ValueError(f"the neighbour file has no {key} (saved without keys?)")
    kmax = int(nb.meta["k"])
    bad = [k for k in ks if k > kmax]
    if bad:
        raise ValueError(f"k values {bad} exceed the saved k={kmax}")
    if any(c > 0 for c in cache_lambdas) and "cache_logp" not in nb.arrays:
        raise ValueError("cache lambdas given but the pass was run without --knn-cache")
    n = nb.n
    lm = np.asarray(nb.arrays["lm_logp"], dtype=np.float64)
    cache = (np.asarray(nb.arrays["cache_logp"], dtype=np.float64)
             if "cache_logp" in nb.arrays else None)
    # sum of log p over tokens for each setting, accumulated chunk by chunk
    sums: dict[tuple, float] = {}
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        d = np.asarray(nb.arrays[key][s:e], dtype=np.float32)
        d = np.where(np.asarray(nb.arrays["ids"][s:e]) >= 0, d, np.inf)
        d, match = sort_by_distance(d, np.asarray(nb.arrays["match"][s:e]))
        for T in temperatures:
            per_k = knn_logp_for_ks(d, match, ks, T, presorted=True)
            for kk, knn in per_k.items():
                for lam in lambdas:
                    base = mix(lm[s:e], knn, lam)
                    for cl in cache_lambdas:
                        lp = base if cl == 0 or cache is None else mix(base, cache[s:e], cl)
                        sums[(T, kk, lam, cl)] = sums.get((T, kk, lam, cl), 0.0) + float(lp.sum())
    rows = [{"temperature": T, "k": kk, "lambda": lam, "cache_lambda": cl, "dist": dist,
             "ppl": ppl_from_nll(-v / n)} for (T, kk, lam, cl), v in sums.items()]
    rows.sort(key=lambda r: r["ppl"])
    return rows


def best(rows: list[dict[str, Any]], **fixed: Any) -> Optional[dict[str, Any]]:
    """The lowest-perplexity row whose fields equal ``fixed``."""
    cands = [r for r in rows if all(r[k] == v for k, v in fixed.items())]
    return min(cands, key=lambda r: r["ppl"]) if cands else None

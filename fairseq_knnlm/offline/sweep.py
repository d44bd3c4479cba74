"""Offline sweeps: save what one kNN-LM pass retrieved, then score many (lambda, k,
temperature, distance, cache weight) settings from that file without searching again.

The saved file set and its reader are offline/neighbours.py.

Sweep maths: for every k' the neighbours kept are chosen by ``k_select``:

* ``faiss`` (default): the first k' columns, i.e. FAISS's top-k', exactly what an online run
  with ``--k k'`` retrieves (FAISS's top-k' of a search for k >= k' are its first k'
  results), so every k' reproduces that run;
* ``exact-l2``: the k' nearest by exact L2 among the saved k (needs PREFIX_l2_dists): what a
  larger search re-ranked by exact distance would keep; it differs from any online run at
  k' < k whenever FAISS's order differs from exact L2 (IVFPQ).

They are then scored with the chosen distance (``l2``: exact, ``faiss_l2``: FAISS's), as
knn.knn_log_prob does online: log p_kNN = logsumexp(-d/T over matches) - logsumexp(-d/T).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from fairseq_knnlm.adaptive.pointers import (
    SEARCH,
    MinPointers,
    StreamResults,
    chains,
    count_modes,
    run_streams,
    stream_continues,
)
from fairseq_knnlm.errors import FlagError
from fairseq_knnlm.flags import require_temperatures
from fairseq_knnlm.offline.neighbours import Neighbors, NeighborsError, _p, check_dists
from fairseq_knnlm.scoring.knn import KNN_LOGP_FLOOR, recompute_distances

logger = logging.getLogger(__name__)
PathLike = Union[str, Path]

DISTS = {"l2": "l2_dists", "faiss_l2": "faiss_dists"}  # --dists name -> saved array
K_SELECTS = ("faiss", "exact-l2")
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.sum(np.exp(x - m), axis=axis)) + np.squeeze(m, axis)


def missing_last(valid: np.ndarray) -> bool:
    """Whether every row's missing slots (False) come after all its real ones."""
    return bool(np.all(valid[:, :-1] >= valid[:, 1:]))


def selection_order(ids: np.ndarray, l2_dists: Optional[np.ndarray],
                    k_select: str = "faiss") -> np.ndarray:
    """(n, k) column order whose first k' columns are the neighbours kept at k'.

    'faiss': FAISS's own order with -1 ids (missing) moved last, stably (FAISS returns them
    last already: a search for k' returns exactly these first k'). 'exact-l2': by exact
    squared L2 (missing last), ties in FAISS's order."""
    valid = np.asarray(ids) >= 0
    if k_select == "faiss":
        return np.argsort(~valid, axis=1, kind="stable")
    if k_select == "exact-l2":
        if l2_dists is None:
            raise FlagError("--k-select exact-l2 needs exact distances: the neighbour file "
                            "has no l2_dists (saved with --no-load-keys?)")
        return np.argsort(np.where(valid, l2_dists, np.inf), axis=1, kind="stable")
    raise FlagError(f"--k-select must be one of {', '.join(K_SELECTS)}, got {k_select!r}")


def knn_logp_for_ks(dists: np.ndarray, match: np.ndarray, ks: Sequence[int],
                    temperature: float) -> dict[int, np.ndarray]:
    """log p_kNN(target) (float64) for each k' in ks from the first k' columns of (n, k)
    distances (inf = missing) and matches (neighbour value == target), as knn.knn_log_prob
    computes it online: logits -d/T rounded to float32 exactly as there, sums in float64."""
    d32 = np.asarray(dists, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        logits = (-d32 / np.float32(temperature)).astype(np.float64)
    m = np.asarray(match).astype(bool) & np.isfinite(logits)
    out = {}
    for kk in ks:
        lg, mm = logits[:, :kk], m[:, :kk]
        norm = _logsumexp(lg)
        tgt = _logsumexp(np.where(mm, lg, -np.inf))
        with np.errstate(invalid="ignore"):  # rows without neighbours: -inf - -inf
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
    """Perplexity exp(mean NLL) as fairseq-eval-lm reports it: eval-lm prints 2**loss with the
    loss (mean NLL in bits) a float32 tensor, so it is inf once it passes float32's range
    (mean NLL > 88.72 nats, 128 bits), e.g. at lambda = 1 when ~1% of the targets are not
    among the neighbours (log p_kNN = KNN_LOGP_FLOOR for those). The loss stays finite."""
    if mean_nll >= 709.0:  # math.exp overflows
        return math.inf
    p = math.exp(mean_nll)
    return p if p <= FLOAT32_MAX else math.inf


def check_sweep(nb: Neighbors, ks: Sequence[int], dists: Sequence[str] = ("l2",),
                k_selects: Sequence[str] = ("faiss",),
                cache_lambdas: Sequence[float] = (0.0,),
                lambdas: Sequence[float] = (0.0,),
                temperatures: Sequence[float] = (1.0,)) -> None:
    """Every user-caused problem of a sweep, as a FlagError naming the flag, before any work."""
    for dist in dists:
        if dist not in DISTS:
            raise FlagError(f"--dists: unknown distance {dist!r}; use {', '.join(DISTS)}")
        if DISTS[dist] not in nb.arrays:
            raise FlagError(f"--dists {dist}: the neighbour file has no {DISTS[dist]} "
                            "(saved with --no-load-keys?)")
    for sel in k_selects:
        if sel not in K_SELECTS:
            raise FlagError(f"--k-select must be one of {', '.join(K_SELECTS)}, got {sel!r}")
        if sel == "exact-l2" and "l2_dists" not in nb.arrays:
            raise FlagError("--k-select exact-l2 needs exact distances: the neighbour file "
                            "has no l2_dists (saved with --no-load-keys?)")
    kmax = int(nb.meta["k"])
    bad = [k for k in ks if not 0 < k <= kmax]
    if bad or not ks:
        raise FlagError(f"--ks: values {bad or '(none)'} outside 1..{kmax} (the saved k)")
    unsearched = unsearched_tokens(nb)
    if unsearched and any(k != kmax for k in ks):
        raise FlagError(f"--ks: {unsearched} tokens of this pass were scored from pointers, "
                        f"which have no FAISS top-k': sweep only k={kmax}, or sweep a pass "
                        f"that searched every token (--knn-min-pointers above --k)")
    if unsearched and "faiss_l2" in dists and nb.meta.get("sim_func") != "faiss_l2":
        raise FlagError(f"--dists faiss_l2: {unsearched} tokens of this pass were scored from "
                        "pointers with exact distances, without FAISS's: use --dists l2")
    if any(not 0.0 <= x <= 1.0 for x in (*lambdas, *cache_lambdas)):
        raise FlagError("--lambdas and --cache-lambdas must lie in [0, 1]")
    if not lambdas or not cache_lambdas:
        raise FlagError("--lambdas and --cache-lambdas need at least one value")
    require_temperatures(temperatures, "--temps")
    if any(c > 0 for c in cache_lambdas) and "cache_logp" not in nb.arrays:
        raise FlagError("--cache-lambdas given but the pass was run without --knn-cache")


def unsearched_tokens(nb: Neighbors) -> int:
    """How many tokens of a pass with --knn-pointers were not searched (0 without)."""
    if "modes" not in nb.arrays:
        return 0
    modes = np.asarray(nb.arrays["modes"][:])
    return int((modes != SEARCH).sum())


def sweep(nb: Neighbors, lambdas: Sequence[float], ks: Sequence[int],
          temperatures: Sequence[float], dist: str = "l2",
          cache_lambdas: Sequence[float] = (0.0,), chunk: int = 32768,
          k_select: str = "faiss") -> list[dict[str, Any]]:
    """Perplexity for every (temperature, k, lambda, cache lambda); one row per setting, each
    naming its distance and its k selection (see the module docstring)."""
    check_sweep(nb, ks, [dist], [k_select], cache_lambdas, lambdas, temperatures)
    key = DISTS[dist]
    n = nb.n
    lm = np.asarray(nb.arrays["lm_logp"], dtype=np.float64)
    cache = (np.asarray(nb.arrays["cache_logp"], dtype=np.float64)
             if "cache_logp" in nb.arrays else None)
    # sum of log p over tokens for each setting, accumulated chunk by chunk
    sums: dict[tuple, float] = {}
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        ids = np.asarray(nb.arrays["ids"][s:e])
        valid = ids >= 0
        d = np.asarray(nb.arrays[key][s:e], dtype=np.float32)
        check_dists(nb, d, valid, key, s)
        d = np.where(valid, d, np.inf)
        match = np.asarray(nb.arrays["match"][s:e]).astype(bool) & valid
        if k_select != "faiss" or not missing_last(valid):  # else: the saved order is it
            l2 = np.asarray(nb.arrays["l2_dists"][s:e]) if k_select == "exact-l2" else None
            order = selection_order(ids, l2, k_select)
            d = np.take_along_axis(d, order, axis=1)
            match = np.take_along_axis(match, order, axis=1)
        for T in temperatures:
            per_k = knn_logp_for_ks(d, match, ks, T)
            for kk, knn in per_k.items():
                for lam in lambdas:
                    base = mix(lm[s:e], knn, lam)
                    for cl in cache_lambdas:
                        lp = base if cl == 0 or cache is None else mix(base, cache[s:e], cl)
                        sums[(T, kk, lam, cl)] = sums.get((T, kk, lam, cl), 0.0) + float(lp.sum())
    rows = [{"temperature": T, "k": kk, "lambda": lam, "cache_lambda": cl, "dist": dist,
             "k_select": k_select, "loss": -v / n / math.log(2), "ppl": ppl_from_nll(-v / n)}
            for (T, kk, lam, cl), v in sums.items()]
    rows.sort(key=lambda r: r["ppl"])
    return rows


def best(rows: list[dict[str, Any]], **fixed: Any) -> Optional[dict[str, Any]]:
    """The lowest-perplexity row whose fields equal ``fixed``."""
    cands = [r for r in rows if all(r[k] == v for k, v in fixed.items())]
    return min(cands, key=lambda r: r["ppl"]) if cands else None


# ---- pointer replay (pointers.py): searches saved against perplexity, from one pass ----

REPLAY_ARRAYS = ("queries", "modes", "fresh", "l2_dists")


def check_replay(nb: Neighbors, thresholds: Sequence[int], lambdas: Sequence[float],
                 temperatures: Sequence[float]) -> None:
    """Every user-caused problem of a pointer replay, as a FlagError, before any work."""
    missing = [a for a in REPLAY_ARRAYS if a not in nb.arrays]
    if missing:
        raise FlagError(f"--pointer-thresholds needs a pass saved with --knn-pointers and keys "
                        f"(exact L2); this one lacks {', '.join(missing)}: rerun eval-lm with "
                        f"--knn-pointers --knn-min-pointers {int(nb.meta['k']) + 1} "
                        "--knn-save-neighbors PREFIX")
    unsearched = unsearched_tokens(nb)
    if unsearched:
        raise FlagError(f"--pointer-thresholds replays a pass that searched every token; "
                        f"this one scored {unsearched} tokens from pointers: save one with "
                        f"--knn-min-pointers {int(nb.meta['k']) + 1} (above --k)")
    if nb.meta.get("sim_func", "l2") != "l2":
        raise FlagError(f"--pointer-thresholds replays exact L2 passes; this pass used "
                        f"--knn-sim-func {nb.meta.get('sim_func')}")
    if not thresholds or any(t < 0 for t in thresholds):
        raise FlagError(f"--pointer-thresholds must be integers >= 0, got {list(thresholds)}")
    if any(not 0.0 <= x <= 1.0 for x in lambdas) or not lambdas:
        raise FlagError("--lambdas must lie in [0, 1]")
    require_temperatures(temperatures, "--temps")


def replay_pieces(fresh: np.ndarray, budget: int
                  ) -> list[tuple[int, int, np.ndarray, np.ndarray, bool]]:
    """The saved tokens cut into pieces of at most ~``budget`` tokens for replay:
    (lo, hi, stream starts relative to lo, stream lengths, continues the previous piece).
    Whole streams (``pointers.chains``) are grouped; a stream longer than the budget is cut
    into consecutive pieces, each continuing the last one's pointers."""
    starts, lengths = chains(fresh)
    pieces: list[tuple[int, int, np.ndarray, np.ndarray, bool]] = []
    i, n = 0, len(starts)
    while i < n:
        if lengths[i] > budget:
            s0, e0 = int(starts[i]), int(starts[i] + lengths[i])
            for j, s in enumerate(range(s0, e0, budget)):
                e = min(e0, s + budget)
                pieces.append((s, e, np.array([0]), np.array([e - s]), j > 0))
            i += 1
            continue
        j, total = i, 0
        while j < n and lengths[j] <= budget and total + lengths[j] <= budget:
            total += int(lengths[j])
            j += 1
        lo = int(starts[i])
        pieces.append((lo, lo + total, starts[i:j] - lo, lengths[i:j], False))
        i = j
    return pieces


def pointer_passes(nb: Neighbors, ds: Any, policy: Any, budget: int = 8192,
                   clusters: Any = None, preset_skip: Optional[np.ndarray] = None
                   ) -> Iterator[tuple[int, int, np.ndarray, StreamResults]]:
    """A full-search pass (``check_replay``) replayed under a pointer ``policy``
    (pointers.SearchPolicy), piece by piece in text order: (lo, hi, the targets of tokens
    lo..hi-1, their ``run_streams`` results). Searched steps read the saved FAISS results,
    pointer steps measure exact L2 from the datastore ``ds``'s keys; ``preset_skip`` (n,)
    bool: tokens a lambda model's gate skipped (as online)."""
    if ds.keys is None:
        raise FlagError("replaying pointers needs the datastore's keys")
    k = int(nb.meta["k"])
    continues = stream_continues(ds.pos)
    vals = np.asarray(ds.vals[:, 0], dtype=np.int64)
    fresh = np.asarray(nb.arrays["fresh"][:])
    carry: Optional[np.ndarray] = None
    for lo, hi, starts, lengths, cont in replay_pieces(fresh, budget):
        tg = np.asarray(nb.arrays["targets"][lo:hi], dtype=np.int64)
        q = torch.from_numpy(np.array(nb.arrays["queries"][lo:hi], dtype=np.float32))
        ids_s = np.asarray(nb.arrays["ids"][lo:hi])
        if ids_s.size and int(ids_s.max()) >= len(vals):
            raise NeighborsError(f"{_p(nb.prefix, 'ids') if nb.prefix else 'ids'} names row "
                                 f"{int(ids_s.max())} of a datastore of {len(vals)} rows: it "
                                 f"was not saved against {ds.prefix}, or it is damaged")
        fd_s = np.asarray(nb.arrays["faiss_dists"][lo:hi])
        l2_s = np.asarray(nb.arrays["l2_dists"][lo:hi])
        check_dists(nb, l2_s, ids_s >= 0, "l2_dists", lo)

        def search(idx: np.ndarray, ids_s: np.ndarray = ids_s, fd_s: np.ndarray = fd_s,
                   l2_s: np.ndarray = l2_s) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
            ids = ids_s[idx]
            d = np.where(ids >= 0, l2_s[idx], np.inf).astype(np.float32)
            return ids, fd_s[idx], torch.from_numpy(d)

        def distances(idx: np.ndarray, ids: np.ndarray, q: torch.Tensor = q) -> torch.Tensor:
            return recompute_distances(q[torch.from_numpy(idx)], ids, ds.keys, "l2")

        init = [carry if cont else None] + [None] * (len(starts) - 1)
        res = run_streams(starts, lengths, init, tg,
                          lambda idx, q=q: q[torch.from_numpy(idx)], search, distances,
                          vals, continues, k, policy,
                          clusters=clusters,
                          preset_skip=preset_skip[lo:hi] if preset_skip is not None else None)
        carry = res.final[-1] if len(res.final) else None
        yield lo, hi, tg, res


def replay_pointers(nb: Neighbors, ds: Any, thresholds: Sequence[int],
                    lambdas: Sequence[float], temperatures: Sequence[float],
                    budget: int = 8192, clusters: Any = None) -> list[dict[str, Any]]:
    """Replay --knn-pointers --knn-min-pointers N offline for every N in ``thresholds`` from
    one full-search pass (``check_replay``) and its datastore ``ds`` (keys, values,
    positions): at every token the live pointers decide, as online, whether the saved
    search results or the pointers (exact L2 from the keys) are the neighbours; perplexity
    for every (temperature, lambda). One row per (N, T, lambda) with the number and fraction
    of searches; equal to the online runs (pointers.run_streams is the online code).
    ``clusters`` (pointers.Clusters) replays --knn-clusters."""
    check_replay(nb, thresholds, lambdas, temperatures)
    if ds.keys is None:
        raise FlagError("--pointer-thresholds needs the datastore's keys")
    k, n = int(nb.meta["k"]), nb.n
    vals = np.asarray(ds.vals[:, 0], dtype=np.int64)
    lm_all = np.asarray(nb.arrays["lm_logp"], dtype=np.float64)
    rows: list[dict[str, Any]] = []
    for thr in thresholds:
        sums: dict[tuple[float, float], float] = {}
        modes_all = np.zeros(n, dtype=np.int8)
        for lo, hi, tg, res in pointer_passes(nb, ds, MinPointers(int(thr)), budget, clusters):
            modes_all[lo:hi] = res.modes
            valid = res.ids >= 0
            match = valid & (vals[np.where(valid, res.ids, 0)] == tg[:, None])
            d = res.dists.numpy()
            for T in temperatures:
                knn = knn_logp_for_ks(d, match, [k], T)[k]
                for lam in lambdas:
                    key = (T, lam)
                    sums[key] = sums.get(key, 0.0) + float(mix(lm_all[lo:hi], knn, lam).sum())
        counts = count_modes(modes_all)
        logger.info("pointer replay, --knn-min-pointers %d: %d of %d tokens searched (%.1f%%)",
                    thr, counts["search"], n, 100.0 * counts["search"] / max(1, n))
        for (T, lam), v in sums.items():
            rows.append({"min_pointers": int(thr), "searches": counts["search"],
                         "pointer_tokens": counts["pointers"], "n_tokens": n,
                         "search_fraction": counts["search"] / max(1, n), "k": k,
                         "temperature": T, "lambda": lam, "dist": "l2",
                         "clusters": clusters is not None,
                         "loss": -v / n / math.log(2), "ppl": ppl_from_nll(-v / n)})
    return rows

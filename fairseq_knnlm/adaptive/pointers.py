"""Fewer kNN searches: RetoMaton-style pointers (Alon et al. 2022) behind one search policy.

Design note
-----------
*Pointers.* Datastore rows are in corpus order: row i+1 holds the context that extends row
i's context by row i's value, whenever ``ds.pos[i+1] == ds.pos[i] + 1`` (same stream of the
dumped text; ``stream_continues``). So if row i was a neighbour at step t and its value is
the token actually seen at t, row i+1 is a likely neighbour at step t+1. After every step
the successors of the matching neighbours become the next step's *pointers*
(``next_pointers``); a successor that starts another stream is dropped. The successor map
is injective, so a step has at most as many pointers as neighbours (<= k), and never a
duplicate. *Clusters* (``Clusters``, ``--knn-clusters``, RetoMaton sec. 3.2): each pointer
stands for the members of its k-means cluster, so pointers survive a token whose exact
successor did not match; the policy then counts these candidates (at most 2k).

*Search policy (the seam shared with adaptive lambda, issue #15).* Before each step a policy
turns the step's live-pointer counts (and queries) into one mode per token (``decide``):
``SEARCH`` (FAISS, as plain kNN-LM), ``POINTERS`` (the pointers are the neighbours; their
distances are computed exactly from the keys, or from the index's codes with FAISS
distances) or ``SKIP`` (no kNN for this token: the runtime scores it with p_LM alone and the
token leaves no pointers). ``MinPointers(N)`` is RetoMaton's rule: pointers when at least N
are alive, else search; with N above the most pointers a step can have (k, or 2k with
clusters) it always searches: the runtime then searches the batch in one call
(``searches_every_token``) and equals plain kNN-LM bit for bit. A lambda model (#15) is
another policy: it returns SKIP where it predicts lambda ~ 0 and wraps MinPointers for the
rest (``runtime.KNNEvalRuntime.policy`` is where it plugs in). The runtime counts the modes
and logs ``kNN-LM searches: S of N tokens (x%)`` at the end of the pass.

*Streams.* Each row of an eval-lm batch is one block of consecutive text
(``--sample-break-mode none``: the block after row r is row r+1, or row 0 of the next
batch), fed behind ``--context-window`` positions that are not scored. ``run_streams``
processes the scored tokens of all rows in lockstep (step t of every row at once), so a
step's searches are one batched FAISS call. A row's first token takes the pointers left
after the token before it in the text (its position - 1) only if that token was scored in an
earlier batch (``CarriedPointers``: in practice the last row of the previous batch, so every
block carries its pointers when a batch holds one block); otherwise the row starts with
none: one forced search per block. Pointers never pass between positions that are not
consecutive in the text, nor between rows of a batch.

*Replay.* ``run_streams`` takes the search and the distances as functions, so the same code
scores a pass offline (sweep.replay_pointers): a full-search pass saved with
``--knn-pointers --knn-min-pointers K+1 --knn-save-neighbors PREFIX`` keeps, per token, the
query, what FAISS returned and whether the token started a stream (``fresh``); any
threshold then replays from those files and the datastore's keys, equal to its online run
(searched steps read the saved FAISS results; FAISS may break near-ties a little differently
for 16 queries than for 4,096, so on IVFPQ the two agree to the last digits, not bit for bit).

*Wide steps* (``split_streams``, ``--knn-stream-len N``): a row can be cut into streams of N
tokens, all stepped together, so a step hands FAISS rows x len/N queries instead of one per
row (and the tail batch of a few rows stops being a string of tiny calls); each stream starts
without pointers, one search more per stream. The saved ``fresh`` flags mark those starts,
so the replay follows the same streams.

*Cost*: docs/performance.md (benchmarks/speed.py) has the measured profile and speeds.
The stepping keeps each stream's pointers compacted with their count and runs its O(k)
per-token work in compiled loops (adaptive/kernels.py, numba): ``follow`` is
``next_pointers`` plus the values p_kNN reads, ``Clusters.expand_live`` is ``expand`` and
``count_live`` its counts; the numpy functions here stay as their definitions (tests compare
them).
Tokens with no surviving pointer (34% with clusters, 49% without, WikiText-2 QUICK) are
searched whatever the threshold.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

# per-token modes (int8)
SEARCH, POINTERS, SKIP = 0, 1, 2
MODE_NAMES = {SEARCH: "search", POINTERS: "pointers", SKIP: "skip"}


class SearchPolicy(Protocol):
    """Decides, before a step, how each of its tokens finds its neighbours."""

    # whether ``decide`` reads the queries (run_streams gathers them only then)
    reads_queries: bool

    def decide(self, n_pointers: np.ndarray, queries: Optional[torch.Tensor]) -> np.ndarray:
        """(m,) int8 modes (SEARCH, POINTERS, SKIP) for m tokens with ``n_pointers`` live
        pointers each and keys ``queries`` (m, D; None when ``reads_queries`` is False)."""
        ...


@dataclass(frozen=True)
class MinPointers:
    """RetoMaton's rule: use the pointers when at least ``n`` (and at least one) are alive,
    else search. ``n`` > k never uses them (a step has at most k pointers)."""

    n: int
    reads_queries = False

    def decide(self, n_pointers: np.ndarray, queries: Optional[torch.Tensor]) -> np.ndarray:
        use = np.asarray(n_pointers) >= max(self.n, 1)
        return np.where(use, POINTERS, SEARCH).astype(np.int8)

    def searches_every_token(self, max_pointers: int) -> bool:
        """Whether every token is searched whatever the pointers, when a step has at most
        ``max_pointers`` (k, or the clusters' limit); the runtime then searches a batch in
        one call, as without pointers (FAISS's results depend a little on how queries are
        batched)."""
        return self.n > max_pointers


def stream_continues(pos: Any, chunk: int = 1 << 22) -> np.ndarray:
    """(N,) bool: whether row i+1 continues row i's stream (pos[i+1] == pos[i] + 1); False
    for the last row and around unknown positions (-1). Read in chunks (memmap or ConcatRows)."""
    n = len(pos)
    out = np.zeros(n, dtype=bool)
    for s in range(0, max(n - 1, 0), chunk):
        e = min(n, s + chunk + 1)
        p = np.asarray(pos[s:e], dtype=np.int64)
        out[s:e - 1] = (p[1:] == p[:-1] + 1) & (p[:-1] >= 0)
    return out


def successors(ids: np.ndarray, continues: np.ndarray) -> np.ndarray:
    """ids + 1 where the id is a row (>= 0) whose next row continues its stream, else -1."""
    ids = np.asarray(ids, dtype=np.int64)
    ok = ids >= 0
    ok &= continues[np.where(ok, ids, 0)]
    return np.where(ok, ids + 1, -1)


def next_pointers(ids: np.ndarray, nbr_vals: np.ndarray, targets: np.ndarray,
                  continues: np.ndarray) -> np.ndarray:
    """(m, w) pointers for the next step: the successors of the neighbours ``ids`` (m, w; -1
    for none) whose value is the token observed now (``targets`` (m,)), else -1."""
    match = (np.asarray(ids) >= 0) & (np.asarray(nbr_vals) == np.asarray(targets)[:, None])
    return successors(np.where(match, ids, -1), continues)


def compact(ptrs: np.ndarray) -> np.ndarray:
    """(m, c) the rows' pointers moved to the front in their order, c = the largest count
    (at least 1), -1 after them."""
    ptrs = np.asarray(ptrs, dtype=np.int64)
    valid = ptrs >= 0
    slot = np.cumsum(valid, axis=1) - 1  # each pointer's place in its row
    width = max(1, int(slot[:, -1].max()) + 1) if ptrs.size else 1
    out = np.full((len(ptrs), width), -1, dtype=np.int64)
    r, c = np.nonzero(valid)
    out[r, slot[r, c]] = ptrs[r, c]
    return out


def nearest_first(ids: np.ndarray, dists: torch.Tensor, k: int
                  ) -> tuple[np.ndarray, torch.Tensor]:
    """Each row's neighbours sorted by distance (inf, i.e. -1 slots, last; ties keep their
    order), at most ``k`` kept."""
    d, order = torch.sort(dists.float(), dim=1, stable=True)
    ids_sorted = np.take_along_axis(np.asarray(ids), order.cpu().numpy(), axis=1)
    return ids_sorted[:, :k], d[:, :k]


class Expander(Protocol):
    """The live pointers of some streams -> candidates (``Clusters``): how many, and which.
    ``ptrs`` (streams, k) holds each stream's pointers compacted to the front, ``nlive``
    their counts; ``streams`` picks the rows."""

    def count_live(self, streams: np.ndarray, ptrs: np.ndarray, nlive: np.ndarray
                   ) -> np.ndarray: ...

    def expand_live(self, streams: np.ndarray, ptrs: np.ndarray, nlive: np.ndarray
                    ) -> np.ndarray: ...


# search(token indices (s,)) -> FAISS ids (s, k), FAISS distances (s, k), scoring dists (s, k)
SearchFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, torch.Tensor]]
# distances(token indices (u,), neighbour ids (u, c), -1 padded) -> scoring dists (u, c)
DistFn = Callable[[np.ndarray, np.ndarray], torch.Tensor]


@dataclass
class StreamResults:
    """The neighbours of every token of a ``run_streams`` call (token order of its input)."""

    ids: np.ndarray  # (n, k) int64 datastore rows, -1 padded
    faiss_dists: np.ndarray  # (n, k) float32 FAISS's distances (inf where not searched)
    dists: torch.Tensor  # (n, k) float32 distances for p_kNN, inf padded
    modes: np.ndarray  # (n,) int8 SEARCH / POINTERS / SKIP
    n_pointers: np.ndarray  # (n,) live pointers before each step
    final: list[np.ndarray]  # per stream: the pointers after its last token
    # (n, k) the neighbours' values (-1 padded), gathered once for the next pointers: the
    # retriever's p_kNN reads them instead of gathering again
    vals: np.ndarray


def run_streams(starts: Sequence[int], lengths: Sequence[int],
                init: Sequence[Optional[np.ndarray]], targets: np.ndarray,
                queries: Callable[[np.ndarray], torch.Tensor], search: SearchFn,
                distances: DistFn, vals: np.ndarray, continues: np.ndarray, k: int,
                policy: SearchPolicy, timing: Optional[dict[str, float]] = None,
                clusters: Optional[Expander] = None,
                preset_skip: Optional[np.ndarray] = None) -> StreamResults:
    """Score streams of consecutive tokens with pointers, in lockstep.

    Stream r is tokens ``starts[r] .. starts[r] + lengths[r] - 1`` of the n tokens (their
    ``targets``), in text order, starting with the pointers ``init[r]`` (None or empty: a
    fresh start). ``queries(idx)`` gives the keys of some tokens; ``search`` and
    ``distances`` find and measure neighbours (see SearchFn, DistFn); ``vals`` (N,) are the
    datastore's values and ``continues`` its ``stream_continues``. Each row's result depends
    only on its own stream, so streams can be grouped any way. ``timing`` gets the seconds of
    the pointer steps (distances, sort) and of the bookkeeping; ``search`` times itself.
    ``clusters`` (``Clusters``) turns each step's pointers (u, c) into candidates (u, c'),
    which the policy counts (``count``, without building them) and a pointer step builds
    (``expand``) and measures (the k nearest kept).
    ``preset_skip`` (n,) bool marks tokens whose search is skipped (a lambda model's gate
    decided before the search, lambda_model.py): those the policy would search become SKIP;
    those scored from their pointers keep them.
    """
    from fairseq_knnlm.adaptive import kernels  # numba: loaded by pointer runs only

    n = len(targets)
    starts_a = np.asarray(starts, dtype=np.int64)
    lengths_a = np.asarray(lengths, dtype=np.int64)
    num = len(starts_a)
    out_ids = np.full((n, k), -1, dtype=np.int64)
    out_fd = np.full((n, k), np.inf, dtype=np.float32)
    out_d = torch.full((n, k), float("inf"), dtype=torch.float32)
    vals = np.asarray(vals)
    out_v = np.full((n, k), -1, dtype=vals.dtype)
    continues = np.asarray(continues, dtype=bool)
    modes = np.zeros(n, dtype=np.int8)
    n_ptr = np.zeros(n, dtype=np.int64)
    # each stream's live pointers, compacted to the front (-1 after), and their count
    ptrs = np.full((num, k), -1, dtype=np.int64)
    nlive = np.zeros(num, dtype=np.int64)
    for r, p in enumerate(init):
        if p is not None and len(p):
            p = np.asarray(p, dtype=np.int64)
            p = p[p >= 0][:k]
            ptrs[r, :len(p)], nlive[r] = p, len(p)
    tgt = np.ascontiguousarray(targets, dtype=np.int64)
    clock = time.perf_counter
    t_ptr = t_book = 0.0
    for t in range(int(lengths_a.max()) if num else 0):
        t0 = clock()
        rows = np.nonzero(lengths_a > t)[0]
        idx = starts_a[rows] + t
        counts = (clusters.count_live(rows, ptrs, nlive) if clusters is not None
                  else nlive[rows])
        m = policy.decide(counts, queries(idx) if getattr(policy, "reads_queries", True)
                          else None)
        if preset_skip is not None:  # the gate decides only the tokens the policy searches
            m = np.where(preset_skip[idx] & (m == SEARCH), SKIP, m).astype(np.int8)
        modes[idx], n_ptr[idx] = m, counts
        on_ptrs = rows[m == POINTERS]
        p = None
        if len(on_ptrs):
            if clusters is not None:
                p = clusters.expand_live(on_ptrs, ptrs, nlive)
            else:
                p = ptrs[on_ptrs, :max(1, int(nlive[on_ptrs].max()))]
        kernels.clear(rows[m == SKIP], ptrs, nlive)  # no kNN: no pointers left
        t1 = clock()
        t_book += t1 - t0
        sel = np.nonzero(m == SEARCH)[0]
        if len(sel):
            ids, fd, d = search(idx[sel])
            ids = np.ascontiguousarray(ids, dtype=np.int64)
            out_ids[idx[sel]], out_fd[idx[sel]] = ids, fd
            out_d[idx[sel]] = d.float().cpu()
            t2 = clock()  # the search function times itself
            kernels.follow(ids, idx[sel], rows[sel], tgt, vals, continues, out_v, ptrs, nlive)
            t1 = clock()
            t_book += t1 - t2
        if p is not None:
            sel = np.nonzero(m == POINTERS)[0]
            d = distances(idx[sel], p)
            p, d = nearest_first(p, d.float().cpu(), k)
            w = p.shape[1]
            out_ids[idx[sel], :w] = p
            out_d[idx[sel], :w] = d
            t2 = clock()
            t_ptr += t2 - t1
            kernels.follow(np.ascontiguousarray(p), idx[sel], on_ptrs, tgt, vals, continues,
                           out_v, ptrs, nlive)
            t_book += clock() - t2
    if timing is not None:
        timing["pointer_distances"] = timing.get("pointer_distances", 0.0) + t_ptr
        timing["pointer_bookkeeping"] = timing.get("pointer_bookkeeping", 0.0) + t_book
    final = [ptrs[r, :nlive[r]].copy() for r in range(num)]
    return StreamResults(ids=out_ids, faiss_dists=out_fd, dists=out_d, modes=modes,
                         n_pointers=n_ptr, final=final, vals=out_v)


def split_streams(row_lengths: Sequence[int], stream_len: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, lengths, first_of_row) of the streams of consecutive rows of the given
    lengths (tokens laid out row after row): each row one stream (``stream_len`` 0), or cut
    into streams of ``stream_len`` tokens (the last one shorter). ``first_of_row`` marks the
    streams that begin a row: only those may continue the text before them."""
    rows = np.asarray(row_lengths, dtype=np.int64)
    row_starts = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64)
    if stream_len <= 0:
        return row_starts, rows, np.ones(len(rows), dtype=bool)
    per_row = np.maximum(1, -(-rows // stream_len))  # a 0-length row keeps one stream
    row_of = np.repeat(np.arange(len(rows)), per_row)
    j = np.arange(len(row_of)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    starts = row_starts[row_of] + j * stream_len
    lengths = np.minimum(stream_len, rows[row_of] - j * stream_len).clip(min=0)
    return starts.astype(np.int64), lengths.astype(np.int64), j == 0


class CarriedPointers:
    """The pointers a batch leaves for the next one, keyed by the text position that comes
    next: a row whose first scored token sits there continues that stream. Only the last
    batch's are kept (a later batch never continues an older one)."""

    def __init__(self) -> None:
        self._next: dict[int, np.ndarray] = {}

    def take(self, first_positions: np.ndarray) -> list[Optional[np.ndarray]]:
        """Each row's starting pointers (None: fresh start), given its first position."""
        return [self._next.get(int(p)) if p >= 0 else None for p in first_positions]

    def keep(self, last_positions: np.ndarray, final: list[np.ndarray]) -> None:
        self._next = {int(p) + 1: f for p, f in zip(last_positions, final) if p >= 0}


class Clusters:
    """RetoMaton's clustering of the datastore (Alon et al. 2022, sec. 3.2): k-means over the
    keys, so that a pointer stands for its whole cluster and pointers survive a token whose
    exact successor did not match. ``expand`` turns pointers into candidates: the pointers,
    then the members of their clusters (each cluster's ``per_cluster`` rows nearest to its
    centroid, first-seen cluster first), without duplicates, at most ``limit``.

    Files (``build_clusters``): PREFIX_assign.npy int32 (N,) each row's cluster,
    PREFIX_order.npy int64 (N,) the rows grouped by cluster, nearest to the centroid first,
    PREFIX_meta.json (num_clusters and the datastore it was built from)."""

    def __init__(self, assign: np.ndarray, order: np.ndarray, num_clusters: int,
                 per_cluster: int = 128, limit: int = 2048) -> None:
        self.assign = np.asarray(assign, dtype=np.int64)
        self.order = np.asarray(order, dtype=np.int64)
        self.bounds = np.searchsorted(self.assign[self.order], np.arange(num_clusters + 1))
        self.per_cluster, self.limit = int(per_cluster), int(limit)
        self.num_clusters = int(num_clusters)

        # the members as one padded table (C, per_cluster), -1 after a cluster's last
        sizes = np.minimum(np.diff(self.bounds), self.per_cluster)
        self.sizes = sizes.astype(np.int64)
        width = max(1, int(sizes.max()) if len(sizes) else 1)
        col = np.arange(width)
        at = self.bounds[:-1, None] + col[None, :]
        self.table = np.where(col[None, :] < sizes[:, None],
                              self.order[np.minimum(at, max(len(self.order) - 1, 0))], -1)
        # whether each row is one of its cluster's ``per_cluster`` members (in the table)
        rank = np.arange(len(self.order)) - self.bounds[self.assign[self.order]]
        self.in_table = np.zeros(len(self.assign), dtype=bool)
        self.in_table[self.order] = rank < self.per_cluster
        # the kernels' scratch, all False between calls: clusters met, rows already taken
        self._seen = np.zeros(self.num_clusters, dtype=bool)
        self._mark = np.zeros(len(self.assign), dtype=bool)

    def count_live(self, streams: np.ndarray, ptrs: np.ndarray, nlive: np.ndarray
                   ) -> np.ndarray:
        """(u,) how many candidates ``expand`` gives the live pointers of ``streams``
        (run_streams' compacted state), without building them: the members of their distinct
        clusters plus the pointers outside their cluster's table, at most ``limit``;
        compiled (adaptive/kernels.py)."""
        from fairseq_knnlm.adaptive import kernels

        return kernels.cluster_count(np.asarray(streams, dtype=np.int64), ptrs, nlive,
                                     self.assign, self.sizes, self.in_table, self.limit,
                                     self._seen)

    def expand_live(self, streams: np.ndarray, ptrs: np.ndarray, nlive: np.ndarray
                    ) -> np.ndarray:
        """``expand`` of the live pointers of ``streams``, compiled (adaptive/kernels.py)."""
        from fairseq_knnlm.adaptive import kernels

        return kernels.cluster_expand(np.asarray(streams, dtype=np.int64), ptrs, nlive,
                                      self.assign, self.table, self.sizes, self.limit,
                                      self._seen, self._mark)

    def members(self, cluster: int) -> np.ndarray:
        lo = self.bounds[cluster]
        return self.order[lo:min(self.bounds[cluster + 1], lo + self.per_cluster)]

    def expand(self, ptrs: np.ndarray) -> np.ndarray:
        """(u, c) pointers (-1 padded, no duplicate in a row) -> (u, w) candidates, -1
        padded: each row's pointers, then the members of their clusters in the order the
        clusters are first met, without the rows already there, at most ``limit``. One row at
        a time: the definition ``expand_live`` (compiled) equals, and ``count_live`` counts
        (tests/adaptive/test_kernels.py)."""
        rows = []
        for row in np.asarray(ptrs):
            p = row[row >= 0]
            if len(p):
                cs = self.assign[p]
                _, first = np.unique(cs, return_index=True)
                cand = np.concatenate([p] + [self.members(c) for c in cs[np.sort(first)]])
                _, first = np.unique(cand, return_index=True)
                p = cand[np.sort(first)][:self.limit]
            rows.append(p)
        out = np.full((len(rows), max([1] + [len(r) for r in rows])), -1, dtype=np.int64)
        for i, r in enumerate(rows):
            out[i, :len(r)] = r
        return out


def count_modes(modes: np.ndarray) -> dict[str, int]:
    """{'search': s, 'pointers': p, 'skip': q} of an int8 mode array."""
    c = np.bincount(np.asarray(modes, dtype=np.int64), minlength=3)
    return {name: int(c[m]) for m, name in MODE_NAMES.items()}


def searches_line(searches: int, tokens: int) -> str:
    """The end-of-pass line: 'kNN-LM searches: S of N tokens (x%)'."""
    pct = 100.0 * searches / tokens if tokens else 0.0
    return f"kNN-LM searches: {searches} of {tokens} tokens ({pct:.1f}%)"


def chains(fresh: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the runs of consecutive tokens that begin at each fresh token
    (and at token 0): the streams of a saved pass in its row order."""
    fresh = np.asarray(fresh).astype(bool).copy()
    if len(fresh):
        fresh[0] = True
    starts = np.nonzero(fresh)[0].astype(np.int64)
    lengths = np.diff(np.append(starts, len(fresh))).astype(np.int64)
    return starts, lengths


# ---- cluster files ----

def _cluster_paths(prefix: Any) -> dict[str, Path]:
    return {name: Path(f"{prefix}_{name}") for name in ("assign.npy", "order.npy", "meta.json")}


def build_clusters(ds: Any, prefix: Any, num_clusters: int, niter: int = 20, seed: int = 1,
                   max_points_per_centroid: int = 64, chunk: int = 1 << 16) -> dict[str, Any]:
    """k-means (FAISS) over a sample of the datastore's keys (``max_points_per_centroid``
    per cluster), then every row assigned to its nearest centroid; writes the
    ``Clusters`` files at ``prefix`` and returns their meta."""
    import faiss

    from fairseq_knnlm.errors import FlagError
    from fairseq_knnlm.flags import require_positive_int
    from fairseq_knnlm.store.datastore import check_finite_keys
    from fairseq_knnlm.store.memmaps import write_json_atomic

    n, d = ds.size, ds.dim
    if not 1 <= num_clusters <= n:
        raise FlagError(f"--num-clusters must be in 1..{n} (the datastore's rows), "
                        f"got {num_clusters}")
    require_positive_int(niter, "--niter")
    if seed < 0:
        raise FlagError(f"--seed must be >= 0, got {seed}")
    rng = np.random.default_rng(seed)
    m = min(n, num_clusters * max_points_per_centroid)
    sample = np.sort(rng.choice(n, m, replace=False))
    x = np.ascontiguousarray(ds.keys[sample], dtype=np.float32)
    check_finite_keys(ds, x, sample)
    t0 = time.perf_counter()
    km = faiss.Kmeans(d, num_clusters, niter=niter, seed=seed,
                      max_points_per_centroid=max_points_per_centroid, verbose=False)
    km.train(x)
    t1 = time.perf_counter()
    assign = np.empty(n, dtype=np.int32)
    dist = np.empty(n, dtype=np.float32)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        x = np.ascontiguousarray(ds.keys[s:e], dtype=np.float32)
        check_finite_keys(ds, x, s)
        dd, ii = km.index.search(x, 1)
        assign[s:e], dist[s:e] = ii[:, 0], dd[:, 0]
    order = np.lexsort((dist, assign)).astype(np.int64)  # by cluster, nearest first
    paths = _cluster_paths(prefix)
    paths["assign.npy"].parent.mkdir(parents=True, exist_ok=True)
    np.save(paths["assign.npy"], assign)
    np.save(paths["order.npy"], order)
    sizes = np.bincount(assign, minlength=num_clusters)
    meta = {"num_clusters": int(num_clusters), "size": int(n), "niter": niter, "seed": seed,
            "train_points": int(m), "train_s": round(t1 - t0, 1),
            "assign_s": round(time.perf_counter() - t1, 1),
            "cluster_size": {"mean": float(sizes.mean()), "max": int(sizes.max()),
                             "empty": int((sizes == 0).sum())},
            "dstore": str(ds.prefix), "datastore": ds.meta.fingerprint()}
    write_json_atomic(paths["meta.json"], meta)
    logger.info("clusters %s: %d clusters of %d rows (mean %.1f, max %d), k-means %.1fs, "
                "assignment %.1fs", prefix, num_clusters, n, sizes.mean(), sizes.max(),
                t1 - t0, meta["assign_s"])
    return meta


def load_clusters(prefix: Any, ds: Any, per_cluster: int = 128, limit: int = 2048,
                  flag: str = "--knn-clusters") -> Clusters:
    """The ``Clusters`` at ``prefix``, checked against the datastore ``ds``: FlagError naming
    ``flag`` and the file for missing, damaged or foreign files."""
    import json

    from fairseq_knnlm.errors import FlagError

    paths = _cluster_paths(prefix)
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise FlagError(f"{flag} {prefix}: {', '.join(missing)} not found (build them "
                        "with knnlm-clusters)")
    try:
        meta = json.loads(paths["meta.json"].read_text())
        num = int(meta["num_clusters"]) if isinstance(meta, dict) else None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FlagError(f"{flag} {prefix}: {paths['meta.json']} is not a knnlm-clusters meta "
                        f"file ({type(e).__name__}: {e})") from None
    if num is None or num < 1:
        raise FlagError(f"{flag} {prefix}: {paths['meta.json']} is not a knnlm-clusters meta "
                        "file (no num_clusters >= 1)")
    if meta.get("datastore") != ds.meta.fingerprint():
        raise FlagError(f"{flag} {prefix} was built from another datastore than "
                        f"{ds.prefix} (or before it was dumped again): rebuild it")
    arrays = {}
    for name in ("assign", "order"):
        path = paths[f"{name}.npy"]
        try:
            a = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise FlagError(f"{flag} {prefix}: {path} is damaged ({e}): rebuild it with "
                            "knnlm-clusters") from None
        if a.shape != (ds.size,) or a.dtype.kind not in "iu":
            raise FlagError(f"{flag} {prefix}: {path} holds {a.dtype} {a.shape}, not one "
                            f"integer per row of {ds.prefix} ({ds.size}): rebuild it")
        arrays[name] = a
    if ds.size and not (0 <= int(arrays["assign"].min()) and
                        int(arrays["assign"].max()) < num):
        raise FlagError(f"{flag} {prefix}: {paths['assign.npy']} names clusters outside "
                        f"0..{num - 1} (num_clusters in {paths['meta.json']}): rebuild it")
    order = arrays["order"]
    if ds.size and not (0 <= int(order.min()) and int(order.max()) < ds.size):
        raise FlagError(f"{flag} {prefix}: {paths['order.npy']} names rows outside "
                        f"0..{ds.size - 1}: rebuild it")
    return Clusters(arrays["assign"], order, num, per_cluster=per_cluster, limit=limit)

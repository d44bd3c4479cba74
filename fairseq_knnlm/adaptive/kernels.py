"""Compiled (numba) inner loops of the pointer stepping (``pointers.run_streams``).

Each function here does, in one pass per token over its k neighbours, what the numpy
definitions in ``pointers`` do in a dozen whole-array passes: ``follow`` is
``next_pointers`` (plus the neighbours' values the retriever's p_kNN reads),
``cluster_expand`` is ``Clusters.expand`` and ``cluster_count`` counts its candidates
without building them. They are integer work only, so the results are the numpy
definitions' exactly (tests/adaptive/test_kernels.py compares them); the numpy versions stay
as the readable definitions.

The pointers of each stream live in one (streams, k) int64 array, compacted to the front in
their order and -1 after them, with their count beside it (``nlive``): a step reads a
stream's live pointers as a prefix, without a pass over the whole row.

Compiled on first use and cached on disk (numba's ``cache=True``: next to this file, or in
numba's user cache dir where that is read-only), so a fresh eval-lm process loads them in
~0.1 s. Imported only by a pointer run.
"""

from __future__ import annotations

import logging

import numpy as np

# fairseq sets the root logger to DEBUG on import; numba's compiler logs every bytecode
# there (megabytes, and seconds of compile time) unless its own logger says otherwise
logging.getLogger("numba").setLevel(logging.WARNING)

from numba import njit  # noqa: E402


@njit(cache=True, nogil=True)
def follow(ids: np.ndarray, tokens: np.ndarray, streams: np.ndarray, targets: np.ndarray,
           vals: np.ndarray, continues: np.ndarray, out_vals: np.ndarray, ptrs: np.ndarray,
           nlive: np.ndarray) -> None:
    """For each row i of ``ids`` (s, w; datastore rows, -1 for none), the neighbours of
    token ``tokens[i]`` of stream ``streams[i]``: write their values to
    ``out_vals[tokens[i], :w]`` (-1 for none) and make the stream's pointers the successors
    of those whose value is ``targets[tokens[i]]`` and whose next row continues their stream
    (``continues``), compacted in neighbour order; ``nlive[stream]`` their count, -1 after
    them up to the stream's previous count."""
    s, w = ids.shape
    nvals = len(vals)
    for i in range(s):
        tok, st = tokens[i], streams[i]
        tgt = targets[tok]
        c = 0
        for j in range(w):
            r = ids[i, j]
            if r < 0:
                out_vals[tok, j] = -1
                continue
            if r >= nvals:  # compiled code has no bounds checks: never read past the end
                raise IndexError("a neighbour id is past the datastore's last row")
            v = vals[r]
            out_vals[tok, j] = v
            if v == tgt and continues[r]:
                ptrs[st, c] = r + 1
                c += 1
        for j in range(c, nlive[st]):
            ptrs[st, j] = -1
        nlive[st] = c


@njit(cache=True, nogil=True)
def clear(streams: np.ndarray, ptrs: np.ndarray, nlive: np.ndarray) -> None:
    """Drop the pointers of ``streams``."""
    for st in streams:
        for j in range(nlive[st]):
            ptrs[st, j] = -1
        nlive[st] = 0


@njit(cache=True, nogil=True)
def cluster_count(streams: np.ndarray, ptrs: np.ndarray, nlive: np.ndarray,
                  assign: np.ndarray, sizes: np.ndarray, in_table: np.ndarray, limit: int,
                  seen: np.ndarray) -> np.ndarray:
    """(u,) how many candidates ``Clusters.expand`` gives each stream's live pointers:
    the members of their distinct clusters plus the pointers outside their cluster's table,
    at most ``limit``. ``seen`` (clusters,) bool scratch, all False on entry and on return."""
    out = np.zeros(len(streams), dtype=np.int64)
    for i in range(len(streams)):
        st = streams[i]
        n = nlive[st]
        total = 0
        for j in range(n):
            p = ptrs[st, j]
            c = assign[p]
            if not seen[c]:
                seen[c] = True
                total += sizes[c]
            if not in_table[p]:
                total += 1
        for j in range(n):
            seen[assign[ptrs[st, j]]] = False
        out[i] = min(total, limit)
    return out


@njit(cache=True, nogil=True)
def cluster_expand(streams: np.ndarray, ptrs: np.ndarray, nlive: np.ndarray,
                   assign: np.ndarray, table: np.ndarray, sizes: np.ndarray, limit: int,
                   seen: np.ndarray, mark: np.ndarray) -> np.ndarray:
    """(u, w) ``Clusters.expand`` of each stream's live pointers: the pointers, then the
    members of their clusters in the order the clusters are first met, without the rows
    already there, at most ``limit``; -1 padded, w the longest (at least 1). ``seen``
    (clusters,) and ``mark`` (datastore rows,) bool scratch, all False on entry and return."""
    u = len(streams)
    count = np.zeros(u, dtype=np.int64)
    width = 1
    # first pass: the lengths, so the output is allocated once
    for i in range(u):
        st = streams[i]
        n = nlive[st]
        got = min(n, limit)
        for j in range(n):
            mark[ptrs[st, j]] = True
        for j in range(n):
            if got >= limit:
                break
            c = assign[ptrs[st, j]]
            if seen[c]:
                continue
            seen[c] = True
            for q in range(sizes[c]):
                if not mark[table[c, q]]:
                    got += 1
                    if got >= limit:
                        break
        for j in range(n):
            p = ptrs[st, j]
            mark[p] = False
            seen[assign[p]] = False
        count[i] = got
        width = max(width, got)
    out = np.full((u, width), -1, dtype=np.int64)
    for i in range(u):
        st = streams[i]
        n = nlive[st]
        got = 0
        for j in range(min(n, limit)):
            out[i, got] = ptrs[st, j]
            got += 1
        for j in range(n):
            mark[ptrs[st, j]] = True
        for j in range(n):
            if got >= limit:
                break
            c = assign[ptrs[st, j]]
            if seen[c]:
                continue
            seen[c] = True
            for q in range(sizes[c]):
                m = table[c, q]
                if not mark[m]:
                    out[i, got] = m
                    got += 1
                    if got >= limit:
                        break
        for j in range(n):
            p = ptrs[st, j]
            mark[p] = False
            seen[assign[p]] = False
    return out


def warm(vals_dtype: np.dtype) -> None:
    """Load (or compile) every kernel for the datastore's value type on tiny arrays, so a
    pass pays numba's one-time start (~0.5-1 s) before its timed steps, not in the first."""
    vals = np.zeros(2, dtype=vals_dtype)
    ids = np.zeros((1, 1), dtype=np.int64)
    one = np.zeros(1, dtype=np.int64)
    ptrs = np.full((1, 1), -1, dtype=np.int64)
    nlive = np.zeros(1, dtype=np.int64)
    follow(ids, one, one, one, vals, np.zeros(2, dtype=bool), np.zeros((1, 1), vals.dtype),
           ptrs, nlive)
    clear(one, ptrs, nlive)
    flags = np.zeros(2, dtype=bool)
    cluster_count(one, ptrs, nlive, one, one, flags, 1, flags)
    cluster_expand(one, ptrs, nlive, one, ids, one, 1, flags, flags)

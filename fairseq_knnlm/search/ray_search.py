"""Sharded search on Ray (``--knn-engine ray``): one actor per shard of a sharded index
(index/sharded.py) loads its FAISS index from its path and, for exact distances, reads its
rows of keys (memory-mapped, or copied into its RAM with --move-dstore-to-mem), and keeps
them for the whole run. Each batch's queries go to the object store once and fan out to all
actors; each returns its top-k with global datastore ids and their exact distances; the k
nearest are merged as FAISS's IndexShards merges them (index.sharded.merge_topk), so the
answers are those of the single-process search over the same shards.

Faults: an actor that dies is restarted by Ray (``ACTOR_RESTARTS``) and the request it was
serving retried (``max_task_retries``); a shard whose actor cannot be served any more fails
the run with one line naming the shard (never a result from fewer shards). Before any actor
starts, each shard's memory (index file, plus its keys with --move-dstore-to-mem) is checked
against the cluster's nodes (index.sharded.check_capacity).

``RayShardedIndex`` quacks like a FAISS index for the retriever: ``search(q, k)`` returns
(distances, ids); ``exact_for(ids)`` the exact distances of the last search's ids.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from fairseq_knnlm.errors import KNNLMError
from fairseq_knnlm.index.ray_build import connect, node_memory, worker_env
from fairseq_knnlm.index.sharded import (
    check_capacity,
    check_shard,
    load_shard,
    merge_topk,
    read_manifest,
    shard_needs,
)
from fairseq_knnlm.scoring.knn import recompute_distances
from fairseq_knnlm.store.datastore import KEY_DTYPES, open_datastore, read_meta
from fairseq_knnlm.store.memmaps import copy_to_memory

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

ACTOR_RESTARTS = 3  # restarts of a shard's actor (and retries of its request) before failing
# FAISS threads per actor (default: this process's own FAISS threads). FAISS's IVFPQ distances
# differ in the last bits with the thread count (its BLAS blocking), which reorders
# near-equal neighbours: the same count as in this process gives the same answers bit for
# bit; fewer (e.g. cores / actors per node) run faster on a loaded node.
THREADS_ENV = "FAIRSEQ_KNNLM_RAY_THREADS"
# where the exact distances (--knn-sim-func l2/dot) are computed: "actors" (default: each
# actor for its own top-k, next to its keys, in the same round trip: S x k rows per query over
# S shards), "owners" (a second round trip: each actor for the merged ids it holds, k rows
# per query in all) or "driver" (this process, for the merged k, from its memmap of the keys:
# k rows per query, every one read where the driver runs). All give the same answers.
EXACT_ENV = "FAIRSEQ_KNNLM_RAY_EXACT"
EXACT_MODES = ("actors", "owners", "driver")


class ShardUnavailable(KNNLMError):
    """A shard whose actor cannot serve it (died past its restarts, or failed to load)."""


class ShardServer:
    """What one actor holds and does: shard ``i`` of the manifest at ``index_path``, searched
    with nprobe ``probe``; exact distances (``sim_func`` l2 or dot) from its rows of keys."""

    def __init__(self, index_path: str, i: int, dstore_prefix: str, probe: int,
                 sim_func: str, keys_in_memory: bool = False, mmap: bool = False,
                 threads: int = 0) -> None:
        self.threads = threads
        self._threads()
        man = read_manifest(index_path)
        self.index = load_shard(man, i, probe, mmap)
        s = man.shards[i]
        self.lo, self.hi, self.sim_func = s.lo, s.hi, sim_func
        self.keys: Any = None
        if sim_func in ("l2", "dot"):
            ds = open_datastore(dstore_prefix)
            rows = ds.keys[s.lo:s.hi]  # this shard's rows only
            self.keys = copy_to_memory(rows) if keys_in_memory else rows

    def _threads(self) -> None:
        """torch's gathers on one thread, then FAISS's threads (in that order: in a Ray worker
        torch and FAISS may share one OpenMP runtime, where torch's setting would also be
        FAISS's); set per call, as OpenMP's setting belongs to the calling thread."""
        import faiss

        torch.set_num_threads(1)
        if self.threads > 0:
            faiss.omp_set_num_threads(self.threads)

    def ready(self) -> int:
        return os.getpid()

    def search(self, queries: np.ndarray, k: int, exact: bool = True
               ) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """(distances, global ids, exact distances or None), each (n, k)."""
        self._threads()
        q = np.ascontiguousarray(queries, dtype=np.float32)
        d, ids = self.index.search(q, k)
        if self.keys is None or not exact:
            return d, ids, None
        local = np.where(ids >= 0, ids - self.lo, -1)
        ex = recompute_distances(torch.from_numpy(np.array(q)), local, self.keys, self.sim_func)
        return d, ids, ex.numpy()

    def exact(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact distances (n, k) of the global ``ids`` this shard holds (+inf elsewhere):
        only those rows are read."""
        self._threads()
        own = (ids >= self.lo) & (ids < self.hi)
        out = np.full(ids.shape, np.inf, dtype=np.float32)
        rows, cols = np.nonzero(own)
        if len(rows):
            q = torch.from_numpy(np.ascontiguousarray(queries[rows], dtype=np.float32))
            local = (ids[rows, cols] - self.lo)[:, None]
            out[rows, cols] = recompute_distances(q, local, self.keys, self.sim_func)[:, 0]
        return out


class RayShardedIndex:
    """The shards of a sharded index served by Ray actors, searched as one index."""

    def __init__(self, index_path: PathLike, dstore_prefix: PathLike, probe: int = 32,
                 sim_func: str = "l2", keys_in_memory: bool = False, mmap: bool = False,
                 address: Optional[str] = None, threads: Optional[int] = None,
                 max_restarts: int = ACTOR_RESTARTS, exact: Optional[str] = None) -> None:
        exact = exact or os.environ.get(EXACT_ENV) or "actors"
        if exact not in EXACT_MODES:
            raise KNNLMError(f"{EXACT_ENV} must be one of {', '.join(EXACT_MODES)}, got "
                             f"{exact!r}")
        if exact == "driver" and sim_func in ("l2", "dot"):
            sim_func, keys_in_memory = "faiss_l2", False  # actors hold no keys
        self.exact, self.sim_func = exact, sim_func
        self.path = Path(index_path)
        self.man = read_manifest(index_path)
        for i in range(len(self.man.shards)):  # every shard present and matching, first
            check_shard(self.man, i)
        self.d = self.man.dim
        self.ntotal = self.man.ntotal
        self.ray = ray = connect(address)
        meta = read_meta(dstore_prefix)
        key_bytes = KEY_DTYPES[meta.key_dtype].itemsize if sim_func in ("l2", "dot") else 0
        self.needs = shard_needs(self.man, keys_in_memory, key_bytes, mmap)
        check_capacity(self.needs, node_memory(ray), "the Ray cluster",
                       [self.man.name(i) for i in range(len(self.needs))])
        n = len(self.man.shards)
        if threads is None:
            import faiss

            threads = int(os.environ.get(THREADS_ENV) or faiss.omp_get_max_threads())
        actor = ray.remote(ShardServer)
        self.actors = [
            actor.options(num_cpus=0, memory=max(1, need), max_restarts=max_restarts,
                          max_task_retries=max_restarts, scheduling_strategy="SPREAD",
                          runtime_env=worker_env(threads)).remote(
                str(self.path), i, str(dstore_prefix), probe, sim_func, keys_in_memory,
                mmap, threads)
            for i, need in enumerate(self.needs)]
        t0 = time.perf_counter()
        self._gather([a.ready.remote() for a in self.actors])
        logger.info("Ray: %d shard actors of %s ready in %.1fs (RAM per actor: %s GB)", n,
                    self.path, time.perf_counter() - t0,
                    ", ".join(f"{b / 1e9:.3g}" for b in self.needs))
        self._last: Optional[tuple[np.ndarray, Optional[np.ndarray]]] = None
        self.timing = {"calls": 0, "seconds": 0.0}

    def _gather(self, refs: list) -> list:
        """ray.get of one request per shard; a shard that cannot answer: one line naming it."""
        ray = self.ray
        out = []
        for i, r in enumerate(refs):
            try:
                out.append(ray.get(r))
            except ray.exceptions.RayError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, KNNLMError):
                    raise ShardUnavailable(str(cause)) from e
                first = str(cause or e).strip().splitlines()
                raise ShardUnavailable(
                    f"{self.man.name(i)} cannot be served on Ray ({type(e).__name__}: "
                    f"{first[0] if first else ''}): the run stops rather than answer from "
                    f"fewer shards") from e
        return out

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        t0 = time.perf_counter()
        q = self.ray.put(np.ascontiguousarray(queries, dtype=np.float32))
        owners = self.exact == "owners" and self.sim_func in ("l2", "dot")
        res = self._gather([a.search.remote(q, k, not owners) for a in self.actors])
        extra = [r[2] for r in res]
        d, ids, ex = merge_topk([r[0] for r in res], [r[1] for r in res], k,
                                None if any(e is None for e in extra) else extra)
        if owners:  # the merged ids' exact distances, each from the shard that holds it
            ids_ref = self.ray.put(ids)
            parts = self._gather([a.exact.remote(q, ids_ref) for a in self.actors])
            ex = np.full(ids.shape, np.inf, dtype=np.float32)
            for s, part in zip(self.man.shards, parts):
                own = (ids >= s.lo) & (ids < s.hi)
                ex[own] = part[own]
        self._last = (ids, ex)
        self.timing["calls"] += 1
        self.timing["seconds"] += time.perf_counter() - t0
        return d, ids

    def exact_for(self, ids: np.ndarray) -> Optional[np.ndarray]:
        """The exact distances the actors computed for the last search, if ``ids`` are its
        ids (None otherwise: the caller computes them)."""
        if self._last is not None and self._last[0] is ids:
            return self._last[1]
        return None

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:  # noqa: BLE001  (already gone)
                pass
        self.actors = []

"""Retrieval for kNN-LM: FAISS search over a datastore and p_kNN of the targets.

Plain Python, no fairseq: the scorer passes (n, D) queries (every scored position of a batch
at once) and (n,) targets; ``KNNRetriever.score`` returns log p_kNN(target) and what was
retrieved, which the offline-sweep writer can save. ``score_streams`` does the same with
pointers (pointers.py): token by token along each stream, searching only where the search
policy says so. ``--knn-torch-exact`` replaces the FAISS index by an exact torch search
(torch_search.py) over the keys held in memory.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from fairseq_knnlm.adaptive.pointers import (
    SEARCH,
    SKIP,
    Expander,
    SearchPolicy,
    StreamResults,
    run_streams,
    stream_continues,
)
from fairseq_knnlm.errors import FlagError
from fairseq_knnlm.flags import check_engine_flags, check_retrieval_flags
from fairseq_knnlm.index.kinds import _faiss
from fairseq_knnlm.index.load import check_index_matches, load_index, search
from fairseq_knnlm.scoring.knn import KNN_LOGP_FLOOR, knn_log_prob, recompute_distances
from fairseq_knnlm.store.datastore import Datastore, open_datastore

logger = logging.getLogger(__name__)


@dataclass
class Retrieved:
    ids: np.ndarray  # (n, k) int64 datastore rows, -1 where FAISS found fewer than k
    faiss_dists: np.ndarray  # (n, k) float32 FAISS (quantized) squared L2 (inf: not searched)
    dists: torch.Tensor  # (n, k) float32 distance used for p_kNN (smaller is closer)
    nbr_vals: torch.Tensor  # (n, k) int64 next-token ids of the neighbours (-1 where masked)
    valid: torch.Tensor  # (n, k) bool
    # with pointers (pointers.py): each token's mode (SEARCH, POINTERS, SKIP) and its live
    # pointers before the step; None: every token was searched
    modes: Optional[np.ndarray] = None
    n_pointers: Optional[np.ndarray] = None


class CodeDistances:
    """Squared L2 between queries and datastore rows as the index stores them, i.e. FAISS's
    own distances up to rounding: the query through the index's pre-transform (OPQ, PCA),
    the row reconstructed from its code (IVF lists get a direct map, 8 bytes per row, on
    first use). For pointer steps with FAISS distances (--knn-sim-func faiss_l2)."""

    def __init__(self, index: Any) -> None:
        faiss = _faiss()
        self.pre = None
        if not hasattr(index, "this") or isinstance(faiss.downcast_index(index),
                                                    faiss.IndexShards):
            raise FlagError("--knn-pointers with FAISS distances (faiss_l2) reads one index's "
                            "codes; a sharded index has none in this process: use "
                            "--knn-sim-func l2")
        base = faiss.downcast_index(index)
        if isinstance(base, faiss.IndexPreTransform):
            self.pre = base
            base = faiss.downcast_index(base.index)
        self.base = base
        ivf = faiss.try_extract_index_ivf(base)
        if ivf is not None:
            ivf.make_direct_map()

    def __call__(self, queries: torch.Tensor, ids: np.ndarray) -> torch.Tensor:
        q = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        if self.pre is not None:
            faiss = _faiss()
            for i in range(self.pre.chain.size()):
                q = faiss.downcast_VectorTransform(self.pre.chain.at(i)).apply(q)
        ids = np.asarray(ids, dtype=np.int64)
        valid = ids >= 0
        out = np.full(ids.shape, np.inf, dtype=np.float32)
        rows, cols = np.nonzero(valid)
        if len(rows):
            rec = self.base.reconstruct_batch(np.ascontiguousarray(ids[rows, cols]))
            out[rows, cols] = ((rec - q[rows]) ** 2).sum(1)
        return torch.from_numpy(out).to(queries.device)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside the block (restored after).

    The exact distances are gathers of key rows in blocks of a few queries: many short
    OpenMP regions, memory bound. Right after a FAISS call of 256 queries the gathers took
    ~10x longer with torch's two threads than with one (2 cores), and 5-8x longer in a
    full-search pass on a loaded machine (other jobs taking a core): a region ends only when
    all its threads are done, and idle OpenMP threads spin (the package sets
    OMP_WAIT_POLICY=PASSIVE before FAISS loads). The LM forward keeps all threads.

    With the pip wheels torch and FAISS share one OpenMP runtime, so this also sets FAISS's
    thread count: ``KNNRetriever.search`` therefore runs FAISS under ``faiss_threads`` with
    the count it had when the retriever was made (inside a ``torch_threads(1)`` block too).
    docs/performance.md has the numbers."""
    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def faiss_thread_count() -> int:
    import faiss

    return int(faiss.omp_get_max_threads())


@contextlib.contextmanager
def faiss_threads(n: int) -> Iterator[None]:
    """FAISS's OpenMP threads set to ``n`` inside the block (restored after): its searches
    keep every core where a ``torch_threads(1)`` block around them (pointer stepping) would
    otherwise leave FAISS one thread (one shared OpenMP runtime)."""
    import faiss

    before = faiss.omp_get_max_threads()
    if before == n:
        yield
        return
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


class KNNRetriever:
    """Holds a datastore and its FAISS index; searches and scores batches of queries."""

    def __init__(
        self,
        dstore_prefix: Union[str, Path],
        index_path: Optional[Union[str, Path]],
        k: int = 1024,
        probe: int = 32,
        sim_func: str = "l2",  # l2, faiss_l2 (alias do_not_recomp_l2) or dot
        temperature: float = 1.0,
        keys_in_memory: bool = False,
        load_keys: bool = True,
        gpu: bool = False,
        mmap_index: bool = False,
        torch_exact: bool = False,
        engine: str = "local",
        ray_address: Optional[str] = None,
    ) -> None:
        sim_func = check_retrieval_flags(k, probe, temperature, sim_func, load_keys,
                                         torch_exact, index_path is not None)
        check_engine_flags(engine, ray_address, torch_exact, gpu)
        self.ds: Datastore = open_datastore(dstore_prefix, load_keys=load_keys,
                                            keys_in_memory=keys_in_memory)
        if k > self.ds.size:
            raise FlagError(f"--k {k} is larger than the datastore ({self.ds.size} entries)")
        self.k, self.sim_func, self.temperature = k, sim_func, temperature
        self.record: dict[str, Any] = {}
        self.index: Any
        if torch_exact:
            from fairseq_knnlm.search.torch_search import TorchExactIndex

            if gpu and not torch.cuda.is_available():
                raise FlagError("--knn-torch-exact --knn-gpu needs a visible CUDA GPU")
            self.index = TorchExactIndex(self.ds.keys, "dot" if sim_func == "dot" else "l2",
                                         device="cuda" if gpu else "cpu")
            what = f"exact torch search on {'cuda' if gpu else 'cpu'}"
        elif engine == "ray":  # one actor per shard (search/ray_search.py; imports Ray)
            from fairseq_knnlm.search.ray_search import RayShardedIndex

            assert index_path is not None
            self.record = check_index_matches(index_path, self.ds)
            if not self.record.get("sharded"):
                raise FlagError(f"--knn-engine ray serves a sharded index (knnlm-build-index "
                                f"--shards N or --engine ray); {index_path} is one piece")
            self.index = RayShardedIndex(index_path, self.ds.prefix, probe=probe,
                                         sim_func=sim_func, keys_in_memory=keys_in_memory,
                                         mmap=mmap_index, address=ray_address)
            what = (f"index {index_path} ({self.record.get('settings', {}).get('index_type')}"
                    f", {len(self.index.actors)} shards on Ray)")
        else:
            assert index_path is not None
            self.record = check_index_matches(index_path, self.ds)
            self.index = load_index(index_path, probe=probe, gpu=gpu, mmap=mmap_index)
            what = f"index {index_path} ({self.record.get('settings', {}).get('index_type')})"
        self.torch_exact, self.gpu = torch_exact, gpu
        # values as one contiguous int64 tensor: gathers by id are then one indexing op
        self.vals = torch.from_numpy(np.asarray(self.ds.vals[:, 0], dtype=np.int64))
        self._continues: Optional[np.ndarray] = None
        self._code_dists: Optional[CodeDistances] = None
        self.timing: dict[str, float] = defaultdict(float)  # seconds per stage, for profiling
        self.search_threads = faiss_thread_count()  # FAISS's threads for every search
        logger.info("kNN-LM datastore %s: %d entries, dim %d, key type %s; %s",
                    self.ds.prefix, self.ds.size, self.ds.dim, self.ds.meta.keytype, what)

    # ---- the pieces of a retrieval ----
    def search(self, queries: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's (or the torch search's) distances and ids (n, k) for float queries."""
        t0 = time.perf_counter()
        with faiss_threads(self.search_threads):
            fd, ids = search(self.index, queries.detach().float().cpu().numpy(), self.k)
        self.timing["faiss_search"] += time.perf_counter() - t0
        return fd, ids

    def distances(self, queries: torch.Tensor, ids: np.ndarray, faiss_dists: np.ndarray
                  ) -> torch.Tensor:
        """(n, k) distances for p_kNN of the rows found: FAISS's own (faiss_l2), or exact
        from the keys; +inf at -1 ids."""
        t0 = time.perf_counter()
        q = queries.detach().float()
        if self.sim_func == "faiss_l2" or (self.torch_exact and self.sim_func == "l2"):
            # the torch search's distances are the exact squared L2 already
            d = torch.from_numpy(np.where(ids >= 0, faiss_dists, np.inf).astype(np.float32))
            d = d.to(q.device)
        else:
            remote = getattr(self.index, "exact_for", None)  # computed by the shards' actors
            ex = remote(ids) if remote is not None else None
            if ex is not None:
                d = torch.from_numpy(ex).to(q.device)
            else:
                assert self.ds.keys is not None
                d = recompute_distances(q, ids, self.ds.keys, self.sim_func)
        self.timing["exact_distances"] += time.perf_counter() - t0
        return d

    def pointer_distances(self, queries: torch.Tensor, ids: np.ndarray) -> torch.Tensor:
        """(u, c) distances of given rows (-1 padded): exact from the keys (l2, dot), or from
        the index's codes (faiss_l2: what FAISS would have returned for them)."""
        if self.sim_func == "faiss_l2":
            if self.torch_exact:
                assert self.ds.keys is not None
                return recompute_distances(queries, ids, self.ds.keys, "l2")
            if self._code_dists is None:
                self._code_dists = CodeDistances(self.index)
            return self._code_dists(queries, ids)
        assert self.ds.keys is not None
        return recompute_distances(queries, ids, self.ds.keys, self.sim_func)

    def values(self, ids: np.ndarray, device: Any = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The neighbours' values (-1 where masked) and the valid mask, both (n, k)."""
        t0 = time.perf_counter()
        valid_np = np.asarray(ids) >= 0
        safe = torch.from_numpy(np.where(valid_np, ids, 0))
        nbr_vals = self.vals[safe].masked_fill(torch.from_numpy(~valid_np), -1)
        self.timing["gather_values"] += time.perf_counter() - t0
        return nbr_vals.to(device), torch.from_numpy(valid_np).to(device)

    @property
    def continues(self) -> np.ndarray:
        """Which rows continue their stream in the next row (pointers.stream_continues)."""
        if self._continues is None:
            t0 = time.perf_counter()
            self._continues = stream_continues(self.ds.pos)
            t1 = time.perf_counter()
            from fairseq_knnlm.adaptive import kernels  # numba: pointer runs only

            kernels.warm(self.vals.numpy().dtype)
            logger.info("pointers: read the position map of %d rows in %.1fs, loaded the "
                        "compiled stepping in %.1fs", self.ds.size, t1 - t0,
                        time.perf_counter() - t1)
        return self._continues

    # ---- whole retrievals ----
    def retrieve(self, queries: torch.Tensor) -> Retrieved:
        q = queries.detach().float()
        fd, ids = self.search(q)
        with torch_threads(1):  # see torch_threads
            dists = self.distances(q, ids, fd)
        nbr_vals, valid = self.values(ids, q.device)
        self.timing["queries"] += len(q)
        return Retrieved(ids=ids, faiss_dists=fd, dists=dists, nbr_vals=nbr_vals, valid=valid)

    def log_prob(self, r: Retrieved, targets: torch.Tensor,
                  temperature: Optional[float]) -> torch.Tensor:
        """log p_kNN(targets) of a retrieval; ``KNN_LOGP_FLOOR`` for its SKIP tokens."""
        t0 = time.perf_counter()
        logp = knn_log_prob(r.dists, r.nbr_vals, targets.to(r.dists.device),
                            temperature or self.temperature, r.valid)
        if r.modes is not None:
            skip = torch.from_numpy(r.modes == SKIP).to(logp.device)
            logp = logp.masked_fill(skip, KNN_LOGP_FLOOR)
        self.timing["knn_softmax"] += time.perf_counter() - t0
        return logp

    def score(self, queries: torch.Tensor, targets: torch.Tensor,
              temperature: Optional[float] = None) -> tuple[torch.Tensor, Retrieved]:
        """log p_kNN(targets) (n,) in float32, and the retrieval it came from."""
        r = self.retrieve(queries)
        return self.log_prob(r, targets, temperature), r

    def score_subset(self, queries: torch.Tensor, targets: torch.Tensor, search: np.ndarray,
                     temperature: Optional[float] = None) -> tuple[torch.Tensor, Retrieved]:
        """``score`` for the tokens where ``search`` (n,) bool is set, in one call; the
        others get no neighbours (-1 ids, inf distances), mode SKIP and ``KNN_LOGP_FLOOR``.
        Values and log p_kNN are computed for the searched rows only (row by row the same
        numbers as ``score`` of those rows) and placed into the batch's arrays."""
        n, dev = len(targets), queries.device
        sel = np.nonzero(np.asarray(search, dtype=bool))[0]
        ids = np.full((n, self.k), -1, dtype=np.int64)
        fd = np.full((n, self.k), np.inf, dtype=np.float32)
        d = torch.full((n, self.k), float("inf"), dtype=torch.float32, device=dev)
        nbr_vals = torch.full((n, self.k), -1, dtype=torch.long, device=dev)
        valid = torch.zeros((n, self.k), dtype=torch.bool, device=dev)
        logp = torch.full((n,), KNN_LOGP_FLOOR, dtype=torch.float32, device=dev)
        if len(sel):
            at = torch.from_numpy(sel).to(dev)
            r = self.retrieve(queries[at])
            ids[sel], fd[sel] = r.ids, r.faiss_dists
            d[at], nbr_vals[at], valid[at] = r.dists.to(dev), r.nbr_vals.to(dev), r.valid.to(dev)
            logp[at] = self.log_prob(r, targets[at], temperature).to(dev)
        modes = np.full(n, SKIP, dtype=np.int8)
        modes[sel] = SEARCH
        r = Retrieved(ids=ids, faiss_dists=fd, dists=d, nbr_vals=nbr_vals, valid=valid,
                      modes=modes, n_pointers=np.zeros(n, dtype=np.int64))
        return logp, r

    def run_streams(self, queries: torch.Tensor, targets: torch.Tensor,
                    starts: Sequence[int], lengths: Sequence[int],
                    init: Sequence[Optional[np.ndarray]], policy: SearchPolicy,
                    clusters: Optional[Expander] = None,
                    preset_skip: Optional[np.ndarray] = None) -> StreamResults:
        """pointers.run_streams with this retriever's search and distances."""
        q = queries.detach().float()

        def search_fn(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
            qi = q[torch.from_numpy(idx)]
            fd, ids = self.search(qi)
            return ids, fd, self.distances(qi, ids, fd)

        def dist_fn(idx: np.ndarray, ids: np.ndarray) -> torch.Tensor:
            return self.pointer_distances(q[torch.from_numpy(idx)], ids)

        with torch_threads(1):  # see torch_threads
            return run_streams(starts, lengths, init, targets.cpu().numpy(),
                               lambda idx: q[torch.from_numpy(idx)], search_fn, dist_fn,
                               self.vals.numpy(), self.continues, self.k, policy,
                               self.timing, clusters, preset_skip)

    def score_streams(self, queries: torch.Tensor, targets: torch.Tensor,
                      starts: Sequence[int], lengths: Sequence[int],
                      init: Sequence[Optional[np.ndarray]], policy: SearchPolicy,
                      temperature: Optional[float] = None,
                      clusters: Optional[Expander] = None,
                      preset_skip: Optional[np.ndarray] = None
                      ) -> tuple[torch.Tensor, Retrieved, list[np.ndarray]]:
        """log p_kNN(targets) with pointers (pointers.run_streams; ``KNN_LOGP_FLOOR`` for
        SKIP tokens), the neighbours used, and each stream's pointers after its last token."""
        res = self.run_streams(queries, targets, starts, lengths, init, policy, clusters,
                               preset_skip)
        dev = queries.device
        # the values were gathered by the stepping already (= self.values: tested)
        nbr_vals = torch.from_numpy(res.vals).to(dev)
        valid = torch.from_numpy(res.ids >= 0).to(dev)
        r = Retrieved(ids=res.ids, faiss_dists=res.faiss_dists, dists=res.dists.to(dev),
                      nbr_vals=nbr_vals, valid=valid, modes=res.modes,
                      n_pointers=res.n_pointers)
        self.timing["queries"] += len(targets)
        return self.log_prob(r, targets, temperature), r, res.final

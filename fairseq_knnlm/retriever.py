"""Retrieval for kNN-LM: FAISS search over a datastore and p_kNN of the targets.

Plain Python, no fairseq: the scorer passes (n, D) queries (every scored position of a batch
at once) and (n,) targets; ``KNNRetriever.score`` returns log p_kNN(target) and what was
retrieved, which the offline-sweep writer can save.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .datastore import Datastore, open_datastore
from .errors import FlagError
from .index import check_index_matches, load_index, search
from .knn import knn_log_prob, normalize_sim_func, recompute_distances

logger = logging.getLogger(__name__)


@dataclass
class Retrieved:
    ids: np.ndarray  # (n, k) int64 datastore rows, -1 where FAISS found fewer than k
    faiss_dists: np.ndarray  # (n, k) float32 FAISS (quantized) squared L2
    dists: torch.Tensor  # (n, k) float32 distance used for p_kNN (smaller is closer)
    nbr_vals: torch.Tensor  # (n, k) int64 next-token ids of the neighbours (-1 where masked)
    valid: torch.Tensor  # (n, k) bool


class KNNRetriever:
    """Holds a datastore and its FAISS index; searches and scores batches of queries."""

    def __init__(
        self,
        dstore_prefix: Union[str, Path],
        index_path: Union[str, Path],
        k: int = 1024,
        probe: int = 32,
        sim_func: str = "l2",  # l2, faiss_l2 (alias do_not_recomp_l2) or dot
        temperature: float = 1.0,
        keys_in_memory: bool = False,
        load_keys: bool = True,
        gpu: bool = False,
        mmap_index: bool = False,
    ) -> None:
        sim_func = normalize_sim_func(sim_func)  # do_not_recomp_l2 -> faiss_l2
        if not load_keys and sim_func != "faiss_l2":
            raise FlagError(f"--no-load-keys leaves no keys to compute '{sim_func}' distances "
                            "from: use --knn-sim-func faiss_l2 or drop --no-load-keys")
        if not temperature > 0:
            raise FlagError(f"--knn-temp must be > 0, got {temperature}")
        if k <= 0:
            raise FlagError(f"--k must be positive, got {k}")
        if probe <= 0:
            raise FlagError(f"--probe must be positive, got {probe}")
        self.ds: Datastore = open_datastore(dstore_prefix, load_keys=load_keys,
                                            keys_in_memory=keys_in_memory)
        if k > self.ds.size:
            raise FlagError(f"--k {k} is larger than the datastore ({self.ds.size} entries)")
        self.record = check_index_matches(index_path, self.ds)
        self.k, self.sim_func, self.temperature = k, sim_func, temperature
        self.index = load_index(index_path, probe=probe, gpu=gpu, mmap=mmap_index)
        # values as one contiguous int64 tensor: gathers by id are then one indexing op
        self.vals = torch.from_numpy(np.asarray(self.ds.vals[:, 0], dtype=np.int64))
        self.timing: dict[str, float] = defaultdict(float)  # seconds per stage, for profiling
        logger.info("kNN-LM datastore %s: %d entries, dim %d, key type %s; index %s (%s)",
                    self.ds.prefix, self.ds.size, self.ds.dim, self.ds.meta.keytype, index_path,
                    self.record.get("settings", {}).get("index_type"))

    def retrieve(self, queries: torch.Tensor) -> Retrieved:
        t0 = time.perf_counter()
        q = queries.detach().float()
        fd, ids = search(self.index, q.cpu().numpy(), self.k)
        t1 = time.perf_counter()
        valid_np = ids >= 0
        if self.sim_func == "faiss_l2":
            dists = torch.from_numpy(np.where(valid_np, fd, np.inf).astype(np.float32))
            dists = dists.to(q.device)
        else:
            assert self.ds.keys is not None
            dists = recompute_distances(q, ids, self.ds.keys, self.sim_func)
        t2 = time.perf_counter()
        safe = torch.from_numpy(np.where(valid_np, ids, 0))
        nbr_vals = self.vals[safe].masked_fill(torch.from_numpy(~valid_np), -1)
        self.timing["faiss_search"] += t1 - t0
        self.timing["exact_distances"] += t2 - t1
        self.timing["gather_values"] += time.perf_counter() - t2
        self.timing["queries"] += len(q)
        return Retrieved(ids=ids, faiss_dists=fd, dists=dists,
                         nbr_vals=nbr_vals.to(q.device),
                         valid=torch.from_numpy(valid_np).to(q.device))

    def score(self, queries: torch.Tensor, targets: torch.Tensor,
              temperature: Optional[float] = None) -> tuple[torch.Tensor, Retrieved]:
        """log p_kNN(targets) (n,) in float32, and the retrieval it came from."""
        r = self.retrieve(queries)
        t0 = time.perf_counter()
        logp = knn_log_prob(r.dists, r.nbr_vals, targets.to(r.dists.device),
                            temperature or self.temperature, r.valid)
        self.timing["knn_softmax"] += time.perf_counter() - t0
        return logp, r

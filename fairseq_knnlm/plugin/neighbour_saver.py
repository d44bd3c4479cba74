"""--knn-save-neighbors: one row per scored token (what was retrieved, the LM's numbers and
features, the cache's, and with pointers the queries and modes) for the offline tools
(sweep.py), finished with the run's settings in its meta."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from fairseq_knnlm.offline.neighbours import NeighborWriter, write_neighbors_manifest
from fairseq_knnlm.offline.neighbours import manifest_path as neighbors_manifest_path
from fairseq_knnlm.offline.neighbours import meta_path as neighbors_meta_path
from fairseq_knnlm.plugin.batch import Batch
from fairseq_knnlm.plugin.run import RunInfo
from fairseq_knnlm.scoring.knn import recompute_distances
from fairseq_knnlm.search.retriever import KNNRetriever, Retrieved


class NeighbourSaver:
    def __init__(self, t: Any, run: RunInfo, retriever: KNNRetriever, with_cache: bool,
                 with_queries: bool) -> None:
        self.t, self.run, self.retriever = t, run, retriever
        self.base = str(t.knn_save_neighbors)
        self.with_cache, self.with_queries = with_cache, with_queries
        self.writer: Optional[NeighborWriter] = None
        self.prefix = run.prefix(self.base)

    def open(self) -> None:
        if self.run.sharded:  # this sharded pass replaces whatever was saved at the base
            for stale in (neighbors_manifest_path(self.base), neighbors_meta_path(self.base)):
                stale.unlink(missing_ok=True)
        ds = self.retriever.ds
        self.writer = NeighborWriter(self.prefix, self.retriever.k, with_l2=ds.keys is not None,
                                     with_cache=self.with_cache,
                                     query_dim=ds.dim if self.with_queries else None,
                                     with_lm_features=True)

    def add(self, b: Batch, lm: torch.Tensor, retrieved: Retrieved,
            cache_lp: Optional[torch.Tensor]) -> None:
        """One row per scored token of the batch."""
        assert self.writer is not None
        tg = b.targets.cpu().numpy()
        rows = dict(
            targets=tg.astype(np.int32), lm_logp=lm.cpu().numpy().astype(np.float32),
            ids=retrieved.ids.astype(np.int64), faiss_dists=retrieved.faiss_dists,
            match=(retrieved.nbr_vals.cpu().numpy() == tg[:, None]).astype(np.uint8))
        if self.retriever.ds.keys is not None:
            l2 = retrieved.dists if self.retriever.sim_func == "l2" else None
            if l2 is None:
                l2 = recompute_distances(b.queries, retrieved.ids, self.retriever.ds.keys)
            rows["l2_dists"] = l2.cpu().numpy()
        if cache_lp is not None:
            rows["cache_logp"] = cache_lp.cpu().numpy().astype(np.float32)
        assert b.lm_feats is not None and b.prev_tokens is not None
        lmf = b.lm_feats.cpu().numpy()
        assert b.lm_top is not None
        rows.update(lm_entropy=lmf[:, 0], lm_max_logp=lmf[:, 1],
                    prev_tokens=b.prev_tokens.cpu().numpy().astype(np.int32),
                    lm_argmax=b.lm_top.cpu().numpy().astype(np.int32),
                    lm_logp_nbrs=b.lm_at_neighbors(retrieved.nbr_vals).cpu().numpy())
        if self.writer.query_dim is not None:  # what a pointer replay needs
            assert retrieved.modes is not None and b.fresh is not None
            rows.update(queries=b.queries.cpu().numpy().astype(np.float32),
                        modes=retrieved.modes.astype(np.int8), fresh=b.fresh)
        self.writer.add(**rows)

    def finish(self, mode_counts: dict[str, int]) -> None:
        if self.writer is None:
            return
        t = self.t
        shard = ({"shard_id": self.run.shard_id, "num_shards": self.run.num_shards}
                 if self.run.sharded else {})
        pointers = ({"min_pointers": t.knn_min_pointers, "modes": dict(mode_counts),
                     "clusters": t.knn_clusters} if self.with_queries else None)
        self.writer.finish(
            subset=self.run.subset, dstore=str(self.retriever.ds.prefix),
            datastore=self.retriever.ds.meta.fingerprint(), probe=t.probe,
            sim_func=self.retriever.sim_func, temperature=t.knn_temp, lmbda=t.lmbda,
            cache_theta=t.cache_theta if self.with_cache else None,
            cache_length=t.cache_length if self.with_cache else None, pointers=pointers,
            index=str(t.indexfile) if t.indexfile else None,
            torch_exact=bool(t.knn_torch_exact), **shard)

    def write_manifest(self) -> None:
        if self.writer is not None:
            write_neighbors_manifest(self.base, self.run.num_shards)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()

"""Bulk search of saved queries (``knnlm-search``): the queries of a saved pass (a neighbour
file set with PREFIX_queries.npy) searched again, in batches, against an index (in this
process, or sharded on Ray with engine "ray"), written as a new neighbour file set that
knnlm-sweep and knnlm-fit-lambda read as if eval-lm had saved it (knnlm-explain reads
no neighbour files: it runs the scorer with eval-lm's flags, --knn-engine ray included).

So the LM pass (GPU) and the search (a CPU cluster) run apart: the pass saves its queries and
LM numbers once; the search runs where the shards are, as often as the index changes.

Copied from the input: targets, LM log-probs and features (entropy, max log-prob, previous
token, argmax), the cache's log-probs, the queries, and ``fresh`` (where the LM pass's
streams start). Searched: ids, FAISS distances, exact L2 from the keys, matches; every token
is searched (modes all 0, as a --knn-min-pointers K+1 pass: pointer replays accept it).
Not written: PREFIX_lm_logp_nbrs (log p_LM at the new neighbours' values needs the LM's
whole distribution), so lambda models with agreement features need an eval-lm pass.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from fairseq_knnlm.errors import FlagError
from fairseq_knnlm.flags import require_positive_int
from fairseq_knnlm.offline.neighbours import (
    LM_FEATURE_ARRAYS,
    NeighborsError,
    NeighborWriter,
    load_neighbors,
)
from fairseq_knnlm.search.retriever import KNNRetriever

logger = logging.getLogger(__name__)
PathLike = Union[str, Path]

COPIED = ("targets", "lm_logp", "cache_logp", *LM_FEATURE_ARRAYS, "lm_argmax", "queries",
          "fresh")


def search_saved(queries_prefix: PathLike, out_prefix: PathLike, dstore: Optional[PathLike],
                 index: PathLike, k: int, probe: int = 32, engine: str = "local",
                 ray_address: Optional[str] = None, batch_size: int = 1024,
                 keys_in_memory: bool = False) -> dict[str, Any]:
    """Search the saved pass's queries, write OUT; returns OUT's meta (with the time taken)."""
    require_positive_int(batch_size, "--batch-size")
    if Path(f"{out_prefix}_meta.json").resolve() == Path(f"{queries_prefix}_meta.json"
                                                         ).resolve():
        raise FlagError("--out must differ from the saved pass it reads")
    nb = load_neighbors(queries_prefix)
    if "queries" not in nb.arrays:
        raise NeighborsError(f"{queries_prefix}: saved without its queries: save the pass with "
                             "--knn-save-neighbors PREFIX --knn-pointers --knn-min-pointers "
                             f"{int(nb.meta['k']) + 1} (every token searched, queries saved)")
    prefix = dstore or nb.meta.get("dstore")
    if not prefix:
        raise FlagError("--dstore PREFIX is needed: the saved pass does not name its datastore")
    r = KNNRetriever(prefix, index, k=k, probe=probe, keys_in_memory=keys_in_memory,
                     engine=engine, ray_address=ray_address)
    if int(nb.meta.get("dim", r.ds.dim)) != r.ds.dim:
        raise NeighborsError(f"{queries_prefix}: queries of dim {nb.meta.get('dim')}, the "
                             f"datastore {prefix} has keys of dim {r.ds.dim}")
    have = [a for a in COPIED if a in nb.arrays]
    w = NeighborWriter(out_prefix, k, with_l2=True, with_cache="cache_logp" in have,
                       query_dim=r.ds.dim, with_lm_features=all(a in have for a in
                                                                LM_FEATURE_ARRAYS),
                       with_lm_nbrs=False)
    n = nb.n
    t0 = time.perf_counter()
    try:
        for s in range(0, n, batch_size):
            e = min(n, s + batch_size)
            q = torch.from_numpy(np.array(nb.arrays["queries"][s:e], dtype=np.float32))
            tg = np.asarray(nb.arrays["targets"][s:e], dtype=np.int64)
            got = r.retrieve(q)
            rows = {a: np.asarray(nb.arrays[a][s:e]) for a in have if a in w.rows.specs}
            rows.update(ids=got.ids.astype(np.int64), faiss_dists=got.faiss_dists,
                        match=((got.nbr_vals.numpy() == tg[:, None]) &
                               got.valid.numpy()).astype(np.uint8),
                        l2_dists=got.dists.numpy(), modes=np.zeros(e - s, dtype=np.int8))
            if "fresh" not in rows:
                rows["fresh"] = np.zeros(e - s, dtype=np.uint8)
            if "lm_argmax" in w.rows.specs and "lm_argmax" not in rows:
                rows["lm_argmax"] = np.zeros(e - s, dtype=np.int32)
            w.add(**rows)
    except BaseException:
        w.abort()
        raise
    secs = time.perf_counter() - t0
    keep = {key: v for key, v in nb.meta.items()
            if key in ("subset", "temperature", "lmbda", "cache_theta", "cache_length")}
    meta = dict(keep, dstore=str(r.ds.prefix), datastore=r.ds.meta.fingerprint(), probe=probe,
                sim_func="l2", index=str(index), torch_exact=False, engine=engine,
                searched_from=str(queries_prefix), search_seconds=round(secs, 3),
                pointers={"min_pointers": k + 1, "modes": {"search": n, "pointers": 0,
                                                           "skip": 0}, "clusters": None})
    w.finish(**meta)
    if engine == "ray":
        r.index.close()
    logger.info("knnlm-search: %d queries, k %d, searched in %.1fs (%.0f queries/s); wrote %s",
                n, k, secs, n / max(secs, 1e-9), out_prefix)
    return {"n": n, "k": k, **meta}

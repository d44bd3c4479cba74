"""Why FAISS time does not fall with the searched fraction (issue #25): the tokens a pointer
policy still searches against all tokens and against a random subset of the same size.

    python benchmarks/faiss_subset.py --neighbors runs/wikitext2_quick/speed/nbrs_valid_lam_mlp \
        --dstore runs/wikitext2_quick/dstore/train \
        --index ivfpq=runs/wikitext2_quick/dstore/train.index \
        --index fastscan=runs/wikitext2_quick/speed/train.fs.index --min-pointers 64

The neighbours must be a full-search pass saved with its queries (--knn-pointers
--knn-min-pointers K+1 --knn-save-neighbors, as benchmarks/speed.py saves); the policy
``MinPointers(N)`` is replayed on it (offline/sweep.pointer_passes) to find the searched
tokens. For each index: µs per query in calls of 4,096, 256 and 16 queries (all tokens, the
searched ones, a random subset of as many), the searched subset's time over all tokens' time,
and the mean number of codes the probed lists hold (what IVF search scans).
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--neighbors", required=True, help="a saved full-search pass (prefix)")
    ap.add_argument("--dstore", required=True, help="its datastore (prefix)")
    ap.add_argument("--index", action="append", required=True, help="NAME=PATH, repeatable")
    ap.add_argument("--min-pointers", type=int, default=64)
    ap.add_argument("--probe", type=int, default=32)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    logging.disable(logging.CRITICAL)
    import faiss

    from fairseq_knnlm.adaptive.pointers import SEARCH, MinPointers
    from fairseq_knnlm.index.load import load_index
    from fairseq_knnlm.offline.neighbours import load_neighbors
    from fairseq_knnlm.offline.sweep import pointer_passes
    from fairseq_knnlm.store.datastore import open_datastore

    nb = load_neighbors(a.neighbors)
    ds = open_datastore(a.dstore, keys_in_memory=True)
    modes = np.concatenate([res.modes for *_, res in
                            pointer_passes(nb, ds, MinPointers(a.min_pointers))])
    q = np.ascontiguousarray(np.asarray(nb.arrays["queries"][:], dtype=np.float32))
    sel = np.nonzero(modes == SEARCH)[0]
    rnd = np.sort(np.random.default_rng(0).choice(len(q), len(sel), replace=False))
    print(f"{len(q)} tokens; --knn-min-pointers {a.min_pointers} searches {len(sel)} "
          f"({100 * len(sel) / len(q):.1f}%)")
    faiss.omp_set_num_threads(a.threads)
    for spec in a.index:
        name, path = spec.split("=", 1)
        index = load_index(path, probe=a.probe)

        def timed(x: np.ndarray, chunk: int, index=index) -> float:
            t0 = time.perf_counter()
            for s in range(0, len(x), chunk):
                index.search(x[s:s + chunk], a.k)
            return time.perf_counter() - t0

        for chunk in (4096, 256, 16):
            t_all, t_sel, t_rnd = timed(q, chunk), timed(q[sel], chunk), timed(q[rnd], chunk)
            print(f"{name}, calls of {chunk}: all {1e6 * t_all / len(q):.0f} µs/query, "
                  f"searched {1e6 * t_sel / len(sel):.0f}, random subset "
                  f"{1e6 * t_rnd / len(rnd):.0f}; searched/all time {t_sel / t_all:.2f} "
                  f"(fraction {len(sel) / len(q):.2f})")
        ivf = faiss.extract_index_ivf(index)
        sizes = np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)])
        _, lists = ivf.quantizer.search(q, a.probe)
        print(f"{name}: codes in the probed lists per query: all {sizes[lists].sum(1).mean():.0f}"
              f", searched {sizes[lists[sel]].sum(1).mean():.0f}")


if __name__ == "__main__":
    main()

"""Exact-L2 recomputation speed against its block size and torch's thread count, on real
neighbour ids (rows gathered from the fp16 datastore memmap, upcast, reduced).

    python benchmarks/gather_bench.py --dstore runs/wikitext2/dstore/train \
        --neighbors runs/wikitext2/nbrs/valid

--neighbors is a --knn-save-neighbors prefix of a kNN-LM pass over held-out text. Prints
million rows/s for each setting (best of --repeats); ~1 min on 2 cores.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fairseq_knnlm.offline.neighbours import load_neighbors
from fairseq_knnlm.scoring.knn import recompute_distances
from fairseq_knnlm.store.datastore import open_datastore


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dstore", required=True)
    p.add_argument("--neighbors", required=True)
    p.add_argument("--n-queries", type=int, default=4096)
    p.add_argument("--start", type=int, default=80_000, help="first query row used")
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    ds = open_datastore(a.dstore)
    ids = np.asarray(load_neighbors(a.neighbors).arrays["ids"][a.start:a.start + a.n_queries])
    q = torch.randn(len(ids), ds.dim)
    print("| torch threads | block MB | M rows/s |")
    print("|---|---|---|")
    for threads in sorted({torch.get_num_threads(), 1}, reverse=True):
        torch.set_num_threads(threads)
        for mb in (1, 2, 4, 8, 16, 128):
            best = float("inf")
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                recompute_distances(q, ids, ds.keys, block_bytes=mb << 20)
                best = min(best, time.perf_counter() - t0)
            print(f"| {threads} | {mb} | {ids.size / best / 1e6:.2f} |", flush=True)


if __name__ == "__main__":
    main()

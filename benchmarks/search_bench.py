"""Search speed and recall of FAISS index types on the WikiText-2 datastore: the paper's
IVFPQ (8-bit PQ, 64 bytes) against 4-bit SIMD fast-scan PQ (faiss "PQ{M}x4fs") with the same
coarse quantizer, for k = 1024, on held-out queries (keys of valid tokens), with recall@k
against exact search. Plain FAISS calls: what bounds kNN-LM's search on this machine.

    python benchmarks/search_bench.py --dstore runs/wikitext2/dstore/train \
        --index runs/wikitext2/dstore/train.index --queries runs/wikitext2/bench/dump/ds

--queries is any datastore dumped from held-out text with the same model (benchmarks/run.py
leaves one in its work dir: WORK/dump/ds). ~3 min on 2 cores.
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from fairseq_knnlm.index.load import load_index
from fairseq_knnlm.store.datastore import open_datastore


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dstore", required=True)
    p.add_argument("--index", required=True, help="the paper's IVFPQ index of --dstore")
    p.add_argument("--queries", required=True)
    p.add_argument("--n-queries", type=int, default=2000)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--train-size", type=int, default=200_000,
                   help="keys to train the fast-scan PQ on (the coarse quantizer is reused)")
    a = p.parse_args()
    ds, qs = open_datastore(a.dstore), open_datastore(a.queries)
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(qs.size, min(a.n_queries, qs.size), replace=False))
    q = np.ascontiguousarray(qs.keys[rows], dtype=np.float32)
    flat = faiss.IndexFlatL2(ds.dim)
    for s in range(0, ds.size, 500_000):
        flat.add(np.ascontiguousarray(ds.keys[s:s + 500_000], dtype=np.float32))
    t0 = time.time()
    _, truth = flat.search(q, a.k)
    print(f"exact search: {len(q) / (time.time() - t0):.0f} queries/s")

    def report(name: str, index: faiss.Index, probe: int) -> None:
        faiss.extract_index_ivf(index).nprobe = probe
        t0 = time.time()
        _, ids = index.search(q, a.k)
        qps = len(q) / (time.time() - t0)
        rec = np.mean([len(set(x) & set(y)) / a.k for x, y in zip(ids, truth)])
        print(f"| {name} | {probe} | {qps:,.0f} | {rec:.3f} |", flush=True)

    print(f"| index | probe | queries/s | recall@{a.k} |")
    print("|---|---|---|---|")
    ivf = load_index(a.index)
    report("IVFPQ, 64 x 8-bit (paper)", ivf, 32)
    nlist = faiss.extract_index_ivf(ivf).nlist
    centroids = faiss.extract_index_ivf(ivf).quantizer.reconstruct_n(0, nlist)
    x = np.ascontiguousarray(
        ds.keys[np.sort(rng.choice(ds.size, min(a.train_size, ds.size), replace=False))],
        dtype=np.float32)
    for m in (128, 64):
        quant = faiss.IndexFlatL2(ds.dim)
        quant.add(centroids)
        fs = faiss.IndexIVFPQFastScan(quant, ds.dim, nlist, m, 4)
        fs.train(x)
        for s in range(0, ds.size, 500_000):
            fs.add(np.ascontiguousarray(ds.keys[s:s + 500_000], dtype=np.float32))
        for probe in (32, 64):
            report(f"IVFPQ fast-scan, {m} x 4-bit ({m // 2} bytes)", fs, probe)


if __name__ == "__main__":
    main()

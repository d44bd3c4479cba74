"""Index benchmark: knnlm-build-index against a bare FAISS script doing the same train + add,
and recall@k of the built IVFPQ index against exact search for several nprobe values.

    python benchmarks/index_bench.py --dstore runs/wikitext2/dstore/train \
        --index runs/wikitext2/dstore/train.index --queries PREFIX_OF_A_VALID_DUMP \
        [--bare] [--probes 8,32,128] [--n-queries 1000] [--k 1024]

--bare re-runs the build with plain FAISS calls (same sample, same settings, keys read in
the same chunks) and prints its time; compare with knnlm-build-index's log of the same data.
"""

from __future__ import annotations

import argparse
import json
import time

import faiss
import numpy as np

from fairseq_knnlm.index.build import sample_train_ids
from fairseq_knnlm.index.load import load_index
from fairseq_knnlm.store.datastore import open_datastore


def bare_build(dstore: str, ncentroids: int, code_size: int, train_size: int,
               seed: int) -> dict:
    ds = open_datastore(dstore)
    t0 = time.time()
    ids = sample_train_ids(ds.size, train_size, seed)
    x = np.ascontiguousarray(ds.keys[ids], dtype=np.float32)
    t_read = time.time() - t0
    quantizer = faiss.IndexFlatL2(ds.dim)
    index = faiss.IndexIVFPQ(quantizer, ds.dim, ncentroids, code_size, 8)
    t0 = time.time()
    index.train(x)
    t_train = time.time() - t0
    t0 = time.time()
    for s in range(0, ds.size, 500_000):
        index.add(np.ascontiguousarray(ds.keys[s:s + 500_000], dtype=np.float32))
    t_add = time.time() - t0
    return {"read_s": t_read, "train_s": t_train, "add_s": t_add,
            "total_s": t_read + t_train + t_add}


def recall(dstore: str, index_path: str, queries: str, probes: list[int], n: int,
           k: int) -> dict:
    ds = open_datastore(dstore)
    qs = open_datastore(queries)
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(qs.size, size=min(n, qs.size), replace=False))
    q = np.ascontiguousarray(qs.keys[rows], dtype=np.float32)
    flat = faiss.IndexFlatL2(ds.dim)
    for s in range(0, ds.size, 500_000):
        flat.add(np.ascontiguousarray(ds.keys[s:s + 500_000], dtype=np.float32))
    t0 = time.time()
    _, truth = flat.search(q, k)
    t_flat = time.time() - t0
    out = {"n_queries": len(q), "k": k, "exact_search_s": t_flat, "probes": {}}
    index = load_index(index_path)
    for p in probes:
        faiss.extract_index_ivf(index).nprobe = p
        t0 = time.time()
        _, got = index.search(q, k)
        dt = time.time() - t0
        r = float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(got, truth)]))
        r1 = float(np.mean(got[:, 0] == truth[:, 0]))
        out["probes"][p] = {"recall_at_k": r, "top1_agrees": r1, "search_s": dt,
                            "queries_per_s": len(q) / dt}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dstore", required=True)
    ap.add_argument("--index", required=True)
    ap.add_argument("--queries", default=None, help="datastore whose keys are the queries")
    ap.add_argument("--bare", action="store_true")
    ap.add_argument("--probes", default="8,32,128")
    ap.add_argument("--n-queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    res: dict = {}
    rec = json.loads(open(f"{a.index}.meta.json").read())["settings"]
    if a.bare:
        res["bare_faiss"] = bare_build(a.dstore, rec["ncentroids"], rec["code_size"],
                                       rec["train_size"], rec["seed"])
        print("bare FAISS build:", json.dumps(res["bare_faiss"]), flush=True)
    if a.queries:
        res["recall"] = recall(a.dstore, a.index, a.queries,
                               [int(p) for p in a.probes.split(",")], a.n_queries, a.k)
        print(f"recall@{a.k} vs exact search ({res['recall']['n_queries']} queries):")
        for p, r in res["recall"]["probes"].items():
            print(f"  probe {p:>4}: recall {r['recall_at_k']:.3f}, top-1 agrees "
                  f"{r['top1_agrees']:.3f}, {r['queries_per_s']:.0f} queries/s")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

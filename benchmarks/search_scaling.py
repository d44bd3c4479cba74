"""Search cost against datastore size (issue #14): queries/s of the paper's IVFPQ (4096 lists,
64 x 8-bit PQ, probe 32, k 1024) and of ivfpq-fastscan (the same lists and bytes, 128 x 4-bit)
at 1M ... 16M keys, on 2 threads and on 1 (per core), with a line fitted in log-log and the
queries/s and kNN-LM tokens/s it projects for WikiText-103's 103M keys.

Keys: a datastore's keys (dim 256 for our WikiText-2 model) tiled past its size with small
Gaussian noise (``--noise`` x each dimension's std), so that the IVF lists keep the real keys'
uneven sizes; one index of each kind is trained once on ``--train-size`` keys and grown
chunk by chunk, measured at each size. Queries: real held-out queries (the ``queries``
array of a neighbours file saved with --knn-pointers), or keys of the datastore plus noise.

    python benchmarks/search_scaling.py --dstore runs/wikitext2_quick/dstore/train \
        --queries runs/wikitext2_quick/pointers/nbrs_valid_ivfpq \
        --out runs/search_scaling --figure benchmarks/figures/search_scaling.png

Projection of kNN-LM tokens/s: 1 / (1/LM + other + searched / queries/s), with LM the
plugin's LM-only tokens/s and ``other`` the per-token exact-L2 and p_kNN time (defaults: the
full WikiText-2 run of the README, 2 cores: 4,124 tokens/s and 0.32 ms), for the fractions
of tokens searched in ``--searched``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from fairseq_knnlm.store.datastore import open_datastore

WT103_KEYS = 103_225_485


def tiled_keys(base: np.ndarray, std: np.ndarray, lo: int, hi: int, noise: float,
               seed: int = 0) -> np.ndarray:
    """Rows lo..hi-1 of the tiled key set: base[i % len(base)] (+ noise past the first tile)."""
    idx = np.arange(lo, hi)
    x = base[idx % len(base)].astype(np.float32)
    rng = np.random.default_rng(seed + lo)
    tiled = idx >= len(base)
    if tiled.any():
        x[tiled] += rng.standard_normal((int(tiled.sum()), base.shape[1]),
                                        dtype=np.float32) * np.float32(noise) * std
    return x


def qps(index: Any, q: np.ndarray, k: int, threads: int) -> float:
    faiss.omp_set_num_threads(threads)
    index.search(q[:20], k)  # warm-up
    t = time.perf_counter()
    index.search(q, k)
    return len(q) / (time.perf_counter() - t)


def fit(sizes: list[int], values: list[float]) -> tuple[float, float]:
    """log(values) = a + b log(sizes), least squares: (a, b)."""
    b, a = np.polyfit(np.log(sizes), np.log(values), 1)
    return float(a), float(b)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dstore", required=True)
    p.add_argument("--queries", default=None, help="neighbours prefix with PREFIX_queries.npy")
    p.add_argument("--sizes", default="1,2,4,8,16", help="millions of keys")
    p.add_argument("--n-queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--probe", type=int, default=32)
    p.add_argument("--ncentroids", type=int, default=4096)
    p.add_argument("--train-size", type=int, default=160_000)
    p.add_argument("--noise", type=float, default=0.05)
    p.add_argument("--chunk", type=int, default=500_000)
    p.add_argument("--lm-tps", type=float, default=4124.0)
    p.add_argument("--other-ms", type=float, default=0.32)
    p.add_argument("--searched", default="1,0.5,0.2")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--figure", type=Path, default=None)
    a = p.parse_args()
    t0 = time.time()
    ds = open_datastore(a.dstore)
    base = np.asarray(ds.keys, dtype=np.float32)
    std = base.std(axis=0).astype(np.float32)
    d = base.shape[1]
    rng = np.random.default_rng(1)
    if a.queries:
        from fairseq_knnlm.offline.neighbours import load_neighbors

        qa = load_neighbors(a.queries).arrays["queries"]
        rows = np.sort(rng.choice(len(qa), min(a.n_queries, len(qa)), replace=False))
        q = np.ascontiguousarray(np.asarray(qa[rows]), dtype=np.float32)
    else:
        q = tiled_keys(base, std, 0, a.n_queries, 0.0) + (
            rng.standard_normal((a.n_queries, d)) * 0.2 * std).astype(np.float32)
    sizes = [int(float(s) * 1_000_000) for s in a.sizes.split(",")]
    pick = np.sort(rng.choice(max(sizes), a.train_size, replace=False))
    train = _sample(base, std, pick, a.noise)  # from the largest tiled set
    quantizer = faiss.IndexFlatL2(d)
    ivfpq = faiss.IndexIVFPQ(quantizer, d, a.ncentroids, 64, 8)
    faiss.omp_set_num_threads(2)
    ivfpq.train(train)
    fs = faiss.IndexIVFPQFastScan(ivfpq.quantizer, d, a.ncentroids, 128, 4)
    fs.train(train)  # the coarse quantizer is trained already: only the PQ
    t_train = time.time() - t0
    print(f"trained on {len(train):,} keys in {t_train:.0f}s", flush=True)
    for index in (ivfpq, fs):
        index.nprobe = a.probe
    rows_out: list[dict[str, Any]] = []
    have = 0
    for size in sizes:
        for s in range(have, size, a.chunk):
            x = tiled_keys(base, std, s, min(size, s + a.chunk), a.noise)
            faiss.omp_set_num_threads(2)
            ivfpq.add(x)
            fs.add(x)
        have = size
        row = {"keys": size}
        for name, index in (("ivfpq", ivfpq), ("fastscan", fs)):
            for threads in (2, 1):
                row[f"{name}_qps_{threads}t"] = qps(index, q, a.k, threads)
        rows_out.append(row)
        print(f"{size:>11,} keys: " + ", ".join(f"{k} {v:.0f}" for k, v in row.items()
                                                 if k != "keys") +
              f" ({time.time() - t0:.0f}s)", flush=True)
    proj = {}
    for key in [k for k in rows_out[0] if k != "keys"]:
        ca, cb = fit([r["keys"] for r in rows_out], [r[key] for r in rows_out])
        proj[key] = {"a": ca, "slope": cb, "qps_at_wt103": math.exp(ca + cb * math.log(WT103_KEYS))}
    searched = [float(x) for x in a.searched.split(",")]
    tps = {key: {str(f): 1.0 / (1.0 / a.lm_tps + a.other_ms / 1e3 + f / v["qps_at_wt103"])
                 for f in searched} for key, v in proj.items()}
    result = {"args": {k: str(v) for k, v in vars(a).items()}, "rows": rows_out,
              "fit": proj, "projected_knnlm_tokens_per_s": tps, "train_s": t_train,
              "wall_s": time.time() - t0, "dim": d, "queries": len(q)}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "search_scaling.json").write_text(json.dumps(result, indent=1))
    md = table(result, searched)
    (a.out / "search_scaling.md").write_text(md)
    print(md)
    if a.figure:
        plot(result, a.figure)
        print(f"wrote {a.figure}")
    print(f"{time.time() - t0:.0f}s in all")


def _sample(base: np.ndarray, std: np.ndarray, pick: np.ndarray, noise: float) -> np.ndarray:
    x = base[pick % len(base)].astype(np.float32)
    tiled = pick >= len(base)
    rng = np.random.default_rng(7)
    x[tiled] += (rng.standard_normal((int(tiled.sum()), base.shape[1])) * noise * std
                 ).astype(np.float32)
    return x


def table(result: dict[str, Any], searched: list[float]) -> str:
    keys = ["ivfpq_qps_2t", "ivfpq_qps_1t", "fastscan_qps_2t", "fastscan_qps_1t"]
    head = ("| keys | IVFPQ q/s, 2 cores | IVFPQ q/s, 1 core | fast-scan q/s, 2 cores | "
            "fast-scan q/s, 1 core |")
    lines = [head, "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['keys'] / 1e6:g}M | " + " | ".join(f"{r[k]:,.0f}" for k in keys)
                     + " |")
    f = result["fit"]
    lines.append("| fit: slope (log-log) | " + " | ".join(f"{f[k]['slope']:.2f}" for k in keys)
                 + " |")
    lines.append("| **projected at 103M** | " + " | ".join(
        f"**{f[k]['qps_at_wt103']:,.0f}**" for k in keys) + " |")
    lines += ["", "Projected kNN-LM tokens/s at 103M keys (our 256-d LM; LM-only and per-token "
              "exact-L2 costs of the full WikiText-2 run):", "",
              "| fraction searched | IVFPQ, 2 cores | IVFPQ, 1 core | fast-scan, 2 cores | "
              "fast-scan, 1 core |", "|---|---|---|---|---|"]
    t = result["projected_knnlm_tokens_per_s"]
    for s in searched:
        lines.append(f"| {s:g} | " + " | ".join(f"{t[k][str(s)]:,.0f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    n = np.array([r["keys"] for r in result["rows"]], dtype=float)
    grid = np.geomspace(n.min(), WT103_KEYS, 50)
    for key, label, c in (("ivfpq_qps_2t", "IVFPQ (paper), 2 cores", "tab:blue"),
                          ("ivfpq_qps_1t", "IVFPQ (paper), 1 core", "tab:cyan"),
                          ("fastscan_qps_2t", "fast-scan, 2 cores", "tab:orange"),
                          ("fastscan_qps_1t", "fast-scan, 1 core", "tab:red")):
        f = result["fit"][key]
        ax.plot(n, [r[key] for r in result["rows"]], "o", color=c,
                label=f"{label} (slope {f['slope']:.2f})")
        ax.plot(grid, np.exp(f["a"] + f["slope"] * np.log(grid)), "--", color=c, lw=0.8)
        ax.plot([WT103_KEYS], [f["qps_at_wt103"]], "x", color=c)
    ax.axvline(WT103_KEYS, color="gray", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("datastore keys (dim 256; x: projection at WikiText-103's 103M)")
    ax.set_ylabel("queries/s (k 1024, probe 32)")
    ax.set_title("FAISS search cost vs datastore size", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

"""Beyond-RAM check: a synthetic sharded datastore of 20M dim-64 keys, indexed on disk and
searched with the merged index memory-mapped, with the peak resident memory of each step.

    python benchmarks/scale.py --work-dir /tmp/knnlm_scale                # 20M keys, ~15 min
    python benchmarks/scale.py --work-dir /tmp/knnlm_scale --n 2000000    # quick look

Steps (each a separate process; peak RSS summed over the process and its children, sampled
every 0.2 s from /proc, so parallel workers count together):
 1. write the datastore as --shards dumps + manifest (fp16 keys around 4096 random centres,
    like LM states that cluster by context), never holding more than one 1M-row chunk;
 2. ``knnlm-build-index --on-disk`` (trained once on --train-size keys, parts of
    --add-shard-size rows added by --workers processes, merged into INDEX.ivfdata);
 3. search --queries held-out queries (k=1024, probe 32) with the index memory-mapped, and
    recall@10 of the top hit lists against exact search over the fp16 keys.
Disk: 20M x 64 x 2 B = 2.56 GB keys, 0.48 GB index lists (+0.48 GB parts during the build).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def tree_rss_bytes(pid: int) -> int:
    """RSS of pid and all its descendants, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total


def run_measured(cmd: list[str]) -> tuple[float, float, str]:
    """Run cmd; return (wall seconds, peak tree RSS in GiB, output)."""
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_rss_bytes(p.pid))
            time.sleep(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out = p.communicate()[0]
    stop.set()
    t.join()
    if p.returncode != 0:
        raise RuntimeError(f"failed ({p.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    return time.time() - t0, peak / 2**30, out


WRITE = r"""
import sys, numpy as np
from fairseq_knnlm.store.datastore import DatastoreWriter
from fairseq_knnlm.store.shards import shard_prefix, write_manifest
prefix, n, d, shards = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(0)
centres = (rng.standard_normal((4096, d)) * 2).astype(np.float32)
per, chunk = -(-n // shards), 1 << 18
for s in range(shards):
    lo, hi = s * per, min(n, (s + 1) * per)
    w = DatastoreWriter(shard_prefix(prefix, s, shards), d, "float16", initial_capacity=hi - lo)
    for a in range(lo, hi, chunk):
        b = min(hi, a + chunk)
        x = centres[rng.integers(0, 4096, b - a)] + rng.standard_normal((b - a, d), np.float32)
        w.add(x.astype(np.float16), rng.integers(0, 50000, b - a), np.arange(a, b))
    w.finish(keytype="synthetic", shard_id=s, num_shards=shards, dict_sha256="synthetic")
write_manifest(prefix, shards)
"""

SEARCH = r"""
import json, resource, sys, time, numpy as np, faiss
from fairseq_knnlm.store.datastore import open_datastore
from fairseq_knnlm.index.build import check_index_matches, load_index, search
prefix, index_path = sys.argv[1], sys.argv[2]
nq, probe, k = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
ds = open_datastore(prefix, load_keys=True)
check_index_matches(index_path, ds)
rng = np.random.default_rng(1)
ids = rng.choice(ds.size, nq, replace=False)
q = ds.keys[np.sort(ids)].astype(np.float32)
q += 0.1 * rng.standard_normal(q.shape, np.float32)  # held-out: near, not equal to, stored keys
t0 = time.time()
index = load_index(index_path, probe=probe)
t_load = time.time() - t0
t0 = time.time()
dist, nbr = search(index, q, k)
t_search = time.time() - t0
rss_search = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB, before the check
# exact top-10 of the first 200 queries, scanning the fp16 keys in 1M-row blocks
nt, best_d, best_i = min(200, nq), None, None
for a in range(0, ds.size, 1 << 20):
    x = np.asarray(ds.keys[a:a + (1 << 20)], dtype=np.float32)
    dd, ii = faiss.knn(q[:nt], x, 10)
    ii += a
    if best_d is None:
        best_d, best_i = dd, ii
    else:
        cd, ci = np.concatenate([best_d, dd], 1), np.concatenate([best_i, ii], 1)
        o = np.argsort(cd, 1)[:, :10]
        best_d, best_i = np.take_along_axis(cd, o, 1), np.take_along_axis(ci, o, 1)
recall10 = np.mean([len(set(a[:10]) & set(b)) / 10 for a, b in zip(nbr[:nt], best_i)])
recall_in_k = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(nbr[:nt], best_i)])
print("SEARCH_JSON " + json.dumps({"load_s": t_load, "search_s": t_search, "queries": nq,
      "queries_per_s": nq / t_search, "recall_at_10": recall10, "peak_rss_gib_search": rss_search,
      "exact_top10_within_k": recall_in_k, "missing_ids": int((nbr < 0).sum())}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", required=True)
    p.add_argument("--n", type=int, default=20_000_000, help="keys (issue: at least 20M)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--shards", type=int, default=2, help="datastore shards (as 2 dump workers)")
    p.add_argument("--ncentroids", type=int, default=4096, help="paper's IVF size")
    p.add_argument("--code-size", type=int, default=16, help="PQ bytes: 4 dims per byte at 64-d")
    p.add_argument("--train-size", type=int, default=500_000,
                   help="training keys (~120 per centroid)")
    p.add_argument("--add-shard-size", type=int, default=2_500_000,
                   help="rows per part: bounds each worker's RAM")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args()
    wd = Path(a.work_dir)
    wd.mkdir(parents=True, exist_ok=True)
    prefix, index = wd / "synth", wd / "synth.index"
    res: dict = {"n": a.n, "dim": a.dim, "cpus": os.cpu_count()}
    py = sys.executable
    if not Path(f"{prefix}_manifest.json").exists():
        w, rss, _ = run_measured([py, "-c", WRITE, str(prefix), str(a.n), str(a.dim),
                                  str(a.shards)])
        res["write"] = {"s": w, "peak_rss_gib": rss}
        print(f"write datastore: {w:.0f}s, peak RSS {rss:.2f} GiB", flush=True)
    if not Path(f"{index}.meta.json").exists():
        w, rss, out = run_measured([
            str(BIN / "knnlm-build-index"), "--dstore-mmap", str(prefix), "--faiss-index",
            str(index), "--on-disk", "--workers", str(a.workers), "--add-shard-size",
            str(a.add_shard_size), "--ncentroids", str(a.ncentroids), "--code-size",
            str(a.code_size), "--train-size", str(a.train_size), "--no-progress"])
        res["build"] = {"s": w, "peak_rss_gib": rss,
                        "log": [ln for ln in out.splitlines() if "fairseq_knnlm.index.build" in ln]}
        print(f"build on-disk index: {w:.0f}s, peak RSS {rss:.2f} GiB", flush=True)
    w, rss, out = run_measured([py, "-c", SEARCH, str(prefix), str(index), str(a.queries), "32",
                                "1024"])
    res["search"] = {"s": w, "peak_rss_gib": rss,
                     **json.loads(out.split("SEARCH_JSON ", 1)[1].splitlines()[0])}
    s = res["search"]
    print(f"search {s['queries']} queries k=1024 probe 32: {s['search_s']:.1f}s "
          f"({s['queries_per_s']:.0f}/s), recall@10 {s['recall_at_10']:.3f}, exact top-10 "
          f"within the 1024 found {s['exact_top10_within_k']:.3f}; peak RSS "
          f"{s['peak_rss_gib_search']:.2f} GiB (load + search)", flush=True)
    sizes = {f.name: f.stat().st_size for f in wd.iterdir() if f.is_file()}
    res["disk_gb"] = {"keys": sum(v for k, v in sizes.items() if k.endswith("_keys.npy")) / 1e9,
                      "index": sizes.get("synth.index", 0) / 1e9,
                      "ivfdata": sizes.get("synth.index.ivfdata", 0) / 1e9}
    print(json.dumps(res["disk_gb"]))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

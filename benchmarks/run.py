"""Speed and memory benchmark of the kNN-LM pipeline on the WikiText-2 setup, in one run.

Every step runs as its own process (the real console scripts), repeated --repeats times in
round robin (step 1, 2, ..., 1, 2, ...); the table shows medians, and every ratio is taken
against plain eval-lm measured in this same run.
Tokens/s are eval-lm's own "Evaluated N tokens in Xs" (forward + scoring, no start-up);
peak memory is the child's max RSS (os.wait4).

    python benchmarks/run.py --run-dir runs/wikitext2            # ~25 min: 1500 lines x 3
    python benchmarks/run.py --run-dir runs/wikitext2 --quick    # ~5 min: 300 lines, 1 repeat
    python benchmarks/run.py --run-dir runs/wikitext2_quick --adaptive  # + benchmarks/speed.py

--adaptive then runs benchmarks/speed.py on the same run (pointers, clusters, lambda models
with and without the gate, fast-scan, smaller probe, IVF-RaBitQ, FAISS distances: searched
fraction, perplexity, tokens/s against stock eval-lm and against full search with the same
index, the per-stage profile and the Pareto plot), into RUN_DIR/speed.

Needs the outputs of examples/wikitext2 steps 1-5 (data-bin, checkpoint, datastore, index).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


_WRAP = (
    "import os, sys, subprocess\n"
    "p = subprocess.Popen(sys.argv[1:])\n"
    "_, status, ru = os.wait4(p.pid, 0)\n"
    "print(f'BENCH_MAXRSS_KB {ru.ru_maxrss}', flush=True)\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def run(cmd: list[str]) -> tuple[str, float, float]:
    """Run cmd under a tiny wrapper that reports the child's own peak RSS (GiB)."""
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", _WRAP, *cmd], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    wall = time.time() - t0
    if p.returncode != 0:
        raise RuntimeError(f"failed: {' '.join(cmd)}\n{p.stdout[-3000:]}")
    m = re.search(r"BENCH_MAXRSS_KB (\d+)", p.stdout)
    rss = int(m.group(1)) / 2**20 if m else float("nan")
    return p.stdout, wall, rss


def tokens_per_s(log: str) -> float:
    m = re.findall(r"Evaluated ([\d,]+) tokens in ([\d.]+)s", log)
    if not m:
        raise RuntimeError(f"no 'Evaluated' line:\n{log[-2000:]}")
    n, s = m[-1]
    return int(n.replace(",", "")) / float(s)


def make_slice(data_bin: Path, split: str, n_lines: int, out: Path) -> Path:
    """Binarize the first n_lines of a split with the same dictionary (for --quick)."""
    from fairseq.data import data_utils
    from fairseq.data.dictionary import Dictionary

    d = Dictionary.load(str(data_bin / "dict.txt"))
    ds = data_utils.load_indexed_dataset(str(data_bin / split), d)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "slice.txt"
    with open(raw, "w") as f:
        for i in range(min(n_lines, len(ds))):
            f.write(d.string(ds[i][:-1]) + "\n")  # drop the per-line eos; preprocess adds it
    subprocess.run([str(BIN / "fairseq-preprocess"), "--only-source", "--srcdict",
                    str(data_bin / "dict.txt"), "--testpref", str(raw), "--destdir", str(out),
                    "--workers", "1"], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default=str(REPO / "runs" / "wikitext2"))
    ap.add_argument("--quick", action="store_true", help="small slice, one repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--probe", type=int, default=32)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--work-dir", default=None, help="keep the slice and the dump here "
                    "(default: a temporary folder)")
    ap.add_argument("--fastscan-index", default=None,
                    help="also time kNN-LM with this ivfpq-fastscan index of the datastore")
    ap.add_argument("--only", default=None,
                    help="comma-separated substrings: run only the steps whose name has one "
                         "(the baseline always runs); e.g. --only fastscan")
    ap.add_argument("--adaptive", action="store_true",
                    help="then run benchmarks/speed.py on the same run dir (RUN_DIR/speed)")
    a = ap.parse_args()
    rd = Path(a.run_dir)
    data_bin, ckpt = rd / "data-bin", rd / "checkpoints" / "checkpoint_best.pt"
    dstore = rd / "dstore" / "train"
    index = Path(f"{dstore}.index")
    for p in (data_bin, ckpt, Path(f"{dstore}_meta.json"), index):
        if not p.exists():
            sys.exit(f"missing {p}: run examples/wikitext2 steps 1-5 first")
    repeats = 1 if a.quick else a.repeats
    tmp = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix="knnlm_bench_"))
    # a slice of valid (its first lines, binarized as "test" with the same dictionary): the
    # whole valid split takes ~10 min per kNN-LM pass on 2 cores
    n_lines = 300 if a.quick else 1500
    data, split = make_slice(data_bin, "valid", n_lines, tmp / "slice"), "test"
    common = [str(BIN / "fairseq-eval-lm"), str(data), "--path", str(ckpt), "--user-dir",
              str(REPO / "fairseq_knnlm"), "--gen-subset", split, "--tokens-per-sample", "512",
              "--context-window", "256", "--sample-break-mode", "none", "--max-tokens", "8192",
              "--cpu", "--num-workers", "0"]
    knn = ["--knnlm", "--dstore-filename", str(dstore), "--indexfile", str(index), "--k",
           str(a.k), "--probe", str(a.probe), "--lmbda", "0.25", "--knn-temp", "10"]
    steps = {
        "eval-lm (baseline)": common,
        "dump datastore": common + ["--save-knnlm-dstore", "--dstore-mmap",
                                    str(tmp / "dump" / "ds"), "--dstore-fp16"],
        "kNN-LM, FAISS distances": common + knn + ["--knn-sim-func", "faiss_l2",
                                                   "--no-load-keys"],
        "kNN-LM, exact L2, keys memmapped": common + knn + ["--knn-sim-func", "l2"],
        "kNN-LM, exact L2, keys in RAM": common + knn + ["--knn-sim-func", "l2",
                                                         "--move-dstore-to-mem"],
    }
    if a.fastscan_index:
        fs = ["--indexfile", a.fastscan_index]  # a later --indexfile wins in argparse
        steps["kNN-LM, FAISS distances, ivfpq-fastscan"] = (
            common + knn + fs + ["--knn-sim-func", "faiss_l2", "--no-load-keys"])
        steps["kNN-LM, exact L2, keys memmapped, ivfpq-fastscan"] = (
            common + knn + fs + ["--knn-sim-func", "l2"])
    if a.only:
        keep = a.only.split(",")
        steps = {n: c for n, c in steps.items()
                 if n == "eval-lm (baseline)" or any(k in n for k in keep)}
    res: dict[str, dict] = {}
    ppl: dict[str, str] = {}
    tps: dict[str, list[float]] = {n: [] for n in steps}
    rss: dict[str, list[float]] = {n: [] for n in steps}
    stage: dict[str, str] = {n: "" for n in steps}
    for rep in range(repeats):  # round robin: a slow spell of the machine hits every step
        for name, cmd in steps.items():
            out, _, r = run(cmd)
            tps[name].append(tokens_per_s(out))
            rss[name].append(r)
            m = re.findall(r"kNN-LM time by stage over \d+ queries: (.*)", out)
            stage[name] = m[-1] if m else stage[name]
            m = re.findall(r"Perplexity: ([\d.]+)", out)
            ppl[name] = m[-1] if m else ""
            print(f"[{rep + 1}/{repeats}] {name}: {tps[name][-1]:.0f} tok/s, {r:.2f} GiB "
                  f"{stage[name]}", flush=True)
    for name in steps:
        res[name] = {"tokens_per_s": statistics.median(tps[name]),
                     "peak_rss_gib": max(rss[name]), "runs": tps[name], "stages": stage[name],
                     "ppl": ppl[name]}
    # index build speed on a sample of the real datastore (train and add separately)
    if not a.only:
        res["index build"] = index_speed(dstore, tmp, quick=a.quick)
    base = res["eval-lm (baseline)"]["tokens_per_s"]
    base_rss = res["eval-lm (baseline)"]["peak_rss_gib"]
    index_gib = index.stat().st_size / 2**30
    print()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"first {n_lines} lines of valid, k={a.k}, probe={a.probe}, "
          f"median of {repeats}; index {index_gib:.2f} GiB")
    print("| step | tokens/s | ratio to eval-lm | peak RSS (GiB) | RSS over eval-lm (GiB) | "
          "ppl (λ 0.25, T 10) |")
    print("|---|---|---|---|---|---|")
    for name, r in res.items():
        if name == "index build":
            continue
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f}x | "
              f"{r['peak_rss_gib']:.2f} | {r['peak_rss_gib'] - base_rss:+.2f} | {r['ppl']} |")
    ib = res.get("index build")
    if ib:
        print(f"| index build ({ib['n']:,} keys, IVF{ib['ncentroids']},PQ{ib['code_size']}) | "
              f"train {ib['train_keys_per_s']:.0f} keys/s, add {ib['add_keys_per_s']:.0f} "
              f"keys/s | | {ib['peak_rss_gib']:.2f} | | |")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    if a.adaptive:
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "speed.py"), "--run-dir",
                        str(rd), "--out-dir", str(rd / "speed"), "--repeats",
                        str(1 if a.quick else a.repeats)], check=True)


_INDEX_BENCH = r"""
import json, sys, time, numpy as np, faiss
from fairseq_knnlm.store.datastore import open_datastore
from fairseq_knnlm.index.build import IndexSettings, new_index, sample_train_ids
ds = open_datastore(sys.argv[1]); n = int(sys.argv[2]); nc = int(sys.argv[3])
s = IndexSettings(ncentroids=nc, code_size=64, train_size=n)
ids = sample_train_ids(ds.size, n, 1)
x = np.ascontiguousarray(ds.keys[ids], dtype=np.float32)
index = new_index(s, ds.dim)
t0 = time.time(); index.train(x); tt = time.time() - t0
m = min(ds.size, 4 * n)
t0 = time.time()
for s0 in range(0, m, 500000):
    index.add(np.ascontiguousarray(ds.keys[s0:min(m, s0 + 500000)], dtype=np.float32))
ta = time.time() - t0
print("RESULT", json.dumps({"n": n, "ncentroids": nc, "code_size": 64, "train_s": tt,
      "train_keys_per_s": n / tt, "add_keys_per_s": m / ta, "added": m}))
"""


def index_speed(dstore: Path, tmp: Path, quick: bool) -> dict:
    n, nc = (50_000, 256) if quick else (200_000, 1024)
    out, _, rss = run([sys.executable, "-c", _INDEX_BENCH, str(dstore), str(n), str(nc)])
    r = json.loads(re.findall(r"RESULT (.*)", out)[-1])
    r["peak_rss_gib"] = rss
    return r


if __name__ == "__main__":
    main()

"""Pointer curve: fraction of kNN searches against perplexity (issue #14), with tokens/s.

For each index (the paper's IVFPQ and ivfpq-fastscan), exact L2, fixed k, lambda and T:

1. one full-search pass with ``--knn-pointers --knn-min-pointers K+1 --knn-save-neighbors``
   (equal to plain kNN-LM; it keeps the queries a replay needs);
2. ``knnlm-sweep --pointer-thresholds`` replays every threshold from that pass, with plain
   pointers and with RetoMaton's clusters (``--knn-clusters``): searches against perplexity;
3. online runs, round robin, ``--repeats`` times (medians): plain ``fairseq-eval-lm`` (no
   plugin), full kNN-LM, and pointer runs at ``--online`` thresholds; tokens/s are eval-lm's
   own "Evaluated ... tokens/s", ratios against plain eval-lm of the same run.

Writes OUT/pointer_curve.json, OUT/pointer_curve.md (the tables) and OUT/pointer_curve.png.

    python benchmarks/pointer_curve.py --run-dir runs/wikitext2_quick \
        --out-dir runs/wikitext2_quick/pointers --lmbda 0.3 --temp 5

Needs the outputs of examples/wikitext2 steps 1-5 (QUICK=1 or not); builds the fast-scan index
and the clusters into OUT when they are missing.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def sh(cmd: list[str]) -> str:
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"failed: {' '.join(cmd)}\n{p.stdout[-3000:]}")
    return p.stdout


def parse_run(log: str) -> dict[str, Any]:
    n, s = re.findall(r"Evaluated ([\d,]+) tokens in ([\d.]+)s", log)[-1]
    out: dict[str, Any] = {"tokens": int(n.replace(",", "")), "seconds": float(s),
                           "ppl": float(re.findall(r"Perplexity: ([0-9.]+)", log)[-1])}
    out["tokens_per_s"] = out["tokens"] / out["seconds"]
    m = re.findall(r"kNN-LM searches: (\d+) of (\d+) tokens", log)
    if m:
        out["searches"] = int(m[-1][0])
    m = re.findall(r"final ppl ([0-9.]+)", log)
    if m:
        out["ppl"] = float(m[-1])  # four decimals
    m = re.findall(r"time by stage over \d+ queries: (.*)", log)
    if m:
        out["stages"] = {k: float(v[:-1]) for k, v in
                         (x.split(" ") for x in m[-1].strip().split(", "))}
    return out


def build_once(dstore: Path, index: Path, kind: str, a: argparse.Namespace) -> None:
    """Build a --ncentroids index of the kind (64-byte codes where they apply) unless it
    exists."""
    if Path(f"{index}.meta.json").exists():
        return
    print(f"building the {kind} index", flush=True)
    code = ["--code-size", "64"] if kind != "ivf-rabitq" else []
    sh([str(BIN / "knnlm-build-index"), "--dstore-mmap", str(dstore), "--faiss-index",
        str(index), "--index-type", kind, "--ncentroids", str(a.ncentroids), *code,
        "--train-size", str(a.index_train_size), "--probe", str(a.probe), "--seed", "1"])


def clusters_once(dstore: Path, prefix: Path, num_clusters: int) -> None:
    """knnlm-clusters into prefix unless they exist."""
    if not Path(f"{prefix}_meta.json").exists():
        print("building the clusters", flush=True)
        sh([sys.executable, "-m", "fairseq_knnlm.cli.clusters", str(dstore), str(prefix),
            "--num-clusters", str(num_clusters)])


def finish_plot(fig: Any, ax: Any, path: Path,
                rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> None:
    """Grid, legend, layout within ``rect`` of the figure; write the figure and close it."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_run_args(ap: argparse.ArgumentParser, subset: str, lmbda: float, temp: float,
                 repeats: int) -> None:
    """The arguments this benchmark and speed.py share (a QUICK or full WikiText-2 run)."""
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--subset", default=subset)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--probe", type=int, default=32)
    ap.add_argument("--lmbda", type=float, default=lmbda)
    ap.add_argument("--temp", type=float, default=temp)
    ap.add_argument("--ncentroids", type=int, default=512, help="fast-scan index lists")
    ap.add_argument("--index-train-size", type=int, default=1000000,
                    help="keys the fast-scan (and RaBitQ) index is trained on")
    ap.add_argument("--num-clusters", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--label", default="WikiText-2 quick (QUICK=1)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap, subset="valid", lmbda=0.25, temp=1.0, repeats=2)
    ap.add_argument("--thresholds", default="1,2,4,8,16,32,64,128,256,512,1024")
    ap.add_argument("--online", default="pointers:64,clusters:256,clusters:512",
                    help="comma list of VARIANT:THRESHOLD timed online (pointers|clusters)")
    a = ap.parse_args()
    run, out = a.run_dir, a.out_dir
    out.mkdir(parents=True, exist_ok=True)
    dstore = run / "dstore" / "train"
    indexes = {"ivfpq": run / "dstore" / "train.index", "fastscan": out / "train.fs.index"}
    clusters = out / f"clusters_c{a.num_clusters}"
    t0 = time.time()
    build_once(dstore, indexes["fastscan"], "ivfpq-fastscan", a)
    clusters_once(dstore, clusters, a.num_clusters)
    base = [str(run / "data-bin"), "--path", str(run / "checkpoints" / "checkpoint_best.pt"),
            "--tokens-per-sample", "512", "--context-window", "256", "--sample-break-mode",
            "none", "--max-tokens", "8192", "--cpu", "--num-workers", "0", "--gen-subset",
            a.subset]
    plugin = ["--user-dir", str(REPO / "fairseq_knnlm")]

    def knn(index: str, *extra: str) -> list[str]:
        return [*base, *plugin, "--knnlm", "--dstore-filename", str(dstore), "--indexfile",
                str(indexes[index]), "--k", str(a.k), "--probe", str(a.probe), "--lmbda",
                str(a.lmbda), "--knn-temp", str(a.temp), *extra]

    # 1-2: full-search passes and replays
    thresholds = a.thresholds
    replay: dict[str, list[dict[str, Any]]] = {}
    full: dict[str, dict[str, Any]] = {}
    for index in indexes:
        nbrs = out / f"nbrs_{a.subset}_{index}"
        log = sh([str(BIN / "fairseq-eval-lm"), *knn(index, "--knn-pointers",
                                                     "--knn-min-pointers", str(a.k + 1),
                                                     "--knn-save-neighbors", str(nbrs))])
        full[index] = parse_run(log)
        for variant, extra in (("pointers", []), ("clusters", ["--clusters", str(clusters)])):
            js = out / f"replay_{index}_{variant}.json"
            sh([str(BIN / "knnlm-sweep"), str(nbrs), "--pointer-thresholds", thresholds,
                "--lambdas", str(a.lmbda), "--temps", str(a.temp), "--json", str(js), *extra])
            replay[f"{index}/{variant}"] = json.loads(js.read_text())["rows"]
        print(f"{index}: full pass and replays done ({time.time() - t0:.0f}s)", flush=True)

    # 3: online timings, round robin
    steps: dict[str, list[str]] = {"eval-lm (plain, no plugin)": [*base]}
    for index in indexes:
        steps[f"{index}: kNN-LM (every token searched)"] = knn(index)
        for spec in a.online.split(","):
            variant, thr = spec.split(":")
            extra = ["--knn-pointers", "--knn-min-pointers", thr]
            if variant == "clusters":
                extra += ["--knn-clusters", str(clusters)]
            steps[f"{index}: {variant}, --knn-min-pointers {thr}"] = knn(index, *extra)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in steps}
    for rep in range(a.repeats):
        for name, args in steps.items():
            runs[name].append(parse_run(sh([str(BIN / "fairseq-eval-lm"), *args])))
        print(f"round {rep + 1} of {a.repeats} done ({time.time() - t0:.0f}s)", flush=True)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    base_tps = med("eval-lm (plain, no plugin)", "tokens_per_s")
    online_rows = []
    for name in steps:
        r = runs[name][0]
        row = {"step": name, "tokens_per_s": med(name, "tokens_per_s"),
               "ratio": med(name, "tokens_per_s") / base_tps, "ppl": r["ppl"],
               "searches": r.get("searches"), "tokens": r["tokens"],
               "all_tokens_per_s": [x["tokens_per_s"] for x in runs[name]],
               "stages": runs[name][-1].get("stages")}
        online_rows.append(row)
    result = {"args": {k: str(v) for k, v in vars(a).items()}, "full_pass": full,
              "replay": replay, "online": online_rows, "wall_s": time.time() - t0}
    (out / "pointer_curve.json").write_text(json.dumps(result, indent=1))
    md = tables(result, a)
    (out / "pointer_curve.md").write_text(md)
    print(md)
    plot(result, out / "pointer_curve.png", a.label)
    print(f"wrote {out / 'pointer_curve.png'} ({time.time() - t0:.0f}s in all)")


def tables(result: dict[str, Any], a: argparse.Namespace) -> str:
    lines = [f"Replayed curve (k={a.k}, λ={a.lmbda}, T={a.temp}, exact L2; searched = "
             "fraction of tokens searched, Δppl against the full kNN-LM pass of the same "
             "index):", ""]
    keys = list(result["replay"])
    lines.append("| --knn-min-pointers | " + " | ".join(f"{k} searched | {k} ppl (Δ)"
                                                          for k in keys) + " |")
    lines.append("|---|" + "---|---|" * len(keys))
    by = {k: {r["min_pointers"]: r for r in rows} for k, rows in result["replay"].items()}
    full = {k: result["full_pass"][k.split("/")[0]]["ppl"] for k in keys}
    for thr in sorted(next(iter(by.values()))):
        cells = []
        for k in keys:
            r = by[k][thr]
            d = 100 * (r["ppl"] / full[k] - 1)
            cells.append(f"{100 * r['search_fraction']:.1f}% | {r['ppl']:.2f} ({d:+.2f}%)")
        lines.append(f"| {thr} | " + " | ".join(cells) + " |")
    lines += ["", "Online (median tokens/s of the repeats; ratio to plain eval-lm in the same "
              "run):", "", "| step | tokens/s | ratio | searched | ppl |", "|---|---|---|---|---|"]
    for r in result["online"]:
        s = f"{100 * r['searches'] / r['tokens']:.1f}%" if r["searches"] is not None else "-"
        lines.append(f"| {r['step']} | {r['tokens_per_s']:.0f} | {r['ratio']:.2f}x | {s} | "
                     f"{r['ppl']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    styles = {"ivfpq": "-", "fastscan": "--"}
    colors = {"pointers": "tab:blue", "clusters": "tab:orange"}
    for key, rows in result["replay"].items():
        index, variant = key.split("/")
        pts = sorted((r["search_fraction"], r["ppl"], r["min_pointers"]) for r in rows)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[index], marker="o",
                ms=3, color=colors[variant], label=f"{index}, {variant}")
        if index == "ivfpq":
            for x, y, thr in pts:
                ax.annotate(str(thr), (x, y), fontsize=6, xytext=(2, 2),
                            textcoords="offset points")
    for index, style in styles.items():
        ppl = result["full_pass"][index]["ppl"]
        ax.axhline(ppl, color="gray", ls=style, lw=0.8)
        ax.axhspan(ppl, ppl * 1.01, color="gray", alpha=0.08)
    ax.axvline(0.2, color="red", lw=0.8, ls=":", label="target: 80% saved")
    ax.set_xlabel("fraction of tokens searched (labels: --knn-min-pointers)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"{label}: pointers, searches vs perplexity", fontsize=9)
    ax.set_xlim(0, 1.02)
    finish_plot(fig, ax, path)


if __name__ == "__main__":
    main()

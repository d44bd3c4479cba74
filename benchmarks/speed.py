"""Speed of every way to save searches (issue #25): pointers, clusters, lambda models with and
without the gate, fast index settings; tokens/s against stock eval-lm and against full search
with the same index, medians of round-robin repeats in one run, and the Pareto plot.

    python benchmarks/speed.py --run-dir runs/wikitext2_quick --out-dir runs/wikitext2_quick/speed \
        --subset test --lmbda 0.3 --temp 5 --repeats 3

Needs examples/wikitext2 steps 1-5 (QUICK=1 or not). Builds into OUT what is missing: the
fast-scan and IVF-RaBitQ indexes, the clusters, and two lambda models fitted on a pass over
--fit-subset (valid; test when timing valid) saved with --knn-pointers --knn-min-pointers K+1
(an MLP with its gate, and one fitted for --knn-min-pointers 1 with --knn-stream-len STREAM).
The gate row's --knn-skip-below is the largest of the fitter's held-out grid that keeps the
model's held-out perplexity within --gate-tolerance (1%), unless --skip-below gives it.
Every kNN row keeps the keys in RAM (--move-dstore-to-mem), so that the page cache does not
decide the exact distances' cost.

Columns: searched fraction, perplexity, tokens/s (median) as ratios to stock eval-lm and to
full search with the same index, and the kNN overhead (time minus the plugin's pass without
--knnlm) as a fraction of full search's overhead, beside the target (searched + 0.15).
Writes OUT/speed.json, OUT/speed.md, OUT/speed.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pointer_curve import (  # noqa: E402
    BIN,
    REPO,
    add_run_args,
    build_once,
    clusters_once,
    finish_plot,
    parse_run,
    sh,
)

GATE = "GATE"  # the gate row's threshold, until the lambda model's report gives it


def artifacts(a: argparse.Namespace, out: Path) -> dict[str, Path]:
    """Where the prepared indexes, clusters and lambda models live (built by ``prepare``)."""
    return {"fastscan": out / "train.fs.index", "rabitq": out / "train.rq.index",
            "clusters": out / f"clusters_c{a.num_clusters}",
            "lam_mlp": out / f"lam_mlp_{a.fit_subset}.npz",
            "lam_ptr1": out / f"lam_ptr1_s{a.stream_len}_{a.fit_subset}.npz"}


def prepare(a: argparse.Namespace, run: Path, got: dict[str, Path], base: list[str],
            knn: Any, needed: set[str]) -> None:
    """Build into OUT the ``needed`` ones of ``got`` that are missing: the fast-scan and
    RaBitQ indexes, the clusters, the lambda models."""
    dstore = run / "dstore" / "train"
    if "fastscan" in needed:
        build_once(dstore, got["fastscan"], "ivfpq-fastscan", a)
    if "rabitq" in needed:
        build_once(dstore, got["rabitq"], "ivf-rabitq", a)
    if "clusters" in needed:
        clusters_once(dstore, got["clusters"], a.num_clusters)
    for name, extra, fit in (
            ("lam_mlp", [], []),
            ("lam_ptr1", ["--knn-stream-len", str(a.stream_len)], ["--min-pointers", "1"])):
        if name not in needed or (got[name].exists() and report_of(got[name]).exists()):
            continue
        nbrs = got[name].parent / f"nbrs_{a.fit_subset}_{name}"
        print(f"saving a {a.fit_subset} pass and fitting {got[name].name}", flush=True)
        sh([str(BIN / "fairseq-eval-lm"), *[x if x != a.subset else a.fit_subset for x in base],
            *knn("ivfpq", "--knn-pointers", "--knn-min-pointers", str(a.k + 1),
                 "--knn-save-neighbors", str(nbrs), *extra)])
        sh([str(BIN / "knnlm-fit-lambda"), str(nbrs), "--out", str(got[name]), "--kind",
            "mlp", "--temp", str(a.temp), "--force", "--json", str(report_of(got[name])),
            *fit])


def report_of(model: Path) -> Path:
    """The fitter's --json report beside a lambda model."""
    return model.with_suffix(".json")


def pick_skip_below(report: dict[str, Any], tolerance: float) -> tuple[float, str]:
    """The gate threshold of the timed gate row: the largest --knn-skip-below of the fitter's
    held-out grid whose perplexity is within ``tolerance`` (relative) of the model's without
    the gate, and a line saying what it searched; 0 (no gate) when none is."""
    base = float(report["held_out_ppl"]["model"])
    skips = report.get("held_out_skips", [])
    ok = [r for r in skips if float(r["skip_below"]) > 0
          and float(r["ppl"]) <= base * (1 + tolerance)]
    if not ok:
        return 0.0, f"no gate threshold keeps ppl within {100 * tolerance:g}% of {base:.2f}"
    best = max(ok, key=lambda r: float(r["skip_below"]))
    edge = " (the grid's largest: widen it)" if best is skips[-1] else ""
    return float(best["skip_below"]), (
        f"gate --knn-skip-below {best['skip_below']:g}{edge}: held-out search "
        f"{100 * best['search_fraction']:.1f}%, ppl {best['ppl']:.2f} against {base:.2f} "
        "without the gate")


def keep_rows(rows: dict[str, tuple[str, list[str]]], only: str
              ) -> dict[str, tuple[str, list[str]]]:
    """The rows named by the ';'-separated items of ``only`` (all rows when empty), with
    the two baselines and the full search of each index a kept row compares with. An item
    that is a row's whole name picks that row alone; any other item picks every row whose
    name contains it."""
    if not only:
        return rows
    keep = [x for x in only.split(";") if x]
    picked = {n for n in rows if any(x == n or (x not in rows and x in n) for x in keep)}
    picked |= {f"{rows[n][0]}: full search" for n in picked if rows[n][0]}
    picked |= {"eval-lm (stock, no plugin)", "plugin, no kNN"}
    return {n: r for n, r in rows.items() if n in picked}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap, subset="test", lmbda=0.3, temp=5.0, repeats=3)
    ap.add_argument("--stream-len", type=int, default=32, help="--knn-stream-len of the rows "
                    "that use it")
    ap.add_argument("--skip-below", type=float, default=None, help="the gate row's "
                    "--knn-skip-below (default: the largest of the fitter's held-out grid "
                    "within --gate-tolerance of the model's perplexity without the gate)")
    ap.add_argument("--gate-tolerance", type=float, default=0.01)
    ap.add_argument("--fit-subset", default=None, help="the split the lambda models are "
                    "fitted on (default: valid, or test when --subset is valid: a model is "
                    "never timed on the split it was fitted on)")
    ap.add_argument("--only", default="", help="rows to time, separated by ';' (row names "
                    "hold commas): a row's whole name, or a part of the names")
    a = ap.parse_args()
    if a.fit_subset is None:
        a.fit_subset = "test" if a.subset == "valid" else "valid"
    if a.fit_subset == a.subset:
        ap.error(f"--fit-subset {a.fit_subset}: the lambda models would be timed on the split "
                 "they were fitted on")
    run, out = a.run_dir, a.out_dir
    out.mkdir(parents=True, exist_ok=True)
    dstore = run / "dstore" / "train"
    t0 = time.time()
    base = [str(run / "data-bin"), "--path", str(run / "checkpoints" / "checkpoint_best.pt"),
            "--tokens-per-sample", "512", "--context-window", "256", "--sample-break-mode",
            "none", "--max-tokens", "8192", "--cpu", "--num-workers", "0", "--gen-subset",
            a.subset]
    plugin = ["--user-dir", str(REPO / "fairseq_knnlm")]
    indexes = {"ivfpq": run / "dstore" / "train.index"}

    def knn(index: str, *extra: str, probe: int | None = None) -> list[str]:
        return [*plugin, "--knnlm", "--dstore-filename", str(dstore), "--indexfile",
                str(indexes[index]), "--k", str(a.k), "--probe", str(probe or a.probe),
                "--lmbda", str(a.lmbda), "--knn-temp", str(a.temp), "--move-dstore-to-mem",
                *extra]

    got = artifacts(a, out)
    indexes["fastscan"], indexes["rabitq"] = got["fastscan"], got["rabitq"]
    s = str(a.stream_len)
    ptr = ["--knn-pointers", "--knn-min-pointers"]
    cl = ["--knn-clusters", str(got["clusters"])]
    rows: dict[str, tuple[str, list[str]]] = {  # name -> (index it compares with, args)
        "eval-lm (stock, no plugin)": ("", []),
        "plugin, no kNN": ("", plugin),
    }
    for index in ("ivfpq", "fastscan"):
        rows[f"{index}: full search"] = (index, knn(index))
        rows[f"{index}: pointers 64"] = (index, knn(index, *ptr, "64"))
        rows[f"{index}: pointers 64, stream {s}"] = (index, knn(index, *ptr, "64",
                                                                "--knn-stream-len", s))
        rows[f"{index}: clusters 512"] = (index, knn(index, *ptr, "512", *cl))
        rows[f"{index}: clusters 512, stream {s}"] = (index, knn(index, *ptr, "512", *cl,
                                                                 "--knn-stream-len", s))
    lam_mlp, lam_ptr = ["--knn-lambda-model", str(got["lam_mlp"])], [
        "--knn-lambda-model", str(got["lam_ptr1"])]
    rows["ivfpq: λ MLP"] = ("ivfpq", knn("ivfpq", *lam_mlp))
    gate_row = "ivfpq: λ MLP, gate"  # its --knn-skip-below is set once the model is fitted
    rows[gate_row] = ("ivfpq", knn("ivfpq", *lam_mlp, "--knn-skip-below", GATE))
    rows[f"ivfpq: λ MLP for pointers 1, stream {s}"] = (
        "ivfpq", knn("ivfpq", *lam_ptr, *ptr, "1", "--knn-stream-len", s))
    for index in ("ivfpq", "fastscan"):  # fewer candidates per cluster step
        rows[f"{index}: clusters 512, stream {s}, limit 1024"] = (
            index, knn(index, *ptr, "512", *cl, "--knn-stream-len", s,
                       "--knn-clusters-limit", "1024"))
    rows["fastscan: full search, probe 8"] = ("fastscan", knn("fastscan", probe=8))
    rows[f"fastscan: clusters 512, stream {s}, probe 8"] = (
        "fastscan", knn("fastscan", *ptr, "512", *cl, "--knn-stream-len", s, probe=8))
    rows["fastscan: full search, FAISS distances"] = (
        "fastscan", knn("fastscan", "--knn-sim-func", "faiss_l2"))
    rows["fastscan: full search, FAISS distances, probe 16"] = (
        "fastscan", knn("fastscan", "--knn-sim-func", "faiss_l2", probe=16))
    rows["rabitq: full search"] = ("rabitq", knn("rabitq"))
    rows[f"rabitq: pointers 64, stream {s}"] = ("rabitq", knn("rabitq", *ptr, "64",
                                                               "--knn-stream-len", s))
    rows = keep_rows(rows, a.only)
    used = {x for _, args in rows.values() for x in args}
    prepare(a, run, got, base, knn, {name for name, path in got.items()
                                     if str(path) in used})
    notes = []
    if gate_row in rows:
        tau, why = (a.skip_below, "--skip-below") if a.skip_below is not None else \
            pick_skip_below(json.loads(report_of(got["lam_mlp"]).read_text()),
                            a.gate_tolerance)
        notes.append(f"{gate_row}: --knn-skip-below {tau:g} ({why})")
        print(notes[-1], flush=True)
        rows = {(f"{n} {tau:g}" if n == gate_row else n):
                (index, [str(tau) if x == GATE else x for x in args])
                for n, (index, args) in rows.items()}  # in the same order
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in rows}
    for rep in range(a.repeats):
        for name, (_, args) in rows.items():
            runs[name].append(parse_run(sh([str(BIN / "fairseq-eval-lm"), *base, *args])))
        print(f"round {rep + 1} of {a.repeats} done ({time.time() - t0:.0f}s)", flush=True)
        write_result(out, summarise(runs, rows), a, rows, base, t0, rep + 1, notes)
    result = json.loads((out / "speed.json").read_text())
    print((out / "speed.md").read_text())
    plot(result, out / "speed.png", a.label)
    print(f"wrote {out / 'speed.png'} ({time.time() - t0:.0f}s in all)")


def write_result(out: Path, result: dict[str, Any], a: argparse.Namespace,
                 rows: dict[str, tuple[str, list[str]]], base: list[str], t0: float,
                 rounds: int, notes: list[str]) -> None:
    """OUT/speed.json and OUT/speed.md of the rounds done so far (rewritten after each
    round, so an interrupted run keeps them)."""
    result.update({"args": {k: str(v) for k, v in vars(a).items()}, "wall_s": time.time() - t0,
                   "rounds": rounds, "notes": notes,
                   "commands": {n: " ".join(["fairseq-eval-lm", *base, *r[1]])
                                for n, r in rows.items()}})
    (out / "speed.json").write_text(json.dumps(result, indent=1))
    (out / "speed.md").write_text(f"{rounds} of {a.repeats} rounds\n\n" + table(result)
                                  + "".join(f"\n{n}\n" for n in notes)
                                  + "\n" + profile_table(result))


def summarise(runs: dict[str, list[dict[str, Any]]], rows: dict[str, tuple[str, list[str]]]
              ) -> dict[str, Any]:
    """Medians over the repeats; ratios to stock eval-lm and to the same index's full
    search; the kNN overhead against the full search's (seconds less the no-kNN pass's)."""
    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    stock, plain = med("eval-lm (stock, no plugin)", "seconds"), med("plugin, no kNN",
                                                                      "seconds")
    out = []
    for name, (index, _) in rows.items():
        sec, r = med(name, "seconds"), runs[name][0]
        row: dict[str, Any] = {"row": name, "index": index, "seconds": sec,
                               "tokens_per_s": r["tokens"] / sec,
                               "vs_stock": stock / sec, "ppl": r["ppl"],
                               "searched": r["searches"] / r["tokens"] if "searches" in r
                               else None, "all_seconds": [x["seconds"] for x in runs[name]],
                               "stages": runs[name][-1].get("stages")}
        if index:
            full = med(f"{index}: full search", "seconds")
            row["vs_full"] = full / sec
            row["overhead"] = (sec - plain) / max(full - plain, 1e-9)
            row["overhead_target"] = (row["searched"] or 0.0) + 0.15
        out.append(row)
    return {"rows": out, "stock_s": stock, "plugin_no_knn_s": plain}


def table(result: dict[str, Any]) -> str:
    lines = ["| run | searched | ppl | tokens/s | vs stock eval-lm | vs full search (same "
             "index) | kNN overhead / full's (target) |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        sf = f"{100 * r['searched']:.1f}%" if r["searched"] is not None else "-"
        vf = f"{r['vs_full']:.2f}x" if "vs_full" in r else "-"
        ov = (f"{r['overhead']:.2f} ({r['overhead_target']:.2f})" if "overhead" in r
              else "-")
        lines.append(f"| {r['row']} | {sf} | {r['ppl']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{r['vs_stock']:.2f}x | {vf} | {ov} |")
    return "\n".join(lines) + "\n"


def profile_table(result: dict[str, Any]) -> str:
    """Where each row's time goes, in µs per token: the LM and fairseq (the plugin's pass
    without kNN), each stage the retriever and the pointer stepping time themselves (the last
    repeat), and the rest (the row's median time less both). Bookkeeping is the pointer and
    cluster stepping outside FAISS and the distances: expansion, policy, next pointers."""
    names = sorted({k for r in result["rows"] for k in (r.get("stages") or {})})
    lines = ["| run | LM + fairseq | " + " | ".join(n.replace("_", " ") for n in names)
             + " | rest | total |", "|---" * (len(names) + 4) + "|"]
    for r in result["rows"]:
        if not r["index"] or not r.get("stages"):
            continue
        tok = r["tokens_per_s"] * r["seconds"]
        lm = 1e6 * result["plugin_no_knn_s"] / tok
        st = {n: 1e6 * r["stages"].get(n, 0.0) / tok for n in names}
        rest = 1e6 * r["seconds"] / tok - lm - sum(st.values())
        lines.append(f"| {r['row']} | {lm:.0f} | " + " | ".join(
            f"{st[n]:.1f}" if n in r["stages"] else "-" for n in names)
            + f" | {rest:.0f} | {1e6 * r['seconds'] / tok:.0f} |")
    return "µs per token:\n\n" + "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    pts = [(r["vs_stock"], r["ppl"], r["row"]) for r in result["rows"] if r["index"]]
    fig, ax = plt.subplots(figsize=(11, 5))
    colors = {"ivfpq": "tab:blue", "fastscan": "tab:orange", "rabitq": "tab:green"}
    front, best = [], float("inf")  # the Pareto front: faster and no worse
    for x, y, name in sorted(pts, key=lambda p: -p[0]):
        if y < best:
            front.append((x, y, name))
            best = y
    on_front = {name for *_, name in front}
    key = []  # every point numbered; the key beside the plot names them
    for i, r in enumerate([r for r in result["rows"] if r["index"]], 1):
        ax.scatter(r["vs_stock"], r["ppl"], color=colors.get(r["index"], "gray"), s=18)
        ax.annotate(str(i), (r["vs_stock"], r["ppl"]), fontsize=7, xytext=(3, 2),
                    textcoords="offset points",
                    fontweight="bold" if r["row"] in on_front else "normal")
        key.append(f"{i:>2} {r['row']}" + (" *" if r["row"] in on_front else ""))
    fig.text(0.70, 0.5, "\n".join(key + ["", "* on the Pareto front"]), fontsize=6.5,
             family="monospace", va="center")
    for index, color in colors.items():  # one legend entry per index
        if any(r["index"] == index for r in result["rows"]):
            ax.scatter([], [], color=color, s=18, label=index)
    ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=0.8, label="Pareto front")
    ax.axvline(1.0, color="red", lw=0.8, ls=":", label="stock eval-lm speed")
    ax.set_xlabel("tokens/s as a ratio to stock fairseq-eval-lm (same run)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"{label}: speed against perplexity", fontsize=9)
    finish_plot(fig, ax, path, rect=(0, 0, 0.68, 1))  # the key on the right


if __name__ == "__main__":
    main()

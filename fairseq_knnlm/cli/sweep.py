"""knnlm-sweep: score many kNN-LM settings from neighbours saved by one eval-lm pass.

    fairseq-eval-lm ... --knnlm --k 1024 --knn-save-neighbors runs/wt2/nbrs/valid
    knnlm-sweep runs/wt2/nbrs/valid --lambdas 0,0.1,0.2,0.3 --ks 8,64,1024 --temps 1,10 \
        --json runs/wt2/sweep_valid.json --plot-dir runs/wt2/plots

Every k' <= the pass's --k is scored from FAISS's top-k' of that pass (--k-select faiss, the
default): the same neighbours, distances and perplexity as an online run with --k k'.
--k-select exact-l2 keeps instead the k' nearest by exact L2 among the saved k (what a
--k k run re-ranked by exact distance would keep; no online run reproduces it at k' < k).
A sharded pass (PREFIX_manifest.json) is read as one file.

Prints the best setting and a table; --json writes every row; --plot-dir writes PNGs of
perplexity against lambda (paper Fig. 5) and against k (paper Fig. 4).

Pointers (--knn-pointers): from one pass that searched every token and saved its queries,

    fairseq-eval-lm ... --knnlm --k 1024 --knn-pointers --knn-min-pointers 1025 \
        --knn-save-neighbors runs/wt2/nbrs/valid_full
    knnlm-sweep runs/wt2/nbrs/valid_full --pointer-thresholds 1,2,4,8,16,32,64,128,1025 \
        --lambdas 0.25 --temps 1 --json runs/wt2/pointers.json --plot-dir runs/wt2/plots

replays --knn-min-pointers N for every N (the online code, offline: equal to the online run)
and prints the fraction of tokens searched against perplexity; --plot-dir writes
ppl_vs_searches.png.

Lambda models (knnlm-fit-lambda): from any pass that searched every token,

    knnlm-sweep runs/wt2/nbrs/test --lambda-model lambda_mlp.npz --skip-below 0,0.1,0.2,0.3

replays --knn-lambda-model MODEL --knn-skip-below tau for every tau (equal to the online
runs) next to the best fixed lambda of --lambdas (give the one tuned on valid) at the model's
k and temperature, and --plot-dir writes ppl_vs_searches_lambda_model.png. A model fitted
with pointers (knnlm-fit-lambda --min-pointers N) is replayed under that pointer policy (the
pass must be saved with --knn-pointers --knn-min-pointers K+1; its datastore's keys are read),
once per tau: the searched fraction then also drops where pointers score a token.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from fairseq_knnlm.errors import FlagError, KNNLMError
from fairseq_knnlm.flags import clusters_limit
from fairseq_knnlm.offline.neighbours import load_neighbors
from fairseq_knnlm.offline.sweep import (
    DISTS,
    K_SELECTS,
    best,
    check_replay,
    check_sweep,
    replay_pointers,
    sweep,
    unsearched_tokens,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")
# what every row of a --json needs to be printed and plotted again (--from-json)
ROW_FIELDS = {"dist", "temperature", "k", "lambda", "cache_lambda", "ppl"}


def _comma_list(convert: Callable[[str], T], what: str) -> Callable[[str], list[T]]:
    def parse(s: str) -> list[T]:
        try:
            return [convert(x) for x in s.split(",") if x]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma list of {what}: {s!r}") from None
    return parse


floats = _comma_list(float, "numbers")
ints = _comma_list(int, "integers")


def names(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(s: str) -> list[str]:
        out = [x for x in s.split(",") if x]
        bad = [x for x in out if x not in choices]
        if bad or not out:
            raise argparse.ArgumentTypeError(f"{s!r}: choose from {', '.join(choices)}")
        return out
    return parse


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="knnlm-sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("neighbors", nargs="?", default=None,
                   help="prefix given to --knn-save-neighbors")
    p.add_argument("--from-json", default=None,
                   help="re-plot / re-print the rows of an earlier --json instead of sweeping")
    p.add_argument("--lambdas", type=floats, default=floats(
        "0,0.05,0.1,0.15,0.2,0.25,0.3,0.35,0.4,0.5,0.6,0.7,0.8,0.9"), help="comma list")
    p.add_argument("--ks", type=ints, default=None,
                   help="comma list (default: powers of two up to the saved k)")
    p.add_argument("--temps", type=floats, default=[1.0], help="comma list of temperatures")
    p.add_argument("--dists", type=names(tuple(DISTS)), default=["l2"],
                   help="comma list of l2 (exact), faiss_l2 (FAISS's distances)")
    p.add_argument("--k-select", type=names(K_SELECTS), default=["faiss"],
                   help="which k' of the saved neighbours each k' keeps (comma list): faiss "
                        "(default; FAISS's top-k', reproduces an online --k k' run) or exact-l2 "
                        "(the k' nearest by exact L2 among the saved ones)")
    p.add_argument("--cache-lambdas", type=floats, default=[0.0],
                   help="comma list of cache weights (needs a pass with --knn-cache)")
    p.add_argument("--pointer-thresholds", type=ints, default=None,
                   help="comma list of --knn-min-pointers values to replay from a pass saved "
                        "with --knn-pointers that searched every token (see above): searches "
                        "against perplexity at each --lambdas x --temps")
    p.add_argument("--dstore", default=None,
                   help="the datastore for --pointer-thresholds (default: the one the pass "
                        "used, from its meta file)")
    p.add_argument("--clusters", default=None,
                   help="with --pointer-thresholds: replay --knn-clusters PREFIX; with "
                        "--lambda-model: the clusters of a model fitted with them (default: "
                        "the prefix it was fitted with)")
    p.add_argument("--clusters-limit", type=int, default=0,
                   help="with --pointer-thresholds --clusters: replay --knn-clusters-limit N "
                        "(the most candidates per token; 0: 2 x k, the default)")
    p.add_argument("--lambda-model", default=None,
                   help="replay this knnlm-fit-lambda model (with --skip-below) instead of "
                        "sweeping fixed lambdas")
    p.add_argument("--skip-below", type=floats, default=[0.0],
                   help="with --lambda-model: comma list of --knn-skip-below thresholds")
    p.add_argument("--json", default=None, help="write all rows and the best ones here")
    p.add_argument("--plot-dir", default=None, help="write ppl_vs_lambda.png, ppl_vs_k.png")
    p.add_argument("--label", default="", help="title prefix for the plots")
    return p


def series(row: dict[str, Any]) -> str:
    """The plot label of a row's (distance, k selection)."""
    return f"{row['dist']}, {row['k_select']} top-k"


def fill_k_select(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of a --json written before --k-select: they sorted the saved neighbours by the
    row's own distance, i.e. exact-l2 selection for l2 and FAISS's order for faiss_l2."""
    for r in rows:
        r.setdefault("k_select", "exact-l2" if r["dist"] == "l2" else "faiss")
    return rows


def _save(fig: Any, ax: Any, xlabel: str, title: str, path: Path) -> Path:
    """Label a perplexity plot, write it as a PNG and close it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity")
    ax.set_title(title.strip(), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(rows: list[dict[str, Any]], out_dir: Path, label: str = "") -> list[Path]:
    """ppl vs lambda at the best (T, k), and ppl vs k at the best (T, lambda) for each k; one
    line per (distance, k selection)."""
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    top = best(rows, cache_lambda=0.0) or best(rows)
    assert top is not None
    base = best(rows, **{"lambda": 0.0, "cache_lambda": 0.0})
    kinds = sorted({(r["dist"], r["k_select"]) for r in rows})
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for dist, sel in kinds:
        t = best(rows, dist=dist, k_select=sel, cache_lambda=top["cache_lambda"])
        if t is None:
            continue
        pts = sorted((r["lambda"], r["ppl"]) for r in rows if r["dist"] == dist and
                     r["k_select"] == sel and r["k"] == t["k"] and
                     r["temperature"] == t["temperature"] and
                     r["cache_lambda"] == t["cache_lambda"])
        ax.plot(*zip(*pts), marker="o",
                label=f"{series(t)}, k={t['k']}, T={t['temperature']:g}")
    written.append(_save(fig, ax, "λ (kNN weight)", f"{label} perplexity vs λ",
                         out_dir / "ppl_vs_lambda.png"))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for dist, sel in kinds:
        pts = []
        for kk in sorted({r["k"] for r in rows}):
            b = best(rows, dist=dist, k_select=sel, k=kk, cache_lambda=top["cache_lambda"])
            if b is not None:
                pts.append((kk, b["ppl"]))
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{dist}, {sel} top-k (λ, T tuned per k)")
    if base is not None:
        ax.axhline(base["ppl"], color="gray", ls="--", label=f"base LM {base['ppl']:.2f}")
    ax.set_xscale("log", base=2)
    written.append(_save(fig, ax, "k (neighbours)", f"{label} perplexity vs k",
                         out_dir / "ppl_vs_k.png"))
    return written


def run_sweep(args: argparse.Namespace) -> tuple[list[dict[str, Any]], int]:
    """All rows for the neighbours at args.neighbors; every flag checked before any work."""
    nb = load_neighbors(args.neighbors)
    kmax = int(nb.meta["k"])
    ks = args.ks or ([kmax] if unsearched_tokens(nb) else  # a pointer pass: its k only
                     [1 << i for i in range(kmax.bit_length()) if (1 << i) <= kmax])
    check_sweep(nb, ks, args.dists, args.k_select, args.cache_lambdas, args.lambdas, args.temps)
    rows: list[dict[str, Any]] = []
    for dist in args.dists:
        for sel in args.k_select:
            rows += sweep(nb, args.lambdas, ks, args.temps, dist=dist,
                          cache_lambdas=args.cache_lambdas, k_select=sel)
    return rows, nb.n


def run_replay(args: argparse.Namespace) -> tuple[list[dict[str, Any]], int]:
    """Pointer replay rows (sweep.replay_pointers) for args.neighbors."""
    from fairseq_knnlm.store.datastore import open_datastore

    nb = load_neighbors(args.neighbors)
    check_replay(nb, args.pointer_thresholds, args.lambdas, args.temps)
    dstore = args.dstore or nb.meta.get("dstore")
    if not dstore:
        raise FlagError("--pointer-thresholds: the pass does not name its datastore: give "
                        "--dstore PREFIX")
    ds = open_datastore(dstore)
    if "datastore" in nb.meta and ds.meta.fingerprint() != nb.meta["datastore"]:
        raise FlagError(f"--dstore {dstore} is not the datastore the pass searched "
                        "(its fingerprint differs)")
    clusters = None
    if args.clusters:
        from fairseq_knnlm.adaptive.pointers import load_clusters

        clusters = load_clusters(args.clusters, ds,
                                 limit=clusters_limit(int(nb.meta["k"]), args.clusters_limit),
                                 flag="--clusters")
    return replay_pointers(nb, ds, args.pointer_thresholds, args.lambdas, args.temps,
                           clusters=clusters), nb.n


def plot_pointers(rows: list[dict[str, Any]], out_dir: Path, label: str = "") -> Path:
    """Perplexity against the fraction of tokens searched, one line per (T, lambda)."""
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for T, lam in sorted({(r["temperature"], r["lambda"]) for r in rows}):
        pts = sorted((r["search_fraction"], r["ppl"], r["min_pointers"]) for r in rows
                     if r["temperature"] == T and r["lambda"] == lam)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"λ {lam:g}, T {T:g}")
        for x, y, thr in pts:
            ax.annotate(str(thr), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set_xlim(0, 1.02)
    return _save(fig, ax, "fraction of tokens searched (labels: --knn-min-pointers)",
                 f"{label} pointers, ppl vs searches", out_dir / "ppl_vs_searches.png")


def replay_main(args: argparse.Namespace) -> int:
    try:
        rows, n_tokens = run_replay(args)
    except (KNNLMError, OSError) as e:
        print(f"knnlm-sweep: error: {e}", file=sys.stderr)
        return 2
    rows.sort(key=lambda r: (r["temperature"], r["lambda"], -r["min_pointers"]))
    print(f"{n_tokens} tokens; pointer replay (k={rows[0]['k']}, exact L2)")
    print(f"{'T':>6} {'lambda':>6} {'min-ptrs':>8} {'searches':>9} {'searched':>9} {'ppl':>9}")
    for r in rows:
        print(f"{r['temperature']:>6g} {r['lambda']:>6g} {r['min_pointers']:>8} "
              f"{r['searches']:>9} {100 * r['search_fraction']:>8.1f}% {r['ppl']:>9.3f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"n_tokens": n_tokens, "rows": rows}, indent=1))
    if args.plot_dir:
        print(f"wrote {plot_pointers(rows, Path(args.plot_dir), args.label)}")
    return 0


def run_lambda_model(args: argparse.Namespace) -> dict[str, Any]:
    """Rows of --lambda-model replayed at each --skip-below, and the best fixed lambda of
    --lambdas at the model's k, temperature and distance on the same tokens."""
    from fairseq_knnlm.adaptive.lambda_file import load_model
    from fairseq_knnlm.offline.lambda_replay import (
        open_pass_datastore,
        replay,
        replay_with_pointers,
        token_inputs,
    )

    if not args.lambdas or any(not 0.0 <= x <= 1.0 for x in args.lambdas):
        raise FlagError(f"--lambdas (the fixed lambdas to compare with) must be values in "
                        f"[0, 1], got {args.lambdas}")
    model = load_model(args.lambda_model, flag="--lambda-model")
    nb = load_neighbors(args.neighbors)
    if model.min_pointers is None:
        inp = token_inputs(nb, model.freq, model.k, model.temperature, model.dist,
                           temps=model.temps)
        rows = replay(inp, model, args.skip_below)
    else:  # the pass replayed under the model's pointer policy, once per tau
        ds = open_pass_datastore(nb, load_keys=True)
        clusters = None
        if model.clusters is not None:  # --clusters, or the prefix the model was fitted with
            from fairseq_knnlm.adaptive.pointers import load_clusters

            prefix = args.clusters or model.info.get("clusters_prefix")
            if not prefix:
                raise FlagError("the lambda model was fitted with --knn-clusters: pass "
                                "--clusters PREFIX")
            clusters = load_clusters(prefix, ds, limit=clusters_limit(model.k),
                                     flag="--clusters")
        rows = replay_with_pointers(nb, ds, model, args.skip_below, clusters)
    fixed = sweep(nb, sorted(set(args.lambdas) | {0.0}), [model.k], [model.temperature],
                  dist=model.dist)
    given = [r for r in fixed if r["lambda"] in args.lambdas]
    return {"n_tokens": nb.n, "lambda_model": str(args.lambda_model), "kind": model.kind,
            "k": model.k, "temperature": model.temperature, "dist": model.dist,
            "min_pointers": model.min_pointers, "clusters": model.clusters,
            "best_fixed": min(given, key=lambda r: r["ppl"]),
            "base": best(fixed, **{"lambda": 0.0}), "rows": rows}


def plot_lambda_model(res: dict[str, Any], out_dir: Path, label: str = "") -> Path:
    """Perplexity against the fraction of tokens searched, labelled by tau, with the best
    fixed lambda as a line."""
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    pts = sorted((r["search_fraction"], r["ppl"], r["skip_below"]) for r in res["rows"])
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
            label=f"{res['kind']} λ model (labels: --knn-skip-below)")
    for x, y, tau in pts:
        ax.annotate(f"{tau:g}", (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    bf = res["best_fixed"]
    ax.axhline(bf["ppl"], color="gray", ls="--",
               label=f"fixed λ {bf['lambda']:g}: {bf['ppl']:.2f}")
    ax.set_xlim(0, 1.02)
    return _save(fig, ax, "fraction of tokens searched", f"{label} adaptive λ: perplexity vs "
                 "searches", out_dir / "ppl_vs_searches_lambda_model.png")


def lambda_main(args: argparse.Namespace) -> int:
    try:
        res = run_lambda_model(args)
    except (KNNLMError, OSError) as e:
        print(f"knnlm-sweep: error: {e}", file=sys.stderr)
        return 2
    bf, base = res["best_fixed"], res["base"]
    ptrs = (f", --knn-pointers --knn-min-pointers {res['min_pointers']}"
            + (f" --knn-clusters ({res['clusters']} clusters)" if res["clusters"] else "")
            if res["min_pointers"] is not None else "")
    print(f"{res['n_tokens']} tokens; k={res['k']}, T={res['temperature']:g}, {res['dist']}"
          f"{ptrs}; " + (f"LM ppl {base['ppl']:.3f}; " if base else "")
          + f"best fixed lambda {bf['lambda']:g}: ppl {bf['ppl']:.3f}")
    print(f"{'skip-below':>10} {'searches':>9} {'searched':>9} {'ppl':>9} {'vs fixed':>9}")
    for r in res["rows"]:
        print(f"{r['skip_below']:>10g} {r['searches']:>9} {100 * r['search_fraction']:>8.1f}% "
              f"{r['ppl']:>9.3f} {100 * (r['ppl'] / bf['ppl'] - 1):>+8.2f}%")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))
    if args.plot_dir:
        print(f"wrote {plot_lambda_model(res, Path(args.plot_dir), args.label)}")
    return 0


def cli_main(argv: Optional[list[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(message)s")
    if args.clusters_limit and (args.clusters is None or args.pointer_thresholds is None
                                or args.clusters_limit < 0):
        print("knnlm-sweep: error: --clusters-limit (>= 1; 0: 2 x k) caps the replayed "
              "clusters' candidates: it needs --pointer-thresholds and --clusters",
              file=sys.stderr)
        return 2
    if args.lambda_model is not None:
        if not args.neighbors or args.from_json or args.pointer_thresholds is not None:
            print("knnlm-sweep: error: --lambda-model needs a neighbours prefix (not "
                  "--from-json or --pointer-thresholds)", file=sys.stderr)
            return 2
        return lambda_main(args)
    if args.pointer_thresholds is not None:
        if not args.neighbors or args.from_json:
            print("knnlm-sweep: error: --pointer-thresholds needs a neighbours prefix (not "
                  "--from-json)", file=sys.stderr)
            return 2
        return replay_main(args)
    try:
        if args.from_json:
            old = json.loads(Path(args.from_json).read_text())
            if not (isinstance(old, dict) and isinstance(old.get("rows"), list) and old["rows"]
                    and all(isinstance(r, dict) and ROW_FIELDS <= set(r) for r in old["rows"])):
                raise FlagError(f"--from-json {args.from_json}: not the --json of a sweep (no "
                                "rows)")
            rows, n_tokens = fill_k_select(old["rows"]), old["n_tokens"]
        elif args.neighbors:
            rows, n_tokens = run_sweep(args)
        else:
            raise FlagError("give a neighbours prefix or --from-json")
    except (KNNLMError, OSError, json.JSONDecodeError, KeyError) as e:
        print(f"knnlm-sweep: error: {e}", file=sys.stderr)
        return 2
    rows.sort(key=lambda r: r["ppl"])
    dists = sorted({r["dist"] for r in rows})
    sels = sorted({r["k_select"] for r in rows})
    base = best(rows, **{"lambda": 0.0, "cache_lambda": 0.0})
    summary = {"n_tokens": n_tokens, "dists": dists, "k_selects": sels, "base": base,
               "best": rows[0], "best_per_dist": {d: best(rows, dist=d) for d in dists},
               "best_per_k_select": {s: best(rows, k_select=s) for s in sels},
               "best_without_cache": best(rows, cache_lambda=0.0)}
    print(f"{n_tokens} tokens; base LM ppl {base['ppl']:.3f}" if base else f"{n_tokens} tokens")
    print(f"{'dist':>8} {'k-select':>8} {'T':>6} {'k':>5} {'lambda':>6} {'cache':>6} {'ppl':>9}")
    for r in rows[:10]:
        print(f"{r['dist']:>8} {r['k_select']:>8} {r['temperature']:>6g} {r['k']:>5} "
              f"{r['lambda']:>6g} {r['cache_lambda']:>6g} {r['ppl']:>9.3f}")
    if args.json and not args.from_json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**summary, "rows": rows}, indent=1))
    if args.plot_dir:
        for p in plot(rows, Path(args.plot_dir), args.label):
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())

"""Figures and tables of the WikiText-2 experiments from saved neighbours and sweep files.

    python examples/wikitext2/plots.py datastore-size --run-dir runs/wikitext2 \
        --fracs "0.1 0.25 0.5 1.0"
    python examples/wikitext2/plots.py lambda-domains --run-dir runs/wikitext2
    python examples/wikitext2/plots.py keytypes --run-dir runs/wikitext2 --keytypes "a b c"
    python examples/wikitext2/plots.py flat-vs-ivfpq --run-dir runs/wikitext2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fairseq_knnlm.offline.neighbours import load_neighbors  # noqa: E402
from fairseq_knnlm.offline.sweep import best, sweep  # noqa: E402

LAMBDAS = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8]
TEMPS = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0]


def _save(fig: plt.Figure, rd: Path, name: str) -> None:
    fig.tight_layout()
    out = rd / "plots" / f"{name}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def tuned(nbr_prefix: Path, temps: list[float] = TEMPS) -> tuple[dict, dict]:
    """(best row, base row) of a lambda x temperature sweep at the saved k."""
    nb = load_neighbors(nbr_prefix)
    rows = sweep(nb, LAMBDAS, [int(nb.meta["k"])], temps, dist="l2")
    return best(rows), best(rows, **{"lambda": 0.0})


def datastore_size(rd: Path, fracs: list[float]) -> None:
    meta = json.loads((rd / "dstore" / "train_meta.json").read_text())
    pts = []
    for f in fracs:
        nbr = rd / "nbrs" / ("valid" if f == 1.0 else f"valid_size_{f:g}")
        b, base = tuned(nbr)
        pts.append((int(meta["size"] * f), b["ppl"], b["lambda"], b["temperature"], base["ppl"]))
    lines = ["| datastore (train tokens) | fraction | valid ppl | tuned λ | tuned T |",
             "|---|---|---|---|---|", f"| none (base LM) | 0 | {pts[0][4]:.2f} | 0 | - |"]
    lines += [f"| {n:,} | {f:g} | {p:.2f} | {lam:g} | {t:g} |"
              for (n, p, lam, t, _), f in zip(pts, fracs)]
    text = "\n".join(lines)
    print(text)
    (rd / "datastore_size.md").write_text(text + "\n")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    xs = [p[0] for p in pts]
    a1.plot(xs, [p[1] for p in pts], marker="o", label="kNN-LM")
    a1.axhline(pts[0][4], color="gray", ls="--", label="base LM")
    a1.set_xscale("log")
    a1.set_xlabel("datastore size (tokens)")
    a1.set_ylabel("valid perplexity")
    a1.legend()
    a1.grid(alpha=0.3)
    a2.plot(xs, [p[2] for p in pts], marker="o")
    a2.set_xscale("log")
    a2.set_xlabel("datastore size (tokens)")
    a2.set_ylabel("tuned λ")
    a2.grid(alpha=0.3)
    fig.suptitle("WikiText-2: effect of datastore size (paper Fig. 2)")
    _save(fig, rd, "datastore_size")


def lambda_domains(rd: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, js in (("in domain: WikiText-2 datastore, WikiText-2 valid", "sweep_valid.json"),
                     ("domain adaptation: Shakespeare datastore, Shakespeare valid",
                      "sweep_shakespeare_valid.json")):
        rows = json.loads((rd / js).read_text())["rows"]
        top = best(rows, dist="l2", cache_lambda=0.0)
        base = best(rows, **{"lambda": 0.0, "cache_lambda": 0.0})
        pts = sorted((r["lambda"], r["ppl"] / base["ppl"]) for r in rows
                     if r["dist"] == "l2" and r["k"] == top["k"] and r["cache_lambda"] == 0.0
                     and r["temperature"] == top["temperature"])
        ax.plot(*zip(*pts), marker="o", label=f"{name} (best λ={top['lambda']:g})")
    ax.set_xlabel("λ")
    ax.set_ylabel("perplexity / base LM perplexity")
    ax.set_title("Optimal λ in and out of domain (paper Fig. 5)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, rd, "lambda_domains")


def keytypes(rd: Path, names: list[str]) -> None:
    lines = ["| key type | valid-slice ppl, λ and T tuned | λ | T | ppl, λ tuned at T = 1 "
             "(paper) | λ |", "|---|---|---|---|---|---|"]
    base = None
    pts = []
    for kt in names:
        nbr = rd / "nbrs" / f"valid_keytype_{kt}"
        # states before a LayerNorm have larger norms, hence larger squared distances: their
        # best temperature lies beyond the grid used elsewhere
        b, base = tuned(nbr, TEMPS + [100.0, 200.0, 500.0])
        b1, _ = tuned(nbr, [1.0])
        pts.append((kt, b["ppl"], b1["ppl"]))
        lines.append(f"| {kt} | {b['ppl']:.2f} | {b['lambda']:g} | {b['temperature']:g} | "
                     f"{b1['ppl']:.2f} | {b1['lambda']:g} |")
    if base is not None:
        lines.insert(2, f"| none (base LM) | {base['ppl']:.2f} | 0 | - | {base['ppl']:.2f} | 0 |")
    text = "\n".join(lines)
    print(text)
    (rd / "keytypes.md").write_text(text + "\n")
    if base is None:
        return
    fig, ax = plt.subplots(figsize=(7, 3.8))
    y = np.arange(len(pts))[::-1]
    ax.barh(y + 0.2, [p[1] for p in pts], height=0.4, label="λ and T tuned")
    ax.barh(y - 0.2, [p[2] for p in pts], height=0.4, label="λ tuned, T = 1 (paper)")
    ax.set_yticks(y, [p[0] for p in pts])
    ax.axvline(base["ppl"], color="gray", ls="--", label=f"base LM {base['ppl']:.1f}")
    ax.set_xlim(min(min(p[1:]) for p in pts) * 0.98, base["ppl"] * 1.01)
    ax.set_xlabel("valid-slice perplexity")
    ax.set_title("Which state to use as the key (paper Table 5)")
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, rd, "keytypes")


def flat_vs_ivfpq(rd: Path) -> None:
    """Step 11: flat (exact) search vs IVFPQ on the same datastore and queries, with recall."""
    flat = load_neighbors(rd / "nbrs" / "valid_flat")
    ivf = load_neighbors(rd / "nbrs" / "valid_keytype_ffn_input_after_ln")
    assert flat.n == ivf.n, (flat.n, ivf.n)
    k = int(flat.meta["k"])
    # recall@k of IVFPQ against exact search, in blocks (rows are k ids each)
    hits = 0
    for s in range(0, flat.n, 4096):
        f, i = flat.arrays["ids"][s:s + 4096], ivf.arrays["ids"][s:s + 4096]
        i = np.where(i < 0, -1 - np.arange(k), i)  # missing (-1) results must not pair up
        both = np.concatenate([np.sort(f, 1), np.sort(i, 1)], 1)
        both.sort(1)
        hits += int((both[:, 1:] == both[:, :-1]).sum())  # ids are unique within a row
    recall = hits / (flat.n * k)
    lines = ["| search | distances | valid-slice ppl (tuned λ, T) | λ | T |",
             "|---|---|---|---|---|"]
    base = None
    for name, nb in (("flat (exact)", flat), ("IVFPQ, probe 32", ivf)):
        for dist, label in (("l2", "exact L2 from stored keys"), ("faiss_l2", "FAISS's own")):
            rows = sweep(nb, LAMBDAS, [k], TEMPS, dist=dist)
            b, base = best(rows), best(rows, **{"lambda": 0.0})
            lines.append(f"| {name} | {label} | {b['ppl']:.2f} | {b['lambda']:g} | "
                         f"{b['temperature']:g} |")
    lines.insert(2, f"| none (base LM) | | {base['ppl']:.2f} | 0 | - |")
    lines.append(f"\nrecall@{k} of IVFPQ (probe 32) against flat search: {recall:.3f}")
    text = "\n".join(lines)
    print(text)
    (rd / "flat_vs_ivfpq.md").write_text(text + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what",
                   choices=["datastore-size", "lambda-domains", "keytypes", "flat-vs-ivfpq"])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--fracs", default="0.1 0.25 0.5 1.0")
    p.add_argument("--keytypes", default="")
    a = p.parse_args()
    rd = Path(a.run_dir)
    if a.what == "datastore-size":
        datastore_size(rd, [float(x) for x in a.fracs.split()])
    elif a.what == "lambda-domains":
        lambda_domains(rd)
    elif a.what == "keytypes":
        keytypes(rd, a.keytypes.split())
    else:
        flat_vs_ivfpq(rd)


if __name__ == "__main__":
    main()

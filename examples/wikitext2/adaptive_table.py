"""The adaptive-lambda table and plot of 13_adaptive_lambda.sh from its JSON files.

For each setup (wikitext2, shakespeare) and lambda model (buckets; mlp; mix: an mlp sharing
its lambda out among several kNN temperatures, knnlm-fit-lambda --temps; mixptrN: that mix
fitted for --knn-pointers --knn-min-pointers N, knnlm-fit-lambda --min-pointers N; mixclN: the
same with --knn-clusters), from
``knnlm-sweep --lambda-model ... --json``: test perplexity of the LM, of the fixed lambda tuned
on valid, of the model at --knn-skip-below 0 (every token searched, or with pointers those
without enough live pointers) and the fewest searches (largest --knn-skip-below) whose
perplexity is no worse than the fixed lambda's.
Run: python examples/wikitext2/adaptive_table.py runs/wikitext2/adaptive_lambda
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SETUPS = {"wikitext2": "WikiText-2 test", "shakespeare": "tiny-shakespeare test"}
KINDS = ("buckets", "mlp", "mix")


POINTER_KINDS = {"mixptr": "mix + pointers", "mixcl": "mix + pointers + clusters"}


def kinds(out: Path, name: str) -> list[str]:
    """The setup's models: KINDS, then the pointer ones (mixptrN, mixclN) by N."""
    found = []
    for pre in POINTER_KINDS:
        found += sorted((f.name[len(name) + 1:-len("_test.json")]
                         for f in out.glob(f"{name}_{pre}[0-9]*_test.json")),
                        key=lambda k, pre=pre: int(k[len(pre):]))
    return [k for k in KINDS if (out / f"{name}_{k}_test.json").exists()] + found


def label(kind: str) -> str:
    for pre, text in POINTER_KINDS.items():
        if kind.startswith(pre) and kind[len(pre):].isdigit():
            return f"{text} (--knn-min-pointers {kind[len(pre):]})"
    return kind


def rows_of(out: Path) -> list[str]:
    lines = ["| test split | model | k, T | LM ppl | fixed λ (valid-tuned) | λ model at τ 0 "
             "(searched) | vs fixed | fewest searches at ≤ fixed ppl (τ) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, setup in SETUPS.items():
        for kind in kinds(out, name):
            r = json.loads((out / f"{name}_{kind}_test.json").read_text())
            fixed, base = r["best_fixed"], r["base"]
            allr = next(x for x in r["rows"] if x["skip_below"] == 0)
            ok = [x for x in r["rows"] if x["ppl"] <= fixed["ppl"]]
            few = min(ok, key=lambda x: x["searches"]) if ok else None
            fewest = (f"{100 * few['search_fraction']:.1f}% ({few['ppl']:.2f}, τ "
                      f"{few['skip_below']:g})" if few else "none")
            lines.append(
                f"| {setup} | {label(kind)} | {r['k']}, {r['temperature']:g} | "
                f"{base['ppl']:.2f} | {fixed['ppl']:.2f} (λ {fixed['lambda']:g}) | "
                f"{allr['ppl']:.2f} ({100 * allr['search_fraction']:.1f}%) | "
                f"{100 * (allr['ppl'] / fixed['ppl'] - 1):+.2f}% | {fewest} |")
    return lines


def plot(out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in SETUPS if kinds(out, n)]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        fixed = None
        for kind in kinds(out, name):
            r = json.loads((out / f"{name}_{kind}_test.json").read_text())
            fixed = r["best_fixed"]
            pts = sorted((x["search_fraction"], x["ppl"]) for x in r["rows"])
            ax.plot(*zip(*pts), marker="o", label=f"{label(kind)} λ model")
        if fixed is not None:
            ax.axhline(fixed["ppl"], color="gray", ls="--",
                       label=f"fixed λ {fixed['lambda']:g} (valid-tuned)")
        ax.set_xlabel("fraction of tokens searched (--knn-skip-below; pointers)")
        ax.set_ylabel("test perplexity")
        ax.set_title(f"{SETUPS[name]}: adaptive λ")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "adaptive_lambda.png"
    fig.savefig(path, dpi=120)
    return path


def main() -> None:
    out = Path(sys.argv[1])
    lines = rows_of(out)
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out / 'table.md'} and {plot(out)}")


if __name__ == "__main__":
    main()

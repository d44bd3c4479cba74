"""Table 1 analogue for WikiText-2: base, +kNN-LM (exact L2 and FAISS distances), +cache,
+kNN-LM+cache, on valid and test, every weight chosen on validation only.

Scores come from the neighbour files of one kNN-LM pass per split (knnlm-sweep's maths,
which the tests check equals the online eval-lm numbers).
Run: python examples/wikitext2/table.py --valid-sweep S.json --valid NBR_VALID --test NBR_TEST
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fairseq_knnlm.offline.neighbours import load_neighbors
from fairseq_knnlm.offline.sweep import best, sweep


def format_row(name: str, s: dict, ppl: dict, base_test: float | None) -> str:
    """One table row; k and T are blank where no kNN is used (lambda 0: the base LM, the
    cache alone), since the sweep's row carries placeholders there."""
    knn = s["lambda"] > 0
    k = f"{s['k']}" if knn else ""
    temp = f"{s['temperature']:g}" if knn else ""
    gain = "" if base_test is None else f" ({100 * (1 - ppl['test'] / base_test):.1f}% lower)"
    return (f"| {name} | {s['lambda']:g} | {k} | {temp} | {s['cache_lambda']:g} | "
            f"{ppl['valid']:.2f} | {ppl['test']:.2f}{gain} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--valid-sweep", required=True)
    p.add_argument("--valid", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    rows = json.loads(Path(a.valid_sweep).read_text())["rows"]
    settings = {
        "Base LM": best(rows, **{"lambda": 0.0, "cache_lambda": 0.0}),
        "+kNN-LM (exact L2)": best(rows, dist="l2", cache_lambda=0.0),
        "+kNN-LM (FAISS distances)": best(rows, dist="faiss_l2", cache_lambda=0.0),
        "+Continuous cache": best(rows, **{"lambda": 0.0}),
        "+kNN-LM +cache (exact L2)": best(rows, dist="l2"),
    }
    nbs = {"valid": load_neighbors(a.valid), "test": load_neighbors(a.test)}
    lines = ["| Model | λ | k | T | cache λ | valid ppl | test ppl |",
             "|---|---|---|---|---|---|---|"]
    base_test = None
    for name, s in settings.items():
        assert s is not None, name
        ppl = {}
        for split, nb in nbs.items():
            r = sweep(nb, [s["lambda"]], [s["k"]], [s["temperature"]], dist=s["dist"],
                      cache_lambdas=[s["cache_lambda"]])
            ppl[split] = r[0]["ppl"]
        if base_test is None:
            base_test = ppl["test"]
        lines.append(format_row(name, s, ppl, None if name == "Base LM" else base_test))
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()

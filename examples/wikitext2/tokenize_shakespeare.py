"""Tokenize tiny-shakespeare like WikiText (words and punctuation split apart) and split it into
train / valid / test by speech (90% / 5% / 5%, in order), for the domain-adaptation runs.

Run: python examples/wikitext2/tokenize_shakespeare.py \
    ../shared/data/tinyshakespeare/input.txt OUT_DIR
Writes OUT_DIR/{train,valid,test}.txt, one speech per line.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

TOKEN = re.compile(r"[A-Za-z]+(?:'[a-z]+)?|\d+|[^\sA-Za-z\d]")


def tokenize(line: str) -> str:
    out = []
    for t in TOKEN.findall(line):
        # WikiText splits clitics: "don't" -> "do n't", "king's" -> "king 's"
        if "'" in t and not t.startswith("'"):
            head, tail = t.split("'", 1)
            if tail == "t" and head.lower().endswith("n"):
                out += [head[:-1], "n't"] if len(head) > 1 else [t]
            else:
                out += [head, "'" + tail]
        else:
            out.append(t)
    return " ".join(x for x in out if x)


def main() -> None:
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    speeches = [s for s in src.read_text().split("\n\n") if s.strip()]
    lines = [tokenize(" ".join(s.split("\n"))) for s in speeches]
    n = len(lines)
    a, b = int(0.9 * n), int(0.95 * n)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", lines[:a]), ("valid", lines[a:b]), ("test", lines[b:])):
        (out / f"{name}.txt").write_text("\n".join(part) + "\n")
        print(f"{name}: {len(part)} speeches, {sum(len(x.split()) for x in part)} tokens")


if __name__ == "__main__":
    main()

"""knnlm-explain's aggregate view (the paper's Section 6 question) over many tokens: which
targets gain from retrieval, by their frequency in the training data and by the longest
n-gram ending at them that occurs in train; ``format_aggregate`` (tables) and
``plot_aggregate`` (PNG) show it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from fairseq_knnlm.explain.document import TokenTable, perplexity, words

FREQ_EDGES = (1, 10, 100, 1_000, 10_000)  # train-count buckets: 0, 1-9, ..., >= 10K


def freq_labels(edges: Sequence[int] = FREQ_EDGES) -> list[str]:
    """'0', '1-9', '10-99', ..., '>= 10,000' for the default edges."""
    labels = ["0"] + [f"{lo:,}-{hi - 1:,}" for lo, hi in zip(edges[:-1], edges[1:])]
    return labels + [f">= {edges[-1]:,}"]


def freq_bucket(counts: np.ndarray, edges: Sequence[int] = FREQ_EDGES) -> np.ndarray:
    """Bucket index of each train count: 0 for unseen, then one per decade."""
    return np.searchsorted(np.asarray(edges), counts, side="right")


_MIX = np.uint64(0x9E3779B97F4A7C15)


def _suffix_hashes(stream: np.ndarray, n: int) -> np.ndarray:
    """64-bit hash of the n-gram ending at each position >= n - 1 of ``stream``."""
    s = np.asarray(stream).astype(np.uint64) + np.uint64(1)
    m = len(s) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):  # tokens n-1-j positions before the end
            h = h * _MIX + s[j:j + m]
            h ^= h >> np.uint64(29)
    return h


def longest_train_ngram(stream: np.ndarray, positions: np.ndarray, train: np.ndarray,
                        max_n: int = 8, chunk: int = 1 << 22) -> np.ndarray:
    """For each position p of ``stream``: the largest n <= max_n such that the n tokens
    stream[p-n+1 .. p] (the target and the n-1 before it) occur in ``train`` (0: the target
    never occurs). n-grams are compared by 64-bit hashes; train is read in chunks."""
    positions = np.asarray(positions, dtype=np.int64)
    train = np.asarray(train)
    stream = np.asarray(stream)
    counts = np.bincount(train.astype(np.int64), minlength=int(stream.max(initial=0)) + 1)
    best = (counts[stream[positions].astype(np.int64)] > 0).astype(np.int64)
    alive = np.nonzero(best == 1)[0]
    for n in range(2, max_n + 1):
        alive = alive[positions[alive] >= n - 1]
        if not len(alive):
            break
        q = _suffix_hashes(stream, n)[positions[alive] - (n - 1)]
        found = np.zeros(len(q), dtype=bool)
        for s in range(0, max(1, len(train) - n + 1), chunk):
            found |= np.isin(q, _suffix_hashes(train[s:s + chunk + n - 1], n))
        alive = alive[found]
        best[alive] = n
    return best


def ngram_labels(max_n: int) -> list[str]:
    """'0 (token unseen)', '1 (token only)', '2', '3', '4', '5-7', '>= 8' for max_n 8."""
    if max_n < 2:
        raise ValueError(f"max_n must be >= 2, got {max_n}")
    labels = ["0 (token unseen)", "1 (token only)"] + [str(n) for n in range(2, min(5, max_n))]
    if max_n > 5:
        labels.append("5" if max_n == 6 else f"5-{max_n - 1}")
    return labels + [f">= {max_n}"]


def ngram_bucket(longest: np.ndarray, max_n: int) -> np.ndarray:
    """Index into ngram_labels(max_n) of each longest n-gram length."""
    b = np.minimum(longest, 5 if max_n > 5 else max_n)
    return np.where(longest >= max_n, len(ngram_labels(max_n)) - 1, b)


def bucket_rows(labels: Sequence[str], bucket: np.ndarray, lm: np.ndarray,
                final: np.ndarray) -> list[dict[str, Any]]:
    """Per bucket: tokens, share, LM and kNN-LM perplexity, mean gain (nats), share of
    tokens helped, share of the total gain."""
    gain = final - lm
    total = float(gain.sum())
    out = []
    for b, label in enumerate(labels):
        m = bucket == b
        n = int(m.sum())
        out.append({"bucket": label, "tokens": n, "share": n / max(1, len(lm)),
                    "lm_ppl": perplexity(lm[m]) if n else None,
                    "knnlm_ppl": perplexity(final[m]) if n else None,
                    "mean_gain": float(gain[m].mean()) if n else None,
                    "helped": float((gain[m] > 0).mean()) if n else None,
                    "gain_share": float(gain[m].sum()) / total if n and total else None})
    return out


@dataclass
class Aggregate:
    n_tokens: int
    lm_ppl: float
    knnlm_ppl: float
    by_frequency: list[dict[str, Any]]
    by_ngram: list[dict[str, Any]]
    top_types: list[dict[str, Any]]
    max_n: int
    train_tokens: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def aggregate(table: TokenTable, stream: np.ndarray, train: np.ndarray,
              symbols: Sequence[str], max_n: int = 8, top_types: int = 10) -> Aggregate:
    """Which targets gain from retrieval: by their count in the datastore's split, by the
    longest n-gram ending at them that occurs there, and the types with the largest total
    gain. ``stream`` is the scored subset's token stream (table.positions index it)."""
    counts = np.bincount(np.asarray(train).astype(np.int64),
                         minlength=max(len(symbols), int(table.targets.max()) + 1))
    tc = counts[table.targets]
    by_freq = bucket_rows(freq_labels(), freq_bucket(tc), table.lm_logp, table.logp)
    longest = longest_train_ngram(stream, table.positions, train, max_n=max_n)
    by_ngram = bucket_rows(ngram_labels(max_n), ngram_bucket(longest, max_n), table.lm_logp,
                           table.logp)
    sums = np.bincount(table.targets, weights=table.gain, minlength=len(counts))
    seen = np.bincount(table.targets, minlength=len(counts))
    tops = []
    for t in np.argsort(-sums, kind="stable")[:top_types]:
        if seen[t] == 0:
            break
        tops.append({"token": words(symbols, [t])[0], "count": int(seen[t]),
                     "train_count": int(counts[t]), "mean_gain": float(sums[t] / seen[t]),
                     "total_gain": float(sums[t])})
    return Aggregate(n_tokens=len(table), lm_ppl=perplexity(table.lm_logp),
                     knnlm_ppl=perplexity(table.logp), by_frequency=by_freq, by_ngram=by_ngram,
                     top_types=tops, max_n=max_n, train_tokens=int(len(train)))


def _cell(x: Optional[float], fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _bucket_table(rows: list[dict[str, Any]], first: str) -> list[str]:
    out = [f"| {first} | tokens | share | LM ppl | kNN-LM ppl | mean gain (nats) | "
           "helped | share of total gain |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["tokens"]:
            continue
        out.append(f"| {r['bucket']} | {r['tokens']:,} | {_cell(r['share'], '.1%')} | "
                   f"{_cell(r['lm_ppl'], ',.1f')} | {_cell(r['knnlm_ppl'], ',.1f')} | "
                   f"{_cell(r['mean_gain'], '+.3f')} | {_cell(r['helped'], '.0%')} | "
                   f"{_cell(r['gain_share'], '.1%')} |")
    return out


def format_aggregate(agg: Aggregate) -> str:
    """The aggregate view as markdown tables (readable in a terminal too)."""
    lines = [f"{agg.n_tokens:,} tokens: LM ppl {agg.lm_ppl:.2f} -> kNN-LM ppl "
             f"{agg.knnlm_ppl:.2f}; gain = ln p - ln p_LM; datastore split "
             f"{agg.train_tokens:,} tokens", ""]
    lines += _bucket_table(agg.by_frequency, "target's count in train")
    lines += [""] + _bucket_table(agg.by_ngram, "longest n-gram ending at the target "
                                                "that occurs in train")
    lines += ["", "| target type | tokens | count in train | mean gain | total gain |",
              "|---|---|---|---|---|"]
    for t in agg.top_types:
        lines.append(f"| `{t['token']}` | {t['count']:,} | {t['train_count']:,} | "
                     f"{t['mean_gain']:+.3f} | {t['total_gain']:+.1f} |")
    return "\n".join(lines + agg.notes)


def plot_aggregate(agg: Aggregate, path: Union[str, Path], label: str = "") -> Path:
    """Mean gain per bucket (frequency, n-gram), bars annotated with their token counts."""
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, rows, xlabel in ((axes[0], agg.by_frequency, "target's count in train"),
                             (axes[1], agg.by_ngram, "longest n-gram in train ending at target")):
        rows = [r for r in rows if r["tokens"]]
        names = [r["bucket"] for r in rows]
        vals = [r["mean_gain"] or 0.0 for r in rows]
        bars = ax.bar(range(len(rows)), vals,
                      color=["#2a9d2a" if v >= 0 else "#d9382f" for v in vals])
        for b, r in zip(bars, rows):
            up = b.get_height() >= 0
            ax.annotate(f"{r['tokens']:,}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom" if up else "top", fontsize=7)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean ln p − ln p_LM (nats)")
        ax.axhline(0, color="gray", lw=0.8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{label} which tokens gain from retrieval (bar labels: tokens)".strip(),
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

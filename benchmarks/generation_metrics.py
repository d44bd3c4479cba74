"""Open-ended generation metrics as plain functions of token-id sequences (no fairseq), for
benchmarks/generation.py (issue #26):

- ``rep_n``: the share of a sequence's n-grams that repeat an earlier n-gram of the same
  sequence (Welleck et al. 2020's seq-rep-n: 1 - unique / total);
- ``distinct_n``: unique n-grams / all n-grams, pooled over all sequences (Li et al. 2016);
- ``token_f1``: bag-of-tokens F1 of a generated sequence against the true continuation
  (SQuAD-style: the multiset overlap);
- ``NgramSet`` / ``share_in_corpus``: the share of generated n-grams that occur in a corpus
  (the datastore's training stream), n-grams packed into int64 keys and looked up with a
  sorted array;
- ``perplexity``: exp of the mean NLL of log-probabilities (nats).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Optional, Sequence

import numpy as np


def ngrams(seq: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(int(x) for x in seq[i:i + n]) for i in range(len(seq) - n + 1)]


def rep_n(seq: Sequence[int], n: int = 4) -> float:
    """1 - unique / total n-grams of one sequence (0 with fewer than n tokens)."""
    g = ngrams(seq, n)
    return 1.0 - len(set(g)) / len(g) if g else 0.0


def distinct_n(seqs: Iterable[Sequence[int]], n: int) -> float:
    """Unique / total n-grams over all sequences together (0 when there are none)."""
    total, uniq = 0, set()
    for s in seqs:
        g = ngrams(s, n)
        total += len(g)
        uniq.update(g)
    return len(uniq) / total if total else 0.0


def token_f1(pred: Sequence[int], ref: Sequence[int]) -> float:
    """Bag-of-tokens F1 of ``pred`` against ``ref`` (0 when either is empty)."""
    common = sum((Counter(int(x) for x in pred) & Counter(int(x) for x in ref)).values())
    if len(pred) == 0 or len(ref) == 0 or common == 0:
        return 0.0
    p, r = common / len(pred), common / len(ref)
    return 2 * p * r / (p + r)


def _pack(windows: np.ndarray, bits: int) -> np.ndarray:
    out = np.zeros(len(windows), dtype=np.int64)
    for j in range(windows.shape[1]):
        out = (out << bits) | windows[:, j].astype(np.int64)
    return out


class NgramSet:
    """The distinct n-grams of a token stream, for membership tests."""

    def __init__(self, stream: np.ndarray, n: int = 4, vocab_size: Optional[int] = None) -> None:
        s = np.asarray(stream, dtype=np.int64)
        vocab = int(vocab_size if vocab_size is not None else (s.max() + 1 if len(s) else 1))
        self.n, self.bits = n, max(1, math.ceil(math.log2(max(2, vocab))))
        if self.bits * n > 63:
            raise ValueError(f"{n}-grams over {vocab} types do not fit in 63 bits")
        if len(s) < n:
            self.keys = np.zeros(0, dtype=np.int64)
            return
        win = np.lib.stride_tricks.sliding_window_view(s, n)
        self.keys = np.unique(_pack(win, self.bits))

    def contains(self, seq: Sequence[int]) -> np.ndarray:
        """(m,) bool: whether each of the sequence's m n-grams is in the set."""
        s = np.asarray(seq, dtype=np.int64)
        if len(s) < self.n:
            return np.zeros(0, dtype=bool)
        k = _pack(np.lib.stride_tricks.sliding_window_view(s, self.n), self.bits)
        i = np.searchsorted(self.keys, k)
        return (i < len(self.keys)) & (self.keys[np.minimum(i, len(self.keys) - 1)] == k)


def share_in_corpus(seqs: Iterable[Sequence[int]], corpus: NgramSet) -> float:
    """The share of all the sequences' n-grams (pooled) found in the corpus."""
    hits = [corpus.contains(s) for s in seqs]
    total = sum(len(h) for h in hits)
    return float(sum(int(h.sum()) for h in hits)) / total if total else 0.0


def perplexity(logp: Sequence[float]) -> float:
    """exp(-mean log p) of log-probabilities in nats."""
    lp = np.asarray(logp, dtype=np.float64)
    if not len(lp):
        raise ValueError("perplexity of no token")
    return float(np.exp(-lp.mean()))

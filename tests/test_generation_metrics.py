"""The open-ended generation metrics of benchmarks/generation_metrics.py (issue #26) against
hand-counted values.

Run: python -m pytest -q tests/test_generation_metrics.py
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location(
        "generation_metrics", ROOT / "benchmarks/generation_metrics.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gm = _load()


def test_rep_and_distinct():
    s = [1, 2, 3, 4, 1, 2, 3, 4, 1]  # 4-grams: 6, unique 4
    assert gm.rep_n(s, 4) == pytest.approx(1 - 4 / 6)
    assert gm.rep_n([1, 2, 3], 4) == 0.0
    assert gm.distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)
    assert gm.distinct_n([], 2) == 0.0


def test_token_f1():
    assert gm.token_f1([1, 1, 2], [1, 2, 2]) == pytest.approx(2 / 3)
    assert gm.token_f1([5], [6]) == 0.0
    assert gm.token_f1(np.array([3, 4]), np.array([3, 4])) == 1.0


def test_ngrams_in_corpus():
    corpus = gm.NgramSet(np.array([1, 2, 3, 4, 5, 1, 2, 3, 9]), 4, vocab_size=20000)
    assert corpus.contains([1, 2, 3, 4, 5, 7]).tolist() == [True, True, False]
    assert gm.share_in_corpus([[1, 2, 3, 4, 5, 7], [5, 1, 2, 3]], corpus) == pytest.approx(3 / 4)
    assert corpus.contains([1, 2]).size == 0


def test_perplexity():
    assert gm.perplexity([math.log(0.5)] * 3) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        gm.perplexity([])

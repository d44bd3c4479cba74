"""No non-finite perplexity printed as a result (finite.py and its use in the runtime): the
reason line of a non-finite token, and eval-lm runs on crafted settings and a crafted
datastore that stop with one line naming the token and why.

Run: python -m pytest -q tests/scoring/test_finite.py
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from conftest import BIN, eval_args, eval_lm_inprocess

from fairseq_knnlm.scoring.finite import NonFiniteScore, nonfinite_reason, nonfinite_rows
from fairseq_knnlm.scoring.knn import KNN_LOGP_FLOOR


def test_nonfinite_rows_counts_the_floor_as_log_zero():
    lp = torch.tensor([-1.0, float("nan"), KNN_LOGP_FLOOR, -3.0, float("-inf"), -4999.0,
                       float("inf")])
    assert nonfinite_rows(lp).tolist() == [1, 2, 4, 6]


@pytest.mark.parametrize("args, words", [
    ((float("-inf"), -2.0, 0.3), "p_LM(target) is 0"),
    ((-2.0, float("nan"), 0.3), "NaN or inf keys"),
    ((-2.0, -1.0, float("nan")), "lambda is nan"),
    ((-2.0, KNN_LOGP_FLOOR, 1.0), "lambda = 1 (--lmbda) gives p_LM no weight"),
    ((-2.0, -1.0, 0.3, KNN_LOGP_FLOOR, 1.0), "--cache-lmbda 1 gives the rest no weight"),
    ((-2.0, -1.0, 0.3, float("nan"), 0.2), "p_cache(target) is nan"),
])
def test_nonfinite_reason_names_the_cause(args, words):
    assert words in nonfinite_reason(*args)


def _knn(dstore, *extra: str) -> list[str]:
    return ["--knnlm", "--dstore-filename", str(dstore), "--indexfile", f"{dstore}.flat",
            "--k", "8", "--knn-temp", "2", *extra]


def test_lambda_one_stops_at_the_first_token_without_its_target(tiny, dstore):
    """--lmbda 1 gives p_LM no weight: a target missing from its 8 neighbours has p = 0;
    eval-lm used to print Perplexity: inf, now it stops with the token and the reason."""
    with pytest.raises(NonFiniteScore, match=r"token \d+ of the test subset \(target '.*'\) "
                       r"scores log p = -10000: p_kNN\(target\) = 0 .* lambda = 1 "
                       r"\(--lmbda 1\) gives p_LM no weight"):
        eval_lm_inprocess(eval_args(tiny, "test", *_knn(dstore, "--lmbda", "1")))
    # below 1 the same run is finite
    res = eval_lm_inprocess(eval_args(tiny, "test", *_knn(dstore, "--lmbda", "0.999")))
    assert math.isfinite(res["perplexity"])


def test_cache_lambda_one_stops_with_the_cache_named(tiny):
    with pytest.raises(NonFiniteScore, match=r"token 0 of the test subset .*p_cache\(target\)"
                       r" = 0 .*--cache-lmbda 1"):
        eval_lm_inprocess(eval_args(tiny, "test", "--knn-cache", "--cache-lmbda", "1"))


def test_nan_keys_stop_the_run_with_the_datastore_named(tiny, dstore, tmp_path):
    """A crafted datastore (the flat index built on clean keys, then NaN written into the
    stored keys that exact L2 reads) gives p_kNN = nan: one line, not Perplexity: nan."""
    d = tmp_path / "nan"
    d.mkdir()
    for f in dstore.parent.iterdir():
        if f.name.startswith(dstore.name):
            shutil.copy(f, d / f.name)
    prefix = d / dstore.name
    from fairseq_knnlm.store.datastore import read_meta

    meta = read_meta(prefix)  # raw (headerless) keys, as the authors' layout
    keys = np.memmap(f"{prefix}_keys.npy", dtype=meta.key_dtype, mode="r+",
                     shape=(meta.size, meta.dim))
    keys[::3] = np.nan
    keys.flush()
    del keys
    with pytest.raises(NonFiniteScore, match=r"p_kNN\(target\) is nan: .*NaN or inf keys"):
        eval_lm_inprocess(eval_args(tiny, "test", *_knn(prefix, "--lmbda", "0.3")))


def test_console_script_prints_one_line(tiny, dstore):
    import subprocess

    p = subprocess.run([str(BIN / "fairseq-eval-lm"),
                        *eval_args(tiny, "test", *_knn(dstore, "--lmbda", "1"))],
                       capture_output=True, text=True)
    assert p.returncode != 0
    assert "Perplexity" not in p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    errs = [ln for ln in p.stderr.splitlines() if "error:" in ln]
    assert len(errs) == 1 and "gives p_LM no weight" in errs[0], p.stderr[-2000:]

"""End-to-end through fairseq-eval-lm: the plugin leaves stock results alone, dumps an exactly
aligned datastore, and scores kNN-LM / cache perplexities that match independent numpy maths."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import BIN, TPS, eval_args, eval_lm_inprocess, parse_ppl, run

from fairseq_knnlm.flags import KEY_TYPES
from fairseq_knnlm.plugin.hooks import KeyCapture
from fairseq_knnlm.store.datastore import DatastoreError, open_datastore


def _stream(tiny: dict, subset: str) -> np.ndarray:
    from fairseq.data import data_utils
    from fairseq.data.dictionary import Dictionary

    d = Dictionary.load(str(tiny["data"] / "dict.txt"))
    ds = data_utils.load_indexed_dataset(str(tiny["data"] / subset), d)
    return np.concatenate([ds[i].numpy() for i in range(len(ds))])


def _load_model(tiny: dict):
    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(tiny["ckpt"])])
    m = models[0].eval()
    return m, task


def test_plugin_does_not_change_stock_perplexity(tiny):
    """The real console script, with and without --user-dir: identical output."""
    stock = run([str(BIN / "fairseq-eval-lm"), *eval_args(tiny, user_dir=False)])
    plugin = run([str(BIN / "fairseq-eval-lm"), *eval_args(tiny)])
    assert parse_ppl(stock) == parse_ppl(plugin)
    assert "Loss (base 2)" in plugin


def test_dump_count_alignment_and_positions(tiny, dstore):
    ds = open_datastore(dstore)
    stream = _stream(tiny, "train")
    # every token of the split is a target exactly once
    assert ds.size == len(stream)
    assert sorted(ds.pos.tolist()) == list(range(len(stream)))
    # the value of row i is the token at its position: the token being predicted
    assert np.array_equal(ds.vals[:, 0], stream[ds.pos])
    meta = json.loads((dstore.parent / "train_meta.json").read_text())
    assert meta["size"] == len(stream) and meta["context_window"] == 16
    assert meta["tokens_per_sample"] == TPS and meta["subset"] == "train"


def test_dump_keys_equal_plain_forward_pass(tiny, dstore):
    """Recompute keys for some rows with a plain forward pass + hook, no eval-lm machinery:
    the key of stream position p comes from a window that ends at token p-1 (input shifted)."""
    from fairseq.data.dictionary import Dictionary

    ds = open_datastore(dstore)
    stream = _stream(tiny, "train")
    eos = Dictionary.load(str(tiny["data"] / "dict.txt")).eos()
    inputs = np.concatenate([[eos], stream[:-1]])  # source = stream shifted right by one
    model, _ = _load_model(tiny)
    rng = np.random.default_rng(0)
    rows = rng.choice(ds.size, size=25, replace=False)
    block = TPS - 16  # scored tokens per block; each block sees up to 16 tokens of context
    with KeyCapture(model, "ffn_input_after_ln") as cap:
        for r in rows:
            p = int(ds.pos[r])
            b0 = (p // block) * block  # first scored token of p's block
            ctx0 = max(0, b0 - 16)
            x = torch.from_numpy(inputs[ctx0:p + 1]).long().unsqueeze(0)
            with torch.no_grad():
                model(x)
            key = cap.pop()[0, -1].numpy()
            np.testing.assert_allclose(ds.keys[r], key, rtol=1e-4, atol=1e-4)


def test_dump_fp16_and_every_keytype(tiny, dstore):
    ref = open_datastore(dstore)
    for kt in KEY_TYPES:
        prefix = tiny["dir"] / "dstore_kt" / kt
        eval_lm_inprocess(eval_args(tiny, "train", "--save-knnlm-dstore", "--dstore-mmap",
                                    str(prefix), "--dstore-fp16", "--knn-keytype", kt))
        ds = open_datastore(prefix)
        assert ds.size == ref.size and ds.keys.dtype == np.float16
        assert ds.meta.keytype == kt
        assert np.array_equal(ds.vals, ref.vals)
        if kt == "ffn_input_after_ln":  # same key, rounded to fp16
            np.testing.assert_allclose(ds.keys.astype(np.float32), ref.keys, rtol=2e-3,
                                       atol=2e-3)
        else:
            assert not np.allclose(ds.keys.astype(np.float32)[:50], ref.keys[:50])


def test_unknown_keytype_lists_valid_ones(tiny):
    with pytest.raises(ValueError, match="valid key types: .*ffn_input_after_ln"):
        eval_lm_inprocess(eval_args(tiny, "train", "--save-knnlm-dstore", "--dstore-mmap",
                                    str(tiny["dir"] / "bad"), "--knn-keytype", "ffn_inpt"))


def _knn_args(dstore, *extra):
    return ("--knnlm", "--dstore-filename", str(dstore), "--indexfile", f"{dstore}.flat",
            *extra)


def test_lambda_zero_reproduces_base(tiny, dstore):
    base = eval_lm_inprocess(eval_args(tiny))
    knn0 = eval_lm_inprocess(eval_args(tiny, "test", *_knn_args(dstore, "--k", "8",
                                                                 "--lmbda", "0")))
    assert knn0["loss"] == pytest.approx(base["loss"], abs=1e-6)


def test_knnlm_matches_brute_force_numpy(tiny, dstore):
    """Flat index, exact l2, k = whole datastore: perplexity equals Eq. 2-3 in numpy, where
    the test queries come from an independent dump of the test split."""
    ds = open_datastore(dstore)
    lam, temp = 0.3, 2.0
    res = eval_lm_inprocess(eval_args(tiny, "test", *_knn_args(
        dstore, "--k", str(ds.size), "--lmbda", str(lam), "--knn-temp", str(temp))))
    qprefix = tiny["dir"] / "dstore_test" / "test"
    base = eval_lm_inprocess(eval_args(tiny, "test", "--save-knnlm-dstore", "--dstore-mmap",
                                       str(qprefix)))
    q = open_datastore(qprefix)
    keys = np.asarray(ds.keys, dtype=np.float64)
    vals = ds.vals[:, 0]
    # LM log-probs of the test targets from a plain forward pass with the same windows
    model, _ = _load_model(tiny)
    lm_lp = _lm_logprobs(tiny, model, q)
    total = 0.0
    for i in range(q.size):
        d = ((keys - q.keys[i].astype(np.float64)) ** 2).sum(1)
        logits = -d / temp
        m = logits.max()
        p_knn = np.exp(logits - m)[vals == q.vals[i, 0]].sum() / np.exp(logits - m).sum()
        total += math.log(lam * p_knn + (1 - lam) * math.exp(lm_lp[i]))
    ppl_numpy = math.exp(-total / q.size)
    ppl_plugin = 2 ** res["loss"]
    assert ppl_plugin == pytest.approx(ppl_numpy, rel=1e-4)
    assert ppl_plugin < 2 ** base["loss"]  # the datastore helps on this repetitive corpus


def _lm_logprobs(tiny, model, q) -> np.ndarray:
    from fairseq.data.dictionary import Dictionary

    stream = _stream(tiny, "test")
    eos = Dictionary.load(str(tiny["data"] / "dict.txt")).eos()
    inputs = np.concatenate([[eos], stream[:-1]])
    block = TPS - 16
    out = np.zeros(q.size)
    for r in range(q.size):
        p = int(q.pos[r])
        b0 = (p // block) * block
        x = torch.from_numpy(inputs[max(0, b0 - 16):p + 1]).long().unsqueeze(0)
        with torch.no_grad():
            lp = model.get_normalized_probs(model(x), log_probs=True)[0, -1]
        out[r] = float(lp[int(q.vals[r, 0])])
    return out


def test_mismatched_datastore_is_refused(tiny, dstore):
    other = tiny["dir"] / "dstore_kt" / "other"
    eval_lm_inprocess(eval_args(tiny, "train", "--save-knnlm-dstore", "--dstore-mmap",
                                str(other), "--knn-keytype", "ffn_output"))
    from fairseq_knnlm.index.build import build_index
    from fairseq_knnlm.index.kinds import IndexSettings

    build_index(other, f"{other}.flat", IndexSettings(index_type="flat"), progress=False)
    with pytest.raises(DatastoreError, match="key type: datastore 'ffn_output'"):
        eval_lm_inprocess(eval_args(tiny, "test", "--knnlm", "--dstore-filename", str(other),
                                    "--indexfile", f"{other}.flat", "--k", "8"))
    with pytest.raises(DatastoreError, match="does not belong to datastore"):
        eval_lm_inprocess(eval_args(tiny, "test", "--knnlm", "--dstore-filename", str(dstore),
                                    "--indexfile", f"{other}.flat", "--k", "8",
                                    "--knn-keytype", "ffn_output"))


@pytest.mark.parametrize("flags,match", [
    (["--lmbda", "1.5"], "lmbda must be in"),
    (["--k", "100000000"], "larger than the datastore"),
    (["--knn-sim-func", "cosine"], "knn-sim-func must be one of"),
    (["--no-load-keys"], "no-load-keys"),
])
def test_bad_flags_fail_before_the_pass(tiny, dstore, flags, match):
    with pytest.raises((ValueError, DatastoreError), match=match):
        eval_lm_inprocess(eval_args(tiny, "test", *_knn_args(dstore, *flags)))


def test_missing_files_give_clear_errors(tiny, dstore):
    with pytest.raises(DatastoreError, match="no datastore"):
        eval_lm_inprocess(eval_args(tiny, "test", "--knnlm", "--dstore-filename",
                                    str(tiny["dir"] / "nope"), "--indexfile", "x.index"))
    with pytest.raises(DatastoreError, match="not found"):
        eval_lm_inprocess(eval_args(tiny, "test", "--knnlm", "--dstore-filename", str(dstore),
                                    "--indexfile", str(tiny["dir"] / "nope.index")))


def test_dot_fp16_faiss_and_softmax_batch_run(tiny, dstore):
    r1 = eval_lm_inprocess(eval_args(tiny, "test", *_knn_args(dstore, "--k", "16")))
    r2 = eval_lm_inprocess(eval_args(tiny, "test", "--softmax-batch", "7",
                                     *_knn_args(dstore, "--k", "16")))
    assert r1["loss"] == pytest.approx(r2["loss"], abs=1e-5)
    r3 = eval_lm_inprocess(eval_args(tiny, "test", *_knn_args(dstore, "--k", "16",
                                                               "--knn-sim-func", "faiss_l2")))
    assert r3["loss"] == pytest.approx(r1["loss"], abs=1e-3)  # flat index: same distances
    r4 = eval_lm_inprocess(eval_args(tiny, "test", *_knn_args(dstore, "--k", "16",
                                                               "--knn-sim-func", "dot")))
    assert math.isfinite(r4["loss"]) and r4["loss"] != r1["loss"]


def test_cache_alone_and_with_knn(tiny, dstore):
    base = eval_lm_inprocess(eval_args(tiny))
    cache = eval_lm_inprocess(eval_args(tiny, "test", "--knn-cache", "--cache-lmbda", "0.2",
                                        "--cache-theta", "0.1", "--cache-length", "16"))
    both = eval_lm_inprocess(eval_args(tiny, "test", "--knn-cache", "--cache-lmbda", "0.2",
                                       "--cache-theta", "0.1", "--cache-length", "16",
                                       *_knn_args(dstore, "--k", "16", "--lmbda", "0.3")))
    knn = eval_lm_inprocess(eval_args(tiny, "test", *_knn_args(dstore, "--k", "16",
                                                                "--lmbda", "0.3")))
    # phrases repeat within a window: the cache helps, and helps on top of kNN too
    assert cache["loss"] < base["loss"]
    assert both["loss"] < knn["loss"]


def test_saved_neighbors_reproduce_online_scores(tiny, dstore):
    from fairseq_knnlm.offline.neighbours import load_neighbors
    from fairseq_knnlm.offline.sweep import sweep

    out = tiny["dir"] / "nbrs" / "test"
    res = eval_lm_inprocess(eval_args(tiny, "test", *_knn_args(
        dstore, "--k", "32", "--lmbda", "0.25", "--knn-temp", "3", "--knn-save-neighbors",
        str(out))))
    nb = load_neighbors(out)
    rows = sweep(nb, lambdas=[0.0, 0.25], ks=[32], temperatures=[3.0])
    by = {r["lambda"]: r["ppl"] for r in rows}
    assert by[0.25] == pytest.approx(2 ** res["loss"], rel=1e-4)
    base = eval_lm_inprocess(eval_args(tiny))
    assert by[0.0] == pytest.approx(2 ** base["loss"], rel=1e-4)
    # the CLI over the same file: table, json and the two plots
    from fairseq_knnlm.cli.sweep import cli_main

    js, plots = tiny["dir"] / "sweep.json", tiny["dir"] / "plots"
    assert cli_main([str(out), "--lambdas", "0,0.25,0.5", "--temps", "1,3",
                     "--dists", "l2,faiss_l2", "--json", str(js), "--plot-dir", str(plots)]) == 0
    summary = json.loads(js.read_text())
    assert summary["best"]["ppl"] <= by[0.25] + 1e-9
    assert {r["k"] for r in summary["rows"]} == {1, 2, 4, 8, 16, 32}
    assert (plots / "ppl_vs_lambda.png").stat().st_size > 1000
    assert (plots / "ppl_vs_k.png").stat().st_size > 1000


def test_output_word_probs_reflect_interpolation(tiny, dstore, caplog):
    """--output-word-probs prints the per-word log-probs eval-lm reads: the interpolated ones."""
    import logging

    caplog.set_level(logging.INFO, logger="fairseq_cli.eval_lm")
    res = eval_lm_inprocess(eval_args(tiny, "test", "--output-word-probs",
                                      *_knn_args(dstore, "--k", "16", "--lmbda", "0.5")))
    lines = [r.getMessage() for r in caplog.records if re.match(r"\d+ ", r.getMessage())]
    words = [float(x) for line in lines for x in re.findall(r" \[(-?[0-9.]+)\]", line)]
    assert words, "no word probabilities printed"
    # eval-lm's loss is the mean of exactly these per-word log-probs (natural log, base 2)
    mean_nll_bits = -sum(words) / len(words) / math.log(2)
    assert mean_nll_bits == pytest.approx(res["loss"], abs=1e-3)

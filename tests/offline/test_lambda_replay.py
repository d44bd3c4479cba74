"""Adaptive lambda end to end (lambda_replay.py, cli/fit_lambda.py and the eval-lm wiring):
the LM features the scorer saves, knnlm-fit-lambda on saved neighbours, --knn-lambda-model
and --knn-skip-below online against the offline replay (knnlm-sweep --lambda-model), and
the refusals.

Run: python -m pytest -q tests/offline/test_lambda_replay.py
"""

from __future__ import annotations

import json
import logging
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import BIN, eval_args, eval_lm_inprocess, run, searches_logged

from fairseq_knnlm.adaptive.lambda_features import AGREEMENT_FEATURES, lm_features
from fairseq_knnlm.adaptive.lambda_file import load_model, save_model
from fairseq_knnlm.adaptive.lambda_model import ConstantHead, LambdaModel
from fairseq_knnlm.errors import FlagError

K, T = "8", "2"


def _knn(dstore, *extra: str) -> tuple[str, ...]:
    return ("--knnlm", "--dstore-filename", str(dstore), "--indexfile", f"{dstore}.flat",
            "--k", K, "--knn-temp", T, *extra)


def _searches(caplog) -> tuple[int, int]:
    return searches_logged(caplog)


@pytest.fixture(scope="module")
def saved(tiny, dstore, tmp_path_factory):
    """Neighbours of full passes over valid and test (k 8), and an MLP model fitted on valid
    (with --force: on this tiny setup a 200-step fit may be worse than the fixed lambda, and
    these tests need a model whatever its quality)."""
    from fairseq_knnlm.cli.fit_lambda import cli_main

    d = tmp_path_factory.mktemp("lam")
    for split in ("valid", "test"):
        eval_lm_inprocess(eval_args(tiny, split, *_knn(dstore, "--lmbda", "0.3"),
                                    "--knn-save-neighbors", str(d / split)))
    model = d / "mlp.npz"
    assert cli_main([str(d / "valid"), "--out", str(model), "--kind", "mlp", "--temp", T,
                     "--steps", "200", "--json", str(d / "mlp.json"), "--force"]) == 0
    mix = d / "mix.npz"  # lambda shared out among three temperatures
    assert cli_main([str(d / "valid"), "--out", str(mix), "--kind", "mlp", "--temp", T,
                     "--temps", "0.5,2,8", "--steps", "200", "--force"]) == 0
    return {"dir": d, "valid": d / "valid", "test": d / "test", "mlp": model, "mix": mix}


def _model_file(path, head, k=8, temperature=2.0, vocab=None, gate=None) -> str:
    freq = np.zeros(vocab or 1, dtype=np.float32)
    save_model(path, LambdaModel(kind="constant", head=head, gate=gate, k=k,
                                 temperature=temperature, dist="l2", freq=freq))
    return str(path)


def _vocab(tiny) -> int:
    from fairseq.data import Dictionary

    return len(Dictionary.load(str(tiny["data"] / "dict.txt")))


# ---- what the scorer saves ----

def test_saved_lm_features_are_those_of_the_lm(saved):
    from fairseq_knnlm.offline.neighbours import load_neighbors

    nb = load_neighbors(saved["valid"])
    a = {k: np.asarray(v) for k, v in nb.arrays.items()}
    assert {"lm_entropy", "lm_max_logp", "prev_tokens"} <= set(a)
    assert (a["lm_logp"] <= a["lm_max_logp"] + 1e-5).all()
    assert (a["lm_entropy"] > 0).all() and (a["lm_max_logp"] < 0).all()
    # the context's last token is the previous target within the text (one stream)
    assert (a["prev_tokens"][1:] == a["targets"][:-1]).mean() > 0.95
    # p_LM at the neighbours' values: at a neighbour holding the target, log p_LM(target)
    m = a["match"].astype(bool)
    assert m.any()
    rows = np.nonzero(m)[0]
    np.testing.assert_allclose(a["lm_logp_nbrs"][m], a["lm_logp"][rows], atol=1e-5)
    assert (a["lm_logp_nbrs"][a["ids"] >= 0] <= a["lm_max_logp"].max() + 1e-5).all()
    # and at one holding the LM's argmax, the LM's max log-prob
    vals = np.asarray(load_datastore_values(nb))
    nv = np.where(a["ids"] >= 0, vals[np.maximum(a["ids"], 0)], -1)
    at_top = nv == a["lm_argmax"][:, None]
    assert at_top.any()
    np.testing.assert_allclose(a["lm_logp_nbrs"][at_top],
                               a["lm_max_logp"][np.nonzero(at_top)[0]], atol=1e-5)


@pytest.mark.parametrize("adaptive", [False, True])
def test_scorer_features_equal_the_full_distribution(tiny, tmp_path, adaptive):
    """The scorer's features equal entropy / max of the model's full distribution; with an
    adaptive softmax, whose target-given log-probs fill only the targets' clusters, too."""
    from fairseq import checkpoint_utils

    from fairseq_knnlm.plugin.scorer import KNNSequenceScorer

    ckpt = tiny["ckpt"]
    if adaptive:
        ckpt_dir = tmp_path / "ckpt"
        run([str(BIN / "fairseq-train"), str(tiny["data"]), "--task", "language_modeling",
             "--arch", "transformer_lm", "--decoder-layers", "1", "--decoder-embed-dim", "16",
             "--decoder-ffn-embed-dim", "32", "--decoder-attention-heads", "2",
             "--decoder-input-dim", "16", "--decoder-output-dim", "16",
             "--adaptive-softmax-cutoff", "10,30", "--criterion", "adaptive_loss",
             "--ddp-backend", "legacy_ddp", "--tokens-per-sample", "32",
             "--sample-break-mode", "none", "--max-tokens", "512", "--optimizer", "adam",
             "--lr", "0.005", "--max-update", "3", "--cpu", "--num-workers", "0",
             "--save-dir", str(ckpt_dir), "--no-epoch-checkpoints", "--seed", "1"])
        ckpt = ckpt_dir / "checkpoint_last.pt"
    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(ckpt)], arg_overrides={"data": str(tiny["data"])})
    m = models[0].eval()
    assert (getattr(m.decoder, "adaptive_softmax", None) is not None) == adaptive
    d = task.target_dictionary
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, len(d), (2, 12), generator=g)
    tgt = torch.randint(4, len(d), (2, 12), generator=g)
    sample = {"net_input": {"src_tokens": src, "src_lengths": torch.tensor([12, 12])},
              "target": tgt, "start_indices": [0, 0]}
    hypos = KNNSequenceScorer(d)._score_targets_only(m, sample, True)
    with torch.no_grad():
        full = m.get_normalized_probs(m(**sample["net_input"]), log_probs=True, sample=None)
    full = full.reshape(-1, full.shape[-1])
    got = torch.cat([h[0]["lm_features"] for h in hypos])
    assert torch.allclose(got, lm_features(full), atol=1e-5)
    lp = torch.cat([h[0]["positional_scores"] for h in hypos])
    assert torch.allclose(lp, full.gather(1, tgt.reshape(-1, 1))[:, 0], atol=1e-5)
    # with features the targets' log-probs come from the one full call (an adaptive softmax
    # otherwise fills only the targets' clusters): the same numbers as without features
    plain = KNNSequenceScorer(d)._score_targets_only(m, sample, False)
    assert torch.equal(lp, torch.cat([h[0]["positional_scores"] for h in plain]))
    # log p_LM at other tokens (the agreement features): from the kept distributions, and
    # recomputed where they would not fit, both equal to the full distribution
    import fairseq_knnlm.plugin.scorer as scorer_mod

    pos = torch.tensor([0, 5, 23, 7])
    toks = torch.randint(0, len(d), (4, 6), generator=g)
    toks[1, 2] = -1  # no neighbour there: 0
    want = full[pos].gather(1, toks.clamp_min(0)).masked_fill(toks < 0, 0.0)
    assert isinstance(hypos[0][0]["lm_logp_at"].args[0], list)  # kept
    assert torch.allclose(hypos[0][0]["lm_logp_at"](pos, toks), want, atol=1e-5)
    # kept in chunks of 5 positions (--softmax-batch 5): read from the chunk of each position
    chunked = KNNSequenceScorer(d)
    chunked.softmax_batch = 5
    hc = chunked._score_targets_only(m, sample, True)
    assert len(hc[0][0]["lm_logp_at"].args[0]) == 5  # 24 positions
    assert torch.equal(hc[0][0]["lm_logp_at"](pos, toks), hypos[0][0]["lm_logp_at"](pos, toks))
    assert torch.equal(torch.cat([h[0]["lm_features"] for h in hc]), got)
    old, scorer_mod.LM_LOGP_KEEP_BYTES = scorer_mod.LM_LOGP_KEEP_BYTES, 0
    try:
        again = KNNSequenceScorer(d)._score_targets_only(m, sample, True)
    finally:
        scorer_mod.LM_LOGP_KEEP_BYTES = old
    assert again[0][0]["lm_logp_at"].func is scorer_mod.lm_logp_at  # recomputed
    assert torch.allclose(again[0][0]["lm_logp_at"](pos, toks), want, atol=1e-5)


# ---- online against fixed lambda and the replay ----

def test_constant_model_equals_the_fixed_lambda_run(tiny, dstore, tmp_path):
    model = _model_file(tmp_path / "c.npz", ConstantHead(0.3), vocab=_vocab(tiny))
    fixed = eval_lm_inprocess(eval_args(tiny, "test", *_knn(dstore, "--lmbda", "0.3")))
    lam = eval_lm_inprocess(eval_args(tiny, "test", *_knn(dstore, "--lmbda", "0.9",
                                                          "--knn-lambda-model", model)))
    assert lam["loss"] == fixed["loss"]  # bit for bit; --lmbda is ignored
    other = eval_lm_inprocess(eval_args(tiny, "test", *_knn(dstore, "--lmbda", "0.9")))
    assert other["loss"] != fixed["loss"]


def test_skip_below_zero_searches_every_token(tiny, dstore, saved, caplog):
    caplog.set_level(logging.INFO, logger="fairseq_knnlm")
    knn = _knn(dstore, "--knn-lambda-model", str(saved["mlp"]))
    plain = eval_lm_inprocess(eval_args(tiny, "test", *knn))
    s, n = _searches(caplog)
    assert s == n > 0
    zero = eval_lm_inprocess(eval_args(tiny, "test", *knn, "--knn-skip-below", "0"))
    assert _searches(caplog) == (n, n) and zero["loss"] == plain["loss"]


def load_datastore_values(nb):
    from fairseq_knnlm.offline.lambda_replay import datastore_values

    return datastore_values(nb)[0]


@pytest.mark.parametrize("which", ["mlp", "mix"])
def test_online_equals_the_replay(tiny, dstore, saved, caplog, tmp_path, which):
    """--knn-skip-below tau online = knnlm-sweep --lambda-model --skip-below tau offline:
    same searches, same perplexity; the model (an MLP lambda reading every feature, the
    LM-neighbour agreement ones included; or one mixing three temperatures) differs from the
    fixed lambda."""
    from fairseq_knnlm.cli.sweep import cli_main
    from fairseq_knnlm.offline.lambda_replay import token_inputs
    from fairseq_knnlm.offline.neighbours import load_neighbors

    caplog.set_level(logging.INFO, logger="fairseq_knnlm")
    path = saved[which]
    model = load_model(path)
    assert set(AGREEMENT_FEATURES) <= set(model.head.features)
    assert bool(model.temps) == (which == "mix")
    inp = token_inputs(load_neighbors(saved["test"]), model.freq, model.k, model.temperature,
                       temps=model.temps)
    gate = model.gate_lambdas({f: torch.from_numpy(v) for f, v in inp.x.items()}, len(inp))
    taus = [0.0] + [round(float(np.quantile(gate.numpy(), q)) + 1e-4, 6) for q in (0.3, 0.7)]
    out = tmp_path / "replay.json"
    assert cli_main([str(saved["test"]), "--lambda-model", str(path), "--skip-below",
                     ",".join(map(str, taus)), "--lambdas", "0.1,0.3,0.5", "--json", str(out),
                     "--plot-dir", str(tmp_path / "plots")]) == 0
    res = json.loads(out.read_text())
    assert (tmp_path / "plots" / "ppl_vs_searches_lambda_model.png").exists()
    rows = {r["skip_below"]: r for r in res["rows"]}
    fracs = []
    for tau in taus:
        online = eval_lm_inprocess(eval_args(tiny, "test", *_knn(
            dstore, "--knn-lambda-model", str(path), "--knn-skip-below", str(tau))))
        s, n = _searches(caplog)
        r = rows[tau]
        assert (r["searches"], r["n_tokens"]) == (s, n), (tau, r)
        assert r["ppl"] == pytest.approx(online["perplexity"], rel=1e-5), (tau, r)
        fracs.append(s / n)
    assert fracs[0] == 1.0 and 0 < fracs[2] < fracs[1] < 1.0
    assert res["best_fixed"]["ppl"] != pytest.approx(rows[0.0]["ppl"], rel=1e-6)


# ---- knnlm-fit-lambda ----

@pytest.mark.parametrize("kind", ["constant", "buckets", "mlp"])
def test_fit_lambda_writes_a_model_and_its_report(saved, tmp_path, capsys, kind):
    from fairseq_knnlm.cli.fit_lambda import cli_main

    out = tmp_path / f"{kind}.npz"
    extra = ["--buckets", "4"] if kind == "buckets" else ["--steps", "100"]
    argv = [str(saved["valid"]), "--out", str(out), "--kind", kind, "--temp", T, *extra]
    rc = cli_main(argv)
    cap = capsys.readouterr()
    held = re.search(r"best fixed lambda [0-9.]+: ppl ([0-9.]+); model: ppl ([0-9.]+) "
                     r"\(([+-][0-9.]+), ", cap.out)
    assert held, cap.out
    fixed, got, diff = map(float, held.groups())
    assert diff == pytest.approx(got - fixed, abs=2e-3)
    if got > fixed:  # worse than the fixed lambda: refused in one line, nothing written
        assert rc == 1 and not out.exists()
        errs = cap.err.strip().splitlines()
        assert len(errs) == 1 and "worse than the best fixed lambda" in errs[0]
        assert cli_main([*argv, "--force"]) == 0
        text = capsys.readouterr().out
        assert "saved with --force" in load_model(out).info["forced"]
    else:
        assert rc == 0
        text = cap.out
    assert "held-out" in text and f"wrote {out}" in text
    m = load_model(out)
    assert (m.kind, m.k, m.temperature, m.dist) == (kind, 8, 2.0, "l2")
    assert m.gate is not None  # buckets need the search: a separate gate on LM features
    assert ("needs the search" in text) == (kind != "constant")
    rep = m.info["report"]
    assert rep["rows"]["held_out"] > 0 and rep["held_out_ppl"]["model"] > 0


def test_fit_lambda_refuses_bad_input(saved, tmp_path, capsys):
    from fairseq_knnlm.cli.fit_lambda import cli_main

    out = str(tmp_path / "m.npz")
    for argv, msg in [
        (["--k", "9"], "--k 9 outside 1..8"),
        (["--temp", "0"], "--temp must be > 0"),
        (["--kind", "mlp", "--features", "lm_entropy,nope"], "--features: unknown ['nope']"),
        (["--kind", "buckets", "--buckets", "0"], "--buckets must be >= 1"),
    ]:
        assert cli_main([str(saved["valid"]), "--out", out, *argv]) == 2
        assert msg in capsys.readouterr().err
    assert cli_main([str(tmp_path / "none"), "--out", out]) == 2
    assert "knnlm-fit-lambda: error:" in capsys.readouterr().err


def test_fit_lambda_refuses_neighbours_without_lm_features(saved, tmp_path, capsys):
    import shutil

    from fairseq_knnlm.cli.fit_lambda import cli_main

    old = tmp_path / "old"
    for f in saved["dir"].glob("valid_*"):
        shutil.copy(f, tmp_path / f.name.replace("valid_", "old_"))
    meta = json.loads((tmp_path / "old_meta.json").read_text())
    meta["arrays"] = [a for a in meta["arrays"] if a not in ("lm_entropy", "lm_max_logp",
                                                             "prev_tokens")]
    (tmp_path / "old_meta.json").write_text(json.dumps(meta))
    assert cli_main([str(old), "--out", str(tmp_path / "m.npz")]) == 2
    assert "lacks lm_entropy, lm_max_logp, prev_tokens" in capsys.readouterr().err


# ---- refusals in eval-lm ----

def test_eval_lm_refuses_a_model_fitted_for_other_settings(tiny, dstore, saved, tmp_path):
    with pytest.raises(FlagError, match=r"--k 4 \(fitted for 8\); --knn-temp 1 \(fitted for 2\)"):
        eval_lm_inprocess(eval_args(tiny, "test", "--knnlm", "--dstore-filename", str(dstore),
                                    "--indexfile", f"{dstore}.flat", "--k", "4",
                                    "--knn-lambda-model", str(saved["mlp"])))
    bad_vocab = _model_file(tmp_path / "v.npz", ConstantHead(0.3), vocab=7)
    with pytest.raises(FlagError, match=r"dictionary of \d+ types \(fitted for 7\)"):
        eval_lm_inprocess(eval_args(tiny, "test", *_knn(dstore, "--knn-lambda-model",
                                                        bad_vocab)))
    nogate = _model_file(tmp_path / "g.npz", ConstantHead(0.3), vocab=_vocab(tiny))
    with pytest.raises(FlagError, match="has no gate"):
        eval_lm_inprocess(eval_args(tiny, "test", *_knn(dstore, "--knn-lambda-model", nogate,
                                                        "--knn-skip-below", "0.1")))
    with pytest.raises(FlagError, match="file not found"):
        eval_lm_inprocess(eval_args(tiny, "test", *_knn(dstore, "--knn-lambda-model",
                                                        str(tmp_path / "none.npz"))))


@pytest.mark.parametrize("flags,match", [
    ({"knn_lambda_model": "m"}, "--knn-lambda-model weighs the kNN distribution: it needs "
                                "--knnlm"),
    ({"knnlm": True, "dstore_filename": "d", "indexfile": "i", "knn_skip_below": 0.1},
     "--knn-skip-below thresholds a lambda model's prediction: it needs --knn-lambda-model"),
    ({"knnlm": True, "dstore_filename": "d", "indexfile": "i", "knn_lambda_model": "m",
      "knn_skip_below": 1.5}, "--knn-skip-below must be in [0, 1], got 1.5"),
    ({"knnlm": True, "dstore_filename": "d", "indexfile": "i", "knn_lambda_model": "m",
      "knn_skip_below": 0.1, "knn_save_neighbors": "p"},
     "--knn-save-neighbors with --knn-skip-below"),
])
def test_lambda_flags_refused_with_the_flag_named(flags, match):
    from dataclasses import replace

    from fairseq_knnlm.flags import check_flags
    from fairseq_knnlm.plugin.config import KNNLMOptions

    with pytest.raises(FlagError, match=re.escape(match)):
        check_flags(replace(KNNLMOptions(), **flags))


def test_console_script_errors_in_one_line(tiny, dstore, tmp_path):
    """The real fairseq-eval-lm: a lambda model fitted for another k is one line, no
    traceback, exit 1 or 2."""
    model = _model_file(tmp_path / "c.npz", ConstantHead(0.3), k=4, vocab=_vocab(tiny))
    p = subprocess.run([str(BIN / "fairseq-eval-lm"), *eval_args(tiny, "test", *_knn(
        dstore, "--knn-lambda-model", model))], capture_output=True, text=True)
    assert p.returncode != 0
    assert "--k 8 (fitted for 4)" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert sys.executable  # the venv's scripts are used (BIN)


def test_skipping_with_pointers(tiny, dstore, saved, caplog):
    """The gate's SKIP goes through the pointers' policy: with a threshold above k it equals
    the run without pointers; with pointers the skipped tokens are neither searched nor
    followed, and the line counts them."""
    caplog.set_level(logging.INFO, logger="fairseq_knnlm")
    model = load_model(saved["mlp"])
    from fairseq_knnlm.offline.lambda_replay import token_inputs
    from fairseq_knnlm.offline.neighbours import load_neighbors

    inp = token_inputs(load_neighbors(saved["test"]), model.freq, model.k, model.temperature)
    gate = model.gate_lambdas({f: torch.from_numpy(v) for f, v in inp.x.items()}, len(inp))
    tau = str(round(float(np.quantile(gate.numpy(), 0.5)) + 1e-4, 6))
    knn = _knn(dstore, "--knn-lambda-model", str(saved["mlp"]), "--knn-skip-below", tau)
    plain = eval_lm_inprocess(eval_args(tiny, "test", *knn))
    s_plain, n = _searches(caplog)
    above = eval_lm_inprocess(eval_args(tiny, "test", *knn, "--knn-pointers",
                                        "--knn-min-pointers", "9"))
    assert _searches(caplog) == (s_plain, n) and above["loss"] == plain["loss"]
    eval_lm_inprocess(eval_args(tiny, "test", *knn, "--knn-pointers", "--knn-min-pointers", "1"))
    line = [r.getMessage() for r in caplog.records if "kNN-LM searches:" in r.getMessage()][-1]
    m = re.search(r"searches: (\d+) of (\d+) tokens .*; (\d+) from pointers, (\d+) without kNN",
                  line)
    assert m, line
    s, total, ptr, skipped = map(int, m.groups())
    # the gate decides only the tokens the pointers would search: tokens with pointers keep
    # them, so fewer are skipped than without pointers, and none is searched that the gate
    # skipped without pointers
    assert total == n and s + ptr + skipped == n and ptr > 0
    assert 0 < skipped < n - s_plain
    eval_lm_inprocess(eval_args(tiny, "test", *_knn(
        dstore, "--knn-lambda-model", str(saved["mlp"])), "--knn-pointers",
        "--knn-min-pointers", "1"))
    s0, _ = _searches(caplog)
    assert s <= s0  # a threshold above 0 never searches more than none


# ---- a model fitted with pointers (knnlm-fit-lambda --min-pointers) ----

@pytest.fixture(scope="module")
def saved_ptr(tiny, dstore, tmp_path_factory):
    """Full-search passes saved with --knn-pointers (threshold above k: queries and stream
    starts kept) over valid and test, and a temperature-mixing model fitted on valid for
    --knn-min-pointers 1."""
    from fairseq_knnlm.cli.fit_lambda import cli_main

    d = tmp_path_factory.mktemp("lamptr")
    for split in ("valid", "test"):
        eval_lm_inprocess(eval_args(tiny, split, *_knn(
            dstore, "--lmbda", "0.3", "--knn-pointers", "--knn-min-pointers", "9",
            "--knn-save-neighbors", str(d / split))))
    model = d / "mixptr.npz"
    assert cli_main([str(d / "valid"), "--out", str(model), "--kind", "mlp", "--temp", T,
                     "--temps", "0.5,2,8", "--steps", "200", "--min-pointers", "1",
                     "--force"]) == 0
    from fairseq_knnlm.cli.clusters import cli_main as clusters_main

    cl = d / "clusters" / "c40"  # --knn-clusters: pointers stand for their clusters
    assert clusters_main([str(dstore), str(cl), "--num-clusters", "40", "--niter", "5"]) == 0
    clmodel = d / "mixcl.npz"
    assert cli_main([str(d / "valid"), "--out", str(clmodel), "--kind", "mlp", "--temp", T,
                     "--steps", "200", "--min-pointers", "4", "--clusters", str(cl),
                     "--force"]) == 0
    return {"valid": d / "valid", "test": d / "test", "model": model, "clusters": cl,
            "clmodel": clmodel}


@pytest.mark.parametrize("which", ["plain", "clusters"])
def test_pointer_model_online_equals_the_replay(tiny, dstore, saved_ptr, caplog, tmp_path,
                                                which):
    """knnlm-sweep --lambda-model on a model fitted with --min-pointers 1 (or 4 with
    --clusters) = eval-lm with --knn-lambda-model --knn-pointers --knn-min-pointers N
    (--knn-clusters) and --knn-skip-below: same searches, pointer tokens and perplexity;
    fewer searches than tokens."""
    from fairseq_knnlm.cli.sweep import cli_main
    from fairseq_knnlm.offline.lambda_replay import _pre_x
    from fairseq_knnlm.offline.neighbours import load_neighbors

    caplog.set_level(logging.INFO, logger="fairseq_knnlm")
    path = saved_ptr["model" if which == "plain" else "clmodel"]
    model = load_model(path)
    policy = (("--knn-min-pointers", "1") if which == "plain" else
              ("--knn-min-pointers", "4", "--knn-clusters", str(saved_ptr["clusters"])))
    assert model.min_pointers == int(policy[1]) and "knn_log_count" in model.head.features
    assert model.clusters == (None if which == "plain" else 40)
    assert not set(AGREEMENT_FEATURES) & set(model.head.features)
    nb = load_neighbors(saved_ptr["test"])
    x = _pre_x(nb, model.freq, False)
    gate = model.gate_lambdas({f: torch.from_numpy(x[f]) for f in model.gate.features}, nb.n)
    taus = [0.0, round(float(np.quantile(gate.numpy(), 0.3)) + 1e-4, 6)]
    out = tmp_path / "replay.json"
    assert cli_main([str(saved_ptr["test"]), "--lambda-model", str(path), "--skip-below",
                     ",".join(map(str, taus)), "--lambdas", "0.3", "--json", str(out)]) == 0
    rows = {r["skip_below"]: r for r in json.loads(out.read_text())["rows"]}
    for tau in taus:
        online = eval_lm_inprocess(eval_args(tiny, "test", *_knn(
            dstore, "--knn-lambda-model", str(path), "--knn-pointers", *policy,
            "--knn-skip-below", str(tau))))
        line = [r.getMessage() for r in caplog.records
                if "kNN-LM searches:" in r.getMessage()][-1]
        s, n = _searches(caplog)
        ptr = int(re.search(r"(\d+) from pointers", line).group(1))
        r = rows[tau]
        assert (r["searches"], r["pointer_tokens"], r["n_tokens"]) == (s, ptr, n), (tau, r)
        assert r["ppl"] == pytest.approx(online["perplexity"], rel=1e-5), (tau, r)
        assert 0 < s < n and ptr > 0
    r0, r1 = rows[0.0], rows[taus[1]]
    assert r0["searches"] + r0["pointer_tokens"] == r0["n_tokens"]
    # tau > 0: the gate skipped tokens (which leave no pointers: more searches may follow)
    assert r1["searches"] + r1["pointer_tokens"] < r1["n_tokens"]


def test_pointer_model_refusals(tiny, dstore, saved, saved_ptr, tmp_path, capsys):
    """A pointer model without its policy in eval-lm; --min-pointers on a pass saved without
    --knn-pointers; a bad --min-pointers."""
    from fairseq_knnlm.cli.fit_lambda import cli_main

    with pytest.raises(FlagError, match=re.escape(
            "no --knn-pointers (fitted for --knn-pointers --knn-min-pointers 1)")):
        eval_lm_inprocess(eval_args(tiny, "test", *_knn(
            dstore, "--knn-lambda-model", str(saved_ptr["model"]))))
    with pytest.raises(FlagError, match=re.escape("--knn-min-pointers 4 (fitted for")):
        eval_lm_inprocess(eval_args(tiny, "test", *_knn(
            dstore, "--knn-lambda-model", str(saved_ptr["model"]), "--knn-pointers",
            "--knn-min-pointers", "4")))
    with pytest.raises(FlagError, match=re.escape(
            "no --knn-clusters (fitted with --knn-clusters of 40 clusters)")):
        eval_lm_inprocess(eval_args(tiny, "test", *_knn(
            dstore, "--knn-lambda-model", str(saved_ptr["clmodel"]), "--knn-pointers",
            "--knn-min-pointers", "4")))
    out = str(tmp_path / "m.npz")
    assert cli_main([str(saved_ptr["valid"]), "--out", out, "--temp", T, "--clusters",
                     str(saved_ptr["clusters"])]) == 2
    assert "--clusters extends the pointers: it needs --min-pointers" in capsys.readouterr().err
    assert cli_main([str(saved["valid"]), "--out", out, "--temp", T, "--min-pointers", "1"]) == 2
    assert "--knn-pointers --knn-min-pointers 9" in capsys.readouterr().err
    assert cli_main([str(saved_ptr["valid"]), "--out", out, "--temp", T,
                     "--min-pointers", "0"]) == 2
    assert "--min-pointers must be >= 1" in capsys.readouterr().err


# ---- finite or refused (issue 23) ----

def _huge_head(z: float):
    from fairseq_knnlm.adaptive.lambda_model import MLPHead

    return MLPHead(("lm_entropy",), np.zeros(1, np.float32), np.ones(1, np.float32),
                   [np.zeros((1, 1), np.float32)], [np.array([z], np.float32)])


@pytest.mark.parametrize("z", [50.0, 100.0, -50.0, -100.0])
def test_huge_logits_are_finite_and_equal_online_in_the_replay_and_the_fitter(
        tiny, dstore, saved, tmp_path, z):
    """lambda = sigmoid(z) rounds to 1 in float32 for z > ~17: the mixture is taken from the
    logit in log space, by one function online, in the replay and in the fitter's held-out
    evaluation, so all three give the same finite perplexity (before: Perplexity inf)."""
    from fairseq_knnlm.adaptive.lambda_fit import head_nll
    from fairseq_knnlm.offline.lambda_replay import replay, searched_nll, token_inputs
    from fairseq_knnlm.offline.neighbours import load_neighbors
    from fairseq_knnlm.offline.sweep import ppl_from_nll

    head = _huge_head(z)
    vocab = _vocab(tiny)
    path = tmp_path / "huge.npz"
    model = LambdaModel(kind="mlp", head=head, gate=None, k=8, temperature=2.0, dist="l2",
                        freq=np.zeros(vocab, dtype=np.float32))
    save_model(path, model)
    online = eval_lm_inprocess(eval_args(tiny, "test", *_knn(dstore, "--knn-lambda-model",
                                                             str(path))))
    inp = token_inputs(load_neighbors(saved["test"]), model.freq, 8, 2.0)
    replayed = replay(inp, load_model(path), [0.0])[0]["ppl"]
    fitter = ppl_from_nll(head_nll(head, inp.x, inp.lm, inp.knn))
    searched = ppl_from_nll(float(searched_nll(inp, model).mean()))
    for ppl in (online["perplexity"], replayed, fitter, searched):
        assert math.isfinite(ppl)
    assert replayed == pytest.approx(online["perplexity"], rel=1e-5)
    assert fitter == pytest.approx(replayed, rel=1e-6) and searched == replayed


def test_fit_lambda_refuses_a_model_worse_than_the_fixed_lambda(tiny, dstore, saved, tmp_path,
                                                                 capsys, monkeypatch):
    """A fitted head that puts lambda at ~1 everywhere (as a diverged fit would) is worse
    than the best fixed lambda on the held-out tokens: one line, exit 1, no file; --force
    saves it and says so in the file; eval-lm with it still prints a finite perplexity."""
    import fairseq_knnlm.offline.lambda_replay as lr
    from fairseq_knnlm.cli.fit_lambda import cli_main

    real = lr.fit_mlp

    def diverged(*a, **kw):
        h = real(*a, **kw)
        h.weights[-1][:] = 0.0
        h.biases[-1][:] = 60.0
        return h

    monkeypatch.setattr(lr, "fit_mlp", diverged)
    out = tmp_path / "bad.npz"
    argv = [str(saved["valid"]), "--out", str(out), "--kind", "mlp", "--steps", "20"]
    assert cli_main(argv) == 1
    cap = capsys.readouterr()
    errs = cap.err.strip().splitlines()
    assert len(errs) == 1 and not out.exists(), cap.err
    assert re.search(r"worse than the best fixed lambda [0-9.]+ on the held-out tokens \(ppl "
                     r"[0-9.]+ vs [0-9.]+\).*--force", errs[0])
    assert "not finite" not in cap.out and "inf" not in cap.out.replace("info", "")
    assert cli_main([*argv, "--force"]) == 0
    assert "saved with --force" in capsys.readouterr().out
    m = load_model(out)
    assert m.info["forced"].startswith("saved with --force: the model is worse")
    res = eval_lm_inprocess(eval_args(tiny, "test", *_knn(dstore, "--knn-lambda-model",
                                                          str(out))))
    assert math.isfinite(res["perplexity"])


def test_fit_lambda_takes_k_and_temperature_from_the_neighbours(saved, tmp_path, capsys):
    """Without --k/--temp the model gets the pass's k and --knn-temp (8, 2: before, T 1,
    which eval-lm then refused against --knn-temp 2); --k above the saved k is refused."""
    from fairseq_knnlm.cli.fit_lambda import cli_main

    out = tmp_path / "c.npz"
    assert cli_main([str(saved["valid"]), "--out", str(out), "--kind", "constant"]) == 0
    m = load_model(out)
    assert (m.k, m.temperature) == (8, 2.0)
    assert "k=8, T=2," in capsys.readouterr().out
    assert cli_main([str(saved["valid"]), "--out", str(out), "--kind", "constant",
                     "--k", "9"]) == 2
    assert "--k 9 outside 1..8" in capsys.readouterr().err

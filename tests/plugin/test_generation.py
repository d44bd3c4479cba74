"""kNN-LM when generating (plugin/generation.py) and the Python API (plugin/api.py), on the
tiny LM and its train datastore: every step's full-vocabulary mixture, a forced continuation
scored as eval-lm scores it, lambda 0 = stock fairseq generation, the API's score = what
fairseq-eval-lm prints, neighbours = knnlm-explain, and the one-line refusals.

Run: python -m pytest -q tests/plugin/test_generation.py
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import BIN, TPS, USER_DIR, eval_args, parse_ppl, run

PROMPT = "w48 w56 w26 w2 w16 w32"
TEXT = "w48 w56 w26 w2 w16 w32 w31 w15 w51 w9"
K, LMBDA, TEMP = 8, 0.5, 2.0


def load(tiny, dstore, **kw):
    from fairseq_knnlm import KNNLM

    opts = dict(dstore=str(dstore), index=f"{dstore}.flat", k=K, lmbda=LMBDA, temp=TEMP,
                tokens_per_sample=TPS)
    opts.update(kw)
    return KNNLM.from_pretrained(tiny["ckpt"].parent, tiny["ckpt"].name,
                                 data_name_or_path=str(tiny["data"]), **opts)


@pytest.fixture(scope="module")
def lm(tiny, dstore):
    return load(tiny, dstore)


def test_import_is_lazy():
    """`from fairseq_knnlm import KNNLM` works; the package itself does not load the API."""
    code = ("import sys, fairseq_knnlm\n"
            "assert 'fairseq_knnlm.plugin.api' not in sys.modules\n"
            "from fairseq_knnlm import KNNLM\n"
            "print(KNNLM.__name__)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0 and "KNNLM" in p.stdout, p.stderr[-2000:]


def test_step_is_the_full_vocabulary_mixture(lm):
    """A decoding step's p_kNN sums to 1 and equals a numpy recomputation from the retrieved
    neighbours (weights softmax(-d/T) added onto their values); the step's distribution is
    lambda p_kNN + (1 - lambda) p_LM over every token."""
    lm.sample(PROMPT, max_len_b=3)
    last = lm.knn_generation.last
    assert last is not None and last.knn is not None and last.retrieved is not None
    V = len(lm.dictionary)
    assert last.knn.shape[1] == V
    assert torch.allclose(torch.logsumexp(last.knn.double(), 1), torch.zeros(len(last.knn),
                          dtype=torch.float64), atol=1e-5)
    r = last.retrieved
    for i in range(len(last.knn)):
        ok = r.valid[i].numpy()
        d = r.dists[i].double().numpy()[ok]
        v = r.nbr_vals[i].numpy()[ok]
        w = np.exp(-(d - d.min()) / TEMP)
        p = np.zeros(V)
        np.add.at(p, v, w / w.sum())
        assert np.allclose(np.exp(last.knn[i].double().numpy()), p, atol=1e-6)
        mix = LMBDA * p + (1 - LMBDA) * np.exp(last.lm[i].double().numpy())
        assert np.allclose(np.exp(last.final[i].double().numpy()), mix, atol=1e-6)
        assert abs(mix.sum() - 1) < 1e-5


def _forced(lm, text):
    """The generator's log-probs of ``text`` forced token by token (its words, then eos)."""
    toks = lm.encode(text)
    hypo = lm.generate(toks[:-1], beam=1, max_len_b=len(toks) - 1)[0]
    assert torch.equal(hypo["tokens"], toks)
    return hypo["positional_scores"]


@pytest.mark.parametrize("extra", [{}, {"knn_cache": True, "cache_lmbda": 0.3},
                                   {"knn_pointers": True, "knn_min_pointers": 2}],
                         ids=["knnlm", "cache", "pointers"])
def test_forced_continuation_equals_the_scorer(tiny, dstore, extra):
    """The generator's log-probability of a forced continuation equals eval-lm's for the
    same tokens and context (the text as one line, from its start): kNN-LM, with the cache
    over what came before, and with pointers followed along the chosen tokens."""
    m = load(tiny, dstore, **extra)
    forced = _forced(m, TEXT)
    scored = m.score([TEXT])
    assert torch.allclose(forced, scored[0].positional_scores, atol=1e-4), (
        forced, scored[0].positional_scores)
    if extra.get("knn_pointers"):
        assert m.knn_generation.knn.mode_counts["pointers"] > 0


def _lambda_model(tiny, path, mix: bool, gate: bool) -> str:
    """A random MLP lambda model over every feature (the agreement ones too), optionally
    shared out over three temperatures (MixHead) and with a gate over the PRE features."""
    from fairseq.data import Dictionary

    from fairseq_knnlm.adaptive.lambda_features import FEATURES, PRE_FEATURES
    from fairseq_knnlm.adaptive.lambda_file import save_model
    from fairseq_knnlm.adaptive.lambda_model import LambdaModel, MixHead, MLPHead

    def mlp(features, seed, out=1):
        rng = np.random.default_rng(seed)
        dims = [len(features), 6, out]
        ws = [rng.standard_normal((dims[i + 1], dims[i])).astype(np.float32) for i in range(2)]
        bs = [rng.standard_normal(dims[i + 1]).astype(np.float32) for i in range(2)]
        return MLPHead(tuple(features), rng.standard_normal(len(features)).astype(np.float32),
                       rng.uniform(0.5, 2, len(features)).astype(np.float32), ws, bs)

    head = mlp(FEATURES, 3, out=4 if mix else 1)
    if mix:
        head = MixHead(head.features, head.mean, head.std, head.weights, head.biases)
    vocab = len(Dictionary.load(str(tiny["data"] / "dict.txt")))
    m = LambdaModel(kind="mlp", head=head, gate=mlp(PRE_FEATURES, 5) if gate else None, k=K,
                    temperature=TEMP, dist="l2",
                    freq=np.log1p(np.arange(vocab, dtype=np.float32)),
                    temps=(0.5, TEMP, 8.0) if mix else ())
    save_model(path, m)
    return str(path)


@pytest.mark.parametrize("mix,skip", [(False, 0.0), (True, 0.0), (False, 0.4)],
                         ids=["mlp", "mix", "gate"])
def test_lambda_model_steps_score_as_eval_lm(tiny, dstore, tmp_path, mix, skip):
    """A fitted lambda model per step (its features from the step's own p_LM and neighbours,
    a MixHead's temperatures, the gate's skipped searches): a forced continuation scores as
    eval-lm scores it with the same --knn-lambda-model."""
    path = _lambda_model(tiny, tmp_path / "lam.npz", mix, gate=skip > 0)
    m = load(tiny, dstore, knn_lambda_model=path, knn_skip_below=skip or None)
    forced = _forced(m, TEXT)
    assert torch.allclose(forced, m.score([TEXT])[0].positional_scores, atol=1e-4)
    if skip:
        assert m.knn_generation.searched < m.knn_generation.steps  # the gate skipped some


def test_beam_search_hypotheses_score_as_forced(tiny, dstore):
    """Beam search reorders its hypotheses every step: the cache's history and the pointers
    follow them, so each final hypothesis' scores are those of its tokens forced one by one
    (and, for the first, eval-lm's)."""
    m = load(tiny, dstore, knn_cache=True, cache_lmbda=0.3, knn_pointers=True,
             knn_min_pointers=2)
    hypos = m.generate(m.encode(PROMPT), beam=3, max_len_b=14)
    assert len(hypos) == 3
    for h in hypos:
        toks = h["tokens"]
        forced = m.generate(toks[:-1], beam=1, max_len_b=len(toks) - 1)[0]
        assert torch.equal(forced["tokens"], toks)
        assert torch.allclose(forced["positional_scores"], h["positional_scores"], atol=1e-4)
    text = m.decode(hypos[0]["tokens"])
    assert torch.allclose(m.score([text])[0].positional_scores, hypos[0]["positional_scores"],
                          atol=1e-4)


def test_lambda_zero_is_stock_generation(tiny, dstore):
    """lambda 0: fairseq's own generation, token for token (greedy, beam, sampling)."""
    from fairseq.models.transformer_lm import TransformerLanguageModel

    stock = TransformerLanguageModel.from_pretrained(
        str(tiny["ckpt"].parent), tiny["ckpt"].name, data_name_or_path=str(tiny["data"]))
    m = load(tiny, dstore, lmbda=0.0)
    toks = m.encode(PROMPT)
    for kw in ({"beam": 1}, {"beam": 3}, {"beam": 1, "sampling": True, "sampling_topk": 5}):
        torch.manual_seed(7)
        a = stock.generate([toks], max_len_b=12, **kw)[0][0]
        b = m.generate([toks], max_len_b=12, seed=7, **kw)[0][0]
        assert torch.equal(a["tokens"], b["tokens"]), kw
        assert torch.allclose(a["positional_scores"], b["positional_scores"], atol=1e-6)
    # and with kNN on, the distribution does change
    knn = load(tiny, dstore, lmbda=0.9).generate(toks, max_len_b=12)
    assert not torch.allclose(knn[0]["positional_scores"][:len(toks) - 1],
                              b["positional_scores"][:len(toks) - 1])


def test_score_equals_what_eval_lm_prints(tiny, dstore, lm, tmp_path):
    """lm.score(): the perplexity fairseq-eval-lm --knnlm prints for the same text and
    flags, to the printed digit, and per-token log-probs that sum to its loss."""
    from fairseq_knnlm.explain.document import binarize_text

    lines = [TEXT, "w32 w8 w18 w8 w48 w51 w15 w54", "w5 w5 w20 w56 w32"]
    sc = lm.score(lines)
    shutil.copy(tiny["data"] / "dict.txt", tmp_path / "dict.txt")
    binarize_text(lines, tiny["data"] / "dict.txt", tmp_path / "text")
    args = eval_args(tiny, "text", "--knnlm", "--dstore-filename", str(dstore), "--indexfile",
                     f"{dstore}.flat", "--k", str(K), "--lmbda", str(LMBDA), "--knn-temp",
                     str(TEMP), context_window=0)
    args[0] = str(tmp_path)
    out = run([str(BIN / "fairseq-eval-lm"), *args])
    assert f"{sc.perplexity:.2f}" == f"{parse_ppl(out):.2f}"
    loss = re.findall(r"Loss \(base 2\): ([0-9.]+)", out)[-1]
    assert f"{sc.loss:.4f}" == loss
    assert [len(s.tokens) for s in sc.sentences] == [len(x.split()) + 1 for x in lines]
    allp = torch.cat([s.positional_scores for s in sc.sentences]).double()
    assert float(-allp.mean() / np.log(2)) == pytest.approx(sc.loss, abs=1e-4)


def test_neighbours_are_what_knnlm_explain_shows(tiny, dstore, lm, tmp_path):
    from fairseq_knnlm.cli.explain import cli_main

    out = tmp_path / "x.json"
    rc = cli_main([str(tiny["data"]), "--path", str(tiny["ckpt"]), "--text", TEXT,
                   "--tokens-per-sample", str(TPS), "--sample-break-mode", "none",
                   "--max-tokens", "1024", "--cpu", "--num-workers", "0",
                   "--dstore-filename", str(dstore), "--indexfile", f"{dstore}.flat",
                   "--k", str(K), "--lmbda", str(LMBDA), "--knn-temp", str(TEMP),
                   "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    for pos in (0, 3, 7):
        assert lm.neighbours(TEXT, pos) == doc["tokens"][pos]


def test_bad_prompts_are_one_line_before_work(lm, caplog):
    from fairseq_knnlm.errors import KNNLMError

    with pytest.raises(KNNLMError, match="is empty: nothing to continue"):
        lm.sample("")
    with pytest.raises(KNNLMError, match=r"has 40 tokens: .* model's 32 positions"):
        lm.sample(" ".join(["w1"] * 40))
    caplog.set_level(logging.WARNING, logger="fairseq_knnlm")
    lm.sample("w48 nosuchword w56 otherword w26", max_len_b=8)
    lines = [r.getMessage() for r in caplog.records if "not in the model's dictionary" in
             r.getMessage()]
    assert len(lines) == 1 and "'nosuchword'" in lines[0] and "2 words" in lines[0], lines


def test_datastore_of_another_dictionary_is_refused(tiny, dstore, tmp_path):
    from fairseq_knnlm.store.datastore import DatastoreError

    other = tmp_path / "train"
    for f in dstore.parent.glob(dstore.name + "*"):
        shutil.copy(f, tmp_path / f.name)
    for name in ("train_meta.json", "train.flat.meta.json"):  # both: as if dumped elsewhere
        meta = json.loads((tmp_path / name).read_text())
        assert "dict_sha256" in json.dumps(meta)
        meta = json.loads(json.dumps(meta).replace(meta_sha(meta), "0" * 64))
        (tmp_path / name).write_text(json.dumps(meta))
    with pytest.raises(DatastoreError, match="does not match the model: dictionary"):
        load(tiny, other, index=f"{other}.flat")


def meta_sha(meta: dict) -> str:
    """The dictionary hash a meta file records (at its top level or one level down)."""
    if "dict_sha256" in meta:
        return meta["dict_sha256"]
    return next(v["dict_sha256"] for v in meta.values()
                if isinstance(v, dict) and "dict_sha256" in v)


def _interactive(tiny, dstore, prompt: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "fairseq-interactive"), str(tiny["data"]), "--task", "language_modeling",
           "--path", str(tiny["ckpt"]), "--user-dir", USER_DIR, "--cpu", "--max-len-b", "10",
           *extra]
    return subprocess.run(cmd, input=prompt + "\n", capture_output=True, text=True)


def test_fairseq_interactive_knnlm(tiny, dstore):
    """The console script: --knnlm generates (and says so); lambda 0 gives the plugin-free
    task's tokens; an empty prompt and a mismatched --k end it with one line."""
    flags = ["--knnlm", "--dstore-filename", str(dstore), "--indexfile", f"{dstore}.flat",
             "--k", str(K), "--knn-temp", str(TEMP)]
    knn = _interactive(tiny, dstore, PROMPT, *flags, "--lmbda", "0.9", "--beam", "2")
    assert knn.returncode == 0, knn.stderr[-3000:]
    assert "every step's distribution is the kNN-LM" in knn.stdout + knn.stderr
    h = [x for x in knn.stdout.splitlines() if x.startswith("H-0")]
    assert h and h[0].split("\t")[2].startswith(PROMPT)
    base = _interactive(tiny, dstore, PROMPT)
    zero = _interactive(tiny, dstore, PROMPT, *flags, "--lmbda", "0")
    hyp = [[x for x in p.stdout.splitlines() if x.startswith(("H-", "P-"))] for p in (base,
                                                                                    zero)]
    assert hyp[0] and hyp[0] == hyp[1]
    empty = _interactive(tiny, dstore, "", *flags)
    assert empty.returncode != 0
    err = [x for x in empty.stderr.splitlines() if x.strip()]
    assert err[-1].startswith("fairseq-interactive: error: prompt '' is empty"), err[-5:]
    assert "Traceback" not in empty.stderr
    big = _interactive(tiny, dstore, PROMPT, *flags[:-4], "--k", "100000")
    assert big.returncode != 0 and "Traceback" not in big.stderr
    assert "fairseq-interactive: error: --k 100000 is larger than the datastore" in big.stderr

"""knnlm-explain (explain.py, cli/explain.py): the scorer's own numbers per token (the JSON's
perplexity is eval-lm's), neighbours and their training contexts read through the position
map, --start/--length scoring only the blocks needed, --text binarized like
fairseq-preprocess, the aggregate view, the terminal table and the web page (in headless
Chromium when it is installed).

Run: python -m pytest -q tests/explain/test_explain.py
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from conftest import eval_args, eval_lm_inprocess

from fairseq_knnlm.cli.explain import cli_main
from fairseq_knnlm.explain import aggregate as ea
from fairseq_knnlm.explain import document as ex
from fairseq_knnlm.explain.html import render_html
from fairseq_knnlm.plugin.runtime import ScoredBatch
from fairseq_knnlm.search.retriever import Retrieved
from fairseq_knnlm.store.datastore import open_datastore

KNN = ("--k", "8", "--lmbda", "0.25", "--knn-temp", "10")


# ---- plain functions ----

def test_top_neighbours_order_weights_ranks_and_targets():
    ids = np.array([[10, 11, 12, -1]])
    dists = torch.tensor([[3.0, 1.0, 2.0, float("inf")]])
    vals = torch.tensor([[7, 8, 7, -1]])
    valid = torch.tensor([[True, True, True, False]])
    nb = ex.top_neighbours(ids, dists, vals, valid, temperature=2.0, top=4)
    assert nb.rows.tolist() == [[11, 12, 10, -1]]  # closest first, the empty slot last
    assert nb.ranks[0, :3].tolist() == [1, 2, 3]
    w = np.exp(-np.array([1.0, 2.0, 3.0]) / 2)
    np.testing.assert_allclose(nb.weights[0, :3], w / w.sum(), rtol=1e-6)
    assert nb.weights[0, 3] == 0 and nb.vals[0, :3].tolist() == [8, 7, 7]
    tgt = ex.top_neighbours(ids, dists, vals, valid, 2.0, top=2, among=vals == 7)
    assert tgt.rows.tolist() == [[12, 10]] and tgt.ranks.tolist() == [[2, 3]]
    # the weights of the neighbours carrying the target add up to p_kNN
    from fairseq_knnlm.scoring.knn import knn_log_prob

    p = math.exp(float(knn_log_prob(dists, vals, torch.tensor([7]), 2.0, valid)[0]))
    assert float(tgt.weights.sum()) == pytest.approx(p, rel=1e-6)


def _batch(positions, targets, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(positions)
    lm = -torch.rand(n, generator=g) * 5
    knn = -torch.rand(n, generator=g) * 5
    ids = np.arange(n * k).reshape(n, k) + 100 * positions[0]
    d = torch.rand(n, k, generator=g) * 10
    vals = torch.randint(0, 5, (n, k), generator=g)
    r = Retrieved(ids=ids, faiss_dists=d.numpy(), dists=d, nbr_vals=vals,
                  valid=torch.ones(n, k, dtype=torch.bool))
    return ScoredBatch(sample_ids=np.zeros(n, np.int64), positions=np.asarray(positions),
                       targets=torch.tensor(targets), lm_logp=lm, knn_logp=knn,
                       cache_logp=None, final_logp=ex_interp(lm, knn), retrieved=r)


def ex_interp(lm, knn):
    from fairseq_knnlm.scoring.knn import interpolate

    return interpolate(lm, knn, 0.25)


def test_collector_keeps_the_range_in_stream_order():
    c = ex.Collector(start=2, end=7, top=2, temperature=1.0)
    b1, b0 = _batch([5, 6, 7, 8], [1, 2, 3, 4]), _batch([0, 1, 2, 3, 4], [0, 1, 2, 3, 4], seed=1)
    c(b1)
    c(b0)  # batches may arrive in any order
    t = c.table()
    assert c.seen == 9 and t.positions.tolist() == [2, 3, 4, 5, 6]
    assert t.targets.tolist() == [2, 3, 4, 1, 2]
    np.testing.assert_allclose(t.logp[:3], b0.final_logp[2:5].double().numpy())
    np.testing.assert_allclose(t.lm_logp[3:], b1.lm_logp[:2].double().numpy())
    assert t.nbrs.rows.shape == (5, 2) and t.cache_logp is None
    assert t.n_tgt_nbrs[3] == int((b1.retrieved.nbr_vals[0] == 1).sum())
    c(b1)  # the same positions twice: a bug upstream, not silently merged
    with pytest.raises(RuntimeError, match="scored twice"):
        c.table()
    with pytest.raises(ValueError, match="no scored token"):
        ex.Collector(start=100).table()


def test_token_stream_contexts_and_text_lines():
    items = [np.array([5, 6, 2]), np.array([2]), np.array([7, 8, 9, 2])]
    s = ex.token_stream(items)
    assert s.tolist() == [5, 6, 2, 2, 7, 8, 9, 2]
    assert [c.tolist() for c in ex.contexts(s, np.array([0, 2, 6]), 3)] == [[], [5, 6],
                                                                           [2, 7, 8]]
    assert ex.text_lines("a b\n\nc\n") == ["a b", "", "c"]
    assert ex.text_lines("a\r\nb") == ["a", "b"]


def test_longest_train_ngram_against_brute_force():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 6, size=400)
    stream = np.concatenate([train[50:70], rng.integers(0, 8, size=60)])  # copies + noise

    def brute(p: int, max_n: int) -> int:
        best = 0
        tl = train.tolist()
        for n in range(1, min(max_n, p + 1) + 1):
            g = stream[p - n + 1:p + 1].tolist()
            if any(tl[i:i + n] == g for i in range(len(tl) - n + 1)):
                best = n
            else:
                break
        return best

    pos = np.arange(len(stream))
    got = ea.longest_train_ngram(stream, pos, train, max_n=8, chunk=64)  # chunked reads
    assert got.tolist() == [brute(int(p), 8) for p in pos]
    assert got[19] == 8 and (got[stream >= 6] == 0).all()


def test_buckets_and_labels():
    assert ea.freq_labels() == ["0", "1-9", "10-99", "100-999", "1,000-9,999", ">= 10,000"]
    assert ea.freq_bucket(np.array([0, 1, 9, 10, 999, 1000, 10**6])).tolist() == [
        0, 1, 1, 2, 3, 4, 5]
    labels = ea.ngram_labels(8)
    assert labels == ["0 (token unseen)", "1 (token only)", "2", "3", "4", "5-7", ">= 8"]
    b = ea.ngram_bucket(np.array([0, 1, 2, 4, 5, 7, 8]), 8)
    assert [labels[i] for i in b] == ["0 (token unseen)", "1 (token only)", "2", "4", "5-7",
                                      "5-7", ">= 8"]
    assert ea.ngram_labels(3) == ["0 (token unseen)", "1 (token only)", "2", ">= 3"]
    assert ea.ngram_bucket(np.array([3]), 3).tolist() == [3]


def test_blocks_for_range_and_the_covering_shard():
    from fairseq_knnlm.store.shards import contiguous_range

    slices = np.array([[0, 16], [16, 32], [32, 48], [48, 60]])
    assert ex.blocks_for_range(slices, 0, 60) == (0, 4)
    assert ex.blocks_for_range(slices, 16, 17) == (1, 2)
    assert ex.blocks_for_range(slices, 15, 33) == (0, 3)
    assert ex.blocks_for_range(slices, 59, 60) == (3, 4)
    for n in (1, 2, 7, 34, 50):
        for b0 in range(n):
            for b1 in range(b0 + 1, n + 1):
                s, i = ex.covering_shard(n, b0, b1)
                lo, hi = contiguous_range(n, s, i)
                assert lo <= b0 and hi >= b1, (n, b0, b1)
                if b1 == b0 + 1:
                    assert hi - lo <= 2  # a single block costs at most one more
    assert ex.covering_shard(34, 5, 6) == (34, 5)


def test_html_is_self_contained_and_escapes_its_data():
    tok = {"position": 0, "token": "</script><b>", "token_id": 4, "lm_logp": -2.0,
           "knn_logp": -1.0, "logp": -1.5, "gain": 0.5, "n_target_neighbors": 1,
           "neighbors": [{"row": 3, "distance": 1.0, "weight": 1.0, "token": "</script><b>",
                          "token_id": 4, "match": True, "rank": 1, "position": 9,
                          "context": "a & b"}], "target_neighbors": []}
    doc = {"perplexity": 4.48, "lm_perplexity": 7.39, "n_tokens": 1, "k": 8, "lmbda": 0.25,
           "knn_temp": 10.0, "subset": "valid", "tokens": [tok]}
    page = render_html(doc)
    assert page.count("</script>") == 3  # the error hook, the data and the code: no more
    for external in ("http://", "https://", "src=", "<link", "@import", "url("):
        assert external not in page
    data = re.search(r'id="knnlm-data">(.*?)</script>', page, re.S).group(1)
    assert json.loads(data)["tokens"][0]["token"] == "</script><b>"


def test_terminal_table_marks_and_rows():
    toks = [{"position": i, "token": f"w{i}", "token_id": i, "lm_logp": -3.0,
             "knn_logp": -10000.0 if i == 1 else -1.0, "logp": -3.0 + g, "gain": g,
             "n_target_neighbors": 0, "target_neighbors": [],
             "neighbors": [{"row": 7, "distance": 2.0, "weight": 0.5, "token": "w9",
                            "token_id": 9, "match": False, "rank": 1, "position": 3,
                            "context": "x y z"}]}
            for i, g in enumerate([0.5, -0.2, 1.5, 0.0, -0.1])]
    doc = {"perplexity": 1.0, "lm_perplexity": 2.0, "k": 8, "lmbda": 0.25, "knn_temp": 10.0,
           "subset": "valid", "tokens": toks}
    out = ex.format_table(doc, max_rows=10, marks=1)
    rows = {line.split()[1]: line for line in out.splitlines() if re.match(r"\s+\d+ w\d", line)}
    assert len(rows) == 5
    assert " ++ " in rows["w2"] and " -- " in rows["w1"] and "++" not in rows["w0"]
    assert " none " in rows["w1"]  # no neighbour carries the target: not -10000
    assert "'w2' at 2 (helped most)" in out and "'w1' at 1 (hurt most)" in out
    short = ex.format_table(doc, max_rows=3, marks=1)
    assert "showing the 2 marked tokens of 5" in short
    assert len([ln for ln in short.splitlines() if re.match(r"\s+\d+ w\d", ln)]) == 2


# ---- through eval-lm's pass ----

def _explain_args(tiny, dstore, subset="valid", *extra):
    return [*eval_args(tiny, subset), "--dstore-filename", str(dstore), "--indexfile",
            f"{dstore}.flat", *KNN, *extra]


@pytest.fixture(scope="module")
def whole(tiny, dstore, tmp_path_factory):
    """knnlm-explain over the whole tiny valid subset: JSON, HTML, aggregate, plot."""
    out = tmp_path_factory.mktemp("explain")
    rc = cli_main(_explain_args(tiny, dstore, "valid", "--json", str(out / "v.json"),
                                "--html", str(out / "v.html"), "--aggregate", "--plot",
                                str(out / "agg.png"), "--top", "4"))
    assert rc == 0
    return {"doc": json.loads((out / "v.json").read_text()), "dir": out}


def test_json_perplexity_is_eval_lms(tiny, dstore, whole):
    doc = whole["doc"]
    res = eval_lm_inprocess(_explain_args(tiny, dstore, "valid", "--knnlm"))
    logp = np.array([t["logp"] for t in doc["tokens"]])
    assert doc["perplexity"] == pytest.approx(res["perplexity"], rel=1e-5)
    assert math.exp(-logp.mean()) == pytest.approx(2 ** res["loss"], rel=1e-5)
    assert [t["position"] for t in doc["tokens"]] == list(range(doc["n_tokens"]))
    assert doc["scored_tokens"] == doc["n_tokens"]
    for t in doc["tokens"]:  # Eq. 3 of the token's own numbers (no cache here)
        lam = 0.25
        assert t["logp"] == pytest.approx(
            math.log(lam * math.exp(t["knn_logp"]) + (1 - lam) * math.exp(t["lm_logp"])),
            abs=1e-5)


def _stream(tiny, split):
    return ex.load_split_stream(tiny["data"], split)


def test_neighbour_tokens_and_contexts_come_from_the_position_map(tiny, dstore, whole):
    from fairseq.data.dictionary import Dictionary

    ds = open_datastore(dstore)
    sym = Dictionary.load(str(tiny["data"] / "dict.txt")).symbols
    train, valid = _stream(tiny, "train"), _stream(tiny, "valid")
    checked = 0
    for t in whole["doc"]["tokens"]:
        assert t["token"] == sym[valid[t["position"]]]
        assert 0 < len(t["neighbors"]) <= 4
        assert [nb["rank"] for nb in t["neighbors"]] == list(range(1, len(t["neighbors"]) + 1))
        assert all(nb["match"] for nb in t["target_neighbors"])
        assert sum(nb["match"] for nb in t["neighbors"]) <= t["n_target_neighbors"]
        for nb in t["neighbors"] + t["target_neighbors"]:
            r = nb["row"]
            assert nb["token_id"] == int(ds.vals[r, 0]) and nb["token"] == sym[ds.vals[r, 0]]
            p = int(ds.pos[r])
            assert nb["position"] == p
            before = [sym[i] for i in train[max(0, p - 20):p]]
            assert nb["context"].split() == before
            assert nb["match"] == (nb["token_id"] == t["token_id"])
            checked += 1
    assert checked > 1000


def test_start_length_scores_only_the_blocks_needed(tiny, dstore, whole, capsys):
    doc = whole["doc"]
    out = whole["dir"] / "part.json"
    assert cli_main(_explain_args(tiny, dstore, "valid", "--start", "300", "--length", "25",
                                  "--json", str(out))) == 0
    part = json.loads(out.read_text())
    assert [t["position"] for t in part["tokens"]] == list(range(300, 325))
    assert part["scored_tokens"] < doc["n_tokens"] // 4  # not the whole pass
    for a, b in zip(part["tokens"], doc["tokens"][300:325]):
        assert a["token"] == b["token"]
        for key in ("lm_logp", "knn_logp", "logp"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["position"], key)
        assert [n["row"] for n in a["neighbors"][:4]] == [n["row"] for n in b["neighbors"]]
    table = capsys.readouterr().out
    assert "valid positions 300-324 (25 tokens)" in table


def test_text_is_binarized_like_preprocess(tiny, dstore, whole, tmp_path):
    out = tmp_path / "text.json"
    assert cli_main(_explain_args(tiny, dstore, "valid", "--text-file",
                                  str(tiny["raw"] / "valid.txt"), "--json", str(out),
                                  "--top", "4")) == 0
    doc, ref = json.loads(out.read_text()), whole["doc"]
    assert doc["subset"] == "--text" and doc["text"]["unknown"] == 0
    assert doc["n_tokens"] == ref["n_tokens"]
    assert [t["token"] for t in doc["tokens"]] == [t["token"] for t in ref["tokens"]]
    np.testing.assert_allclose([t["logp"] for t in doc["tokens"]],
                               [t["logp"] for t in ref["tokens"]], atol=1e-6)
    # any sentence: unknown words are <unk>, each line ends with </s>
    words = (tiny["raw"] / "train.txt").read_text().split()[:5]
    assert cli_main(_explain_args(tiny, dstore, "valid", "--text",
                                  " ".join(words) + " zzz", "--json", str(out))) == 0
    doc = json.loads(out.read_text())
    assert [t["token"] for t in doc["tokens"]] == [*words, "<unk>", "</s>"]
    assert doc["text"] == {"lines": 1, "tokens": 7, "unknown": 1}
    assert all(t["neighbors"] and t["neighbors"][0]["context"] for t in doc["tokens"][1:])


def test_context_unavailable_without_the_datastore_split(tiny, dstore, tmp_path):
    data = tmp_path / "bin"
    data.mkdir()
    for f in ("dict.txt", "valid.bin", "valid.idx"):
        shutil.copy(tiny["data"] / f, data / f)
    args = _explain_args(tiny, dstore, "valid", "--start", "0", "--length", "5", "--json",
                         str(tmp_path / "x.json"))
    args[0] = str(data)
    assert cli_main(args) == 0
    doc = json.loads((tmp_path / "x.json").read_text())
    note = f"training context unavailable: {data / 'train'} not found"
    assert doc["context_note"] == note
    assert {nb["context"] for t in doc["tokens"] for nb in t["neighbors"]} == {note}


def test_user_errors_are_one_line(tiny, dstore, tmp_path, capsys):
    assert cli_main(_explain_args(tiny, dstore, "valid", "--start", "1000000")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"knnlm-explain: error: --start 1000000 is past the end of valid "
                        r"\(\d+ tokens\)", err), err
    assert cli_main(_explain_args(tiny, dstore, "valid", "--text-file",
                                  str(tmp_path / "none.txt"))) == 2
    assert "--text-file" in capsys.readouterr().err
    assert cli_main(_explain_args(tiny, dstore, "valid", "--top", "0")) == 2
    assert "--top must be >= 1" in capsys.readouterr().err
    assert cli_main(_explain_args(tiny, tmp_path / "nope", "valid")) == 2
    assert f"no datastore at {tmp_path / 'nope'}" in capsys.readouterr().err


def test_aggregate_buckets_cover_every_token(tiny, whole):
    agg, n = whole["doc"]["aggregate"], whole["doc"]["n_tokens"]
    for rows in (agg["by_frequency"], agg["by_ngram"]):
        assert sum(r["tokens"] for r in rows) == n
        assert sum(r["gain_share"] or 0 for r in rows) == pytest.approx(1.0, abs=1e-9)
    assert agg["train_tokens"] == len(_stream(tiny, "train"))
    assert (whole["dir"] / "agg.png").stat().st_size > 10_000


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(chromium() is None, reason="no chromium (apt-get install chromium)")
def test_html_loads_in_headless_chromium(whole):
    page = whole["dir"] / "v.html"
    p = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                        "--enable-logging=stderr", "--v=0", "--dump-dom",
                        f"{page.as_uri()}#selftest"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    console = [ln for ln in p.stderr.splitlines() if ":CONSOLE" in ln]
    assert not console, console  # the page logs nothing: any console line is an error
    body = re.search(r"<body[^>]*>", p.stdout).group(0)
    assert f'data-ready="{whole["doc"]["n_tokens"]}"' in body, body
    assert 'data-selftest="ok"' in body and "data-errors" not in body, body
    assert p.stdout.count('class="nb"') >= 4  # the selected token's neighbours are shown

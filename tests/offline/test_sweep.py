"""Offline sweeps (sweep.py, cli/sweep.py) against online computations with plain
numpy/faiss/torch: the k axis reproduces online --k k' runs on an IVFPQ index, -1 slots,
the exact-l2 selection, sharded neighbour files, and perplexity as eval-lm reports it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fairseq_knnlm.errors import FlagError
from fairseq_knnlm.offline.neighbours import (
    NeighborsError,
    NeighborWriter,
    load_neighbors,
    write_neighbors_manifest,
)
from fairseq_knnlm.offline.sweep import knn_logp_for_ks, ppl_from_nll, selection_order, sweep
from fairseq_knnlm.scoring.knn import KNN_LOGP_FLOOR, interpolate, knn_log_prob, recompute_distances

K = 32
KS = (1, 2, 3, 5, 8, 16, 32)


def _clustered(n: int, d: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    return (centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, d))
            ).astype(np.float32)


@pytest.fixture(scope="module")
def ivfpq():
    """An IVFPQ index over clustered synthetic keys (its order differs from exact L2), probed
    narrowly enough that some queries get fewer than K results (-1 ids), and one pass's
    retrieval saved with NeighborWriter exactly as runtime.py saves it."""
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    d, n_keys, n_q = 16, 3000, 400
    centres = rng.standard_normal((20, d)).astype(np.float32) * 3
    keys = _clustered(n_keys, d, rng, centres)
    keys[100:110] = keys[100]  # duplicates: tied distances
    vals = rng.integers(0, 12, n_keys)  # few types: targets often among the neighbours
    q = _clustered(n_q, d, rng, centres)
    q[:3] = keys[100]
    targets = rng.integers(0, 12, n_q)
    lm = np.log(rng.uniform(0.01, 0.5, n_q)).astype(np.float32)
    index = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, 64, 4, 6)
    index.train(keys)
    index.add(keys)
    index.nprobe = 2
    return {"index": index, "keys": keys, "vals": vals, "q": q, "targets": targets, "lm": lm}


def _retrieve(s: dict, k: int) -> tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]:
    """What KNNRetriever.retrieve does: search with k, exact L2 for the ids found."""
    fd, ids = s["index"].search(s["q"], k)
    l2 = recompute_distances(torch.from_numpy(s["q"]), ids, s["keys"], "l2")
    valid = torch.from_numpy(ids >= 0)
    vals = torch.from_numpy(s["vals"][np.where(ids >= 0, ids, 0)]).masked_fill(~valid, -1)
    return fd, ids, l2, vals


def _online_ppl(s: dict, k: int, dist: str, temperature: float, lmbda: float) -> float:
    """An online --k k run: FAISS's top-k, the chosen distance, Eq. 2, Eq. 3 (torch)."""
    fd, ids, l2, vals = _retrieve(s, k)
    valid = torch.from_numpy(ids >= 0)
    dists = l2 if dist == "l2" else torch.from_numpy(np.where(ids >= 0, fd, np.inf))
    knn = knn_log_prob(dists.float(), vals, torch.from_numpy(s["targets"]), temperature, valid)
    lp = interpolate(torch.from_numpy(s["lm"]), knn, lmbda)
    return ppl_from_nll(-float(lp.double().mean()))


@pytest.fixture(scope="module")
def saved(ivfpq, tmp_path_factory):
    s = ivfpq
    fd, ids, l2, vals = _retrieve(s, K)
    prefix = tmp_path_factory.mktemp("nbrs") / "valid"
    w = NeighborWriter(prefix, K, with_l2=True, with_cache=False)
    for a in range(0, len(ids), 128):  # batch by batch, as eval-lm does
        b = a + 128
        w.add(targets=s["targets"][a:b].astype(np.int32), lm_logp=s["lm"][a:b], ids=ids[a:b],
              faiss_dists=fd[a:b],
              match=(vals[a:b].numpy() == s["targets"][a:b, None]).astype(np.uint8),
              l2_dists=l2[a:b].numpy())
    w.finish(probe=2, subset="valid")
    return prefix


def test_the_ivfpq_setup_exercises_what_it_must(ivfpq, saved):
    """Premises: some rows have -1 ids, FAISS's order is not exact L2's, and FAISS's top-k'
    for k' < K are the first k' columns of the top-K (ties included)."""
    nb = load_neighbors(saved)
    ids, l2 = np.asarray(nb.arrays["ids"]), np.asarray(nb.arrays["l2_dists"])
    assert (ids < 0).any() and (ids[ids < 0].size < ids.size // 4)
    assert all(np.all(ids[r][ids[r] < 0] == -1) and np.all(np.diff((ids[r] < 0).astype(int)) >= 0)
               for r in range(len(ids)))  # -1 only at the end
    by_l2 = selection_order(ids, l2, "exact-l2")
    assert (by_l2 != np.arange(K)).any(axis=1).mean() > 0.5
    for kk in KS:
        _, ids_k = ivfpq["index"].search(ivfpq["q"], kk)
        assert np.array_equal(ids_k, ids[:, :kk])


@pytest.mark.parametrize("dist", ["l2", "faiss_l2"])
def test_sweep_k_axis_reproduces_online_runs(ivfpq, saved, dist):
    nb = load_neighbors(saved)
    rows = sweep(nb, lambdas=[0.25, 0.7], ks=KS, temperatures=[1.0, 5.0], dist=dist)
    assert len(rows) == len(KS) * 4
    for r in rows:
        assert r["k_select"] == "faiss" and r["dist"] == dist
        online = _online_ppl(ivfpq, r["k"], dist, r["temperature"], r["lambda"])
        assert r["ppl"] == pytest.approx(online, rel=1e-6), r


def test_exact_l2_selection_is_the_other_one(ivfpq, saved):
    """The old behaviour (k' nearest by exact L2 of the saved K), only under its own name: it
    equals the default at k' = K and misses online runs at k' < K (so the test above can
    fail)."""
    nb = load_neighbors(saved)
    ex = {r["k"]: r for r in sweep(nb, [0.25], KS, [1.0], "l2", k_select="exact-l2")}
    fa = {r["k"]: r for r in sweep(nb, [0.25], KS, [1.0], "l2")}
    assert all(r["k_select"] == "exact-l2" for r in ex.values())
    assert ex[K]["ppl"] == pytest.approx(fa[K]["ppl"], rel=1e-12)
    online = {kk: _online_ppl(ivfpq, kk, "l2", 1.0, 0.25) for kk in KS}
    off = [kk for kk in KS[:-1] if abs(ex[kk]["ppl"] / online[kk] - 1) > 1e-3]
    assert len(off) >= 3, {kk: (ex[kk]["ppl"], online[kk]) for kk in KS}
    # by hand: sort by exact L2, keep k', score
    l2 = np.asarray(nb.arrays["l2_dists"], dtype=np.float64)
    ids = np.asarray(nb.arrays["ids"])
    d = np.sort(np.where(ids >= 0, l2, np.inf), axis=1)[:, :5]
    order = np.argsort(np.where(ids >= 0, l2, np.inf), axis=1, kind="stable")[:, :5]
    m = np.take_along_axis(np.asarray(nb.arrays["match"]).astype(bool), order, axis=1)
    w = np.exp(-d)
    p = np.where(m.any(1), np.log((w * m).sum(1) / w.sum(1)), KNN_LOGP_FLOOR)
    lp = np.logaddexp(ivfpq["lm"] + math.log(0.75), p + math.log(0.25))
    assert ex[5]["ppl"] == pytest.approx(math.exp(-lp.mean()), rel=1e-6)


def test_l2_in_faiss_order_equals_knn_log_prob_with_missing_slots():
    """sweep's maths on the same (n, k) inputs as knn.knn_log_prob, -1 slots anywhere (moved
    last by the selection), rows without any neighbour or without a match."""
    rng = np.random.default_rng(5)
    n, k = 300, 12
    ids = rng.integers(0, 1000, (n, k))
    ids[rng.random((n, k)) < 0.2] = -1
    ids[7] = -1
    d = rng.uniform(0, 40, (n, k)).astype(np.float32)
    vals = rng.integers(0, 6, (n, k))
    tg = rng.integers(0, 6, n)
    vals[9] = (tg[9] + 1) % 6  # no match
    match = (vals == tg[:, None]) & (ids >= 0)
    order = selection_order(ids, d, "faiss")
    assert (np.diff((np.take_along_axis(ids, order, 1) < 0).astype(int), axis=1)
            >= 0).all()
    dd = np.take_along_axis(np.where(ids >= 0, d, np.inf), order, 1)
    mm = np.take_along_axis(match, order, 1)
    for T in (1.0, 3.0, 0.3):
        got = knn_logp_for_ks(dd, mm, [k], T)[k]
        ref = knn_log_prob(torch.from_numpy(d), torch.from_numpy(vals), torch.from_numpy(tg),
                           T, torch.from_numpy(ids >= 0)).double().numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-5)
        assert got[7] == KNN_LOGP_FLOOR and got[9] == KNN_LOGP_FLOOR
    # a stale match flag on a -1 slot is never counted
    bad = mm.copy()
    bad[7] = True
    assert knn_logp_for_ks(dd, bad, [k], 1.0)[k][7] == KNN_LOGP_FLOOR


def test_ppl_from_nll_is_eval_lm_perplexity():
    """eval-lm: loss = -score_sum / count / ln 2 with score_sum a float32 tensor, perplexity
    2**loss (fairseq_cli/eval_lm.py): inf past float32's range, where math.exp is not yet."""
    for mean_nll in (0.5, 3.0, 50.0, 88.0, 88.6, 88.8, 100.0, 500.0, 700.0, 710.0, 5000.0):
        count = 1000
        score_sum = torch.tensor(0.0) + torch.full((count,), -mean_nll).sum()
        loss = -score_sum / count / math.log(2)
        ev = float(2 ** loss)
        ours = ppl_from_nll(mean_nll)
        assert (math.isinf(ev) and math.isinf(ours)) or ours == pytest.approx(ev, rel=1e-5), \
            (mean_nll, ev, ours)
    assert math.isinf(ppl_from_nll(100.0))  # the old exp-until-709 gave 2.7e43 here


def test_lambda_one_row_has_finite_loss_and_eval_lm_perplexity(saved):
    nb = load_neighbors(saved)
    rows = {(r["k"], r["lambda"]): r for r in sweep(nb, [0.0, 1.0], [1, K], [1.0])}
    missing = float(np.mean(~np.asarray(nb.arrays["match"])[:, :1].any(1)))
    assert missing > 0.01  # enough floor hits to overflow float32's perplexity
    r = rows[(1, 1.0)]
    assert math.isinf(r["ppl"]) and math.isfinite(r["loss"])
    assert r["loss"] > -KNN_LOGP_FLOOR * missing / math.log(2) * 0.99
    b = rows[(1, 0.0)]
    assert b["ppl"] == pytest.approx(2 ** b["loss"], rel=1e-9)


# ---- sharded passes ----

def _write(prefix, rng, n, k=8, with_l2=True, **meta):
    arrays = dict(targets=rng.integers(0, 5, n).astype(np.int32),
                  lm_logp=np.log(rng.uniform(0.05, 0.9, n)).astype(np.float32),
                  ids=np.sort(rng.integers(0, 500, (n, k)), axis=1),
                  faiss_dists=np.sort(rng.uniform(0, 9, (n, k)).astype(np.float32), axis=1),
                  match=(rng.random((n, k)) < 0.3).astype(np.uint8))
    if with_l2:
        arrays["l2_dists"] = rng.uniform(0, 9, (n, k)).astype(np.float32)
    w = NeighborWriter(prefix, k, with_l2=with_l2, with_cache=False)
    w.add(**arrays)
    w.finish(probe=8, subset="valid", **meta)
    return arrays


def _sharded(tmp_path, sizes=(50, 0, 33), k=8):
    rng = np.random.default_rng(2)
    base = tmp_path / "nbrs" / "valid"
    n = len(sizes)
    parts = [_write(f"{base}_shard{i}of{n}", rng, m, k) for i, m in enumerate(sizes)]
    man = {"num_shards": n, "n": sum(sizes), "k": k,
           "shards": [{"prefix": f"valid_shard{i}of{n}", "n": m} for i, m in enumerate(sizes)]}
    (tmp_path / "nbrs" / "valid_manifest.json").write_text(json.dumps(man))
    return base, parts


def test_sharded_pass_loads_as_one(tmp_path):
    base, parts = _sharded(tmp_path)
    nb = load_neighbors(base)
    assert nb.n == 83 and nb.meta["k"] == 8 and nb.meta["num_shards"] == 3
    for name in parts[0]:
        whole = np.concatenate([p[name] for p in parts])
        assert np.array_equal(np.asarray(nb.arrays[name]), whole), name
        assert np.array_equal(nb.arrays[name][40:60], whole[40:60])  # across shards
    # the sweep reads it in chunks that straddle shards; same rows as one plain file
    plain = tmp_path / "plain"
    w = NeighborWriter(plain, 8, with_l2=True, with_cache=False)
    w.add(**{name: np.concatenate([p[name] for p in parts]) for name in parts[0]})
    w.finish()
    one = load_neighbors(plain)
    for sel in ("faiss", "exact-l2"):
        a = sweep(nb, [0.3], [2, 8], [2.0], k_select=sel, chunk=17)
        b = sweep(one, [0.3], [2, 8], [2.0], k_select=sel)
        assert [r["ppl"] for r in a] == pytest.approx([r["ppl"] for r in b], rel=1e-12)
    # the helper writes the same manifest
    (tmp_path / "nbrs" / "valid_manifest.json").unlink()
    assert write_neighbors_manifest(base, 3) == {
        "num_shards": 3, "n": 83, "k": 8,
        "shards": [{"prefix": f"valid_shard{i}of3", "n": m} for i, m in enumerate((50, 0, 33))]}
    assert load_neighbors(base).n == 83


def test_sharded_pass_errors(tmp_path):
    base, _ = _sharded(tmp_path)
    mp = tmp_path / "nbrs" / "valid_manifest.json"
    man = json.loads(mp.read_text())
    mp.write_text(json.dumps({**man, "k": 16}))
    with pytest.raises(NeighborsError, match=r"shard 0 of 3 .* k=8, .* says k=16"):
        load_neighbors(base)
    bad = json.loads(json.dumps(man))
    bad["shards"][2]["n"] = 30
    bad["n"] = 80
    mp.write_text(json.dumps(bad))
    with pytest.raises(NeighborsError, match="shard 2 of 3 .* has 33 rows, .* says 30"):
        load_neighbors(base)
    mp.write_text(json.dumps(man))
    (tmp_path / "nbrs" / "valid_shard1of3_meta.json").unlink()
    with pytest.raises(NeighborsError, match="shard 1 of 3 is missing"):
        load_neighbors(base)
    assert write_neighbors_manifest(base, 3) is None  # not finished: no manifest yet
    mp.unlink()
    with pytest.raises(NeighborsError, match="the sharded pass has not finished: manifest "
                                             "missing"):
        load_neighbors(base)
    with pytest.raises(NeighborsError, match="no finished neighbour file"):
        load_neighbors(tmp_path / "nbrs" / "test")


def test_sharded_shards_must_agree(tmp_path):
    rng = np.random.default_rng(3)
    base = tmp_path / "valid"
    _write(f"{base}_shard0of2", rng, 5, k=8)
    _write(f"{base}_shard1of2", rng, 5, k=4)
    with pytest.raises(NeighborsError, match="different k"):
        write_neighbors_manifest(base, 2)
    _write(f"{base}_shard1of2", rng, 5, k=8, with_l2=False)
    write_neighbors_manifest(base, 2)
    with pytest.raises(NeighborsError, match="disagrees with shard 0: arrays"):
        load_neighbors(base)
    # a plain pass at the same prefix replaces the sharded one (its writer drops the manifest)
    _write(base, rng, 4)
    assert load_neighbors(base).n == 4


def test_plain_and_manifest_together_is_an_error(tmp_path):
    base, _ = _sharded(tmp_path)
    _write(base, np.random.default_rng(0), 3)  # drops the manifest
    assert load_neighbors(base).n == 3
    _sharded(tmp_path)  # a later sharded pass writes a manifest next to the plain meta
    with pytest.raises(NeighborsError, match="both .* exist"):
        load_neighbors(base)


def test_truncated_array_is_a_one_line_error(tmp_path):
    _write(tmp_path / "v", np.random.default_rng(0), 10)
    with open(tmp_path / "v_ids.npy", "r+b") as f:
        f.truncate(100)
    with pytest.raises(NeighborsError, match="v_ids.npy: 100 bytes"):
        load_neighbors(tmp_path / "v")


def test_sweep_flag_checks(tmp_path):
    _write(tmp_path / "v", np.random.default_rng(0), 10, with_l2=False)
    nb = load_neighbors(tmp_path / "v")
    with pytest.raises(FlagError, match="--ks"):
        sweep(nb, [0.1], [16], [1.0], dist="faiss_l2")
    with pytest.raises(FlagError, match="--dists l2: .* no l2_dists"):
        sweep(nb, [0.1], [4], [1.0], dist="l2")
    with pytest.raises(FlagError, match="--k-select exact-l2 needs exact distances"):
        sweep(nb, [0.1], [4], [1.0], dist="faiss_l2", k_select="exact-l2")
    with pytest.raises(FlagError, match="--k-select must be one of"):
        sweep(nb, [0.1], [4], [1.0], dist="faiss_l2", k_select="nearest")
    with pytest.raises(FlagError, match="--cache-lambdas"):
        sweep(nb, [0.1], [4], [1.0], dist="faiss_l2", cache_lambdas=[0.2])


def test_cli_records_selection_and_reports_errors(tmp_path, capsys):
    from fairseq_knnlm.cli.sweep import cli_main

    base, _ = _sharded(tmp_path)
    js = tmp_path / "s.json"
    assert cli_main([str(base), "--lambdas", "0,0.3", "--temps", "1,2", "--dists",
                     "l2,faiss_l2", "--k-select", "faiss,exact-l2", "--json", str(js),
                     "--plot-dir", str(tmp_path / "plots")]) == 0
    out = json.loads(js.read_text())
    assert out["n_tokens"] == 83 and out["k_selects"] == ["exact-l2", "faiss"]
    assert {(r["dist"], r["k_select"]) for r in out["rows"]} == {
        (d, s) for d in ("l2", "faiss_l2") for s in ("faiss", "exact-l2")}
    assert {r["k"] for r in out["rows"]} == {1, 2, 4, 8}
    assert set(out["best_per_k_select"]) == {"faiss", "exact-l2"}
    assert (tmp_path / "plots" / "ppl_vs_k.png").stat().st_size > 1000
    assert "k-select" in capsys.readouterr().out
    # rows of a --json from before --k-select get the selection they were made with
    for r in out["rows"]:
        r.pop("k_select")
    js.write_text(json.dumps(out))
    assert cli_main(["--from-json", str(js), "--plot-dir", str(tmp_path / "p2")]) == 0
    # user errors: one line, exit 2, nothing written
    capsys.readouterr()
    assert cli_main([str(base), "--ks", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("knnlm-sweep: error: --ks") and "\n" not in err
    assert cli_main([str(tmp_path / "nope")]) == 2
    assert "no finished neighbour file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main([str(base), "--k-select", "nearest"])


# ---- through fairseq-eval-lm (the tiny LM of conftest.py) ----

def test_eval_lm_runs_match_the_sweep_on_ivfpq(tiny, dstore):
    """One saved --k 32 pass on an IVFPQ index; online --k 4 and --k 16 runs equal the sweep at
    those k (default selection); at --lmbda 1 the sweep row is inf and eval-lm stops."""
    from conftest import eval_args, eval_lm_inprocess

    from fairseq_knnlm.index.build import build_index
    from fairseq_knnlm.index.kinds import IndexSettings

    index = f"{dstore}.ivfpq_sweep"
    build_index(dstore, index, IndexSettings(index_type="ivfpq", ncentroids=16, code_size=8),
                progress=False)

    def run(*flags: str) -> dict:
        return eval_lm_inprocess(eval_args(tiny, "test", "--knnlm", "--dstore-filename",
                                           str(dstore), "--indexfile", index, "--probe", "2",
                                           "--knn-temp", "3", *flags))

    out = tiny["dir"] / "nbrs_ivfpq" / "test"
    run("--k", "32", "--lmbda", "0.25", "--knn-save-neighbors", str(out))
    nb = load_neighbors(out)
    rows = sweep(nb, [0.25, 1.0], [4, 16, 32], [3.0])
    by = {(r["k"], r["lambda"]): r for r in rows}
    exact = {r["k"]: r["ppl"] for r in sweep(nb, [0.25], [4, 16], [3.0], k_select="exact-l2")}
    for kk in (4, 16):
        res = run("--k", str(kk), "--lmbda", "0.25")
        assert by[(kk, 0.25)]["ppl"] == pytest.approx(2 ** res["loss"], rel=1e-4)
        assert by[(kk, 0.25)]["loss"] == pytest.approx(res["loss"], rel=1e-5)
        exact[kk] /= 2 ** res["loss"]
    assert any(abs(v - 1) > 1e-3 for v in exact.values()), exact  # IVFPQ order != exact L2
    # --lmbda 1: a target missing from its 4 neighbours has p = 0; the sweep reports the
    # row (inf), eval-lm stops at that token with one line instead of printing inf
    from fairseq_knnlm.scoring.finite import NonFiniteScore

    r = by[(4, 1.0)]
    assert math.isinf(r["ppl"])
    with pytest.raises(NonFiniteScore, match=r"lambda = 1 \(--lmbda 1\) gives p_LM no weight"):
        run("--k", "4", "--lmbda", "1")

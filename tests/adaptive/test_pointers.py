"""Pointers (pointers.py, RetoMaton-style): successor logic, streams in lockstep, the
search policy, the eval-lm wiring (threshold above k = plain kNN-LM, pointers follow the
text across batches and context windows, the searches line) and the offline replay
(knnlm-sweep --pointer-thresholds) against online runs.

Run: python -m pytest -q tests/adaptive/test_pointers.py
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import eval_args, eval_lm_inprocess, searches_logged

from fairseq_knnlm.adaptive.pointers import (
    POINTERS,
    SEARCH,
    SKIP,
    CarriedPointers,
    Clusters,
    MinPointers,
    chains,
    compact,
    count_modes,
    nearest_first,
    next_pointers,
    run_streams,
    searches_line,
    split_streams,
    stream_continues,
    successors,
)
from fairseq_knnlm.errors import FlagError
from fairseq_knnlm.offline.sweep import replay_pieces
from fairseq_knnlm.scoring.knn import recompute_distances

# ---- plain functions ----


def test_stream_continues_only_between_consecutive_positions():
    pos = np.array([0, 1, 2, 10, 11, 5, -1, 0, 7, 8])
    want = [True, True, False, True, False, False, False, False, True, False]
    assert stream_continues(pos).tolist() == want
    assert stream_continues(pos, chunk=3).tolist() == want  # chunk edges change nothing
    assert stream_continues(np.array([4])).tolist() == [False]


def test_successors_drop_rows_that_start_another_stream():
    cont = stream_continues(np.array([0, 1, 2, 10, 11, 5]))
    ids = np.array([[0, 1, 2, 3, -1, 4, 5]])
    # 2 -> 3 jumps from position 2 to 10; 4 -> 5 from 11 to 5; 5 is the last row
    assert successors(ids, cont).tolist() == [[1, 2, -1, 4, -1, -1, -1]]


def test_next_pointers_keep_only_neighbours_whose_value_was_seen():
    cont = np.ones(10, dtype=bool)
    ids = np.array([[3, 5, 7, -1], [1, 2, 3, 4]])
    vals = np.array([[9, 4, 9, 9], [0, 0, 0, 0]])
    got = next_pointers(ids, vals, np.array([9, 1]), cont)
    assert got.tolist() == [[4, -1, 8, -1], [-1, -1, -1, -1]]  # the -1 slot never matches


def test_compact_and_nearest_first():
    p = np.array([[-1, 4, -1, 2], [-1, -1, -1, -1], [7, 8, 9, -1]])
    assert compact(p).tolist() == [[4, 2, -1], [-1, -1, -1], [7, 8, 9]]
    ids, d = nearest_first(np.array([[4, 2, -1], [7, 8, 9]]),
                           torch.tensor([[3.0, 1.0, float("inf")], [2.0, 2.0, 0.5]]), k=2)
    assert ids.tolist() == [[2, 4], [9, 7]]  # ties keep their order (7 before 8)
    assert d.tolist() == [[1.0, 3.0], [0.5, 2.0]]


def test_min_pointers_policy():
    c = np.array([0, 1, 3, 64, 65])
    assert MinPointers(64).decide(c, torch.zeros(5, 2)).tolist() == [0, 0, 0, 1, 1]
    # 0 and 1 both mean "pointers whenever there is one": never an empty neighbour set
    assert MinPointers(0).decide(c, torch.zeros(5, 2)).tolist() == [0, 1, 1, 1, 1]
    assert MinPointers(1).decide(c, torch.zeros(5, 2)).tolist() == [0, 1, 1, 1, 1]


def test_carried_pointers_follow_positions_of_the_last_batch_only():
    cp = CarriedPointers()
    assert cp.take(np.array([0, 5])) == [None, None]
    cp.keep(np.array([4, 9, -1]), [np.array([1]), np.array([2]), np.array([3])])
    got = cp.take(np.array([10, 5, 6, -1]))
    assert got[0].tolist() == [2] and got[1].tolist() == [1] and got[2] is None
    assert got[3] is None
    cp.keep(np.array([19]), [np.array([8])])  # a later batch: the older entries are gone
    assert cp.take(np.array([10, 20]))[0] is None


def test_chains_and_replay_pieces():
    fresh = np.array([0, 0, 1, 0, 0, 0, 1, 1, 0])
    s, n = chains(fresh)
    assert s.tolist() == [0, 2, 6, 7] and n.tolist() == [2, 4, 1, 2]
    pieces = replay_pieces(fresh, budget=3)
    # [0,2) alone (the next chain does not fit), [2,6) cut in 3 + 1 continuing, [6,9) grouped
    assert [(lo, hi, st.tolist(), ln.tolist(), c) for lo, hi, st, ln, c in pieces] == [
        (0, 2, [0], [2], False), (2, 5, [0], [3], False), (5, 6, [0], [1], True),
        (6, 9, [0, 1], [1, 2], False)]


def test_searches_line_and_counts():
    assert searches_line(20, 100) == "kNN-LM searches: 20 of 100 tokens (20.0%)"
    assert count_modes(np.array([0, 1, 1, 2], dtype=np.int8)) == {
        "search": 1, "pointers": 2, "skip": 1}


def test_clusters_expand_pointers_to_their_members():
    assign = np.array([0, 1, 0, 2, 1, 0, 2, 0])
    # rows grouped by cluster, nearest to the centroid first: 0: 5,0,2,7  1: 4,1  2: 3,6
    order = np.array([5, 0, 2, 7, 4, 1, 3, 6])
    c = Clusters(assign, order, 3, per_cluster=3, limit=6)
    assert c.members(0).tolist() == [5, 0, 2] and c.members(1).tolist() == [4, 1]
    got = c.expand(np.array([[1, 2, -1], [-1, -1, -1], [6, -1, -1]]))
    # row 0: its pointers, then cluster 1's and cluster 0's members, no duplicates, <= 6
    assert got.tolist() == [[1, 2, 4, 5, 0], [-1] * 5, [6, 3, -1, -1, -1]]
    assert Clusters(assign, order, 3, limit=2).expand(np.array([[1, 2]])).tolist() == [[1, 2]]


def test_compiled_expand_equals_the_per_row_definition():
    """Clusters.expand_live (compiled, over run_streams' compacted pointers) =
    Clusters.expand, the per-row definition, on random clusterings
    (small and large clusters, limits below and above the pointers, empty rows)."""
    rng = np.random.default_rng(3)
    for n, num, per, limit in ((500, 7, 128, 64), (3000, 300, 3, 50), (3000, 40, 128, 2048),
                               (2000, 2000, 1, 20)):
        assign = rng.integers(0, num, n)
        order = np.argsort(assign, kind="stable")
        c = Clusters(assign, order, num, per_cluster=per, limit=limit)
        for _ in range(25):
            u, w = int(rng.integers(0, 30)), int(rng.integers(1, 200))
            ptrs = np.full((u, w), -1)
            for i in range(u):
                m = int(rng.integers(0, w + 1))
                ptrs[i, :m] = rng.choice(n, m, replace=False)
                rng.shuffle(ptrs[i])
            live, nlive = compact(ptrs), (ptrs >= 0).sum(axis=1)
            streams = np.arange(u)
            a, b = c.expand_live(streams, live, nlive), c.expand(ptrs)
            assert a.shape == b.shape and (a == b).all()
            # the policy's counts, without building the candidates
            assert (c.count_live(streams, live, nlive).tolist()
                    == (b >= 0).sum(axis=1).tolist())


def test_split_streams_cuts_rows_and_marks_their_first_stream():
    starts, lengths, first = split_streams([10, 0, 7, 4], 4)
    assert starts.tolist() == [0, 4, 8, 10, 10, 14, 17]
    assert lengths.tolist() == [4, 4, 2, 0, 4, 3, 4]
    assert first.tolist() == [True, False, False, True, True, False, True]
    starts, lengths, first = split_streams([10, 0, 7], 0)  # 0: a row is one stream
    assert starts.tolist() == [0, 10, 10] and lengths.tolist() == [10, 0, 7] and first.all()


# ---- run_streams on a synthetic datastore ----

@pytest.fixture(scope="module")
def synth():
    """A datastore of two dumped streams (positions 0..299 and 1000..1199) whose keys are
    random, and a brute-force exact search over them."""
    rng = np.random.default_rng(0)
    n, d = 500, 8
    keys = rng.standard_normal((n, d)).astype(np.float32)
    vals = rng.integers(0, 6, n)
    pos = np.concatenate([np.arange(300), 1000 + np.arange(200)])
    return {"keys": keys, "vals": vals, "pos": pos, "cont": stream_continues(pos)}


def _brute(s, q: torch.Tensor, k: int):
    def search(idx):
        d = ((q[idx].numpy()[:, None] - s["keys"][None]) ** 2).sum(-1)
        ids = np.argsort(d, axis=1, kind="stable")[:, :k]
        l2 = recompute_distances(q[torch.from_numpy(idx)], ids, s["keys"])
        return ids, np.take_along_axis(d, ids, 1).astype(np.float32), l2

    def dist(idx, ids):
        return recompute_distances(q[torch.from_numpy(idx)], ids, s["keys"])

    return search, dist


def _run(s, q, targets, starts, lengths, k, policy, init=None):
    search, dist = _brute(s, q, k)
    init = init if init is not None else [None] * len(starts)
    return run_streams(starts, lengths, init, targets, lambda i: q[torch.from_numpy(i)], search,
                       dist, s["vals"], s["cont"], k, policy)


def test_threshold_above_k_searches_every_token(synth):
    q = torch.from_numpy(synth["keys"][:40] + 0.1)
    tg = synth["vals"][:40]
    res = _run(synth, q, tg, [0, 20], [20, 20], 5, MinPointers(6))
    assert (res.modes == SEARCH).all()
    ids, _, l2 = _brute(synth, q, 5)[0](np.arange(40))
    assert np.array_equal(res.ids, ids) and torch.equal(res.dists, l2)


def test_pointers_follow_the_datastore_stream_and_stop_at_its_end(synth):
    """Queries = the datastore's own keys along stream 1 (rows 290..309 cross the boundary
    into stream 2 at row 300): after one search every token is scored from pointers holding
    its own row, until the stream ends; row 300 must then be searched (299 -> 300 jumps)."""
    rows = np.arange(290, 310)
    q = torch.from_numpy(synth["keys"][rows])
    res = _run(synth, q, synth["vals"][rows], [0], [20], 3, MinPointers(1))
    searched = rows[res.modes == SEARCH].tolist()
    assert searched[:2] == [290, 300]
    for i, r in enumerate(rows):
        if res.modes[i] == POINTERS:
            assert r in res.ids[i].tolist()  # its own row, at distance 0
            assert res.dists[i, 0] == 0 and res.ids[i, 0] == r


def test_stream_results_keep_the_neighbours_values(synth):
    """The values the stepping gathers for the next pointers (StreamResults.vals, which the
    retriever's p_kNN reads instead of gathering again) are the values of the returned ids,
    -1 where there is none: searched, pointer and skipped tokens alike."""
    rng = np.random.default_rng(3)
    rows = np.concatenate([np.arange(280, 320), rng.integers(0, 500, 40)])
    q = torch.from_numpy(synth["keys"][rows] + 0.01)
    tg = synth["vals"][rows]
    skip = np.zeros(len(rows), dtype=bool)
    skip[::7] = True
    search, dist = _brute(synth, q, 4)
    for policy, preset in ((MinPointers(1), None), (MinPointers(3), None),
                           (MinPointers(1), skip)):
        res = run_streams([0, 40], [40, 40], [None, None], tg, lambda i: q[torch.from_numpy(i)],
                          search, dist, synth["vals"], synth["cont"], 4, policy,
                          preset_skip=preset)
        assert {SEARCH, POINTERS} <= set(res.modes.tolist())
        want = np.where(res.ids >= 0, synth["vals"][np.where(res.ids >= 0, res.ids, 0)], -1)
        assert np.array_equal(res.vals, want)


def test_a_gate_skip_leaves_pointer_tokens_their_pointers(synth):
    """A lambda model's gate (preset_skip) decides only the tokens the policy would search:
    a token scored from its pointers keeps them (once it dropped them, and the searches
    they had saved came back later in the stream); a skipped searched token is SKIP."""
    rows = np.arange(10, 40)
    q = torch.from_numpy(synth["keys"][rows])
    tg = synth["vals"][rows]
    search, dist = _brute(synth, q, 3)
    plain = _run(synth, q, tg, [0], [30], 3, MinPointers(1))
    assert plain.modes[0] == SEARCH and (plain.modes[1:] == POINTERS).all()
    every = np.ones(30, dtype=bool)  # the gate would skip every search
    res = run_streams([0], [30], [None], tg, lambda i: q[torch.from_numpy(i)], search, dist,
                      synth["vals"], synth["cont"], 3, MinPointers(1), preset_skip=every)
    assert res.modes.tolist() == [SKIP] * 30  # no search, so no pointers after it
    one = np.zeros(30, dtype=bool)
    one[5:] = True  # the gate skips from token 5 on: tokens 1.. have pointers and keep them
    res = run_streams([0], [30], [None], tg, lambda i: q[torch.from_numpy(i)], search, dist,
                      synth["vals"], synth["cont"], 3, MinPointers(1), preset_skip=one)
    assert np.array_equal(res.modes, plain.modes)
    assert np.array_equal(res.ids, plain.ids) and torch.equal(res.dists, plain.dists)


def test_streams_in_lockstep_equal_streams_one_by_one(synth):
    rng = np.random.default_rng(1)
    rows = np.concatenate([np.arange(10, 60), np.arange(100, 130), np.arange(350, 390)])
    q = torch.from_numpy(synth["keys"][rows] + 0.3 * rng.standard_normal((len(rows), 8))
                         .astype(np.float32))
    tg = np.where(rng.random(len(rows)) < 0.8, synth["vals"][rows], 0)
    starts, lengths = [0, 50, 80], [50, 30, 40]
    both = _run(synth, q, tg, starts, lengths, 6, MinPointers(2))
    assert 0 < (both.modes == POINTERS).sum() < len(rows)
    for s, n in zip(starts, lengths):
        one = _run(synth, q[s:s + n], tg[s:s + n], [0], [n], 6, MinPointers(2))
        assert np.array_equal(both.ids[s:s + n], one.ids)
        assert torch.equal(both.dists[s:s + n], one.dists)
        assert np.array_equal(both.modes[s:s + n], one.modes)
    # a stream continued from carried pointers equals the stream run in one go
    first = _run(synth, q[:20], tg[:20], [0], [20], 6, MinPointers(2))
    rest = _run(synth, q[20:50], tg[20:50], [0], [30], 6, MinPointers(2), init=first.final)
    assert np.array_equal(np.concatenate([first.ids, rest.ids]), both.ids[:50])


class _SkipOdd:
    """A policy as adaptive lambda (#15) would plug in: skip the tokens of every other step,
    pointers for the rest when there are any."""

    def __init__(self):
        self.steps = 0

    def decide(self, n_pointers, queries):
        m = MinPointers(1).decide(n_pointers, queries)
        if self.steps % 2 == 0:
            m[:] = SKIP
        self.steps += 1
        return m


def test_skip_mode_leaves_no_neighbours_and_no_pointers(synth):
    rows = np.arange(0, 30)
    q = torch.from_numpy(synth["keys"][rows])
    res = _run(synth, q, synth["vals"][rows], [0, 15], [15, 15], 4, _SkipOdd())
    skipped = res.modes == SKIP
    assert skipped.sum() == 16  # step 0, 2, ... of both streams
    assert (res.ids[skipped] == -1).all() and torch.isinf(res.dists[skipped]).all()
    assert (res.modes[~skipped] == SEARCH).all()  # a skip drops the pointers: search again


# ---- through fairseq-eval-lm (tiny fixture) ----

def _knn(dstore, *extra: str) -> tuple[str, ...]:
    return ("--knnlm", "--dstore-filename", str(dstore), "--indexfile", f"{dstore}.flat",
            *extra)


def _searches(caplog) -> tuple[int, int]:
    return searches_logged(caplog)


def test_threshold_above_k_equals_plain_knnlm(tiny, dstore, caplog):
    caplog.set_level(logging.INFO, logger="fairseq_knnlm")
    for sim in ("l2", "faiss_l2"):
        knn = _knn(dstore, "--k", "8", "--lmbda", "0.3", "--knn-temp", "2",
                   "--knn-sim-func", sim)
        plain = eval_lm_inprocess(eval_args(tiny, "test", *knn))
        s, n = _searches(caplog)
        assert s == n > 0  # the line is printed without pointers too
        ptr = eval_lm_inprocess(eval_args(tiny, "test", *knn, "--knn-pointers",
                                          "--knn-min-pointers", "9"))
        assert ptr["loss"] == plain["loss"], sim
        assert _searches(caplog) == (n, n)
        low = eval_lm_inprocess(eval_args(tiny, "test", *knn, "--knn-pointers",
                                          "--knn-min-pointers", "1"))
        s, n2 = _searches(caplog)
        assert n2 == n and 0 < s < n and low["loss"] != plain["loss"]


def _self_rows(tiny, dstore, max_tokens: str, caplog) -> tuple[int, int, list]:
    """Score the train split against its own datastore with pointers (k 8, threshold 1)."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from fairseq_knnlm.plugin.eval_lm_patch import knnlm_main

    batches: list = []
    args = eval_args(tiny, "train", *_knn(dstore, "--k", "8", "--knn-pointers",
                                          "--knn-min-pointers", "1"),
                     "--max-tokens", max_tokens)
    a = options.parse_args_and_arch(options.get_eval_lm_parser(), args)
    knnlm_main(convert_namespace_to_omegaconf(a), knn_observers=[batches.append])
    s, n = _searches(caplog)
    return s, n, batches


def test_pointers_follow_the_text_across_batches_and_context_windows(tiny, dstore, caplog):
    """Train split against its own datastore (one stream, positions 0..N-1): the datastore row
    of each token's own position is at distance 0, and its successor is the next token's
    own row. If pointers follow the text, every pointer step holds the token's own row.
    One block per batch (--max-tokens = one block): the state passes from batch to batch,
    so only the very first token is searched. Many blocks per batch: rows of a batch start
    fresh (their previous block is scored in the same step), row 0 continues the previous
    batch: one search per block, less one per batch after the first."""
    from fairseq_knnlm.store.datastore import open_datastore

    caplog.set_level(logging.INFO, logger="fairseq_knnlm")
    row_of = np.empty(open_datastore(dstore).size, dtype=np.int64)
    row_of[np.asarray(open_datastore(dstore).pos)] = np.arange(len(row_of))
    for max_tokens in ("16", "256"):
        s, n, batches = _self_rows(tiny, dstore, max_tokens, caplog)
        blocks = sum(len(np.unique(b.sample_ids)) for b in batches)
        if max_tokens == "16":  # 16 scored tokens per block: one block per batch
            assert all(len(np.unique(b.sample_ids)) == 1 for b in batches)
            assert s == 1
        else:
            assert len(batches) > 1 and blocks > len(batches)
            assert s == blocks - (len(batches) - 1)
        for b in batches:
            r = b.retrieved
            own = row_of[b.positions]
            ptr = r.modes == POINTERS
            # searched or followed, its own row is a neighbour at distance ~0 (the same
            # state, recomputed; duplicated contexts may tie with it)
            mine = (r.ids == own[:, None]) & (r.dists.numpy() < 1e-6)
            assert mine.any(axis=1).all()
            assert ptr.sum() > 0.8 * len(ptr) or len(ptr) < 20


def test_replay_equals_online_runs(tiny, dstore, tmp_path, caplog):
    """knnlm-sweep --pointer-thresholds from one full-search pass equals the online runs with
    those thresholds: same number of searches, same perplexity."""
    from fairseq_knnlm.cli.sweep import cli_main
    from fairseq_knnlm.offline.neighbours import load_neighbors

    caplog.set_level(logging.INFO, logger="fairseq_knnlm")
    knn = _knn(dstore, "--k", "8", "--lmbda", "0.3", "--knn-temp", "2", "--knn-pointers")
    prefix = tmp_path / "nbrs" / "valid"
    full = eval_lm_inprocess(eval_args(tiny, "valid", *knn, "--knn-min-pointers", "9",
                                       "--knn-save-neighbors", str(prefix), "--max-tokens",
                                       "256"))
    nb = load_neighbors(prefix)
    assert {"queries", "modes", "fresh"} <= set(nb.arrays) and nb.meta["dim"] == 32
    assert np.asarray(nb.arrays["fresh"]).sum() > 1  # several streams per pass
    online = {}
    for thr in (1, 4, 9):
        res = eval_lm_inprocess(eval_args(tiny, "valid", *knn, "--knn-min-pointers", str(thr),
                                          "--max-tokens", "256"))
        online[thr] = (res["perplexity"], _searches(caplog)[0])
    assert online[9][0] == pytest.approx(full["perplexity"], rel=1e-6)
    out = tmp_path / "replay.json"
    assert cli_main([str(prefix), "--pointer-thresholds", "1,4,9", "--lambdas", "0.3",
                     "--temps", "2", "--json", str(out), "--plot-dir",
                     str(tmp_path / "plots")]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 3 and (tmp_path / "plots" / "ppl_vs_searches.png").exists()
    for r in rows:
        ppl, searches = online[r["min_pointers"]]
        assert r["searches"] == searches, r
        assert r["ppl"] == pytest.approx(ppl, rel=1e-5), r
    assert rows[0]["searches"] != rows[-1]["searches"]


@pytest.mark.parametrize("clustered", [False, True])
def test_stream_len_online_equals_replay(tiny, dstore, tmp_path, caplog, clustered):
    """--knn-stream-len cuts each row into streams stepped together: each starts fresh (one
    search more per stream, marked in the saved 'fresh' flags), so the replay of a pass saved
    with the same --knn-stream-len equals the online runs; the searches line counts the
    restarts (more searches than one stream per row at the same threshold)."""
    from fairseq_knnlm.cli.clusters import cli_main as clusters_main
    from fairseq_knnlm.cli.sweep import cli_main
    from fairseq_knnlm.offline.neighbours import load_neighbors

    caplog.set_level(logging.INFO, logger="fairseq_knnlm")
    extra: tuple[str, ...] = ()
    sweep_extra: list[str] = []
    if clustered:
        cl = tmp_path / "clusters" / "c40"
        assert clusters_main([str(dstore), str(cl), "--num-clusters", "40", "--niter",
                              "5"]) == 0
        extra, sweep_extra = ("--knn-clusters", str(cl)), ["--clusters", str(cl)]
    knn = _knn(dstore, "--k", "8", "--lmbda", "0.3", "--knn-temp", "2", "--knn-pointers",
               "--max-tokens", "256", *extra)
    prefix = tmp_path / "nbrs" / "valid"
    eval_lm_inprocess(eval_args(tiny, "valid", *knn, "--knn-min-pointers", "17",
                                "--knn-stream-len", "5", "--knn-save-neighbors", str(prefix)))
    nb = load_neighbors(prefix)
    fresh = np.asarray(nb.arrays["fresh"]).astype(bool)
    online, whole = {}, {}
    for thr in (1, 4):
        res = eval_lm_inprocess(eval_args(tiny, "valid", *knn, "--knn-min-pointers", str(thr),
                                          "--knn-stream-len", "5"))
        online[thr] = (res["perplexity"], _searches(caplog)[0])
        eval_lm_inprocess(eval_args(tiny, "valid", *knn, "--knn-min-pointers", str(thr)))
        whole[thr] = _searches(caplog)[0]
        assert online[thr][1] > whole[thr]  # the restarts are searched and counted
        assert online[thr][1] >= fresh.sum()  # every stream start is a search
    out = tmp_path / "replay.json"
    assert cli_main([str(prefix), "--pointer-thresholds", "1,4", "--lambdas", "0.3",
                     "--temps", "2", "--json", str(out), *sweep_extra]) == 0
    for r in json.loads(out.read_text())["rows"]:
        ppl, searches = online[r["min_pointers"]]
        assert r["searches"] == searches and r["ppl"] == pytest.approx(ppl, rel=1e-5), r


def test_substreams_do_not_leak_pointers(synth):
    """Streams cut from one row (split_streams) and stepped together give each stream what
    it gets alone from a fresh start: no pointer passes from one stream to the next."""
    q = torch.from_numpy(synth["keys"][:60] + 0.05)
    targets = synth["vals"][1:61]
    starts, lengths, _ = split_streams([60], 12)
    together = _run(synth, q, targets, starts, lengths, 8, MinPointers(2))
    assert (together.modes[starts] == SEARCH).all()
    for s, n in zip(starts, lengths):
        alone = _run(synth, q, targets, [s], [n], 8, MinPointers(2))
        sl = slice(s, s + n)
        assert (together.modes[sl] == alone.modes[sl]).all()
        assert (together.ids[sl] == alone.ids[sl]).all()
    whole = _run(synth, q, targets, [0], [60], 8, MinPointers(2))
    assert (whole.modes == POINTERS).sum() > (together.modes == POINTERS).sum()


def test_clusters_online_equal_replay(tiny, dstore, tmp_path, caplog):
    """--knn-clusters: pointers stand for their clusters' members; fewer searches than plain
    pointers at the same threshold, and the replay (--clusters) equals the online run."""
    from fairseq_knnlm.cli.clusters import cli_main as clusters_main
    from fairseq_knnlm.cli.sweep import cli_main

    caplog.set_level(logging.INFO, logger="fairseq_knnlm")
    cl = tmp_path / "clusters" / "c40"
    assert clusters_main([str(dstore), str(cl), "--num-clusters", "40", "--niter", "5"]) == 0
    knn = _knn(dstore, "--k", "8", "--lmbda", "0.3", "--knn-temp", "2", "--knn-pointers",
               "--max-tokens", "256")
    prefix = tmp_path / "nbrs" / "valid"
    eval_lm_inprocess(eval_args(tiny, "valid", *knn, "--knn-min-pointers", "17",
                                "--knn-clusters", str(cl), "--knn-save-neighbors", str(prefix)))
    assert _searches(caplog)[0] == _searches_total(prefix)  # 17 > 2k: searched every token
    online = {}
    for thr, extra in ((4, ()), (4, ("--knn-clusters", str(cl))), (12, ("--knn-clusters",
                                                                          str(cl)))):
        res = eval_lm_inprocess(eval_args(tiny, "valid", *knn, "--knn-min-pointers", str(thr),
                                          *extra))
        online[thr, bool(extra)] = (res["perplexity"], _searches(caplog)[0])
    assert online[4, True][1] < online[4, False][1]
    out = tmp_path / "replay.json"
    assert cli_main([str(prefix), "--pointer-thresholds", "4,12", "--lambdas", "0.3",
                     "--temps", "2", "--clusters", str(cl), "--json", str(out)]) == 0
    for r in json.loads(out.read_text())["rows"]:
        ppl, searches = online[r["min_pointers"], True]
        assert r["searches"] == searches and r["ppl"] == pytest.approx(ppl, rel=1e-5), r
    # --knn-clusters-limit: fewer candidates per token (at most 10 here against 2k = 16),
    # online = replay with --clusters-limit; the default limit (0) is 2k exactly
    assert cli_main([str(prefix), "--pointer-thresholds", "4", "--lambdas", "0.3", "--temps",
                     "2", "--clusters", str(cl), "--clusters-limit", "16", "--json",
                     str(out)]) == 0
    (r,) = json.loads(out.read_text())["rows"]
    assert r["searches"] == online[4, True][1]
    assert r["ppl"] == pytest.approx(online[4, True][0], rel=1e-5)
    res = eval_lm_inprocess(eval_args(tiny, "valid", *knn, "--knn-min-pointers", "4",
                                      "--knn-clusters", str(cl), "--knn-clusters-limit", "16"))
    assert (res["perplexity"], _searches(caplog)[0]) == online[4, True]
    res = eval_lm_inprocess(eval_args(tiny, "valid", *knn, "--knn-min-pointers", "4",
                                      "--knn-clusters", str(cl), "--knn-clusters-limit", "10"))
    limited = (res["perplexity"], _searches(caplog)[0])
    assert limited != online[4, True]
    assert cli_main([str(prefix), "--pointer-thresholds", "4", "--lambdas", "0.3", "--temps",
                     "2", "--clusters", str(cl), "--clusters-limit", "10", "--json",
                     str(out)]) == 0
    (r,) = json.loads(out.read_text())["rows"]
    assert r["searches"] == limited[1] and r["ppl"] == pytest.approx(limited[0], rel=1e-5), r
    with pytest.raises(FlagError, match="--knn-clusters .* another datastore"):
        from fairseq_knnlm.adaptive.pointers import load_clusters
        from fairseq_knnlm.store.datastore import open_datastore

        other = tmp_path / "other"
        eval_lm_inprocess(eval_args(tiny, "valid", "--save-knnlm-dstore", "--dstore-mmap",
                                    str(other)))
        load_clusters(cl, open_datastore(other))


def _searches_total(prefix) -> int:
    from fairseq_knnlm.offline.neighbours import load_neighbors

    return load_neighbors(prefix).n


def test_pointer_pass_neighbours_sweep_and_refusals(tiny, dstore, tmp_path):
    """A pass scored partly from pointers saves what it used: sweeping its lambda and T at its
    k works; k' < k, FAISS distances or a replay of it are refused with the flag named."""
    from fairseq_knnlm.cli.sweep import cli_main
    from fairseq_knnlm.offline.neighbours import load_neighbors
    from fairseq_knnlm.offline.sweep import check_sweep, sweep

    prefix = tmp_path / "ptr" / "valid"
    res = eval_lm_inprocess(eval_args(tiny, "valid", *_knn(
        dstore, "--k", "8", "--lmbda", "0.3", "--knn-temp", "2", "--knn-pointers",
        "--knn-min-pointers", "2", "--knn-save-neighbors", str(prefix))))
    nb = load_neighbors(prefix)
    modes = np.asarray(nb.arrays["modes"])
    assert (modes == POINTERS).any() and (modes == SEARCH).any()
    assert nb.meta["pointers"]["modes"]["pointers"] == int((modes == POINTERS).sum())
    rows = sweep(nb, [0.3], [8], [2.0])
    assert rows[0]["ppl"] == pytest.approx(res["perplexity"], rel=1e-5)
    with pytest.raises(FlagError, match="--ks: .* scored from pointers"):
        check_sweep(nb, [4, 8])
    with pytest.raises(FlagError, match="--dists faiss_l2"):
        check_sweep(nb, [8], dists=["faiss_l2"])
    assert cli_main([str(prefix), "--lambdas", "0.3", "--temps", "2"]) == 0  # default ks: k
    assert cli_main([str(prefix), "--pointer-thresholds", "1"]) == 2


def test_replay_needs_a_pointer_pass(tiny, dstore, tmp_path, capsys):
    from fairseq_knnlm.cli.sweep import cli_main

    prefix = tmp_path / "plain" / "valid"
    eval_lm_inprocess(eval_args(tiny, "valid", *_knn(dstore, "--k", "8"),
                                "--knn-save-neighbors", str(prefix)))
    assert cli_main([str(prefix), "--pointer-thresholds", "1"]) == 2
    err = capsys.readouterr().err
    assert "--pointer-thresholds needs a pass saved with --knn-pointers" in err
    assert "--knn-min-pointers 9" in err


def _opts(**flags):
    from fairseq_knnlm.plugin.config import KNNLMOptions

    return replace(KNNLMOptions(), **flags)


@pytest.mark.parametrize("flags,match", [
    ({"knn_pointers": True}, "--knn-pointers steers the kNN search: it needs --knnlm"),
    ({"knnlm": True, "dstore_filename": "d", "indexfile": "i", "knn_pointers": True,
      "knn_min_pointers": -1}, "--knn-min-pointers must be >= 0, got -1"),
    ({"knnlm": True, "dstore_filename": "d", "indexfile": "i", "knn_pointers": True,
      "knn_gpu": True, "knn_sim_func": "faiss_l2"}, "drop --knn-gpu or use --knn-sim-func l2"),
    ({"knn_torch_exact": True}, "--knn-torch-exact is a kNN search: it needs --knnlm"),
    ({"knnlm": True, "dstore_filename": "d"}, "--indexfile INDEX (or --knn-torch-exact)"),
    ({"knn_clusters": "c"}, "--knn-clusters extends the pointers: it needs --knnlm"),
    ({"knn_stream_len": 32}, "--knn-stream-len splits the pointers' streams: it needs"),
    ({"knn_clusters_limit": 64}, "--knn-clusters-limit caps the clusters' candidates: it needs "
     "--knn-clusters"),
    ({"knnlm": True, "dstore_filename": "d", "indexfile": "i", "knn_pointers": True,
      "knn_clusters": "c", "knn_clusters_limit": -1}, "--knn-clusters-limit must be >= 0"),
    ({"knnlm": True, "dstore_filename": "d", "indexfile": "i", "knn_pointers": True,
      "knn_clusters": "c", "knn_clusters_limit": 64, "knn_lambda_model": "m.npz"},
     "--knn-clusters-limit: lambda models are fitted for the default limit"),
    ({"knnlm": True, "dstore_filename": "d", "indexfile": "i", "knn_pointers": True,
      "knn_stream_len": -2}, "--knn-stream-len must be >= 0 (0: a row is one stream), got -2"),
    ({"knnlm": True, "dstore_filename": "d", "knn_torch_exact": True, "no_load_keys": True,
      "knn_sim_func": "faiss_l2"}, "--knn-torch-exact searches the keys"),
])
def test_pointer_flags_refused_with_the_flag_named(flags, match):
    from fairseq_knnlm.flags import check_flags

    with pytest.raises(FlagError, match=re.escape(match)):
        check_flags(_opts(**flags))


def test_help_documents_the_pointer_flags():
    """The options' help as fairseq's parser builds it from the task's dataclass."""
    import argparse

    from fairseq.dataclass.utils import gen_parser_from_dataclass

    from fairseq_knnlm.plugin.config import KNNLanguageModelingConfig

    parser = argparse.ArgumentParser()
    gen_parser_from_dataclass(parser, KNNLanguageModelingConfig())
    text = " ".join(parser.format_help().split())
    assert "--knn-pointers" in text and "--knn-min-pointers" in text
    assert "--knn-torch-exact" in text and "kNN-LM searches: S of N tokens (x%)" in text


@pytest.mark.parametrize("factory", ["IVF16,PQ8", "OPQ8,IVF16,PQ8", "PCA16,IVF16,PQ8",
                                     "IVF16,PQ8x4fs", "Flat"])
def test_code_distances_are_faiss_distances(factory):
    """Pointer steps with --knn-sim-func faiss_l2 measure rows from the index's codes: for the
    rows FAISS returns, the same distances FAISS returns (fast-scan's are approximate: its
    lookup tables are quantized to 8 bits)."""
    faiss = pytest.importorskip("faiss")
    from fairseq_knnlm.search.retriever import CodeDistances

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 32)).astype(np.float32)
    index = faiss.index_factory(32, factory)
    index.train(x)
    index.add(x)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = 4
    q = x[:20] + 0.1
    fd, ids = index.search(q, 10)
    ids[3, 5:] = -1
    got = CodeDistances(index)(torch.from_numpy(q), ids).numpy()
    ok = ids >= 0
    tol = 0.05 if "fs" in factory else 1e-4
    np.testing.assert_allclose(got[ok], fd[ok], rtol=tol, atol=tol)
    assert np.isinf(got[~ok]).all()


def test_sweep_clusters_limit_needs_a_clusters_replay(tmp_path, capsys):
    """One line naming the flag, before any file is read."""
    from fairseq_knnlm.cli.sweep import cli_main

    missing = str(tmp_path / "none")
    for argv in ([missing, "--clusters-limit", "64"],
                 [missing, "--pointer-thresholds", "4", "--clusters-limit", "64"],
                 [missing, "--pointer-thresholds", "4", "--clusters", "c",
                  "--clusters-limit", "-3"]):
        assert cli_main(argv) == 2
        assert "--clusters-limit (>= 1; 0: 2 x k) caps" in capsys.readouterr().err

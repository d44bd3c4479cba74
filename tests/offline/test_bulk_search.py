"""knnlm-search (offline/bulk_search.py): the queries of a saved pass searched again, in this
process or on Ray over a sharded index, give the neighbour files eval-lm saved (flat sharded
= flat), which knnlm-sweep scores to the same perplexity."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import eval_args, eval_lm_inprocess

from fairseq_knnlm.index.kinds import IndexSettings
from fairseq_knnlm.index.sharded import build_index_sharded
from fairseq_knnlm.offline.bulk_search import search_saved
from fairseq_knnlm.offline.neighbours import NeighborsError, load_neighbors

K = 16


@pytest.fixture(scope="module")
def saved(tiny, dstore):
    """A pass that searched every token and saved its queries (pointers above --k), over
    the unsharded flat index; a 2-shard flat index of the same datastore."""
    prefix = tiny["dir"] / "nbrs_q" / "test"
    prefix.parent.mkdir(exist_ok=True)
    eval_lm_inprocess(eval_args(tiny, "test", "--knnlm", "--dstore-filename", str(dstore),
                                "--indexfile", f"{dstore}.flat", "--k", str(K),
                                "--knn-pointers", "--knn-min-pointers", str(K + 1),
                                "--knn-save-neighbors", str(prefix)))
    flat2 = f"{dstore}.flat2"
    build_index_sharded(dstore, flat2, IndexSettings(index_type="flat"), num_shards=2,
                        progress=False)
    return prefix, flat2


def _sweep(prefix, tmp_path, name):
    out = tmp_path / f"{name}.json"
    p = subprocess.run([sys.executable, "-m", "fairseq_knnlm.cli.sweep", str(prefix),
                        "--lambdas", "0.25", "--ks", str(K), "--temps", "5", "--json",
                        str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(out.read_text())["rows"][0]["ppl"]


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_bulk_search_reproduces_the_saved_pass(request, tiny, dstore, saved, tmp_path,
                                               engine):
    if engine == "ray":
        request.getfixturevalue("ray_local")
    prefix, flat2 = saved
    out = tmp_path / "again"
    meta = search_saved(prefix, out, None, flat2, k=K, probe=1, engine=engine,
                        batch_size=100)
    a, b = load_neighbors(prefix), load_neighbors(out)
    assert meta["n"] == a.n == b.n
    for name in ("ids", "faiss_dists", "match", "l2_dists", "targets", "lm_logp", "queries",
                 "fresh"):
        assert np.array_equal(np.asarray(a.arrays[name][:]), np.asarray(b.arrays[name][:])), name
    assert "lm_logp_nbrs" not in b.arrays
    assert _sweep(prefix, tmp_path, "a") == _sweep(out, tmp_path, "b")
    if engine == "local":  # knnlm-fit-lambda reads it too (without the agreement features)
        from fairseq_knnlm.cli.fit_lambda import cli_main as fit_main

        assert fit_main([str(out), "--out", str(tmp_path / "lam.npz"), "--kind", "mlp",
                         "--temp", "5", "--steps", "20", "--force"]) == 0


def test_bulk_search_needs_saved_queries(tiny, dstore, tmp_path):
    prefix = tmp_path / "noq"
    eval_lm_inprocess(eval_args(tiny, "test", "--knnlm", "--dstore-filename", str(dstore),
                                "--indexfile", f"{dstore}.flat", "--k", "8",
                                "--knn-save-neighbors", str(prefix)))
    with pytest.raises(NeighborsError, match="saved without its queries"):
        search_saved(prefix, tmp_path / "out", None, f"{dstore}.flat", k=8)


def test_cli_runs_as_a_module(saved, tmp_path):
    prefix, flat2 = saved
    p = subprocess.run([sys.executable, "-m", "fairseq_knnlm.cli.search", str(prefix),
                        "--indexfile", flat2, "--k", "4", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert load_neighbors(tmp_path / "o").meta["k"] == 4
    p = subprocess.run([sys.executable, "-m", "fairseq_knnlm.cli.search", str(prefix),
                        "--indexfile", flat2, "--out", str(prefix)], capture_output=True,
                       text=True)
    assert p.returncode == 2 and "--out must differ" in p.stderr

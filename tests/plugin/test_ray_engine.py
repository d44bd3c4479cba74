"""fairseq-eval-lm --knnlm --knn-engine ray on the tiny LM: the same perplexity as the
single-process search over the same shards and (flat) as the unsharded flat index, with and
without pointers; the options' rules before anything loads."""

from __future__ import annotations

import pytest
from conftest import eval_args, eval_lm_inprocess

from fairseq_knnlm.errors import FlagError
from fairseq_knnlm.index.kinds import IndexSettings
from fairseq_knnlm.index.sharded import build_index_sharded


@pytest.fixture(scope="module")
def flat3(dstore):
    path = f"{dstore}.flat3"
    build_index_sharded(dstore, path, IndexSettings(index_type="flat"), num_shards=3,
                        progress=False)
    return path


def _knn(dstore, index, *extra):
    return ("--knnlm", "--dstore-filename", str(dstore), "--indexfile", str(index), "--k", "16",
            "--knn-temp", "5", *extra)


@pytest.fixture(scope="module")
def adaptive(tiny, dstore, tmp_path_factory):
    """Cluster files (knnlm-clusters) and a lambda model fitted on a saved valid pass."""
    from fairseq_knnlm.cli.clusters import cli_main as clusters_main
    from fairseq_knnlm.cli.fit_lambda import cli_main as fit_main

    d = tmp_path_factory.mktemp("ray_adaptive")
    assert clusters_main([str(dstore), str(d / "c40"), "--num-clusters", "40", "--niter",
                          "5"]) == 0
    eval_lm_inprocess(eval_args(tiny, "valid", *_knn(dstore, f"{dstore}.flat",
                                                     "--knn-save-neighbors", str(d / "nb"))))
    assert fit_main([str(d / "nb"), "--out", str(d / "lam.npz"), "--kind", "mlp", "--temp",
                     "5", "--steps", "30", "--force"]) == 0
    return d


@pytest.mark.parametrize("case", ["search", "pointers+clusters", "lambda-model"])
def test_ray_perplexity_equals_single_process(ray_local, tiny, dstore, flat3, adaptive, case):
    """Ray = IndexShards in this process = the unsharded flat index; pointers, clusters and
    lambda models run on top unchanged."""
    extra = {"search": (),
             "pointers+clusters": ("--knn-pointers", "--knn-min-pointers", "4",
                                   "--knn-clusters", str(adaptive / "c40")),
             "lambda-model": ("--knn-lambda-model", str(adaptive / "lam.npz"))}[case]
    flat = eval_lm_inprocess(eval_args(tiny, "test", *_knn(dstore, f"{dstore}.flat", *extra)))
    local = eval_lm_inprocess(eval_args(tiny, "test", *_knn(dstore, flat3, *extra)))
    ray = eval_lm_inprocess(eval_args(tiny, "test", *_knn(dstore, flat3, "--knn-engine", "ray",
                                                          *extra)))
    assert ray["loss"] == local["loss"] == flat["loss"]


@pytest.mark.parametrize("extra,msg", [
    (("--knn-engine", "ray", "--knn-torch-exact"), "--knn-torch-exact searches in this"),
    (("--ray-address", "h:1"), "--ray-address names the Ray cluster"),
    (("--knn-engine", "ray", "--knn-pointers", "--knn-sim-func", "faiss_l2"),
     "stay with the Ray actors"),
])
def test_engine_flag_rules(tiny, dstore, extra, msg):
    with pytest.raises(FlagError, match=msg):
        eval_lm_inprocess(eval_args(tiny, "test", *_knn(dstore, "nope.index", *extra)))


def test_engine_needs_knnlm():
    from fairseq_knnlm.flags import check_flags
    from fairseq_knnlm.plugin.config import KNNLMOptions

    with pytest.raises(FlagError, match="--knn-engine / --ray-address choose where"):
        check_flags(KNNLMOptions(knn_engine="ray", save_knnlm_dstore=True, dstore_mmap="x"))

"""The eval-lm commands of the authors' README (urvashik/knnlm) run unchanged with
``--user-dir fairseq_knnlm``, sized to the tiny fixture (data, checkpoint, context flags from
conftest; the datastore size is the tiny train split's):

    dump:  --save-knnlm-dstore --dstore-mmap checkpoints/dstore --knn-keytype 'last_ffn_input'
           --dstore-size 103225485 --model-overrides "{'knn_keytype': 'last_ffn_input'}"
           --dstore-fp16
    eval:  --dstore-filename checkpoints/dstore --indexfile checkpoints/knn.index --k 1024
           --lmbda 0.25 --dstore-size 103225485 --knn-keytype last_ffn_input --probe 32
           --knnlm --dstore-fp16
    fast:  the same + --no-load-keys --knn-sim-func "do_not_recomp_l2"

The index is built in-process (the authors' build_dstore.py-style command is tested with
knnlm-build-index). Run: python -m pytest -q tests/test_authors_commands.py
"""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
from conftest import BIN, eval_args, eval_lm_inprocess, parse_ppl, run

from fairseq_knnlm.errors import FlagError
from fairseq_knnlm.store.datastore import open_datastore


def _final_ppl(log: str) -> float:
    m = re.findall(r"kNN-LM: \d+ tokens; LM ppl [0-9.]+ -> final ppl ([0-9.]+)", log)
    assert m, log[-3000:]
    return float(m[-1])


@pytest.fixture(scope="module")
def authors_dstore(tiny, dstore):
    """The authors' dump command (console script), and an IVFPQ index over its datastore."""
    from fairseq_knnlm.index.build import build_index
    from fairseq_knnlm.index.kinds import IndexSettings

    size = open_datastore(dstore).size
    prefix = tiny["dir"] / "checkpoints" / "dstore"
    log = run([str(BIN / "fairseq-eval-lm"), *eval_args(
        tiny, "train", "--save-knnlm-dstore", "--dstore-mmap", str(prefix),
        "--knn-keytype", "last_ffn_input", "--dstore-size", str(size),
        "--model-overrides", "{'knn_keytype': 'last_ffn_input'}", "--dstore-fp16")])
    assert "--dstore-size" not in log  # the right size: nothing to say
    index = tiny["dir"] / "checkpoints" / "knn.index"
    build_index(prefix, index, IndexSettings(index_type="ivfpq", ncentroids=8, code_size=8,
                                             train_size=size), progress=False)
    return {"prefix": prefix, "index": index, "size": size}


def test_authors_dump_is_the_plugins_dump(dstore, authors_dstore):
    ref, ds = open_datastore(dstore), open_datastore(authors_dstore["prefix"])
    assert ds.meta.keytype == "ffn_input_after_ln"  # the alias is stored by its name
    assert ds.keys.dtype == np.float16 and ds.size == ref.size
    np.testing.assert_array_equal(ds.vals, ref.vals)
    np.testing.assert_array_equal(ds.pos, ref.pos)
    np.testing.assert_allclose(ds.keys.astype(np.float32), ref.keys, rtol=2e-3, atol=2e-3)


def _authors_eval(tiny, a: dict, *extra: str) -> list[str]:
    return [str(BIN / "fairseq-eval-lm"), *eval_args(
        tiny, "valid", "--dstore-filename", str(a["prefix"]), "--indexfile", str(a["index"]),
        "--k", "1024", "--lmbda", "0.25", "--dstore-size", str(a["size"]),
        "--knn-keytype", "last_ffn_input", "--probe", "32", "--knnlm", "--dstore-fp16",
        *extra)]


def test_authors_eval_commands(tiny, authors_dstore):
    a = authors_dstore
    base = parse_ppl(run([str(BIN / "fairseq-eval-lm"), *eval_args(tiny, "valid")]))
    exact = run(_authors_eval(tiny, a))
    fast = run(_authors_eval(tiny, a, "--no-load-keys", "--knn-sim-func", "do_not_recomp_l2"))
    for log in (exact, fast):
        assert parse_ppl(log) == pytest.approx(_final_ppl(log), rel=1e-3)
        assert parse_ppl(log) < base  # the datastore helps on this repetitive corpus
    assert parse_ppl(exact) != parse_ppl(fast)  # exact vs quantized distances
    # the same settings under this plugin's own names give the same numbers
    own = eval_lm_inprocess(eval_args(
        tiny, "valid", "--knnlm", "--dstore-filename", str(a["prefix"]), "--indexfile",
        str(a["index"]), "--k", "1024", "--lmbda", "0.25", "--probe", "32",
        "--knn-sim-func", "faiss_l2", "--no-load-keys"))
    assert own["perplexity"] == pytest.approx(parse_ppl(fast), abs=0.01)


def test_wrong_dstore_size_is_refused_for_knnlm(tiny, authors_dstore, tmp_path):
    a = authors_dstore
    args = eval_args(tiny, "valid", "--knnlm", "--dstore-filename", str(a["prefix"]),
                     "--indexfile", str(a["index"]), "--dstore-size", "103225485")
    args[args.index("--path") + 1] = str(tmp_path / "missing.pt")  # refused before loading
    with pytest.raises(FlagError, match=f"--dstore-size 103225485 disagrees with the "
                                        f"datastore .* which has {a['size']} entries"):
        eval_lm_inprocess(args)


def test_dump_with_another_dstore_size_notes_the_real_one(tiny, tmp_path, caplog):
    """At dump time --dstore-size was the authors' preallocation: not refused, one line."""
    caplog.set_level(logging.INFO)
    prefix = tmp_path / "dstore"
    eval_lm_inprocess(eval_args(tiny, "valid", "--save-knnlm-dstore", "--dstore-mmap",
                                str(prefix), "--dstore-size", "103225485"))
    n = open_datastore(prefix).size
    notes = [r.getMessage() for r in caplog.records if "--dstore-size" in r.getMessage()]
    assert notes == [f"--dstore-size 103225485: the dump wrote {n} entries to {prefix}; its "
                     "meta file holds the size that counts (--dstore-size is not needed)"]

"""knnlm-build-index as a command: flags out of range are refused before any work with one
line naming the flag (exit 2), and the authors' build_dstore.py command line works unchanged,
its hand-typed --dstore_size / --dimension checked against the meta file. No fairseq needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fairseq_knnlm.cli.build_index import cli_main
from fairseq_knnlm.index.kinds import meta_path
from fairseq_knnlm.store.datastore import DatastoreWriter

N, DIM = 2000, 16


@pytest.fixture(scope="module")
def dstore(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, DIM)) * 3
    keys = centres[rng.integers(0, 20, N)] + rng.standard_normal((N, DIM))
    w = DatastoreWriter(d / "dstore", DIM, "float16")
    w.add(keys.astype(np.float32), np.arange(N) % 50, np.arange(N))
    w.finish(keytype="ffn_input_after_ln")
    return d / "dstore"


def _one_line_error(capsys, flag: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("knnlm-build-index: error: ") and flag in err, err
    return err


@pytest.mark.parametrize("flag,value", [
    ("--num-keys-to-add-at-a-time", "0"), ("--num-keys-to-add-at-a-time", "-3"),
    ("--ncentroids", "0"), ("--ncentroids", "-8"), ("--code-size", "0"),
    ("--code-size", "-8"), ("--train-size", "0"), ("--probe", "0"),
    ("--checkpoint-every", "0"), ("--add-shard-size", "-1"), ("--workers", "0"),
    ("--pca-dim", "0"), ("--pca-dim", "-1"), ("--starting-point", "-1")])
def test_bad_flags_are_refused_before_any_work(dstore, tmp_path, capsys, flag, value):
    out = tmp_path / "x.index"
    code = cli_main(["--dstore-mmap", str(dstore), "--faiss-index", str(out), flag, value])
    assert code == 2
    err = _one_line_error(capsys, flag)
    assert f"got {value}" in err
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written


def test_ncentroids_zero_as_a_real_command(dstore, tmp_path):
    """FAISS segfaulted on --ncentroids 0 (exit 139): now one line and exit 2, no log."""
    env = {**os.environ, "FAIRSEQ_KNNLM_NO_FAIRSEQ": "1"}
    p = subprocess.run([sys.executable, "-m", "fairseq_knnlm.cli.build_index", "--dstore-mmap",
                        str(dstore), "--faiss-index", str(tmp_path / "x.index"),
                        "--ncentroids", "0"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip() == ("knnlm-build-index: error: --ncentroids must be positive, "
                                "got 0")


def _authors_command(dstore, index, size=N, dim=DIM) -> list[str]:
    """The authors' README command (build_dstore.py), sized to the small datastore."""
    return ["--dstore_mmap", str(dstore), "--dstore_size", str(size), "--dimension", str(dim),
            "--faiss_index", str(index), "--num_keys_to_add_at_a_time", "500",
            "--starting_point", "0", "--dstore_fp16", "--ncentroids", "16", "--code_size", "8",
            "--probe", "8", "--seed", "1", "--no-progress"]


def test_the_authors_build_command_works(dstore, tmp_path):
    assert cli_main(_authors_command(dstore, tmp_path / "knn.index")) == 0
    rec = json.loads(meta_path(tmp_path / "knn.index").read_text())
    assert rec["complete"] and rec["ntotal"] == N
    assert {k: rec["settings"][k] for k in ("ncentroids", "code_size", "probe", "seed")} == {
        "ncentroids": 16, "code_size": 8, "probe": 8, "seed": 1}


@pytest.mark.parametrize("size,dim,flag,numbers", [
    (N + 1, DIM, "--dstore_size", (f"{N + 1}", f"{N}")),
    (N, 1024, "--dimension", ("1024", f"{DIM}"))])
def test_hand_typed_size_or_dimension_must_match_the_meta(dstore, tmp_path, capsys, size, dim,
                                                          flag, numbers):
    assert cli_main(_authors_command(dstore, tmp_path / "knn.index", size, dim)) == 2
    err = _one_line_error(capsys, flag)
    assert all(n in err for n in numbers), err
    assert not list(tmp_path.iterdir())


def test_dashed_spellings_are_checked_too(dstore, tmp_path, capsys):
    args = ["--dstore-mmap", str(dstore), "--faiss-index", str(tmp_path / "x.index"),
            "--dstore-size", "7"]
    assert cli_main(args) == 2
    _one_line_error(capsys, "--dstore-size 7")


def test_dstore_fp16_on_float32_keys_is_a_note(tmp_path, caplog):
    """--dstore_fp16 states the key dtype, which the meta file knows: a float32 datastore
    is read as float32 (with a warning), not misread as the authors' script would."""
    w = DatastoreWriter(tmp_path / "ds32", DIM, "float32")
    w.add(np.ones((300, DIM), np.float32), np.arange(300), np.arange(300))
    w.finish(keytype="ffn_input_after_ln")
    args = ["--dstore_mmap", str(tmp_path / "ds32"), "--faiss_index", str(tmp_path / "i"),
            "--dstore_fp16", "--index-type", "flat", "--no-progress"]
    assert cli_main(args) == 0
    assert "keys of" in caplog.text and "are float32" in caplog.text

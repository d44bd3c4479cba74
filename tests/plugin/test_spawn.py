"""fairseq-eval-lm's spawned ranks (the default on a machine with several GPUs) run the plugin
exactly as one-process-per-rank workers do: a sharded dump equal to the single-process one,
kNN-LM perplexity summed over the ranks equal to the single-process one, one-line errors.

fairseq's ``call_main`` starts ``min(#GPUs, --distributed-world-size)`` ranks with
``torch.multiprocessing.spawn(distributed_main, args=(main, cfg, kwargs))``, so on this CPU
machine it would start none. The driver below is the console script (``cli_main``) with
``torch.cuda.device_count`` reporting 2 in the parent only: ``call_main`` then spawns 2 CPU
ranks joined by gloo, unpickling ``main`` in each rank, which is what the test is about.

Run: python -m pytest -q tests/plugin/test_spawn.py
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import eval_args, eval_lm_inprocess

from fairseq_knnlm.offline.neighbours import load_neighbors
from fairseq_knnlm.store.datastore import open_datastore
from fairseq_knnlm.store.shards import manifest_path

DRIVER = '''\
import sys

import torch


def main() -> None:
    torch.cuda.device_count = lambda: 2  # the parent only: call_main spawns 2 ranks
    from fairseq_cli.eval_lm import cli_main

    sys.argv[0] = "fairseq-eval-lm"
    cli_main()


if __name__ == "__main__":
    main()
'''


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return int(sock.getsockname()[1])


def spawn_eval_lm(tmp_path: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    """fairseq-eval-lm ARGS with 2 ranks spawned by fairseq's call_main (gloo, on CPU)."""
    driver = tmp_path / "spawn_eval_lm.py"
    driver.write_text(DRIVER)
    dist = ["--distributed-world-size", "2", "--distributed-backend", "gloo",
            "--distributed-init-method", f"tcp://localhost:{_free_port()}"]
    return subprocess.run(
        [sys.executable, str(driver), *args, *dist],
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **env},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)


def _ok(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 0, p.stdout[-4000:]
    assert "as rank 1" in p.stdout or "distributed init (rank 1)" in p.stdout, p.stdout[-4000:]
    return p.stdout


def _by_pos(ds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pos = np.asarray(ds.pos[:])
    order = np.argsort(pos, kind="stable")
    return np.asarray(ds.keys[:])[order], np.asarray(ds.vals[:])[order, 0], pos[order]


def test_spawned_ranks_dump_the_single_process_datastore(tiny, dstore, tmp_path):
    prefix = tmp_path / "spawn" / "train"
    _ok(spawn_eval_lm(tmp_path, eval_args(tiny, "train", "--save-knnlm-dstore",
                                          "--dstore-mmap", str(prefix))))
    assert manifest_path(prefix).exists()
    m = json.loads(manifest_path(prefix).read_text())
    assert [s["prefix"] for s in m["shards"]] == ["train_shard0of2", "train_shard1of2"]
    single, sharded = open_datastore(dstore), open_datastore(prefix)
    assert sharded.size == single.size
    k1, v1, p1 = _by_pos(single)
    k2, v2, p2 = _by_pos(sharded)
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(v1, v2)
    np.testing.assert_allclose(k1, k2, rtol=1e-5, atol=1e-5)


def test_spawned_ranks_knnlm_perplexity_equals_single_process(tiny, dstore, tmp_path):
    knn = ["--knnlm", "--dstore-filename", str(dstore), "--indexfile", f"{dstore}.flat",
           "--k", "16", "--lmbda", "0.5", "--knn-temp", "2"]
    single = eval_lm_inprocess(eval_args(tiny, "valid", *knn))
    nbrs = tmp_path / "nbrs" / "valid"
    out = _ok(spawn_eval_lm(tmp_path, eval_args(tiny, "valid", *knn, "--knn-save-neighbors",
                                                str(nbrs))))
    # eval-lm reports each rank's shard alone; the plugin sums over the ranks
    found = re.findall(r"kNN-LM \(all 2 ranks\): (\d+) tokens; LM ppl ([0-9.]+) -> "
                       r"final ppl ([0-9.]+)", out)
    assert len(found) == 1, out[-4000:]
    n, ppl = int(found[0][0]), float(found[0][2])
    assert ppl == pytest.approx(single["perplexity"], rel=1e-4)
    nb = load_neighbors(nbrs)  # rank 0 wrote the manifest over both ranks' files
    assert nb.n == n and nb.meta["num_shards"] == 2


def test_error_in_spawned_ranks_is_one_line(tiny, tmp_path):
    p = spawn_eval_lm(tmp_path, eval_args(tiny, "valid", "--knnlm", "--dstore-filename",
                                          str(tmp_path / "nope"), "--indexfile", "x.index"))
    assert p.returncode != 0, p.stdout[-3000:]
    assert "Traceback" not in p.stdout, p.stdout[-3000:]
    errors = [line for line in p.stdout.splitlines()
              if re.search(r"(?i)error:|exception", line)]
    assert len(errors) == 1, p.stdout[-3000:]
    assert errors[0].startswith("fairseq-eval-lm: error: ") and "nope" in errors[0]
    debug = spawn_eval_lm(tmp_path, eval_args(tiny, "valid", "--knnlm", "--dstore-filename",
                                              str(tmp_path / "nope"), "--indexfile", "x.index"),
                          FAIRSEQ_KNNLM_DEBUG="1")
    assert debug.returncode != 0 and "Traceback" in debug.stdout

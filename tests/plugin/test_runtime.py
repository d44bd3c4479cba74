"""The eval-lm run (runtime.py, eval_lm_patch.py): flag checks before the model loads, key
types compared by the state they name, shard-aware saved neighbours, progress lines, and
one-line errors from the real console script.

Run: python -m pytest -q tests/plugin/test_runtime.py
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
from dataclasses import replace

import numpy as np
import pytest
from conftest import BIN, eval_args, eval_lm_inprocess

from fairseq_knnlm.errors import FlagError, KNNLMError
from fairseq_knnlm.flags import (
    canonical_keytype,
    check_dstore_size,
    check_flags,
    check_model_overrides,
    same_key_state,
)
from fairseq_knnlm.offline.neighbours import load_neighbors
from fairseq_knnlm.offline.sweep import sweep
from fairseq_knnlm.plugin.eval_lm_patch import debug_requested, user_error_message
from fairseq_knnlm.store.datastore import DatastoreError, open_datastore
from fairseq_knnlm.store.shards import shard_prefix

KNN_ON = {"knnlm": True, "dstore_filename": "d", "indexfile": "i"}


def _opts(**flags):
    from fairseq_knnlm.plugin.config import KNNLMOptions

    return replace(KNNLMOptions(), **flags)


# ---- plain functions ----

@pytest.mark.parametrize("flags,match", [
    ({**KNN_ON, "probe": 0}, "--probe must be >= 1"),
    ({**KNN_ON, "probe": -1}, "--probe must be >= 1"),
    ({**KNN_ON, "k": 0}, "--k must be >= 1"),
    ({**KNN_ON, "knn_temp": 0.0}, "--knn-temp must be > 0"),
    ({**KNN_ON, "knn_temp": math.nan}, "--knn-temp must be > 0"),
    ({**KNN_ON, "lmbda": -0.1}, "--lmbda must be in [0, 1]"),
    ({**KNN_ON, "lmbda": math.nan}, "--lmbda must be in [0, 1]"),
    ({**KNN_ON, "knn_sim_func": "cosine"}, "--knn-sim-func must be one of"),
    ({**KNN_ON, "no_load_keys": True}, "--no-load-keys"),
    ({"knnlm": True}, "--knnlm needs --dstore-filename"),
    ({"knn_save_neighbors": "p"}, "it needs --knnlm"),
    ({"knn_cache": True, "cache_theta": 0.0}, "--cache-theta must be > 0"),
    ({"knn_cache": True, "cache_theta": -0.5}, "--cache-theta must be > 0"),
    ({"knn_cache": True, "cache_lmbda": 1.5}, "--cache-lmbda must be in [0, 1]"),
    ({"knn_cache": True, "cache_length": 0}, "--cache-length must be >= 1"),
    ({"save_knnlm_dstore": True}, "--save-knnlm-dstore needs --dstore-mmap"),
    ({"dstore_size": 0}, "--dstore-size must be >= 1"),
    ({"knn_keytype": "ffn_inpt"}, "--knn-keytype: unknown key type"),
])
def test_check_flags_refuses_with_the_flag_named(flags, match):
    with pytest.raises(FlagError, match=re.escape(match)):
        check_flags(_opts(**flags))


def test_check_flags_accepts_defaults_authors_names_and_unused_options():
    check_flags(_opts())
    check_flags(_opts(**KNN_ON, no_load_keys=True, knn_sim_func="do_not_recomp_l2",
                      knn_keytype="last_ffn_input", dstore_size=10, probe=1, lmbda=1.0))
    check_flags(_opts(knn_cache=True, cache_lmbda=0.0, cache_length=1))
    # ranges of an option that is off are not checked (its defaults are never used)
    check_flags(_opts(k=0, probe=0, knn_temp=-1.0, cache_theta=-1.0))


def test_check_dstore_size():
    check_dstore_size(None, 5, "p")
    check_dstore_size(5, 5, "p")
    with pytest.raises(FlagError, match="--dstore-size 6 disagrees with the datastore p, "
                                        "which has 5 entries"):
        check_dstore_size(6, 5, "p")


def test_model_overrides_key_type_must_agree():
    check_model_overrides("{}", "ffn_input_after_ln")
    check_model_overrides(None, "ffn_input_after_ln")
    check_model_overrides("{'knn_keytype': 'last_ffn_input'}", "last_ffn_input")
    check_model_overrides("{'knn_keytype': 'last_ffn_input'}", "ffn_input_after_ln")
    check_model_overrides("{'dropout': 0.0}", "ffn_output")
    check_model_overrides("not python", "ffn_output")  # fairseq reports that one
    with pytest.raises(FlagError, match="--model-overrides sets knn_keytype 'last_ffn_input' "
                                        "but --knn-keytype is 'ffn_output'"):
        check_model_overrides("{'knn_keytype': 'last_ffn_input'}", "ffn_output")
    with pytest.raises(FlagError, match="--model-overrides knn_keytype: unknown key type"):
        check_model_overrides("{'knn_keytype': 'nope'}", "ffn_output")


def test_key_types_compare_by_the_state_they_name():
    assert canonical_keytype("last_ffn_input") == "ffn_input_after_ln"
    assert canonical_keytype("last_ffn_input:1") == "ffn_input_after_ln:1"
    assert canonical_keytype("ffn_output:-2") == "ffn_output:-2"
    for spec in ("ffn_input_after_ln:1", "ffn_input_after_ln:-1", "last_ffn_input"):
        assert same_key_state("ffn_input_after_ln", spec, num_layers=2)
    assert not same_key_state("ffn_input_after_ln", "ffn_input_after_ln:0", num_layers=2)
    assert not same_key_state("ffn_input_after_ln", "ffn_output", num_layers=2)
    assert not same_key_state("ffn_input_after_ln:5", "ffn_input_after_ln", num_layers=2)


def test_user_error_message_from_this_process_and_from_a_spawned_rank():
    from torch.multiprocessing import ProcessRaisedException

    assert user_error_message(FlagError("--probe must be >= 1")) == "--probe must be >= 1"
    assert user_error_message(DatastoreError("no datastore at x")) == "no datastore at x"
    assert user_error_message(ValueError("a bug")) is None

    def rank_failed(last_line: str) -> ProcessRaisedException:
        trace = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
                 f"{last_line}\n")
        return ProcessRaisedException(
            f"\n\n-- Process 1 terminated with the following error:\n{trace}", 1, 123)

    e = rank_failed("fairseq_knnlm.errors.FlagError: --probe must be >= 1, got 0")
    assert user_error_message(e) == "--probe must be >= 1, got 0"
    e = rank_failed("fairseq_knnlm.store.datastore.DatastoreError: no datastore at x")
    assert user_error_message(e) == "no datastore at x"
    assert user_error_message(rank_failed("ValueError: a bug")) is None
    assert user_error_message(rank_failed("fairseq_knnlm.plugin.runtime.Nope: x")) is None
    assert user_error_message(rank_failed("fairseq_knnlm.plugin.runtime.KNNEvalRuntime: x")) is None


def test_debug_switch():
    assert not debug_requested(["fairseq-eval-lm", "data"], {})
    assert debug_requested(["fairseq-eval-lm", "data", "--knn-debug"], {})
    assert debug_requested(["fairseq-eval-lm"], {"FAIRSEQ_KNNLM_DEBUG": "1"})
    assert not debug_requested(["fairseq-eval-lm"], {"FAIRSEQ_KNNLM_DEBUG": "0"})


# ---- through fairseq-eval-lm ----

def _knn(dstore, *extra: str) -> tuple[str, ...]:
    return ("--knnlm", "--dstore-filename", str(dstore), "--indexfile", f"{dstore}.flat",
            *extra)


def test_bad_number_refused_before_the_model_loads(tiny, dstore, tmp_path):
    """--probe 0 with a checkpoint that does not exist: the flag is named, so it was checked
    before fairseq tried to load the model (or open the datastore)."""
    args = eval_args(tiny, "test", *_knn(dstore, "--probe", "0"))
    args[args.index("--path") + 1] = str(tmp_path / "missing.pt")
    with pytest.raises(FlagError, match=r"--probe must be >= 1 .*, got 0"):
        eval_lm_inprocess(args)
    args = eval_args(tiny, "test", *_knn(tmp_path / "no_dstore", "--knn-temp", "0"))
    with pytest.raises(FlagError, match="--knn-temp"):
        eval_lm_inprocess(args)


def _console(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fairseq-eval-lm"), *args],
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                          capture_output=True, text=True, timeout=300)


def test_console_script_reports_user_errors_in_one_line(tiny, dstore, tmp_path):
    nope = tmp_path / "nope"
    p = _console(eval_args(tiny, "test", "--knnlm", "--dstore-filename", str(nope),
                           "--indexfile", "x.index"))
    assert p.returncode != 0
    assert "Traceback" not in p.stderr + p.stdout, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1].startswith(
        f"fairseq-eval-lm: error: no datastore at {nope}"), p.stderr[-3000:]
    p = _console(eval_args(tiny, "test", *_knn(dstore, "--probe", "0")))
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == "fairseq-eval-lm: error: --probe must be >= 1 " \
        "(IVF lists searched per query), got 0"
    # the debug switches give the traceback back
    for args, env in (([], {"FAIRSEQ_KNNLM_DEBUG": "1"}), (["--knn-debug"], {})):
        p = _console(eval_args(tiny, "test", *_knn(dstore, "--probe", "0"), *args), **env)
        assert p.returncode != 0 and "Traceback" in p.stderr
        assert "FlagError: --probe must be >= 1" in p.stderr


def test_key_type_of_the_same_state_is_accepted(tiny, dstore, tmp_path):
    """On the 2-layer tiny model, ffn_input_after_ln:1 and last_ffn_input name the default
    key; ffn_input_after_ln:0 does not. A dump with the alias records the canonical name."""
    base = eval_lm_inprocess(eval_args(tiny, "test", *_knn(dstore, "--k", "8")))
    for spec in ("ffn_input_after_ln:1", "last_ffn_input", "ffn_input_after_ln:-1"):
        res = eval_lm_inprocess(eval_args(tiny, "test", *_knn(dstore, "--k", "8"),
                                          "--knn-keytype", spec))
        assert res["loss"] == base["loss"], spec
    with pytest.raises(DatastoreError, match="key type: datastore 'ffn_input_after_ln', "
                                             "--knn-keytype 'ffn_input_after_ln:0'"):
        eval_lm_inprocess(eval_args(tiny, "test", *_knn(dstore, "--k", "8"),
                                    "--knn-keytype", "ffn_input_after_ln:0"))
    with pytest.raises(FlagError, match="--knn-keytype: .*the model has 2 layers"):
        eval_lm_inprocess(eval_args(tiny, "valid", "--save-knnlm-dstore", "--dstore-mmap",
                                    str(tmp_path / "x"), "--knn-keytype", "ffn_output:5"))
    prefix = tmp_path / "alias" / "valid"
    eval_lm_inprocess(eval_args(tiny, "valid", "--save-knnlm-dstore", "--dstore-mmap",
                                str(prefix), "--knn-keytype", "last_ffn_input"))
    assert open_datastore(prefix).meta.keytype == "ffn_input_after_ln"


def test_saved_neighbors_of_shards_read_as_one(tiny, dstore, tmp_path):
    knn = _knn(dstore, "--k", "8", "--lmbda", "0.25", "--knn-temp", "2")
    single = tmp_path / "single" / "valid"
    eval_lm_inprocess(eval_args(tiny, "valid", *knn, "--knn-save-neighbors", str(single)))
    prefix = tmp_path / "sharded" / "valid"
    for i in range(2):
        eval_lm_inprocess(eval_args(tiny, "valid", *knn, "--knn-save-neighbors", str(prefix),
                                    "--num-shards", "2", "--shard-id", str(i)))
        assert (tmp_path / "sharded" / "valid_manifest.json").exists() == (i == 1)
    assert not (tmp_path / "sharded" / "valid_meta.json").exists()
    man = json.loads((tmp_path / "sharded" / "valid_manifest.json").read_text())
    metas = [json.loads(open(f"{shard_prefix(prefix, i, 2)}_meta.json").read())
             for i in range(2)]
    assert man == {"num_shards": 2, "n": metas[0]["n"] + metas[1]["n"], "k": 8,
                   "shards": [{"prefix": "valid_shard0of2", "n": metas[0]["n"]},
                              {"prefix": "valid_shard1of2", "n": metas[1]["n"]}]}
    assert [m["shard_id"] for m in metas] == [0, 1] and metas[0]["n"] > 0
    one, both = load_neighbors(single), load_neighbors(prefix)
    assert both.n == one.n
    np.testing.assert_array_equal(np.sort(np.asarray(both.arrays["targets"][:])),
                                  np.sort(np.asarray(one.arrays["targets"][:])))
    grid = {"lambdas": [0.0, 0.25], "ks": [4, 8], "temperatures": [2.0]}
    ppl = {(r["lambda"], r["k"]): r["ppl"] for r in sweep(one, **grid)}
    for r in sweep(both, **grid):
        assert r["ppl"] == pytest.approx(ppl[r["lambda"], r["k"]], rel=1e-5)


def test_progress_lines(tiny, dstore, tmp_path, monkeypatch, caplog):
    from fairseq_knnlm.plugin import eval_progress

    monkeypatch.setattr(eval_progress, "PROGRESS_INTERVAL_S", 0.0)
    caplog.set_level(logging.INFO, logger="fairseq_knnlm.plugin.eval_progress")
    prefix = tmp_path / "progress" / "valid"
    eval_lm_inprocess(eval_args(tiny, "valid", "--save-knnlm-dstore", "--dstore-mmap",
                                str(prefix), *_knn(dstore, "--k", "8"), "--max-tokens", "128"))
    n = open_datastore(prefix).size
    lines = [r.getMessage() for r in caplog.records
             if r.name == "fairseq_knnlm.plugin.eval_progress"]
    assert len(lines) >= 2, lines
    assert all(f" of {n:,} tokens (" in line and "tokens/s, ETA" in line for line in lines)
    assert lines[-1].startswith(f"progress (dump + kNN-LM): {n:,} of {n:,} tokens (100.0%)")
    assert lines[-1].endswith(f"datastore entries {n:,}, kNN searches {n:,}"), lines[-1]


def test_knnlm_error_is_a_value_error_for_flags():
    """FlagError stays catchable as ValueError (older callers); every user error is a
    KNNLMError."""
    assert issubclass(FlagError, ValueError) and issubclass(FlagError, KNNLMError)
    assert issubclass(DatastoreError, KNNLMError)


def test_observers_get_the_scorer_numbers(tiny, dstore):
    """knnlm_main(cfg, knn_observers=[...]) hands every scored batch to the observers (also
    through distributed_utils.call_main, which passes keyword arguments on): the
    final log-probs are exactly the ones eval-lm averages, positions map to the stream."""
    import torch
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from fairseq_knnlm.plugin.eval_lm_patch import knnlm_main
    from fairseq_knnlm.scoring.knn import interpolate

    batches = []
    args = eval_args(tiny, "test", "--knnlm", "--dstore-filename", str(dstore), "--indexfile",
                     f"{dstore}.flat", "--k", "8", "--lmbda", "0.3")
    a = options.parse_args_and_arch(options.get_eval_lm_parser(), args)
    res = knnlm_main(convert_namespace_to_omegaconf(a), knn_observers=[batches.append])
    assert batches
    final = torch.cat([b.final_logp for b in batches])
    # eval-lm's loss is the mean NLL in base 2 of exactly these log-probs
    assert float(-final.mean()) / math.log(2) == pytest.approx(float(res["loss"]), abs=1e-5)
    for b in batches:
        assert b.knn_logp is not None and b.retrieved is not None
        assert torch.allclose(interpolate(b.lm_logp, b.knn_logp, 0.3), b.final_logp)
        assert len(b.positions) == len(b.targets) == len(b.sample_ids)
    pos = np.concatenate([b.positions for b in batches])
    assert sorted(pos.tolist()) == list(range(len(pos)))  # every test token once

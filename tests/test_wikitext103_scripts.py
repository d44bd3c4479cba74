"""The WikiText-103 scripts (examples/wikitext103/): the full-scale commands carry the paper's
settings, and SMALL=1 runs every script end to end on CPU.

The settings test runs run_all.sh with DRY_RUN=1, which prints each command with its
variables resolved (the "+ ..." lines) and runs nothing: it checks what would be run, not
only what the script text says. The end-to-end test slices WikiText-2 (the same articles and
tokenization as WikiText-103), trains a 2-layer LM for 50 updates, dumps, indexes, evaluates
and sweeps: about 3 minutes on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_ALL = ROOT / "examples" / "wikitext103" / "run_all.sh"
BIN = Path(sys.executable).parent
WIKITEXT2_DIR = Path(os.environ.get("WIKITEXT2_DIR", ROOT.parent / "shared" / "data" /
                                    "wikitext-2"))
SWEEP_LAMBDAS = ",".join(f"{i * 0.05:g}" for i in range(21))  # 0,0.05,...,0.95,1


def run_all(run_dir: Path, timeout: int, **env: str) -> str:
    """run_all.sh in a clean environment (no settings leaking in from the caller's shell)."""
    base = {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "VIRTUAL_ENV": str(BIN.parent), "HOME": os.environ.get("HOME", str(run_dir)),
            "LC_ALL": "C.UTF-8", "RUN_DIR": str(run_dir), "MPLBACKEND": "Agg"}
    p = subprocess.run(["bash", str(RUN_ALL)], env={**base, **env}, cwd=ROOT, text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    assert p.returncode == 0, p.stdout[-6000:]
    return p.stdout


def has(cmd: str, *flags: str) -> bool:
    padded = f" {cmd} "
    return all(f" {f} " in padded for f in flags)


def test_full_scale_commands_carry_the_paper_settings(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    for split in ("train", "valid", "test"):
        (raw / f"wiki.{split}.tokens").write_text("")
    out = run_all(tmp_path / "run", timeout=120, DRY_RUN="1", WIKITEXT103_DIR=str(raw),
                  FP16="1")
    cmds = [line[2:] for line in out.splitlines() if line.startswith("+ ")]

    def one(*flags: str) -> str:
        found = [c for c in cmds if has(c, *flags)]
        assert len(found) == 1, (flags, cmds)
        return found[0]

    assert not [c for c in cmds if "--cpu" in c.split()], "full scale assumes GPUs"
    one("fairseq-preprocess", "--only-source")
    one("fairseq-train", "--arch transformer_lm_wiki103", "--max-update 286000", "--lr 1.0",
        "--t-mult 2", "--lr-period-updates 270000", "--lr-scheduler cosine", "--lr-shrink 0.75",
        "--warmup-updates 16000", "--warmup-init-lr 1e-07", "--stop-min-lr 1e-09",
        "--optimizer nag", "--min-lr 0.0001", "--clip-norm 0.1", "--criterion adaptive_loss",
        "--max-tokens 3072", "--update-freq 3", "--tokens-per-sample 3072", "--seed 1",
        "--sample-break-mode none", "--skip-invalid-size-inputs-valid-test",
        "--ddp-backend=legacy_ddp", "--fp16")  # FP16=1: as on a CUDA machine (auto)
    dump = one("fairseq-eval-lm", "--gen-subset train")
    assert has(dump, "--save-knnlm-dstore", "--dstore-fp16", "--knn-keytype ffn_input_after_ln",
               "--tokens-per-sample 3072", "--context-window 1536", "--sample-break-mode none",
               "--max-tokens 3072", "--softmax-batch 1024")
    one("knnlm-build-index", "--index-type ivfpq", "--ncentroids 4096", "--code-size 64",
        "--train-size 1000000", "--probe 32", "--seed 1")
    evals = [c for c in cmds if has(c, "fairseq-eval-lm") and not has(c, "--gen-subset train")]
    # 03 (valid, test), 06 (4 settings x 2 splits), 07 (valid)
    assert len(evals) == 11, evals
    for c in evals:
        assert has(c, "--context-window 2560", "--tokens-per-sample 3072",
                   "--sample-break-mode complete"), c
    knn = [c for c in evals if has(c, "--knnlm")]
    assert len(knn) == 5, knn
    for c in knn:
        assert has(c, "--k 1024", "--lmbda 0.25", "--probe 32", "--knn-sim-func l2",
                   "--knn-temp 1"), c
    for c in evals:
        if has(c, "--knn-cache"):
            assert has(c, "--cache-length 2560"), c
    save = one("--knn-save-neighbors")
    assert has(save, "--gen-subset valid", "--k 1024")
    sweep = [c for c in cmds if c.startswith("knnlm-sweep")]
    if sweep:  # else 07 said that knnlm-sweep is not installed
        assert has(sweep[0], f"--lambdas {SWEEP_LAMBDAS}", "--temps 1",
                   "--ks 1,2,4,8,16,32,64,128,256,512,1024"), sweep
    else:
        assert "knnlm-sweep is not installed" in out


def test_fp16_training_follows_the_device(tmp_path: Path) -> None:
    """--fp16 (the authors' training) only where torch sees CUDA: FP16=auto on this machine
    gives it exactly when a GPU is visible; FP16=0 never."""
    import torch

    raw = tmp_path / "raw"
    raw.mkdir()
    for split in ("train", "valid", "test"):
        (raw / f"wiki.{split}.tokens").write_text("")
    for fp16, want in (("auto", torch.cuda.is_available()), ("0", False)):
        out = run_all(tmp_path / f"run_{fp16}", timeout=120, DRY_RUN="1",
                      WIKITEXT103_DIR=str(raw), FP16=fp16)
        train = [line for line in out.splitlines() if line.startswith("+ fairseq-train")]
        assert len(train) == 1 and has(train[0], "--fp16") == want, (fp16, train)


@pytest.mark.skipif(not (WIKITEXT2_DIR / "wiki.train.tokens").exists(),
                    reason=f"no WikiText-2 at {WIKITEXT2_DIR} (set WIKITEXT2_DIR)")
def test_small_pipeline_runs_every_script(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    out = run_all(run_dir, timeout=900, SMALL="1", WIKITEXT103_DIR=str(WIKITEXT2_DIR))
    for step in ("01_prepare_data", "02_train_lm", "03_eval_lm", "04_dump_datastore",
                 "05_build_index", "06_eval_knnlm", "07_sweep"):
        assert f"=== {step} done" in out, out[-3000:]
    logs = run_dir / "logs"
    ppl = {}
    for name in ("base", "knnlm", "cache", "knnlm_cache"):
        for split in ("valid", "test"):
            text = (logs / f"eval_{name}_{split}.log").read_text()
            found = re.findall(r"Perplexity: ([0-9.]+)", text)
            assert found, text[-2000:]
            ppl[name, split] = float(found[-1])
            assert math.isfinite(ppl[name, split]) and ppl[name, split] > 1
            if "knnlm" in name:
                assert re.search(r"kNN-LM( \+ continuous cache)?: \d+ tokens; LM ppl [0-9.]+ "
                                 r"-> final ppl", text)
            elif name == "cache":  # the cache alone logs its summary as the cache's
                assert re.search(r"continuous cache: \d+ tokens; LM ppl", text)
                assert "kNN-LM:" not in text
    assert "knnlm_cache" in (logs / "summary.txt").read_text()
    # the datastore has one row per token of the slice's train split (one </s> per line)
    lines = (run_dir / "slice" / "wiki.train.tokens").read_text(encoding="utf-8").splitlines()
    n_tokens = sum(len(line.split()) + 1 for line in lines)
    m = re.search(r"wiki\.train\.tokens: (\d+) sents, (\d+) tokens",
                  (logs / "preprocess.log").read_text())
    assert m and int(m.group(2)) == n_tokens, m
    meta = json.loads((run_dir / "dstore" / "train_meta.json").read_text())
    assert meta["size"] == n_tokens
    assert (meta["dim"], meta["keytype"], meta["key_dtype"]) == (64, "ffn_input_after_ln",
                                                                  "float16")
    assert (meta["tokens_per_sample"], meta["context_window"]) == (256, 128)
    assert (run_dir / "dstore" / "train.index.meta.json").exists()
    if "knnlm-sweep is not installed" not in out:
        sweep = json.loads((run_dir / "sweep_valid.json").read_text())
        assert sweep["rows"] and sweep["best"]["ppl"] <= sweep["base"]["ppl"]
        assert (run_dir / "plots" / "ppl_vs_lambda.png").exists()

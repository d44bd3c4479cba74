"""Session fixtures: a tiny synthetic corpus with repeated phrases, binarized by
fairseq-preprocess, a 2-layer 32-d Transformer LM trained for a few updates, and helpers to
run fairseq-eval-lm with the plugin (in-process for speed, or as the real console script).

All of it builds in about a minute on 2 CPU cores and needs no internet.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
USER_DIR = str(ROOT / "fairseq_knnlm")
BIN = Path(sys.executable).parent
TPS, CW = 32, 16  # tokens per sample and context window of the tiny setup


def _corpus(n_lines: int, rng: random.Random, phrases: list[str]) -> str:
    """Lines 'A B A' of random phrases: phrases recur across the corpus (the datastore helps)
    and within a few tokens (the cache helps)."""
    lines = []
    for _ in range(n_lines):
        a, b = rng.choice(phrases), rng.choice(phrases)
        lines.append(f"{a} {b} {a}\n")
    return "".join(lines)


def run(cmd: list[str], cwd: Path | None = None) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True)
    if p.returncode != 0:
        raise RuntimeError(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout[-4000:]}")
    return p.stdout


def searches_logged(caplog: pytest.LogCaptureFixture) -> tuple[int, int]:
    """(S, N) of the last 'kNN-LM searches: S of N tokens (x%)' line logged; clears the log."""
    lines = [r.getMessage() for r in caplog.records if "kNN-LM searches:" in r.getMessage()]
    assert lines, "no searches line"
    m = re.search(r"kNN-LM searches: (\d+) of (\d+) tokens \((\d+\.\d)%\)", lines[-1])
    assert m, lines[-1]
    caplog.clear()
    return int(m.group(1)), int(m.group(2))


def parse_ppl(log: str) -> float:
    m = re.findall(r"Perplexity: ([0-9.]+)", log)
    assert m, log[-2000:]
    return float(m[-1])


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Corpus, binarized data and a trained tiny LM: {'dir', 'data', 'ckpt', 'raw'}."""
    d = tmp_path_factory.mktemp("tiny")
    rng = random.Random(0)
    words = [f"w{i}" for i in range(60)]
    phrases = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))) for _ in range(25)]
    raw = d / "raw"
    raw.mkdir()
    for split, n in (("train", 300), ("valid", 40), ("test", 40)):
        (raw / f"{split}.txt").write_text(_corpus(n, rng, phrases))
    data = d / "bin"
    run([str(BIN / "fairseq-preprocess"), "--only-source", "--trainpref", str(raw / "train.txt"),
         "--validpref", str(raw / "valid.txt"), "--testpref", str(raw / "test.txt"),
         "--destdir", str(data), "--workers", "1"])
    ckpt_dir = d / "ckpt"
    run([str(BIN / "fairseq-train"), str(data), "--task", "language_modeling",
         "--arch", "transformer_lm", "--decoder-layers", "2", "--decoder-embed-dim", "32",
         "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "2",
         "--decoder-input-dim", "32", "--decoder-output-dim", "32", "--decoder-normalize-before",
         "--tokens-per-sample", str(TPS), "--sample-break-mode", "none", "--max-tokens", "512",
         "--optimizer", "adam", "--lr", "0.005", "--max-update", "30", "--cpu",
         "--num-workers", "0", "--save-dir", str(ckpt_dir), "--no-epoch-checkpoints",
         "--log-format", "simple", "--seed", "1"])
    return {"dir": d, "data": data, "ckpt": ckpt_dir / "checkpoint_last.pt", "raw": raw}


def eval_args(tiny: dict, subset: str = "test", *extra: str, context_window: int = CW,
              user_dir: bool = True) -> list[str]:
    args = [str(tiny["data"]), "--path", str(tiny["ckpt"]), "--gen-subset", subset,
            "--tokens-per-sample", str(TPS), "--context-window", str(context_window),
            "--sample-break-mode", "none", "--max-tokens", "1024", "--cpu", "--num-workers", "0"]
    if user_dir:
        args += ["--user-dir", USER_DIR]
    return args + list(extra)


def eval_lm_inprocess(args: list[str]) -> dict:
    """fairseq-eval-lm's own parse + (wrapped) main in this process; returns its results."""
    import fairseq_cli.eval_lm as ev
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_eval_lm_parser()
    a = options.parse_args_and_arch(parser, args)
    res = ev.main(convert_namespace_to_omegaconf(a))
    return {k: float(v) for k, v in res.items()}  # eval-lm returns 0-d tensors


@pytest.fixture(scope="session")
def dstore(tiny: dict) -> Path:
    """A float32 train datastore of the tiny LM, with a flat index next to it."""
    from fairseq_knnlm.index.build import build_index
    from fairseq_knnlm.index.kinds import IndexSettings

    prefix = tiny["dir"] / "dstore" / "train"
    eval_lm_inprocess(eval_args(tiny, "train", "--save-knnlm-dstore", "--dstore-mmap",
                                str(prefix)))
    build_index(prefix, f"{prefix}.flat", IndexSettings(index_type="flat"), progress=False)
    return prefix


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray (2 CPUs, no dashboard) for every Ray test of the session,
    started on first use and shut down at the end (starting one costs seconds)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
                 log_to_driver=False)
    yield ray
    ray.shutdown()

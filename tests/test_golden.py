"""Golden outputs: what the commands print, pinned on the tiny fixture (conftest.py).

Every case runs the real console scripts (fairseq-eval-lm with --user-dir, and the knnlm-*
commands, as subprocesses) and compares the lines a user reads as results with a plain-text
file in tests/golden/<case>.txt, whose first line is a comment giving the command it pins.
They guard refactors that must leave behaviour unchanged: a mismatch fails with a unified
diff.

    KNNLM_UPDATE_GOLDEN=1 python -m pytest -q tests/test_golden.py   # (re)write the goldens

Without KNNLM_UPDATE_GOLDEN=1 a missing golden file is a failure.

What is normalised before the comparison (numbers stay exactly as printed):
- log prefixes (timestamp, level, logger name: logger names follow the module layout, which a
  refactor may change); lines are kept as "message", or "WARNING: message" above INFO;
- the session's temporary folder -> <TMP>, the repository root -> <ROOT>;
- durations ("in 0.12s", "12.3 s"), throughputs ("1,234 tokens/s"), ETAs;
- a dump's random dump_id (any 32-64 digit hex string) -> <HASH>;
- FAISS's loader and k-means noise ("could not load swigfaiss_avx2", "WARNING clustering
  ...") and the periodic progress lines (the machine's speed decides how many are printed);
- log records of other packages are dropped: only this package's log lines, what the
  commands print, and fairseq-eval-lm's "Loss (base 2): ..., Perplexity: ..." line are kept
  (fairseq's config dump and model-loading lines are not this package's behaviour);
- from knnlm-explain's JSON the fields that hold paths (VOLATILE_JSON).

Determinism: two fresh sessions write identical goldens (the tiny LM is retrained by
conftest.py each session, with --seed 1). The subprocesses run with OMP_NUM_THREADS=1 (and
MKL_NUM_THREADS=1) so that FAISS's k-means (knnlm-build-index's IVFPQ training,
knnlm-clusters) and torch's reductions cannot depend on the machine's core count; on the
2-core machine the goldens were written on, 2 threads gave the same files.

The numbers are a kind of CPU's, named in golden/MACHINE (vendor, torch's CPU capability,
FAISS's SIMD level): torch's kernels and MKL, and FAISS's distances and k-means, change their
last float digits with the instruction set (the tiny LM is trained, and the IVFPQ index and
the lambda model are fitted, on that machine, so the digits travel down the pipeline: an
AVX2 EPYC against the generic build they were first written with moved the final ppl of
knnlm_faiss_l2 from 6.9511 to 6.9546, the fitted lambda model's from 5.649 to 5.646 and one
sweep's row order). On the machine kind of golden/MACHINE every line must match exactly; on
another (CI machines vary) the check is FOREIGN: every line must be there with the same
words (numbers masked, in any order), and each float on a line in the same place within
FOREIGN_RTOL relative (FOREIGN_ATOL absolute) of the golden; counts are not compared. The
test says which check it ran.

Run: python -m pytest -q tests/test_golden.py
"""

from __future__ import annotations

import difflib
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import pytest
from conftest import BIN, CW, ROOT, TPS, USER_DIR

GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("KNNLM_UPDATE_GOLDEN") == "1"

MACHINE = GOLDEN / "MACHINE"
FOREIGN_RTOL, FOREIGN_ATOL = 0.05, 0.01  # last-digit noise: observed at most 1.6% (fit_lambda)

K, T, LMBDA = "8", "2", "0.3"  # small k on the tiny datastore (5,770 keys)

# knnlm-explain --json fields that name files (removed before pinning; the JSON holds no
# times or versions)
VOLATILE_JSON = {"checkpoint", "dstore", "indexfile"}


# ---- running and normalising ----

_FAIRSEQ_PREFIX = re.compile(  # fairseq / our CLIs: "2024-01-02 03:04:05 | INFO | name | msg"
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:,\d+)? \| (?P<level>[A-Z]+) \| "
    r"(?:(?P<name>[\w.]+) \| )?(?P<msg>.*)$")
_PLAIN_PREFIX = re.compile(r"^(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL):(?P<name>[\w.]+):"
                           r"(?P<msg>.*)$")  # logging's default format
# not this package's output: FAISS's loader (which instruction set it could load), its C++
# k-means warnings (their number is PQ training's detail), fairseq's optional-import note
# (Python warnings are off: PYTHONWARNINGS=ignore)
_NOISE = re.compile(r"swigfaiss|Loading faiss|loaded faiss|FAISS_OPT_LEVEL|"
                    r"Could not load library with|^WARNING clustering \d+ points|"
                    r"Please install tensorboardX")
# the periodic progress lines (how many there are depends on the machine's speed)
_PROGRESS = re.compile(r"^progress \(|^\S*\s*\d+%\|")


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _run(cmd: list[str]) -> str:
    p = subprocess.run(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"command failed ({p.returncode}): {' '.join(cmd)}\n"
                           f"{p.stdout[-4000:]}")
    return p.stdout


class Norm:
    """Replaces the session's paths and the volatile parts of a line."""

    def __init__(self, tmp: Path) -> None:
        self.subs = [(str(Path(tmp).resolve()), "<TMP>"), (str(tmp), "<TMP>"),
                     (str(ROOT), "<ROOT>")]

    def paths(self, s: str) -> str:
        for a, b in self.subs:
            s = s.replace(a, b)
        return s

    def line(self, s: str) -> str:
        s = self.paths(s)
        s = re.sub(r"\b\d+(?:\.\d+)?\s?(?:ms|s|sec|seconds|min)\b(?!\w)", "<TIME>", s)
        s = re.sub(r"[\d,]+(?:\.\d+)?\s?(?:tokens|keys|queries|rows|it)/s\b", "<RATE>", s)
        s = re.sub(r"ETA\s+\S+", "ETA <TIME>", s)
        s = re.sub(r"\b\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d\S*", "<DATE>", s)
        s = re.sub(r"\b[0-9a-f]{32,64}\b", "<HASH>", s)  # a dump's random dump_id
        return s.rstrip()

    def cmd(self, cmd: list[str]) -> str:
        """The command as typed: the console script by its name (not the venv's path)."""
        return self.paths(" ".join([Path(cmd[0]).name, *cmd[1:]]))


def _split_log(raw: str) -> list[tuple[str | None, str | None, str]]:
    """(level, logger name, message) of each output line; level None: not a log record (a
    print, or the continuation of a multi-line record); name None: a format without it."""
    out = []
    for ln in raw.splitlines():
        m = _FAIRSEQ_PREFIX.match(ln) or _PLAIN_PREFIX.match(ln)
        if m:
            out.append((m.group("level"), m.group("name"), m.group("msg")))
        else:
            out.append((None, None, ln))
    return out


def _ours(level: str | None, name: str | None, msg: str) -> bool:
    """A line this package prints or logs, or eval-lm's perplexity line."""
    if level is None or name is None:  # a print, or a log format without the logger name
        return True
    if name == "fairseq_cli.eval_lm":
        return msg.startswith("Loss (base 2)")
    return name.split(".")[0] == "fairseq_knnlm"


def pinned_lines(raw: str, norm: Norm) -> list[str]:
    """The lines of a command's output that a golden file pins, normalised."""
    keep = []
    for level, name, msg in _split_log(raw):
        if _NOISE.search(msg) or _PROGRESS.search(msg) or not _ours(level, name, msg):
            continue
        keep.append(f"{level}: {msg}" if level not in (None, "INFO", "DEBUG") else msg)
    while keep and not keep[-1].strip():
        keep.pop()
    return [norm.line(x) for x in keep]


def scrub_json(x):
    """The JSON less VOLATILE_JSON fields (recursively)."""
    if isinstance(x, dict):
        return {k: scrub_json(v) for k, v in x.items() if k not in VOLATILE_JSON}
    if isinstance(x, list):
        return [scrub_json(v) for v in x]
    return x


def machine_signature() -> str:
    """What decides the goldens' last float digits: CPU vendor, torch's and FAISS's SIMD."""
    import faiss
    import torch

    vendor = platform.processor() or platform.machine()
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("vendor_id"):
                vendor = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    simd = getattr(faiss, "SIMDConfig", None)
    level = simd.get_level_name() if simd is not None else faiss.get_compile_options()
    cap = torch.backends.cpu.get_cpu_capability()
    return f"{platform.machine()} {vendor} torch={cap} faiss={level}"


_NUM = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def _masked(line: str) -> str:
    return _NUM.sub("#", line)


def foreign_mismatch(want: list[str], got: list[str]) -> str | None:
    """None if ``got`` matches ``want`` as the FOREIGN check asks (module docstring), else why
    not, in one line."""
    if sorted(map(_masked, want)) != sorted(map(_masked, got)):
        extra = sorted(set(map(_masked, got)) - set(map(_masked, want)))
        gone = sorted(set(map(_masked, want)) - set(map(_masked, got)))
        return (f"lines differ beyond their numbers: new {extra[:2]}, gone {gone[:2]}"
                if extra or gone else "the same lines, a different number of times")
    for i, (w, g) in enumerate(zip(want, got)):
        if _masked(w) != _masked(g):
            continue  # the row moved (a sorted table whose close values swapped)
        for a, b in zip(_NUM.findall(w), _NUM.findall(g)):
            if not any(c in a + b for c in ".eE"):
                continue  # a count: it follows the neighbours, which may differ
            x, y = float(a), float(b)
            if abs(x - y) > FOREIGN_RTOL * max(abs(x), abs(y)) + FOREIGN_ATOL:
                return f"line {i + 1}: {a} -> {b} (beyond {FOREIGN_RTOL:.0%}): {g.strip()}"
    return None


# ---- the cases (run once per session, in order: later ones use earlier ones' files) ----

def _eval_lm(tiny: dict, subset: str, *extra: str, max_tokens: int = 1024) -> list[str]:
    return [str(BIN / "fairseq-eval-lm"), str(tiny["data"]), "--path", str(tiny["ckpt"]),
            "--gen-subset", subset, "--tokens-per-sample", str(TPS), "--context-window",
            str(CW), "--sample-break-mode", "none", "--max-tokens", str(max_tokens), "--cpu",
            "--num-workers", "0", "--user-dir", USER_DIR, *extra]


CASES = ["eval_lm_base", "dump", "build_index", "knnlm_l2", "knnlm_faiss_l2", "cache_only",
         "knnlm_cache", "pointers", "clusters", "knnlm_clusters", "save_neighbors",
         "save_neighbors_ivfpq",
         "fit_lambda", "lambda_model", "lambda_model_skip", "sweep", "sweep_pointers",
         "explain"]


@pytest.fixture(scope="module")
def outputs(tiny, dstore, tmp_path_factory) -> dict[str, tuple[str, list[str]]]:
    """case -> (the command, normalised; its pinned lines)."""
    base = tmp_path_factory.getbasetemp()
    norm = Norm(base)
    d = tmp_path_factory.mktemp("golden")
    res: dict[str, tuple[str, list[str]]] = {}

    def case(name: str, cmd: list[str], lines) -> str:
        raw = _run(cmd)
        res[name] = (norm.cmd(cmd), lines(raw, norm))
        return raw

    def ev(name: str, subset: str, *extra: str, max_tokens: int = 1024) -> str:
        return case(name, _eval_lm(tiny, subset, *extra, max_tokens=max_tokens), pinned_lines)

    flat = f"{dstore}.flat"  # the conftest datastore of train, with its flat (exact) index
    knn = ("--knnlm", "--dstore-filename", str(dstore), "--k", K, "--knn-temp", T)

    ev("eval_lm_base", "test")
    dump = d / "dstore" / "train"
    ev("dump", "train", "--save-knnlm-dstore", "--dstore-mmap", str(dump))
    ivfpq = d / "dstore" / "train.ivfpq"
    case("build_index", [str(BIN / "knnlm-build-index"), "--dstore-mmap", str(dump),
                         "--faiss-index", str(ivfpq), "--index-type", "ivfpq",
                         "--ncentroids", "16", "--code-size", "8", "--probe", "4",
                         "--seed", "1"], pinned_lines)
    ev("knnlm_l2", "test", *knn, "--indexfile", flat, "--lmbda", LMBDA)
    ev("knnlm_faiss_l2", "test", "--knnlm", "--dstore-filename", str(dump), "--indexfile",
       str(ivfpq), "--k", K, "--knn-temp", T, "--lmbda", LMBDA, "--probe", "4",
       "--knn-sim-func", "faiss_l2")
    cache = ("--knn-cache", "--cache-lmbda", "0.2", "--cache-theta", "0.05")
    ev("cache_only", "test", *cache)
    ev("knnlm_cache", "test", *knn, "--indexfile", flat, "--lmbda", LMBDA, *cache)
    # pointers in batches of 256 tokens (8 blocks), so that they also cross batches
    ptr = (*knn, "--indexfile", flat, "--lmbda", LMBDA, "--knn-pointers")
    ev("pointers", "valid", *ptr, "--knn-min-pointers", "4", max_tokens=256)
    cl = d / "clusters" / "c40"
    case("clusters", [str(BIN / "knnlm-clusters"), str(dstore), str(cl), "--num-clusters",
                      "40", "--niter", "5"], pinned_lines)
    ev("knnlm_clusters", "valid", *ptr, "--knn-min-pointers", "4", "--knn-clusters", str(cl),
       max_tokens=256)
    # full-search passes (min pointers > k) saved: valid with the flat index (the lambda
    # model's tuning data), test with the IVFPQ one (the sweeps' input: FAISS's quantized
    # distances then differ from exact L2, and so do the two k-selections)
    nbrs = d / "nbrs"
    full = ("--knn-pointers", "--knn-min-pointers", str(int(K) + 1))
    ev("save_neighbors", "valid", *knn, "--indexfile", flat, "--lmbda", LMBDA, *full,
       "--knn-save-neighbors", str(nbrs / "valid"), max_tokens=256)
    ev("save_neighbors_ivfpq", "test", "--knnlm", "--dstore-filename", str(dump),
       "--indexfile", str(ivfpq), "--probe", "4", "--k", K, "--knn-temp", T, "--lmbda", LMBDA,
       *full, "--knn-save-neighbors", str(nbrs / "test"), max_tokens=256)
    lam = d / "lam" / "mlp.npz"
    case("fit_lambda", [str(BIN / "knnlm-fit-lambda"), str(nbrs / "valid"), "--out", str(lam),
                        "--kind", "mlp", "--temp", T, "--steps", "200", "--force"], pinned_lines)
    ev("lambda_model", "test", *knn, "--indexfile", flat, "--knn-lambda-model", str(lam))
    # the tiny fixture's gate is almost constant (its lambdas on test lie in 0.6672-0.6681,
    # whatever --steps), so only a threshold inside that range skips any search: 0.6676
    # skips about a third of them (neighbouring gate values differ by ~1e-6, far above
    # float32 noise at 0.67, so the count is stable)
    ev("lambda_model_skip", "test", *knn, "--indexfile", flat, "--knn-lambda-model", str(lam),
       "--knn-skip-below", "0.6676")
    sweep_json = d / "sweep.json"
    sweep_cmd = [str(BIN / "knnlm-sweep"), str(nbrs / "test"), "--lambdas", "0,0.25,0.5",
                 "--ks", "4,8", "--temps", "1,2", "--dists", "l2,faiss_l2", "--k-select",
                 "faiss,exact-l2", "--json", str(sweep_json)]
    raw = _run(sweep_cmd)
    # the table prints the 10 best rows; the JSON's rows pin the others too
    rows = [" ".join(f"{key}={r[key]!r}" for key in ("dist", "k_select", "temperature", "k",
                                                     "lambda", "cache_lambda", "ppl"))
            for r in json.loads(sweep_json.read_text())["rows"]]
    res["sweep"] = (norm.cmd(sweep_cmd), pinned_lines(raw, norm) + ["", "# all rows (--json):"]
                    + rows)
    case("sweep_pointers", [str(BIN / "knnlm-sweep"), str(nbrs / "test"),
                            "--pointer-thresholds", "1,4,9", "--lambdas", LMBDA, "--temps", T],
         pinned_lines)

    js = d / "explain.json"
    ex_cmd = [str(BIN / "knnlm-explain"), *_eval_lm(tiny, "valid")[1:], "--dstore-filename",
              str(dstore), "--indexfile", flat, "--k", K, "--lmbda", LMBDA, "--knn-temp", T,
              "--start", "100", "--length", "12", "--top", "3", "--json", str(js)]
    raw = _run(ex_cmd)
    doc = scrub_json(json.loads(js.read_text(encoding="utf-8")))
    text = norm.paths(json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False))
    res["explain"] = (norm.cmd(ex_cmd), text.splitlines() + ["", "# printed:"]
                      + pinned_lines(raw, norm))
    return res


@pytest.mark.parametrize("name", CASES)
def test_golden(outputs, name):
    cmd, lines = outputs[name]
    # a filter that lost the results (say, a logger renamed outside fairseq_knnlm) must not
    # pass unnoticed, not even in update mode
    assert any(x.strip() for x in lines), f"{name}: nothing pinned"
    if cmd.startswith(("fairseq-eval-lm", "knnlm-explain")):
        assert any(x.startswith("Loss (base 2):") for x in lines), f"{name}: no ppl line"
    got = f"# {cmd}\n" + "".join(f"{x}\n" for x in lines)
    path = GOLDEN / f"{name}.txt"
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(got, encoding="utf-8")
        MACHINE.write_text(machine_signature() + "\n", encoding="utf-8")
        return
    assert path.exists(), (f"no golden file {path}: run with KNNLM_UPDATE_GOLDEN=1 to "
                           "write it")
    want = path.read_text(encoding="utf-8")
    if got == want:
        return
    diff = "".join(difflib.unified_diff(want.splitlines(True), got.splitlines(True),
                                        f"golden/{name}.txt", "this run"))
    here = machine_signature()
    there = MACHINE.read_text(encoding="utf-8").strip() if MACHINE.exists() else "unknown"
    if here == there:
        pytest.fail(f"output differs from golden/{name}.txt "
                    f"(KNNLM_UPDATE_GOLDEN=1 rewrites it):\n{diff}", pytrace=False)
    why = foreign_mismatch(want.splitlines(), got.splitlines())
    if why is not None:
        pytest.fail(f"output differs from golden/{name}.txt beyond another CPU's float noise "
                    f"(this machine: {here}; goldens: {there}): {why}\n{diff}", pytrace=False)
    print(f"golden/{name}.txt: FOREIGN check ({here}; goldens: {there}) passed")


def test_foreign_check_fails_on_real_changes():
    """The FOREIGN check passes last-digit noise and a swapped row, and fails on a changed
    word, a lost line or a float moved beyond FOREIGN_RTOL."""
    want = ["kNN-LM: 731 tokens; LM ppl 8.9284 -> final ppl 6.9511", "a 1 6.653", "b 2 6.658",
            "searches: 377 of 731"]
    assert foreign_mismatch(want, want) is None
    noisy = ["kNN-LM: 731 tokens; LM ppl 8.9285 -> final ppl 6.9546", "b 2 6.658",
             "a 1 6.653", "searches: 374 of 731"]
    assert foreign_mismatch(want, noisy) is None
    assert foreign_mismatch(want, [want[0].replace("final", "cache")] + want[1:])
    assert foreign_mismatch(want, want[:-1])
    assert "beyond" in foreign_mismatch(want, [want[0].replace("6.9511", "7.4")] + want[1:])

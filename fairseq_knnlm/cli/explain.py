"""knnlm-explain: the neighbours behind every kNN-LM prediction, in the terminal, as JSON and
as a web page (the paper's Figure 6, for any token).

    knnlm-explain DATA --path CKPT --gen-subset valid --tokens-per-sample 512 \\
        --context-window 256 --sample-break-mode none --max-tokens 4096 \\
        --dstore-filename PREFIX --indexfile INDEX --k 16 --lmbda 0.25 --knn-temp 10 \\
        [--start N --length M | --text "raw text" | --text-file F] [--top 5] \\
        [--json OUT.json] [--html OUT.html] [--aggregate [--plot OUT.png]]

Every fairseq-eval-lm flag works as there (--knnlm and --user-dir are added); the numbers are
the scorer's own (an observer of eval-lm's pass), so the perplexity of the explained tokens
is eval-lm's. --start/--length pick tokens of the subset's stream by position; only the
blocks that hold them are scored, each behind the same left context as in a whole pass.
--text / --text-file explain any text: it is binarized with the model's dictionary as
fairseq-preprocess does. Neighbour contexts are read from DATA/<the datastore's split> through
the datastore's position map. --aggregate adds the paper's Section 6 view: which targets gain
from retrieval, by their frequency in the datastore's split and by the longest n-gram ending at
them that occurs there.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from fairseq_knnlm.errors import FlagError, KNNLMError

logger = logging.getLogger("fairseq_knnlm.cli.explain")
PROG = "knnlm-explain"
TEXT_SPLIT = "text"


def get_parser() -> argparse.ArgumentParser:
    """knnlm-explain's own flags; everything else goes to fairseq-eval-lm's parser."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="plus every fairseq-eval-lm flag (fairseq-eval-lm "
                                       "--help)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--text", default=None, help="explain this text instead of --gen-subset")
    what.add_argument("--text-file", default=None, help="explain the text of this file")
    p.add_argument("--start", type=int, default=0,
                   help="first stream position explained (default 0)")
    p.add_argument("--length", type=int, default=None,
                   help="tokens explained from --start (default: to the end)")
    p.add_argument("--top", type=int, default=5, help="neighbours shown per token (default 5)")
    p.add_argument("--context-tokens", type=int, default=20,
                   help="training-context tokens before each neighbour (default 20)")
    p.add_argument("--json", default=None, help="write every explained token here")
    p.add_argument("--html", default=None, help="write a self-contained web page here")
    p.add_argument("--rows", type=int, default=40,
                   help="terminal: a line per token up to this many tokens, else the marked "
                        "ones only (default 40)")
    p.add_argument("--marks", type=int, default=3,
                   help="terminal: tokens marked as most helped / hurt (default 3 each)")
    p.add_argument("--aggregate", action="store_true",
                   help="also print which targets gain most (by train frequency and by the "
                        "longest n-gram occurring in train); in the JSON too")
    p.add_argument("--max-ngram", type=int, default=8,
                   help="--aggregate: longest n-gram looked up in train (default 8)")
    p.add_argument("--plot", default=None, help="--aggregate: write the bar plot here (PNG)")
    p.add_argument("--whole-pass", action="store_true",
                   help="score the whole subset even with --start/--length (default: only "
                        "the blocks that hold the selected tokens)")
    return p


def check_own_flags(a: argparse.Namespace) -> None:
    """knnlm-explain's flags, before anything is loaded."""
    if a.start < 0:
        raise FlagError(f"--start must be >= 0, got {a.start}")
    if a.length is not None and a.length < 1:
        raise FlagError(f"--length must be >= 1, got {a.length}")
    if a.top < 1:
        raise FlagError(f"--top must be >= 1, got {a.top}")
    if a.context_tokens < 1:
        raise FlagError(f"--context-tokens must be >= 1, got {a.context_tokens}")
    if a.rows < 1 or a.marks < 0:
        raise FlagError("--rows must be >= 1 and --marks >= 0")
    if a.max_ngram < 2:
        raise FlagError(f"--max-ngram must be >= 2, got {a.max_ngram}")
    if a.plot and not a.aggregate:
        raise FlagError("--plot draws the aggregate view: add --aggregate")
    if a.text_file and not Path(a.text_file).is_file():
        raise FlagError(f"--text-file {a.text_file}: no such file")
    for flag, out in (("--json", a.json), ("--html", a.html), ("--plot", a.plot)):
        if out and Path(out).is_dir():
            raise FlagError(f"{flag} {out} is a directory: give a file name")


def _has_flag(argv: list[str], flag: str) -> bool:
    return any(x == flag or x.startswith(flag + "=") for x in argv)


def eval_lm_argv(rest: list[str]) -> list[str]:
    """fairseq-eval-lm's arguments: --user-dir (the plugin) and --knnlm added if missing."""
    import fairseq_knnlm

    out = list(rest)
    if not _has_flag(out, "--user-dir"):
        out += ["--user-dir", str(Path(fairseq_knnlm.__file__).resolve().parent)]
    if "--knnlm" not in out:
        out.append("--knnlm")
    return out


def eval_blocks(cfg: Any) -> tuple[np.ndarray, list[str]]:
    """The (n, 2) stream span of each block eval-lm will score (its windowing: tokens per
    sample less the context window), and the model's dictionary symbols."""
    from fairseq import tasks

    c = copy.deepcopy(cfg)
    if c.eval_lm.context_window > 0:
        c.task.tokens_per_sample -= c.eval_lm.context_window
    task = tasks.setup_task(c.task)
    subset = c.dataset.gen_subset
    data = Path(str(c.task.data).split(":")[0])
    if (data / f"{subset}.bin").is_file() and (data / f"{subset}.bin").stat().st_size == 0:
        raise FlagError(f"--gen-subset {subset}: {data / subset}.bin is empty (0 tokens): "
                        "nothing to explain")
    try:
        task.load_dataset(subset)
    except FileNotFoundError as e:
        raise FlagError(f"--gen-subset {subset}: {e}") from None
    except ValueError as e:  # fairseq's reader of a damaged or empty split
        raise FlagError(f"--gen-subset {subset}: cannot read {data / subset} ({e})") from None
    ds, seen = task.dataset(subset), 0
    while ds is not None and getattr(ds, "slice_indices", None) is None and seen < 10:
        ds, seen = getattr(ds, "dataset", None), seen + 1
    if ds is None or getattr(ds, "slice_indices", None) is None:
        raise KNNLMError(f"{subset}: not a token-block dataset (cannot map positions)")
    return np.asarray(ds.slice_indices, dtype=np.int64), list(task.target_dictionary.symbols)


def run(own: argparse.Namespace, rest: list[str]) -> int:
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from fairseq_knnlm.explain import aggregate as ea
    from fairseq_knnlm.explain import document as ex
    from fairseq_knnlm.explain.document import train_text
    from fairseq_knnlm.explain.html import render_html
    from fairseq_knnlm.flags import check_flags
    from fairseq_knnlm.plugin.eval_lm_patch import knnlm_main
    from fairseq_knnlm.store.datastore import open_datastore

    args = options.parse_args_and_arch(options.get_eval_lm_parser(), eval_lm_argv(rest))
    if getattr(args, "save_knnlm_dstore", False):
        raise FlagError("knnlm-explain scores; dump a datastore with fairseq-eval-lm "
                        "--save-knnlm-dstore")
    data_dir = Path(str(args.data).split(":")[0])
    text = own.text if own.text is not None else (
        Path(own.text_file).read_text(encoding="utf-8") if own.text_file else None)
    with tempfile.TemporaryDirectory(prefix="knnlm-explain-") as tmp:
        text_stats = None
        if text is not None:
            if not ex.text_lines(text):
                what = "--text" if own.text is not None else f"--text-file {own.text_file}"
                raise FlagError(f"{what} is empty: nothing to explain")
            if not (data_dir / "dict.txt").is_file():
                raise FlagError(f"--text needs the model's dictionary: {data_dir}/dict.txt "
                                "not found")
            shutil.copy(data_dir / "dict.txt", Path(tmp) / "dict.txt")
            text_stats = ex.binarize_text(ex.text_lines(text), data_dir / "dict.txt",
                                          Path(tmp) / TEXT_SPLIT)
            args.data, args.gen_subset = tmp, TEXT_SPLIT
        args.distributed_world_size = 1  # one process: the observer lives here
        cfg = convert_namespace_to_omegaconf(args)
        t = cfg.task
        check_flags(t)
        ds = open_datastore(t.dstore_filename, load_keys=False)
        slices, symbols = eval_blocks(cfg)
        total = int(slices[-1, 1]) if len(slices) else 0
        subset = cfg.dataset.gen_subset
        if total == 0:
            raise FlagError(f"--gen-subset {subset} has no tokens: nothing to explain")
        if own.start >= total:
            raise FlagError(f"--start {own.start} is past the end of {subset} ({total} tokens)")
        end = total if own.length is None else min(total, own.start + own.length)
        train = train_text(data_dir, ds, own.context_tokens)
        if own.aggregate and train.stream is None:
            raise FlagError(f"--aggregate needs the datastore's split: {train.unavailable}")
        info: dict[str, Any] = {
            "subset": "--text" if text is not None else subset, "start": own.start,
            "end": end, "k": int(t.k), "lmbda": float(t.lmbda), "knn_temp": float(t.knn_temp),
            "probe": int(t.probe), "sim_func": str(t.knn_sim_func),
            "dstore": str(t.dstore_filename), "indexfile": str(t.indexfile),
            "checkpoint": str(cfg.common_eval.path), "datastore_split": ds.meta.subset,
            "context_window": int(cfg.eval_lm.context_window),
            "tokens_per_sample": int(t.tokens_per_sample)}
        if text_stats is not None:
            info["text"] = text_stats
        if (own.start, end) != (0, total) and not own.whole_pass and \
                int(cfg.dataset.num_shards or 1) <= 1 and not t.knn_save_neighbors:
            b0, b1 = ex.blocks_for_range(slices, own.start, end)
            shards, sid = ex.covering_shard(len(slices), b0, b1)
            if shards > 1:
                cfg.dataset.num_shards, cfg.dataset.shard_id = shards, sid
                logger.info("scoring only the blocks that hold positions [%d, %d) (shard %d of "
                            "%d)", own.start, end, sid, shards)
        collector = ex.Collector(own.start, end, top=own.top, temperature=float(t.knn_temp))
        knnlm_main(cfg, knn_observers=[collector])
        table = collector.table()
        info["scored_tokens"] = collector.seen
        doc = ex.build_doc(table, symbols, train, info)
        agg = None
        if own.aggregate:
            stream = ex.load_split_stream(cfg.task.data, subset)
            assert stream is not None and train.stream is not None
            agg = ea.aggregate(table, stream, train.stream, symbols, max_n=own.max_ngram)
            doc["aggregate"] = agg.to_dict()
    print(ex.format_table(doc, max_rows=own.rows, marks=own.marks))
    if text_stats and text_stats["unknown"]:
        print(f"({text_stats['unknown']} words of the text are not in the model's dictionary: "
              "shown as <unk>)")
    if agg is not None:
        print("\n" + ea.format_aggregate(agg))
    for out, write in ((own.json, lambda p: p.write_text(json.dumps(doc, indent=1))),
                       (own.html, lambda p: p.write_text(render_html(doc), encoding="utf-8")),
                       (own.plot, lambda p: ea.plot_aggregate(agg, p, _label(doc)))):
        if out:
            path = Path(out)
            path.parent.mkdir(parents=True, exist_ok=True)
            write(path)
            print(f"wrote {path}")
    return 0


def _label(doc: dict[str, Any]) -> str:
    """Plot title prefix: the subset and the kNN-LM setting."""
    return (f"{doc.get('subset', '')} (k={doc['k']}, λ={doc['lmbda']:g}, T={doc['knn_temp']:g}):")


def log_to_stderr() -> None:
    """stdout is for the table: fairseq_cli.eval_lm (imported with the plugin) points the root
    logger at stdout. Plain console handlers of the root logger are replaced by one on stderr
    in fairseq's format; other handlers (a test runner's) are left alone."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if type(h) is logging.StreamHandler and h.stream in (sys.stdout, sys.stderr):
            root.removeHandler(h)
    if not any(type(h) is logging.StreamHandler for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                                         datefmt="%Y-%m-%d %H:%M:%S"))
        root.addHandler(h)
    root.setLevel(os.environ.get("LOGLEVEL", "INFO").upper())  # as fairseq_cli does


def cli_main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    log_to_stderr()
    own, rest = get_parser().parse_known_args(argv)
    try:
        check_own_flags(own)
        return run(own, rest)
    except (KNNLMError, OSError, UnicodeDecodeError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli_main())

"""fairseq-eval-lm --help with the plugin (help_patch.py): every kNN-LM flag with its help,
in a "kNN-LM" group; parsing without --help is fairseq's own."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess

import pytest
from conftest import BIN, ROOT, USER_DIR
from fairseq import options

from fairseq_knnlm.plugin import help_patch
from fairseq_knnlm.plugin.config import KNNLMOptions

KNN_FLAGS = ["--" + f.name.replace("_", "-") for f in dataclasses.fields(KNNLMOptions)]
# pieces of help text (issue #14: the pointer flags must be documented in --help)
HELP_PIECES = {
    "--knn-pointers": "search only when fewer than --knn-min-pointers are alive",
    "--knn-min-pointers": "when at least this many are alive, else search",
}


def _squeeze(text: str) -> str:
    """Text without whitespace: argparse wraps help at the terminal width (and after '-')."""
    return "".join(text.split())


def _group(help_text: str, title: str) -> str:
    """The lines of one argument group of an argparse help (up to the next group or the end)."""
    m = re.search(rf"^{re.escape(title)}:\n(.*?)(?=^\S.*:\n|\Z)", help_text, re.M | re.S)
    assert m, f"no {title!r} group in:\n{help_text[-3000:]}"
    return m.group(1)


def _check_knn_group(help_text: str) -> None:
    group = _group(help_text, help_patch.KNN_GROUP)
    for flag in KNN_FLAGS:
        assert re.search(rf"^  {re.escape(flag)}\b", group, re.M), f"{flag} not in:\n{group}"
    for flag, piece in HELP_PIECES.items():
        assert _squeeze(piece) in _squeeze(group), f"help of {flag} not in:\n{group}"


@pytest.mark.parametrize("argv", [
    ["DATA", "--user-dir", "fairseq_knnlm", "--help"],  # the README's form
    ["--user-dir", USER_DIR, "--task", "language_modeling", "-h"],  # no DATA, explicit task
], ids=["readme", "task-no-data"])
def test_console_script_help_lists_knn_flags(argv: list[str]) -> None:
    env = {**os.environ, "COLUMNS": "100"}
    p = subprocess.run([str(BIN / "fairseq-eval-lm"), *argv], cwd=ROOT, env=env, text=True,
                       capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    _check_knn_group(p.stdout)
    task = _group(p.stdout, "language_modeling task")  # the task's own options are listed too
    assert "--tokens-per-sample" in task and "--knnlm" not in task


def _help_in_process(args: list[str], capsys: pytest.CaptureFixture) -> str:
    parser = options.get_eval_lm_parser()
    with pytest.raises(SystemExit) as e:
        options.parse_args_and_arch(parser, args)
    assert e.value.code == 0
    assert "--knnlm" not in parser._option_string_actions  # fairseq's parser is left alone
    return capsys.readouterr().out


def test_help_in_process(capsys: pytest.CaptureFixture) -> None:
    _check_knn_group(_help_in_process(["--task=language_modeling", "--help"], capsys))


def test_help_of_another_task_is_fairseqs(capsys: pytest.CaptureFixture) -> None:
    out = _help_in_process(["--task", "translation", "--help"], capsys)
    assert "kNN-LM:" not in out and "--knnlm" not in out


@pytest.mark.parametrize("args", [
    ["DATA"],
    ["DATA", "--knnlm", "--k", "8", "--lmbda", "0.5", "--knn-pointers",
     "--knn-min-pointers", "3", "--tokens-per-sample", "16", "--context-window", "8"],
])
def test_parsing_without_help_is_fairseqs(args: list[str]) -> None:
    assert options.parse_args_and_arch is help_patch.parse_args_and_arch  # installed
    fairseq_parse = help_patch._fairseq_parse_args_and_arch
    assert fairseq_parse is not None
    ours = options.parse_args_and_arch(options.get_eval_lm_parser(), args)
    theirs = fairseq_parse(options.get_eval_lm_parser(), args)
    assert vars(ours) == vars(theirs)
    assert ours.knn_min_pointers == (3 if "--knn-pointers" in args else 64)


def test_help_after_double_dash_is_not_help(capsys: pytest.CaptureFixture) -> None:
    """'-h' after '--' is a positional for argparse: fairseq's error, not the help."""
    with pytest.raises(SystemExit) as e:
        options.parse_args_and_arch(options.get_eval_lm_parser(), ["DATA", "--", "-h"])
    assert e.value.code == 2
    assert "kNN-LM:" not in capsys.readouterr().out


def test_help_requested() -> None:
    assert help_patch.help_requested(["DATA", "--help"])
    assert help_patch.help_requested(["-h", "DATA"])
    assert not help_patch.help_requested(["DATA", "--", "-h"])
    assert not help_patch.help_requested(["DATA", "--help-me", "--hel"])


def test_selected_task() -> None:
    assert help_patch.selected_task(["DATA"], "language_modeling") == "language_modeling"
    assert help_patch.selected_task(["--task", "a", "--task=b"], None) == "b"
    assert help_patch.selected_task(["--task", "a", "--", "--task", "b"], None) == "a"
    assert help_patch.selected_task(["--task"], "x") == "x"


def test_help_parser_leaves_other_tasks_alone() -> None:
    parser = options.get_eval_lm_parser()
    assert help_patch.help_parser(parser, ["--task", "translation", "-h"]) is None
    assert help_patch.help_parser(parser, ["--task", "no_such_task", "-h"]) is None
    copy = help_patch.help_parser(parser, ["-h"])
    assert copy is not None and "--knn-min-pointers" in copy._option_string_actions
    assert "--knn-min-pointers" not in parser._option_string_actions

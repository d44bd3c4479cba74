"""``--help`` that lists the kNN-LM flags, in their own "kNN-LM" group.

Why stock fairseq 0.12 leaves them out: ``fairseq-eval-lm``'s parser (``options.get_parser``)
is an ``argparse.ArgumentParser`` with argparse's own ``-h/--help``, holding only the common,
dataset, distributed and eval-lm options. The task's options (``language_modeling``'s, and with
them every kNN-LM flag of ``config.KNNLMOptions``) are added inside
``options.parse_args_and_arch``, after a first ``parser.parse_known_args`` that reads
``--task``: with ``--help`` on the command line that first parse already prints the help and
exits, so the task's options never reach it (whatever ``--task`` or DATA says).

The plugin wraps ``fairseq.options.parse_args_and_arch``, which fairseq-eval-lm's ``cli_main``
(and the other fairseq CLIs) look up on the module when they call it, after ``--user-dir`` was
imported. When the arguments ask for help and the selected task is the plugin's, the wrapper
prints the help of a copy of the parser to which the task's options were added (the kNN-LM
flags in a "kNN-LM" group, the others in a "language_modeling task" group) and exits 0, as
argparse does. In every other call (no ``-h``/``--help``, or another task) fairseq's function
runs as it is, on the parser as it is: how flags parse does not change.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from fairseq import options
from fairseq.dataclass import FairseqDataclass
from fairseq.dataclass.utils import gen_parser_from_dataclass

from fairseq_knnlm.plugin.config import KNNLMOptions

HELP_FLAGS = ("-h", "--help")
KNN_GROUP = "kNN-LM"
KNN_GROUP_DESCRIPTION = ("options of the fairseq_knnlm plugin (--user-dir), all off by default: "
                         "dump a datastore (--save-knnlm-dstore), score with it (--knnlm), "
                         "fewer searches (--knn-pointers), continuous cache (--knn-cache)")
# fairseq's own parse_args_and_arch, found by install()
_fairseq_parse_args_and_arch: Optional[Callable[..., Any]] = None


@dataclass
class _KNNLMArgs(FairseqDataclass, KNNLMOptions):
    """The kNN-LM fields alone, in the form gen_parser_from_dataclass reads (help, types,
    defaults exactly as the task's config gives them to the real parser)."""


def help_requested(args: Sequence[str]) -> bool:
    """Whether argparse would see -h/--help (an exact flag before any '--')."""
    for a in args:
        if a == "--":
            return False
        if a in HELP_FLAGS:
            return True
    return False


def selected_task(args: Sequence[str], default: Optional[str]) -> Optional[str]:
    """The value of the last --task (``--task X`` or ``--task=X``) before any '--', else
    ``default``."""
    task = default
    for i, a in enumerate(args):
        if a == "--":
            break
        if a == "--task" and i + 1 < len(args):
            task = args[i + 1]
        elif a.startswith("--task="):
            task = a[len("--task="):]
    return task


def is_knnlm_task(task_cls: Any) -> bool:
    """Whether a registered task class carries the kNN-LM options (the plugin's task)."""
    dc = getattr(task_cls, "__dataclass", None)
    return isinstance(dc, type) and issubclass(dc, KNNLMOptions)


def add_task_groups(parser: argparse.ArgumentParser, task_name: str, task_cls: Any) -> None:
    """Add the task's options to ``parser``: the kNN-LM ones in the "kNN-LM" group, the rest
    in a task group (options the parser already has stay where they are)."""
    task_group = parser.add_argument_group(f"{task_name} task")
    knn_group = parser.add_argument_group(KNN_GROUP, KNN_GROUP_DESCRIPTION)
    gen_parser_from_dataclass(knn_group, _KNNLMArgs())
    # gen_parser_from_dataclass skips the flags already added (argparse's conflict error)
    task_cls.add_args(task_group)


def help_parser(parser: argparse.ArgumentParser, args: Sequence[str],
                modify_parser: Optional[Callable[[argparse.ArgumentParser], None]] = None,
                ) -> Optional[argparse.ArgumentParser]:
    """A copy of ``parser`` with the selected task's options, or None when the task is not the
    plugin's (fairseq's help is then left as it is). ``parser`` itself is not changed."""
    from fairseq.tasks import TASK_REGISTRY

    task_name = selected_task(args, parser.get_default("task"))
    task_cls = TASK_REGISTRY.get(task_name) if task_name else None
    if task_cls is None or not is_knnlm_task(task_cls):
        return None
    copy = argparse.ArgumentParser(
        prog=parser.prog, usage=parser.usage, description=parser.description,
        epilog=parser.epilog, formatter_class=parser.formatter_class,
        conflict_handler=parser.conflict_handler, allow_abbrev=parser.allow_abbrev,
        add_help=False, parents=[parser])
    if modify_parser is not None:
        modify_parser(copy)
    add_task_groups(copy, task_name, task_cls)
    return copy


def parse_args_and_arch(parser: argparse.ArgumentParser, input_args: Optional[list[str]] = None,
                        parse_known: bool = False, suppress_defaults: bool = False,
                        modify_parser: Optional[Callable[[argparse.ArgumentParser], None]] = None,
                        ) -> Any:
    """fairseq's ``options.parse_args_and_arch``, whose --help also lists the plugin task's
    options (and exits 0); any call without --help is fairseq's own."""
    assert _fairseq_parse_args_and_arch is not None, "help_patch.install() did not run"
    args = sys.argv[1:] if input_args is None else input_args
    if help_requested(args):
        copy = help_parser(parser, args, modify_parser)
        if copy is not None:
            copy.parse_known_args(input_args)  # prints the help and exits, as argparse does
    return _fairseq_parse_args_and_arch(parser, input_args=input_args, parse_known=parse_known,
                                        suppress_defaults=suppress_defaults,
                                        modify_parser=modify_parser)


def install() -> None:
    """Put the wrapper in place of ``fairseq.options.parse_args_and_arch`` (once)."""
    global _fairseq_parse_args_and_arch
    current = options.parse_args_and_arch
    if getattr(current, "_knnlm_help", False):  # this wrapper, also from a reloaded module
        return
    _fairseq_parse_args_and_arch = current
    options.parse_args_and_arch = parse_args_and_arch


parse_args_and_arch._knnlm_help = True  # type: ignore[attr-defined]

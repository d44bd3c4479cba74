"""Wires the plugin into stock ``fairseq-eval-lm`` without editing fairseq.

``fairseq_cli.eval_lm`` builds ``SequenceScorer`` itself and calls ``main`` through
``distributed_utils.call_main(cfg, main)`` after the user dir is imported. So, on import,
the plugin rebinds two names of that module (and of ``__main__`` when it is run with
``python -m fairseq_cli.eval_lm``): ``SequenceScorer`` -> ``KNNSequenceScorer`` and
``main`` -> ``knnlm_main``, fairseq's main inside a kNN-LM run when any kNN-LM option is on.
It also installs help_patch, so that ``fairseq-eval-lm --help`` lists the kNN-LM flags.

``knnlm_main`` is a plain function of this module on purpose: with several GPUs eval-lm
starts its ranks with ``torch.multiprocessing.spawn``, which pickles ``main`` by its qualified
name. This name makes each spawned rank import the plugin and run the kNN-LM, as ranks
started one per process (``--distributed-no-spawn``) do; a wrapper carrying fairseq's name
(functools.wraps) would resolve to fairseq's own main in the rank, and the plugin would not
run there at all.

Errors a user can cause (``errors.KNNLMError``: bad flags, missing or mismatched files) end
the ``fairseq-eval-lm`` process with one line, ``fairseq-eval-lm: error: <message>``, also
when they happen in a spawned rank; ``FAIRSEQ_KNNLM_DEBUG=1`` or ``--knn-debug`` restores the
traceback. This is done by a ``sys.excepthook`` installed only in a ``fairseq-eval-lm``
process: code that calls ``main`` itself (tests, scripts) gets the exceptions as they are.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Optional, Sequence

from fairseq_knnlm.errors import KNNLMError
from fairseq_knnlm.plugin import help_patch
from fairseq_knnlm.plugin.runtime import BatchObserver, KNNEvalRuntime, wants_runtime
from fairseq_knnlm.plugin.scorer import KNNSequenceScorer

logger = logging.getLogger(__name__)

DEBUG_ENV = "FAIRSEQ_KNNLM_DEBUG"
DEBUG_FLAG = "--knn-debug"
EVAL_LM_PROGRAM = "fairseq-eval-lm"
# the console scripts whose user errors are one line (generate_patch.py wires the last two)
PROGRAMS = {EVAL_LM_PROGRAM: "fairseq_cli.eval_lm", "fairseq-interactive":
            "fairseq_cli.interactive", "fairseq-generate": "fairseq_cli.generate"}
# fairseq's own main, found by install(); knnlm_main runs it
_fairseq_main: Optional[Callable[..., Any]] = None


def knnlm_main(cfg: Any, knn_observers: Sequence[BatchObserver] = (), **kwargs: Any) -> Any:
    """fairseq-eval-lm's ``main`` with the kNN-LM run around it when a kNN-LM option is on.

    ``knn_observers``: callables that receive every scored batch's numbers
    (plugin.batch.ScoredBatch: the scorer's own log-probs, not a recomputation), for tools
    built on the scorer such as knnlm-explain; pass them through
    ``distributed_utils.call_main(cfg, knnlm_main, knn_observers=[...])``."""
    from argparse import Namespace

    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    assert _fairseq_main is not None, "fairseq_knnlm.plugin.eval_lm_patch.install() did not run"
    if isinstance(cfg, Namespace):
        cfg = convert_namespace_to_omegaconf(cfg)
    if not wants_runtime(cfg.task):
        return _fairseq_main(cfg, **kwargs)
    rt = KNNEvalRuntime(cfg)
    for obs in knn_observers:
        rt.add_observer(obs)
    with rt.activate():
        try:
            result = _fairseq_main(cfg, **kwargs)
        except BaseException:
            rt.abort()
            raise
        rt.finish()
    return result


# ---- one-line errors ----

_EXC_LINE = re.compile(r"^(fairseq_knnlm(?:\.\w+)*)\.(\w+): (.*)$")


def _is_user_error_class(module: str, name: str) -> bool:
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return False
    return isinstance(cls, type) and issubclass(cls, KNNLMError)


def user_error_message(exc: BaseException) -> Optional[str]:
    """The one-line report of an error the user caused, or None (our bug: keep the traceback).

    A KNNLMError raised in a rank that torch.multiprocessing.spawn started reaches this
    process as a ProcessRaisedException holding the rank's traceback as text, whose last line
    is ``module.Class: message``."""
    if isinstance(exc, KNNLMError):
        return str(exc)
    try:
        from torch.multiprocessing import ProcessRaisedException
    except ImportError:  # pragma: no cover (torch is always there with fairseq)
        return None
    if isinstance(exc, ProcessRaisedException):
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        m = _EXC_LINE.match(lines[-1]) if lines else None
        if m and _is_user_error_class(m.group(1), m.group(2)):
            return m.group(3)
    return None


def debug_requested(argv: Optional[list[str]] = None, env: Optional[dict] = None) -> bool:
    argv = sys.argv if argv is None else argv
    env = os.environ if env is None else env  # type: ignore[assignment]
    return env.get(DEBUG_ENV, "") not in ("", "0") or DEBUG_FLAG in argv


def _excepthook(previous: Callable[..., Any]) -> Callable[..., Any]:
    def hook(exc_type: type, exc: BaseException, tb: Optional[TracebackType]) -> None:
        message = user_error_message(exc)
        if message is None or debug_requested():
            previous(exc_type, exc, tb)
            return
        prog = _running_program() or EVAL_LM_PROGRAM
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)

    hook._knnlm = True  # type: ignore[attr-defined]
    return hook


def _running_program() -> Optional[str]:
    """Which of PROGRAMS this process is (console script or python -m), or None."""
    main = sys.modules.get("__main__")
    spec_name = getattr(getattr(main, "__spec__", None), "name", "")
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    for name, module in PROGRAMS.items():
        if prog.startswith(name) or spec_name == module:
            return name
    return None


def _running_eval_lm() -> bool:
    """Whether this process is fairseq-eval-lm (console script or python -m)."""
    return _running_program() == EVAL_LM_PROGRAM


def install_excepthook() -> None:
    if not getattr(sys.excepthook, "_knnlm", False):
        sys.excepthook = _excepthook(sys.excepthook)


# ---- patching fairseq_cli.eval_lm ----

def _is_eval_lm_module(mod: Any) -> bool:
    f = getattr(mod, "__file__", "") or ""
    return f.replace("\\", "/").endswith("fairseq_cli/eval_lm.py")


def install() -> None:
    global _fairseq_main
    import fairseq_cli.eval_lm as eval_lm  # patch it even if the plugin was imported first

    if eval_lm.main is not knnlm_main:
        _fairseq_main = eval_lm.main
    for name in ("fairseq_cli.eval_lm", "__main__"):
        mod = sys.modules.get(name)
        if mod is None or not _is_eval_lm_module(mod):
            continue
        mod.SequenceScorer = KNNSequenceScorer
        mod.main = knnlm_main
    if _running_program() is not None:
        install_excepthook()
    help_patch.install()


install()

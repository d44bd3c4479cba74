"""Wires the plugin into stock ``fairseq-eval-lm`` without editing fairseq.

``fairseq_cli.eval_lm`` builds ``SequenceScorer`` itself and calls ``main`` through
``distributed_utils.call_main(cfg, main)`` after the user dir is imported. So, on import,
the plugin rebinds two names of that module (and of ``__main__`` when it is run with
``python -m fairseq_cli.eval_lm``): ``SequenceScorer`` -> ``KNNSequenceScorer`` and
``main`` -> ``main`` wrapped in a kNN-LM run when any kNN-LM option is on.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any, Callable

from .runtime import KNNEvalRuntime, wants_runtime
from .scorer import KNNSequenceScorer

logger = logging.getLogger(__name__)


def wrap_main(orig_main: Callable[..., Any]) -> Callable[..., Any]:
    if getattr(orig_main, "_knnlm_wrapped", False):
        return orig_main

    @functools.wraps(orig_main)
    def main(cfg: Any, **kwargs: Any) -> Any:
        from argparse import Namespace

        from fairseq.dataclass.utils import convert_namespace_to_omegaconf

        if isinstance(cfg, Namespace):
            cfg = convert_namespace_to_omegaconf(cfg)
        if not wants_runtime(cfg.task):
            return orig_main(cfg, **kwargs)
        rt = KNNEvalRuntime(cfg)
        with rt.activate():
            try:
                result = orig_main(cfg, **kwargs)
            except BaseException:
                rt.abort()
                raise
            rt.finish()
        return result

    main._knnlm_wrapped = True  # type: ignore[attr-defined]
    return main


def _is_eval_lm_module(mod: Any) -> bool:
    f = getattr(mod, "__file__", "") or ""
    return f.replace("\\", "/").endswith("fairseq_cli/eval_lm.py")


def install() -> None:
    import fairseq_cli.eval_lm  # noqa: F401  (patch it even if the plugin was imported first)

    for name in ("fairseq_cli.eval_lm", "__main__"):
        mod = sys.modules.get(name)
        if mod is None or not _is_eval_lm_module(mod):
            continue
        mod.SequenceScorer = KNNSequenceScorer
        mod.main = wrap_main(mod.main)


install()

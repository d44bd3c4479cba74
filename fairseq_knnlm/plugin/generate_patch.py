"""Wires kNN-LM generation into stock ``fairseq-interactive`` and ``fairseq-generate``
without editing fairseq: on import, the plugin rebinds the ``main`` of
``fairseq_cli.interactive`` and ``fairseq_cli.generate`` (and of ``__main__`` when one of
them runs with ``python -m``) to a wrapper that tells the task which checkpoint it is loading
(the datastore's model check, plugin/generation.py) and logs a summary line at the end. The
kNN-LM itself is bound by the task's ``build_model`` (task.py); user errors end these
programs with one line, as eval-lm's do (eval_lm_patch's excepthook).
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any, Callable

from fairseq_knnlm.plugin.generation import loading_checkpoint

logger = logging.getLogger(__name__)

MODULES = ("fairseq_cli.interactive", "fairseq_cli.generate")
_fairseq_mains: dict[str, Callable[..., Any]] = {}


def _wrapper(module: str) -> Callable[..., Any]:
    def knnlm_generation_main(cfg: Any, **kwargs: Any) -> Any:
        from argparse import Namespace

        from fairseq.dataclass.utils import convert_namespace_to_omegaconf

        if isinstance(cfg, Namespace):
            cfg = convert_namespace_to_omegaconf(cfg)
        with loading_checkpoint(str(cfg.common_eval.path)):
            return _fairseq_mains[module](cfg, **kwargs)

    knnlm_generation_main._knnlm = True  # type: ignore[attr-defined]
    return knnlm_generation_main


def install() -> None:
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:  # pragma: no cover (both ship with fairseq)
            continue
        if not getattr(mod.main, "_knnlm", False):
            _fairseq_mains[name] = mod.main
        wrapped = _wrapper(name)
        for target in (name, "__main__"):
            m = sys.modules.get(target)
            f = (getattr(m, "__file__", "") or "").replace("\\", "/")
            if m is not None and f.endswith(name.replace(".", "/") + ".py"):
                m.main = wrapped
                if target == "__main__" and name not in _fairseq_mains:
                    _fairseq_mains[name] = mod.main


install()

"""The ``language_modeling`` task with the kNN-LM options added.

Stock ``fairseq-eval-lm`` (no ``--task`` flag) builds the ``language_modeling`` task, so the
plugin registers this subclass under that same name: its dataclass adds the kNN-LM flags
(``--knnlm``, ``--save-knnlm-dstore``, ...) to ``--help`` and to hydra, all off by default,
and ``build_model`` hands the model to an active kNN-LM run, if any. Nothing else changes:
with the options off, training and evaluation are the stock ones.
"""

from __future__ import annotations

from typing import Any

from fairseq.tasks import TASK_DATACLASS_REGISTRY, TASK_REGISTRY
from fairseq.tasks.language_modeling import LanguageModelingTask

from .config import KNNLanguageModelingConfig
from .runtime import active_runtime

TASK_NAME = "language_modeling"


class KNNLanguageModelingTask(LanguageModelingTask):
    """LanguageModelingTask whose models are bound to the active kNN-LM run."""

    def build_model(self, *args: Any, **kwargs: Any):  # 0.12.2 and main differ in signature
        model = super().build_model(*args, **kwargs)
        rt = active_runtime()
        if rt is not None:
            rt.bind(self, model)
        return model


def register() -> None:
    """Put the subclass and its config in fairseq's registries under 'language_modeling'.

    fairseq's ``register_task`` refuses (or ignores) a second registration of a name, so the
    registries are updated directly, and hydra's ConfigStore gets the extended node.
    """
    if TASK_REGISTRY.get(TASK_NAME) is KNNLanguageModelingTask:
        return
    TASK_REGISTRY[TASK_NAME] = KNNLanguageModelingTask
    # FairseqTask.add_args reads the literal attribute "__dataclass" that register_task sets
    setattr(KNNLanguageModelingTask, "__dataclass", KNNLanguageModelingConfig)  # noqa: B010
    TASK_DATACLASS_REGISTRY[TASK_NAME] = KNNLanguageModelingConfig
    try:
        from hydra.core.config_store import ConfigStore

        node = KNNLanguageModelingConfig()
        node._name = TASK_NAME
        ConfigStore.instance().store(name=TASK_NAME, group="task", node=node,
                                     provider="fairseq")
    except Exception:  # hydra is optional for the argparse path  # noqa: BLE001
        pass


register()

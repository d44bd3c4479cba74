"""The ``language_modeling`` task with the kNN-LM options added.

Stock ``fairseq-eval-lm`` (no ``--task`` flag) builds the ``language_modeling`` task, so the
plugin registers this subclass under that same name: its dataclass adds the kNN-LM flags
(``--knnlm``, ``--save-knnlm-dstore``, ...) to ``--help`` and to hydra, all off by default,
and ``build_model`` hands the model to an active kNN-LM run, if any; ``eval_lm_dataloader``
tells it how many tokens the pass will score (for the dump's disk check and progress lines).
During a kNN-LM run with several shards (``--num-shards``/``--shard-id`` or
``--distributed-world-size``), ``eval_lm_dataloader`` gives each shard a contiguous run of
blocks, each block behind its true left context (fairseq deals batches round-robin, which
gives the first block of each batch another batch's context). Nothing else changes: with the
options off, training and evaluation are the stock ones.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np
from fairseq.data import FairseqDataset, LMContextWindowDataset
from fairseq.tasks import TASK_DATACLASS_REGISTRY, TASK_REGISTRY
from fairseq.tasks.language_modeling import LanguageModelingTask
from fairseq.tokenizer import tokenize_line

from fairseq_knnlm.plugin import generation
from fairseq_knnlm.plugin.config import KNNLanguageModelingConfig
from fairseq_knnlm.plugin.generation import wants_generation
from fairseq_knnlm.plugin.runtime import active_runtime
from fairseq_knnlm.store.shards import contiguous_range, left_context

logger = logging.getLogger(__name__)

TASK_NAME = "language_modeling"


class KNNLanguageModelingTask(LanguageModelingTask):
    """LanguageModelingTask whose models are bound to the active kNN-LM run."""

    def build_model(self, *args: Any, **kwargs: Any):  # 0.12.2 and main differ in signature
        model = super().build_model(*args, **kwargs)
        rt = active_runtime()
        if rt is not None:
            rt.bind(self, model)
        elif wants_generation(self.args):  # fairseq-interactive / -generate, the Python API
            self._knn_generation = generation.attach(self, model)
        return model

    @property
    def knn_generation(self) -> Optional[generation.KNNGeneration]:
        return getattr(self, "_knn_generation", None)

    def get_interactive_tokens_and_lengths(self, lines: list, encode_fn: Any) -> Any:
        """fairseq-interactive's prompts; with kNN-LM generation, checked first (empty,
        longer than the model's positions, unknown words) in one line each."""
        tokens, lengths = super().get_interactive_tokens_and_lengths(lines, encode_fn)
        gen = self.knn_generation
        if gen is not None:
            d = self.source_dictionary
            prompts = [t[:-1] if t.numel() and int(t[-1]) == d.eos() else t for t in tokens]
            unknown = [[w for w in tokenize_line(encode_fn(line))
                        if d.index(w) == d.unk_index and w != d.unk_word] for line in lines]
            generation.check_prompts(prompts, d.unk(), gen.max_positions, unknown_words=unknown,
                                     what=lambda i: f"prompt {lines[i][:40]!r}")
        return tokens, lengths

    def build_dataset_for_inference(self, src_tokens: list, src_lengths: list,
                                    **kwargs: Any) -> Any:
        """fairseq's, but under numpy 2 (no ``np.compat``, which TokenBlockDataset's "eos"
        break mode reads) each prompt is its own block through ``_Blocks``: what that mode
        makes of a list of prompts."""
        if hasattr(np, "compat"):
            return super().build_dataset_for_inference(src_tokens, src_lengths, **kwargs)
        import fairseq.tasks.language_modeling as lm_task

        stock = lm_task.TokenBlockDataset
        lm_task.TokenBlockDataset = _Blocks  # type: ignore[misc,assignment]
        try:
            return super().build_dataset_for_inference(src_tokens, src_lengths, **kwargs)
        finally:
            lm_task.TokenBlockDataset = stock  # type: ignore[misc]

    def inference_step(self, generator: Any, models: list, sample: dict,
                       prefix_tokens: Any = None, constraints: Any = None) -> Any:
        gen = self.knn_generation
        if gen is not None:
            src = sample["net_input"]["src_tokens"]
            lengths = sample["net_input"].get("src_lengths")
            # forced tokens: the prompt after the bos the task prepends
            gen.prefix_length = (int(lengths.min()) - 1 if lengths is not None and
                                 prefix_tokens is None and src.nelement() else None)
        return super().inference_step(generator, models, sample, prefix_tokens=prefix_tokens,
                                      constraints=constraints)

    def eval_lm_dataloader(self, dataset: Any, max_tokens: Optional[int] = 36000,
                           batch_size: Optional[int] = None, max_positions: Any = None,
                           num_shards: int = 1, shard_id: int = 0, num_workers: int = 1,
                           data_buffer_size: int = 10, context_window: int = 0) -> Any:
        rt = active_runtime()
        if rt is not None:
            lo, hi = contiguous_range(len(dataset), num_shards, shard_id)
            rt.begin(_tokens_in(dataset, lo, hi))
        if num_shards <= 1 or rt is None:
            return super().eval_lm_dataloader(
                dataset, max_tokens=max_tokens, batch_size=batch_size,
                max_positions=max_positions, num_shards=num_shards, shard_id=shard_id,
                num_workers=num_workers, data_buffer_size=data_buffer_size,
                context_window=context_window)
        lo, hi = contiguous_range(len(dataset), num_shards, shard_id)
        logger.info("shard %d of %d: blocks [%d, %d) of %d", shard_id, num_shards, lo, hi,
                    len(dataset))
        if context_window > 0:
            pad = self.source_dictionary.pad()
            wrapped = LMContextWindowDataset(dataset, tokens_per_sample=self.args.tokens_per_sample,
                                             context_window=context_window, pad_idx=pad)
            before, have, j = [], 0, lo - 1  # blocks before the shard, latest first
            while j >= 0 and have < context_window:
                before.append(dataset[j]["source"].numpy())
                have += int((before[-1] != pad).sum())
                j -= 1
            wrapped.prev_tokens = left_context(before[::-1], context_window, pad)
            dataset = wrapped
        return self.get_batch_iterator(
            dataset=_ItemRange(dataset, lo, hi), max_tokens=max_tokens,
            max_sentences=batch_size, max_positions=max_positions, ignore_invalid_inputs=True,
            num_shards=1, shard_id=0, num_workers=num_workers,
            data_buffer_size=data_buffer_size).next_epoch_itr(shuffle=False)


def _tokens_in(dataset: Any, lo: int, hi: int) -> Optional[int]:
    """Tokens that eval-lm scores in items [lo, hi) (each block's size), None if unknown."""
    sizes = getattr(dataset, "sizes", None)
    if sizes is None:
        return None
    return int(np.asarray(sizes[lo:hi], dtype=np.int64).sum())


class _ItemRange(FairseqDataset):
    """Items [lo, hi) of a dataset, in order; items keep their global ids (``sample['id']``),
    so the dump's position map stays in the whole split's coordinates."""

    def __init__(self, dataset: Any, lo: int, hi: int) -> None:
        self.dataset, self.lo, self.hi = dataset, lo, hi

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.lo + index]

    def __len__(self) -> int:
        return self.hi - self.lo

    def collater(self, samples: list) -> Any:
        return self.dataset.collater(samples)

    def num_tokens(self, index: int) -> int:
        return self.dataset.num_tokens(self.lo + index)

    def size(self, index: int) -> Any:
        return self.dataset.size(self.lo + index)

    def ordered_indices(self) -> np.ndarray:
        return np.arange(len(self))


class _Blocks(FairseqDataset):
    """TokenBlockDataset(tokens, sizes, break_mode="eos") for a list of prompts: item i is
    prompt i (each already ends with its eos)."""

    def __init__(self, tokens: list, sizes: Any, **kwargs: Any) -> None:
        self.tokens = tokens
        self._sizes = np.asarray([t.numel() for t in tokens], dtype=np.int64)

    def __getitem__(self, index: int) -> Any:
        return self.tokens[index]

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def sizes(self) -> np.ndarray:
        return self._sizes

    def num_tokens(self, index: int) -> int:
        return int(self._sizes[index])

    def size(self, index: int) -> int:
        return int(self._sizes[index])


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

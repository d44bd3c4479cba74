"""The facts of one eval-lm run that every part of the runtime reads: the subset, the
context, the shard this process scores, the key type and the checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fairseq_knnlm.errors import FlagError
from fairseq_knnlm.flags import canonical_keytype
from fairseq_knnlm.store.shards import shard_prefix


@dataclass(frozen=True)
class RunInfo:
    subset: str
    context_window: int
    tokens_per_sample: int  # before eval-lm subtracts the context window
    break_mode: str
    num_shards: int
    shard_id: int
    add_bos: bool
    checkpoint: str
    keytype: str  # as a datastore's meta records it
    keytype_arg: str  # as typed, for messages

    @classmethod
    def from_cfg(cls, cfg: Any) -> RunInfo:
        t = cfg.task
        checkpoint = str(cfg.common_eval.path)
        if ":" in checkpoint and not Path(checkpoint).exists():
            raise FlagError("kNN-LM options do not support ensembles (--path with ':'): "
                            "score one model at a time")
        world = int(cfg.distributed_training.distributed_world_size or 1)
        rank = int(cfg.distributed_training.distributed_rank or 0)
        return cls(subset=cfg.dataset.gen_subset,
                   context_window=int(cfg.eval_lm.context_window),
                   tokens_per_sample=int(t.tokens_per_sample),
                   break_mode=str(t.sample_break_mode),
                   num_shards=max(int(cfg.dataset.num_shards or 1), world),
                   shard_id=max(int(cfg.dataset.shard_id or 0), rank),
                   add_bos=bool(getattr(t, "add_bos_token", False)),
                   checkpoint=checkpoint, keytype=canonical_keytype(t.knn_keytype),
                   keytype_arg=t.knn_keytype)

    @property
    def sharded(self) -> bool:
        return self.num_shards > 1

    def prefix(self, base: str) -> str:
        """This shard's prefix of a file set (``base`` itself when not sharded)."""
        return str(shard_prefix(base, self.shard_id, self.num_shards)) if self.sharded else base

    def where(self, distributed: bool, world: int) -> str:
        """' (all N ranks)', ' (shard i of n)' or '' for summary lines."""
        if distributed:
            return f" (all {world} ranks)"
        return f" (shard {self.shard_id} of {self.num_shards})" if self.sharded else ""

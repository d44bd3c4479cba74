"""The datastore dump of an eval-lm run (--save-knnlm-dstore): one (key, next token, stream
position) row per scored token, this shard's files finished with the run's facts in the
meta, the shard manifest, and the note on --dstore-size."""

from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np

from fairseq_knnlm.plugin.run import RunInfo
from fairseq_knnlm.store.datastore import DatastoreError, DatastoreWriter, read_meta
from fairseq_knnlm.store.shards import try_write_manifest

logger = logging.getLogger(__name__)


class DumpWriter:
    def __init__(self, t: Any, run: RunInfo) -> None:
        self.base = str(t.dstore_mmap)
        self.fp16 = bool(t.dstore_fp16)
        self.dstore_size: Optional[int] = t.dstore_size
        self.run = run
        self.writer: Optional[DatastoreWriter] = None
        self.prefix = run.prefix(self.base)

    def open(self, dim: int, expected_rows: Optional[int]) -> None:
        self.writer = DatastoreWriter(self.prefix, dim, "float16" if self.fp16 else "float32",
                                      expected_rows=expected_rows)

    @property
    def opened(self) -> bool:
        return self.writer is not None

    @property
    def size(self) -> int:
        return self.writer.size if self.writer is not None else 0

    def add(self, queries: Any, targets: Any, positions: np.ndarray) -> None:
        """Append the batch's (key, next token, stream position) rows."""
        assert self.writer is not None
        self.writer.add(queries.cpu().numpy().astype(self.writer.key_dtype, copy=False),
                        targets.cpu().numpy().astype(np.int32), positions)

    def finish(self, **model_facts: Any) -> int:
        """Finish this shard's datastore (meta: the run's facts and ``model_facts``);
        returns its number of entries (0 if never opened)."""
        if self.writer is None:
            return 0
        r = self.run
        meta = self.writer.finish(
            keytype=r.keytype, model_path=r.checkpoint, subset=r.subset,
            context_window=r.context_window, tokens_per_sample=r.tokens_per_sample,
            sample_break_mode=r.break_mode, shard_id=r.shard_id, num_shards=r.num_shards,
            **model_facts)
        logger.info("wrote datastore %s: %d entries", self.prefix, meta.size)
        return int(meta.size)

    def write_manifest(self) -> None:
        if self.writer is not None:
            try_write_manifest(self.base, self.run.num_shards)

    def note_dstore_size(self, distributed: bool, total: int) -> None:
        """--dstore-size at dump time was the authors' preallocation: we keep every scored
        token, so a different count is no error; say which number counts."""
        want = self.dstore_size
        if want is None:
            return
        if self.run.sharded and not distributed:  # separate runs: the manifest has it
            try:
                total = read_meta(self.base).size
            except DatastoreError:  # a later shard writes the manifest
                return
        if total != want:
            logger.warning("--dstore-size %d: the dump wrote %d entries to %s; its meta file "
                           "holds the size that counts (--dstore-size is not needed)", want,
                           total, self.base)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()

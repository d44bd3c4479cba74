"""One ``fairseq-eval-lm`` run with the plugin's options, as the pipeline's steps: capture
the keys, dump them, retrieve and interpolate (kNN-LM), add the cache, save the neighbours,
hand the numbers to observers, and sum up. Each step is a collaborator built from the
config (plugin/): ``DumpWriter``, ``KNNScorer``, ``CacheScorer``, ``NeighbourSaver``,
``RunSummary``; this class only orders them.

Lifecycle (wired by eval_lm_patch.py and task.py):
  1. the eval-lm ``main`` wrapper builds a ``KNNEvalRuntime`` from the full config (checks
     every flag, then opens datastore and index, before the model is even loaded) and
     activates it;
  2. the task's ``build_model`` binds the model (hooks) and the task (dictionary);
  3. the task's ``eval_lm_dataloader`` calls ``begin`` with the number of tokens this shard
     will score: the dump and neighbour writers open, progress lines start;
  4. the scorer hands each scored batch to ``process``, which dumps and/or rescores;
  5. the wrapper calls ``finish`` (or ``abort`` on error) when eval-lm returns. With several
     distributed ranks, ``finish`` sums the perplexity over the ranks (eval-lm itself reports
     each rank's shard alone) and rank 0 writes the shard manifests.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from fairseq_knnlm.errors import FlagError
from fairseq_knnlm.flags import check_flags, check_model_overrides, check_subset_not_empty
from fairseq_knnlm.plugin.batch import (
    Batch,
    BatchObserver,
    ScoredBatch,
    StreamPositions,
    collect,
    lm_log_probs,
    take_lm_features,
    write_back,
)
from fairseq_knnlm.plugin.cache_scorer import CacheScorer
from fairseq_knnlm.plugin.dump import DumpWriter
from fairseq_knnlm.plugin.hooks import KeyCapture, attach_key_capture
from fairseq_knnlm.plugin.knn_scorer import KNNScorer
from fairseq_knnlm.plugin.neighbour_saver import NeighbourSaver
from fairseq_knnlm.plugin.run import RunInfo
from fairseq_knnlm.plugin.summary import RunSummary
from fairseq_knnlm.scoring.finite import check_finite, nonfinite_reason
from fairseq_knnlm.search.retriever import Retrieved
from fairseq_knnlm.store.datastore import dictionary_sha256, sha256_file

logger = logging.getLogger(__name__)

_ACTIVE: contextvars.ContextVar[Optional[KNNEvalRuntime]] = contextvars.ContextVar(
    "fairseq_knnlm_runtime", default=None)


def active_runtime() -> Optional[KNNEvalRuntime]:
    return _ACTIVE.get()


def wants_runtime(task_cfg: Any) -> bool:
    return bool(getattr(task_cfg, "knnlm", False) or getattr(task_cfg, "save_knnlm_dstore", False)
                or getattr(task_cfg, "knn_cache", False))


def _versions() -> tuple[str, str]:
    import fairseq

    from fairseq_knnlm import __version__

    return getattr(fairseq, "__version__", "unknown"), __version__


class KNNEvalRuntime:
    def __init__(self, cfg: Any) -> None:
        t = cfg.task
        check_flags(t)  # every flag, before anything is opened or loaded
        check_model_overrides(cfg.common_eval.model_overrides, t.knn_keytype)
        check_subset_not_empty(t.data, cfg.dataset.gen_subset)
        self.cfg, self.task_cfg = cfg, t
        self.run = RunInfo.from_cfg(cfg)
        self.knn = KNNScorer(t) if t.knnlm else None
        self.cache = CacheScorer(t) if t.knn_cache else None
        self.dump = DumpWriter(t, self.run) if t.save_knnlm_dstore else None
        self.saver = (NeighbourSaver(t, self.run, self.knn.retriever, with_cache=bool(
            t.knn_cache), with_queries=self.knn.policy is not None)
            if self.knn is not None and t.knn_save_neighbors else None)
        self.summary = RunSummary(self.run, dump=self.dump is not None,
                                  knnlm=self.knn is not None, cache=self.cache is not None)
        self.observers: list[BatchObserver] = []
        self.capture: Optional[KeyCapture] = None
        self.task: Any = None
        self.positions: Optional[StreamPositions] = None

    def add_observer(self, observer: BatchObserver) -> None:
        """Call ``observer(ScoredBatch)`` after every scored batch (kNN-LM or cache runs)."""
        self.observers.append(observer)

    # ---- binding (called from the task's build_model) ----
    def bind(self, task: Any, model: torch.nn.Module) -> None:
        if self.capture is not None:
            raise FlagError("kNN-LM options do not support ensembles: one model only")
        self.task = task
        self.capture, self.num_layers = attach_key_capture(model, self.run.keytype)
        dictionary = task.target_dictionary
        self.dict_sha = dictionary_sha256(list(dictionary.symbols))
        self.dict_size = len(dictionary)
        ckpt = self.run.checkpoint
        self.model_sha = sha256_file(ckpt) if Path(ckpt).exists() else None
        self.positions = StreamPositions(task, self.run.subset)
        if self.knn is not None:
            self.knn.check_model(self.capture.dim, self.run.keytype, self.run.keytype_arg,
                                 self.num_layers, self.dict_size, self.dict_sha, ckpt,
                                 self.model_sha)

    @property
    def bound(self) -> bool:
        return self.capture is not None

    @property
    def wants_lm_features(self) -> bool:
        """Whether the scorer must hand over the LM's features per token (knn_scorer)."""
        return self.knn is not None and self.knn.wants_lm_features

    # ---- start of the pass (called from the task's eval_lm_dataloader) ----
    @property
    def started(self) -> bool:
        return self.summary.started

    def begin(self, total_tokens: Optional[int]) -> None:
        """Open the writers and start progress lines; ``total_tokens``: the tokens this shard
        will score (None if unknown)."""
        assert self.capture is not None, "begin() before the model was bound"
        if self.started:
            return
        if self.dump is not None:
            self.dump.open(self.capture.dim, total_tokens)
        if self.saver is not None:
            self.saver.open()
        self.summary.start(total_tokens)

    # ---- per batch (called from the scorer) ----
    @torch.no_grad()
    def process(self, sample: dict, hypos: list) -> None:
        """Dump and/or rescore one scored batch; the interpolated log-probs replace each
        hypothesis' positional scores, where eval-lm reads them."""
        if not self.started:
            self.begin(None)
        assert self.capture is not None and self.positions is not None
        b = collect(self.capture.pop(), sample, hypos, self.run.add_bos)
        if self.wants_lm_features:
            take_lm_features(b, hypos)
        if self.dump is not None:
            self.dump.add(b.queries, b.targets, self.positions(sample, b))
        if self.knn is not None or self.cache is not None:
            lm = lm_log_probs(b, hypos)
            final, knn_lp, retrieved = lm, None, None
            if self.knn is not None:
                final, knn_lp, retrieved = self.knn.score(lm, b, sample, self.positions)
            cache_lp = None
            if self.cache is not None:
                cache_lp = self.cache.log_prob(sample, b, self.task.target_dictionary.pad()
                                               ).to(lm.device)
                final = self.cache.interpolate(final, cache_lp)
            check_finite(final, lambda i: self._nonfinite_line(sample, b, i, lm, knn_lp,
                                                               cache_lp, final, retrieved))
            if self.saver is not None and retrieved is not None:
                self.saver.add(b, lm, retrieved, cache_lp)
            self.summary.add(lm, final)
            write_back(hypos, b, final)
            if self.observers:
                self._notify(sample, b, lm, knn_lp, cache_lp, final, retrieved)
        counters = {}
        if self.dump is not None:
            counters["datastore entries"] = self.dump.size
        if self.knn is not None:
            counters["kNN searches"] = self.knn.mode_counts["search"]
        self.summary.report_progress(len(b.targets), counters)

    def _nonfinite_line(self, sample: dict, b: Batch, i: int, lm: torch.Tensor,
                        knn_lp: Optional[torch.Tensor], cache_lp: Optional[torch.Tensor],
                        final: torch.Tensor, retrieved: Optional[Retrieved]) -> str:
        """The one line that stops a run at a token whose final log-probability is not
        finite: its place in the subset's token stream, its target, and which of p_LM,
        p_kNN, lambda or the cache made it so."""
        assert self.positions is not None
        subset = self.run.subset
        pos = int(self.positions(sample, b)[i])
        tgt = int(b.targets[i])
        where = (f"token {pos} of the {subset} subset" if pos >= 0 else
                 f"a token of block {int(sample['id'][0])} of the {subset} subset")
        sym = self.task.target_dictionary[tgt] if self.task is not None else str(tgt)
        knn, lam, source = None, None, "--lmbda"
        if self.knn is not None and knn_lp is not None:
            lam, source = self.knn.lambda_of(i, retrieved)
            knn = float(knn_lp[i]) if lam is not None else None
        reason = nonfinite_reason(
            float(lm[i]), knn, lam, float(cache_lp[i]) if cache_lp is not None else None,
            self.cache.lmbda if self.cache is not None else None, lambda_source=source)
        return (f"{where} (target {sym!r}) scores log p = {float(final[i]):g}: "
                f"{reason}; stopped rather than print a non-finite perplexity")

    def _notify(self, sample: dict, b: Batch, lm: torch.Tensor, knn_lp: Optional[torch.Tensor],
                cache_lp: Optional[torch.Tensor], final: torch.Tensor,
                retrieved: Optional[Retrieved]) -> None:
        """Hand the batch's numbers to the observers."""
        assert self.positions is not None
        ids = sample["id"].cpu().numpy()
        sample_ids = np.concatenate([np.full(n, ids[i], dtype=np.int64) for i, _, n in b.spans])
        scored = ScoredBatch(sample_ids=sample_ids, positions=self.positions(sample, b),
                             targets=b.targets, lm_logp=lm, knn_logp=knn_lp,
                             cache_logp=cache_lp, final_logp=final, retrieved=retrieved)
        for obs in self.observers:
            obs(scored)

    # ---- end of run ----
    def finish(self) -> None:
        """Finish the files, sum over ranks, write the shard manifests, log the summary."""
        entries = 0
        if self.dump is not None:
            fairseq_version, plugin_version = _versions()
            entries = self.dump.finish(model_sha256=self.model_sha, dict_size=self.dict_size,
                                       dict_sha256=self.dict_sha,
                                       fairseq_version=fairseq_version,
                                       plugin_version=plugin_version)
        modes = self.knn.mode_counts if self.knn is not None else {}
        if self.saver is not None:
            self.saver.finish(modes)
        totals, dist = self.summary.totals(entries, modes)
        writes_manifests = self.run.sharded and (
            not dist or torch.distributed.get_rank() == 0)
        if writes_manifests:  # tie the shards together once all have finished
            for part in (self.dump, self.saver):
                if part is not None:
                    part.write_manifest()
        if self.dump is not None and self.dump.opened and (not self.run.sharded
                                                           or writes_manifests):
            self.dump.note_dstore_size(dist, int(totals["entries"]))
        if self.knn is not None:
            self.knn.log_timing()
        if self.summary.log(totals, dist) and self.knn is not None:
            logger.info("%s", self.knn.searches_summary(totals, int(totals["tokens"])))
        self.close()

    def abort(self) -> None:
        for part in (self.dump, self.saver):
            if part is not None:
                part.abort()
        self.close()

    def close(self) -> None:
        if self.capture is not None:
            self.capture.remove()

    @contextlib.contextmanager
    def activate(self) -> Iterator[KNNEvalRuntime]:
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

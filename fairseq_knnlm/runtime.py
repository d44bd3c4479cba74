"""State of one ``fairseq-eval-lm`` run with the plugin's options: the key capture, the
datastore writer, the retriever, the cache and the saved-neighbours writer.

Lifecycle (wired by eval_lm_patch.py and task.py):
  1. the eval-lm ``main`` wrapper builds a ``KNNEvalRuntime`` from the full config (checks
     flags and opens datastore and index before the model is even loaded) and activates it;
  2. the task's ``build_model`` binds the model (hooks) and the task (dictionary, dataset);
  3. the scorer hands each scored batch to ``process``, which dumps and/or rescores;
  4. the wrapper calls ``finish`` (or ``abort`` on error) when eval-lm returns.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from .cache import cache_log_prob, interpolate_cache, next_tokens
from .datastore import DatastoreError, DatastoreWriter, dictionary_sha256, sha256_file
from .hooks import KeyCapture, parse_keytype
from .knn import interpolate, recompute_distances
from .retriever import KNNRetriever
from .shards import shard_prefix, try_write_manifest
from .sweep import NeighborWriter

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

    from . import __version__

    return getattr(fairseq, "__version__", "unknown"), __version__


def _stream_offsets(dataset: Any) -> Optional[np.ndarray]:
    """Start offset in the subset's token stream of each block (TokenBlockDataset)."""
    seen = 0
    while dataset is not None and seen < 10:
        si = getattr(dataset, "slice_indices", None)
        if si is not None:
            return np.asarray(si)[:, 0].astype(np.int64)
        dataset = getattr(dataset, "dataset", None)
        seen += 1
    return None


class KNNEvalRuntime:
    def __init__(self, cfg: Any) -> None:
        t = cfg.task
        self.cfg = cfg
        self.task_cfg = t
        self.dump = bool(t.save_knnlm_dstore)
        self.knnlm = bool(t.knnlm)
        self.cache = bool(t.knn_cache)
        self.keytype = t.knn_keytype
        parse_keytype(self.keytype)  # unknown names fail here, before anything loads
        self.checkpoint = str(cfg.common_eval.path)
        if ":" in self.checkpoint and not Path(self.checkpoint).exists():
            raise ValueError("kNN-LM options do not support ensembles (--path with ':'): "
                             "score one model at a time")
        self.subset = cfg.dataset.gen_subset
        self.context_window = int(cfg.eval_lm.context_window)
        self.tokens_per_sample = int(t.tokens_per_sample)  # before eval-lm subtracts the window
        self.break_mode = str(t.sample_break_mode)
        self.world = int(cfg.distributed_training.distributed_world_size or 1)
        self.rank = int(cfg.distributed_training.distributed_rank or 0)
        self.num_shards = max(int(cfg.dataset.num_shards or 1), self.world)
        self.shard_id = max(int(cfg.dataset.shard_id or 0), self.rank)
        self.add_bos = bool(getattr(t, "add_bos_token", False))
        if self.dump and not t.dstore_mmap:
            raise ValueError("--save-knnlm-dstore needs --dstore-mmap PREFIX")
        if self.cache:
            if not 0.0 <= t.cache_lmbda <= 1.0:
                raise ValueError(f"--cache-lmbda must be in [0, 1], got {t.cache_lmbda}")
            if t.cache_length <= 0:
                raise ValueError(f"--cache-length must be positive, got {t.cache_length}")
        self.retriever: Optional[KNNRetriever] = None
        if self.knnlm:
            if not t.dstore_filename or not t.indexfile:
                raise ValueError("--knnlm needs --dstore-filename PREFIX and --indexfile INDEX")
            if not 0.0 <= t.lmbda <= 1.0:
                raise ValueError(f"--lmbda must be in [0, 1], got {t.lmbda}")
            self.retriever = KNNRetriever(
                t.dstore_filename, t.indexfile, k=t.k, probe=t.probe, sim_func=t.knn_sim_func,
                temperature=t.knn_temp, keys_in_memory=t.move_dstore_to_mem,
                load_keys=not t.no_load_keys, gpu=t.knn_gpu, mmap_index=t.knn_mmap_index)
        self.capture: Optional[KeyCapture] = None
        self.task: Any = None
        self.writer: Optional[DatastoreWriter] = None
        self.nbr_writer: Optional[NeighborWriter] = None
        self._offsets: Optional[np.ndarray] = None
        self.n_scored = 0
        self.sum_logp = {"lm": 0.0, "final": 0.0}

    # ---- binding (called from the task's build_model) ----
    def bind(self, task: Any, model: torch.nn.Module) -> None:
        if self.capture is not None:
            raise ValueError("kNN-LM options do not support ensembles: one model only")
        self.task = task
        self.capture = KeyCapture(model, self.keytype)
        dictionary = task.target_dictionary
        self.dict_sha = dictionary_sha256(list(dictionary.symbols))
        self.dict_size = len(dictionary)
        self.model_sha = sha256_file(self.checkpoint) if Path(self.checkpoint).exists() else None
        if self.retriever is not None:
            self._check_datastore_matches_model()
        if self.dump:
            prefix = self.task_cfg.dstore_mmap
            if self.num_shards > 1:
                prefix = str(shard_prefix(prefix, self.shard_id, self.num_shards))
            self.writer = DatastoreWriter(prefix, self.capture.dim,
                                          "float16" if self.task_cfg.dstore_fp16 else "float32")
            self.dstore_prefix = prefix
        if self.retriever is not None and self.task_cfg.knn_save_neighbors:
            self.nbr_writer = NeighborWriter(
                self.task_cfg.knn_save_neighbors, self.retriever.k,
                with_l2=self.retriever.ds.keys is not None, with_cache=self.cache)

    def _check_datastore_matches_model(self) -> None:
        assert self.retriever is not None and self.capture is not None
        meta = self.retriever.ds.meta
        problems = []
        if meta.dim != self.capture.dim:
            problems.append(f"key dim: datastore {meta.dim}, model {self.capture.dim}")
        if meta.keytype != self.keytype:
            problems.append(f"key type: datastore {meta.keytype!r}, --knn-keytype "
                            f"{self.keytype!r}")
        if meta.dict_sha256 and meta.dict_sha256 != self.dict_sha:
            problems.append(f"dictionary: datastore {meta.dict_size} types "
                            f"(sha256 {meta.dict_sha256[:12]}), model {self.dict_size} types "
                            f"(sha256 {self.dict_sha[:12]})")
        if meta.model_sha256 and self.model_sha and meta.model_sha256 != self.model_sha:
            problems.append(f"model: datastore dumped with {meta.model_path} (sha256 "
                            f"{meta.model_sha256[:12]}), scoring with {self.checkpoint} "
                            f"(sha256 {self.model_sha[:12]})")
        if problems:
            raise DatastoreError(f"datastore {self.retriever.ds.prefix} does not match the "
                                 "model: " + "; ".join(problems))

    @property
    def bound(self) -> bool:
        return self.capture is not None

    # ---- per batch (called from the scorer) ----
    def _offsets_for(self, ids: torch.Tensor) -> np.ndarray:
        if self._offsets is None:
            off = _stream_offsets(self.task.dataset(self.subset))
            if off is None:
                logger.warning("cannot map rows to token offsets: position map will be -1")
                off = np.full(0, -1, dtype=np.int64)
            self._offsets = off
        idx = ids.cpu().numpy()
        if len(self._offsets) == 0:
            return np.full(len(idx), -1, dtype=np.int64)
        return self._offsets[idx]

    @torch.no_grad()
    def process(self, sample: dict, hypos: list) -> None:
        assert self.capture is not None
        feats = self.capture.pop()  # (B, T, C)
        bsz = len(hypos)
        if feats.shape[0] != bsz:
            raise RuntimeError(f"captured states for {feats.shape[0]} rows, batch has {bsz}")
        starts = sample.get("start_indices", [0] * bsz)
        skip = 1 if self.add_bos else 0  # eval-lm drops the score of the leading bos
        spans = []
        for i, h in enumerate(hypos):
            n = h[0]["tokens"].numel()
            spans.append((i, int(starts[i]) + skip, n - skip))
        queries = torch.cat([feats[i, s:s + n] for i, s, n in spans]).float()
        targets = torch.cat([h[0]["tokens"][skip:] for h in hypos]).long()
        if self.writer is not None:
            block_off = self._offsets_for(sample["id"])
            pos = np.concatenate([block_off[i] + np.arange(n) if block_off[i] >= 0
                                  else np.full(n, -1) for i, _, n in spans]).astype(np.int64)
            self.writer.add(queries.cpu().numpy().astype(self.writer.key_dtype, copy=False),
                            targets.cpu().numpy().astype(np.int32), pos)
        if not (self.knnlm or self.cache):
            return
        lm = torch.cat([h[0]["positional_scores"][skip:] for h in hypos]).float()
        final = lm
        retrieved = None
        if self.retriever is not None:
            knn_lp, retrieved = self.retriever.score(queries, targets)
            final = interpolate(lm, knn_lp.to(lm.device), self.task_cfg.lmbda)
        cache_lp = None
        if self.cache:
            src, tgt = sample["net_input"]["src_tokens"], sample["target"]
            vals = next_tokens(src, tgt, self.task.target_dictionary.pad())
            parts = []
            for i, s, n in spans:
                length = s + n
                lp = cache_log_prob(feats[i, :length], vals[i, :length], tgt[i, :length],
                                    self.task_cfg.cache_theta, self.task_cfg.cache_length)
                parts.append(lp[s:s + n])
            cache_lp = torch.cat(parts).to(lm.device)
            final = interpolate_cache(final, cache_lp, self.task_cfg.cache_lmbda)
        if self.nbr_writer is not None and retrieved is not None:
            tg = targets.cpu().numpy()
            rows = dict(
                targets=tg.astype(np.int32), lm_logp=lm.cpu().numpy().astype(np.float32),
                ids=retrieved.ids.astype(np.int64), faiss_dists=retrieved.faiss_dists,
                match=(retrieved.nbr_vals.cpu().numpy() == tg[:, None]).astype(np.uint8))
            if self.retriever is not None and self.retriever.ds.keys is not None:
                l2 = retrieved.dists if self.retriever.sim_func == "l2" else None
                if l2 is None:
                    l2 = recompute_distances(queries, retrieved.ids, self.retriever.ds.keys)
                rows["l2_dists"] = l2.cpu().numpy()
            if cache_lp is not None:
                rows["cache_logp"] = cache_lp.cpu().numpy().astype(np.float32)
            self.nbr_writer.add(**rows)
        self.sum_logp["lm"] += float(lm.sum())
        self.sum_logp["final"] += float(final.sum())
        self.n_scored += len(final)
        # write the interpolated scores back where eval-lm reads them
        o = 0
        for (_, _, n), h in zip(spans, hypos):
            ps = h[0]["positional_scores"].float().clone()
            ps[skip:] = final[o:o + n].to(ps.device)
            h[0]["positional_scores"] = ps
            h[0]["score"] = ps.sum() / max(1, ps.numel())
            o += n

    # ---- end of run ----
    def finish(self) -> None:
        fairseq_version, plugin_version = _versions()
        if self.writer is not None:
            meta = self.writer.finish(
                keytype=self.keytype, model_path=self.checkpoint, model_sha256=self.model_sha,
                dict_size=self.dict_size, dict_sha256=self.dict_sha, subset=self.subset,
                context_window=self.context_window, tokens_per_sample=self.tokens_per_sample,
                sample_break_mode=self.break_mode, fairseq_version=fairseq_version,
                plugin_version=plugin_version, shard_id=self.shard_id,
                num_shards=self.num_shards)
            logger.info("wrote datastore %s: %d entries", self.dstore_prefix, meta.size)
            if self.num_shards > 1:  # the last shard to finish ties them together
                try_write_manifest(self.task_cfg.dstore_mmap, self.num_shards)
        if self.nbr_writer is not None and self.retriever is not None:
            t = self.task_cfg
            self.nbr_writer.finish(
                subset=self.subset, dstore=str(self.retriever.ds.prefix),
                datastore=self.retriever.ds.meta.fingerprint(), probe=t.probe,
                sim_func=t.knn_sim_func, temperature=t.knn_temp, lmbda=t.lmbda,
                cache_theta=t.cache_theta if self.cache else None,
                cache_length=t.cache_length if self.cache else None)
        if self.retriever is not None and self.retriever.timing:
            t = dict(self.retriever.timing)
            nq = int(t.pop("queries", 0))
            logger.info("kNN-LM time by stage over %d queries: %s", nq,
                        ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
        if self.n_scored:
            n = self.n_scored
            logger.info("kNN-LM: %d tokens; LM ppl %.2f -> final ppl %.2f", n,
                        float(np.exp(-self.sum_logp["lm"] / n)),
                        float(np.exp(-self.sum_logp["final"] / n)))
        self.close()

    def abort(self) -> None:
        for w in (self.writer, self.nbr_writer):
            if w is not None:
                w.abort()
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

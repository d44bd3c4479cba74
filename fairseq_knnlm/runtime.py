"""State of one ``fairseq-eval-lm`` run with the plugin's options: the key capture, the
datastore writer, the retriever, the cache and the saved-neighbours writer.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from .cache import cache_log_prob, interpolate_cache, next_tokens
from .datastore import (
    DatastoreError,
    DatastoreWriter,
    dictionary_sha256,
    read_meta,
    sha256_file,
)
from .errors import FlagError
from .eval_progress import EvalProgress
from .finite import check_finite, nonfinite_reason
from .flags import (
    canonical_keytype,
    check_dstore_size,
    check_flags,
    check_model_overrides,
    normalize_sim_func,
    same_key_state,
)
from .hooks import KeyCapture, find_decoder
from .knn import interpolate, recompute_distances
from .lambda_model import (
    LambdaModel,
    check_model_flags,
    knn_features,
    load_model,
    pre_features,
)
from .pointers import (
    SKIP,
    CarriedPointers,
    Clusters,
    MinPointers,
    SearchPolicy,
    count_modes,
    load_clusters,
    searches_line,
)
from .retriever import KNNRetriever, Retrieved
from .shards import shard_prefix, try_write_manifest
from .sweep import NeighborWriter, ppl_from_nll, write_neighbors_manifest
from .sweep import manifest_path as neighbors_manifest_path
from .sweep import meta_path as neighbors_meta_path

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


def _distributed() -> bool:
    """Whether this process is one rank of several joined by torch.distributed."""
    dist = torch.distributed
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def _sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sum over all ranks (float64: token counts stay exact); also a barrier."""
    dist = torch.distributed
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend() == "nccl" else torch.device("cpu"))
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@dataclass
class _Batch:
    """The scored positions of one batch, in row-major order."""

    feats: torch.Tensor  # (B, T, C) the captured hidden states
    spans: list[tuple[int, int, int]]  # (row, first scored position, number scored)
    queries: torch.Tensor  # (n, C) float32 keys of the scored positions
    targets: torch.Tensor  # (n,) int64 the tokens scored there
    skip: int  # leading positions of each hypothesis that eval-lm does not score (bos)
    fresh: Optional[np.ndarray] = None  # (n,) uint8, with pointers: 1 where a stream starts
    prev_tokens: Optional[torch.Tensor] = None  # (n,) the input token at each scored position
    lm_feats: Optional[torch.Tensor] = None  # (n, 2) LM entropy and max log-prob, if wanted
    lm_top: Optional[torch.Tensor] = None  # (n,) the LM's argmax, if wanted
    # log p_LM of tokens (m, k) at m of the scored positions (rows (m,) int64: indices into
    # the batch's scored tokens; scorer.lm_logp_at), if wanted
    lm_logp_at: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
    lm_logp_nbrs: Optional[torch.Tensor] = None  # (n, k) once computed

    def lm_at_neighbors(self, nbr_vals: torch.Tensor) -> torch.Tensor:
        """(n, k) log p_LM at the neighbours' values (0 where none), computed once and only
        for the tokens with neighbours (not those the gate skipped)."""
        if self.lm_logp_nbrs is None:
            assert self.lm_logp_at is not None
            rows = (nbr_vals >= 0).any(dim=1).nonzero()[:, 0].cpu()
            out = torch.zeros(nbr_vals.shape, dtype=torch.float32, device=nbr_vals.device)
            if len(rows):
                out[rows.to(out.device)] = self.lm_logp_at(rows, nbr_vals[rows.to(
                    nbr_vals.device)]).to(out.device)
            self.lm_logp_nbrs = out
        return self.lm_logp_nbrs


@dataclass
class ScoredBatch:
    """The scorer's numbers for the scored tokens of one batch (row-major order), handed to
    observers (``KNNEvalRuntime.add_observer``) after the batch is scored."""

    sample_ids: np.ndarray  # (n,) the block (``sample['id']``) each token belongs to
    positions: np.ndarray  # (n,) offset of each target in the subset's token stream (-1 unknown)
    targets: torch.Tensor  # (n,) int64 target token ids
    lm_logp: torch.Tensor  # (n,) float32 log p_LM(target)
    knn_logp: Optional[torch.Tensor]  # (n,) float32 log p_kNN(target), None without --knnlm
    cache_logp: Optional[torch.Tensor]  # (n,) float32 log p_cache(target), None without cache
    final_logp: torch.Tensor  # (n,) float32 the interpolated log p that eval-lm scores
    retrieved: Optional[Retrieved]  # the neighbours behind knn_logp (ids, distances, values)


BatchObserver = Callable[[ScoredBatch], None]


class KNNEvalRuntime:
    def __init__(self, cfg: Any) -> None:
        t = cfg.task
        check_flags(t)  # every flag, before anything is opened or loaded
        check_model_overrides(cfg.common_eval.model_overrides, t.knn_keytype)
        self.cfg = cfg
        self.task_cfg = t
        self.dump = bool(t.save_knnlm_dstore)
        self.knnlm = bool(t.knnlm)
        self.cache = bool(t.knn_cache)
        self.keytype_arg = t.knn_keytype  # as typed, for messages
        self.keytype = canonical_keytype(t.knn_keytype)  # as a datastore's meta records it
        self.checkpoint = str(cfg.common_eval.path)
        if ":" in self.checkpoint and not Path(self.checkpoint).exists():
            raise FlagError("kNN-LM options do not support ensembles (--path with ':'): "
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
        self.retriever: Optional[KNNRetriever] = None
        if self.knnlm:
            check_dstore_size(t.dstore_size, read_meta(t.dstore_filename).size,
                              t.dstore_filename)
            self.retriever = KNNRetriever(
                t.dstore_filename, t.indexfile, k=t.k, probe=t.probe, sim_func=t.knn_sim_func,
                temperature=t.knn_temp, keys_in_memory=t.move_dstore_to_mem,
                load_keys=not t.no_load_keys, gpu=t.knn_gpu, mmap_index=t.knn_mmap_index,
                torch_exact=t.knn_torch_exact)
        # a lambda per token (lambda_model.py), and the searches its gate skips
        self.lambda_model: Optional[LambdaModel] = None
        self.skip_below = float(t.knn_skip_below)
        if self.knnlm and t.knn_lambda_model:
            self.lambda_model = load_model(t.knn_lambda_model)
            if self.skip_below > 0 and self.lambda_model.gate is None:
                raise FlagError(f"--knn-skip-below: --knn-lambda-model {t.knn_lambda_model} "
                                "has no gate (a head that predicts lambda before the search)")
        # the search policy (pointers.py): None searches every token in one call per batch
        self.policy: Optional[SearchPolicy] = None
        self.clusters: Optional[Clusters] = None
        if self.knnlm and t.knn_pointers:
            self.policy = MinPointers(t.knn_min_pointers)
            if t.knn_clusters:
                self.clusters = load_clusters(t.knn_clusters, self.retriever.ds,
                                              limit=2 * t.k)
            if t.knn_min_pointers > t.k and not t.knn_clusters:
                logger.info("--knn-min-pointers %d > --k %d: every token is searched (the "
                            "pointers are only followed to be saved)", t.knn_min_pointers, t.k)
        if self.lambda_model is not None:
            self._check_lambda_model()
        self.carried = CarriedPointers()
        self.capture: Optional[KeyCapture] = None
        self.task: Any = None
        self.writer: Optional[DatastoreWriter] = None
        self.dstore_prefix: Optional[str] = None
        self.nbr_writer: Optional[NeighborWriter] = None
        self.nbr_prefix: Optional[str] = None
        self.progress: Optional[EvalProgress] = None
        self._offsets: Optional[np.ndarray] = None
        self.n_scored = 0
        self.mode_counts = {"search": 0, "pointers": 0, "skip": 0}  # kNN-LM tokens by mode
        self.sum_logp = {"lm": 0.0, "final": 0.0}
        self.observers: list[BatchObserver] = []
        # the lambda model's lambdas of the batch being scored (computed only if needed)
        self._batch_lambdas: Optional[Callable[[], torch.Tensor]] = None

    def add_observer(self, observer: BatchObserver) -> None:
        """Call ``observer(ScoredBatch)`` after every scored batch (kNN-LM or cache runs)."""
        self.observers.append(observer)

    # ---- binding (called from the task's build_model) ----
    def bind(self, task: Any, model: torch.nn.Module) -> None:
        if self.capture is not None:
            raise FlagError("kNN-LM options do not support ensembles: one model only")
        self.task = task
        try:
            self.capture = KeyCapture(model, self.keytype)
        except ValueError as e:  # a layer or state this model does not have
            raise FlagError(f"--knn-keytype: {e}") from None
        self.num_layers = len(find_decoder(model).layers)
        dictionary = task.target_dictionary
        self.dict_sha = dictionary_sha256(list(dictionary.symbols))
        self.dict_size = len(dictionary)
        if self.lambda_model is not None:
            self._check_lambda_model(vocab_size=self.dict_size)
        self.model_sha = sha256_file(self.checkpoint) if Path(self.checkpoint).exists() else None
        if self.retriever is not None:
            self._check_datastore_matches_model()

    def _check_lambda_model(self, vocab_size: Optional[int] = None) -> None:
        """The lambda model fits this run's flags (at start-up; with the dictionary's size
        once the task is bound)."""
        assert self.lambda_model is not None
        t = self.task_cfg
        check_model_flags(self.lambda_model, t.knn_lambda_model, t.k, t.knn_temp,
                          normalize_sim_func(t.knn_sim_func), vocab_size=vocab_size,
                          min_pointers=t.knn_min_pointers if t.knn_pointers else None,
                          clusters=(self.clusters.num_clusters if self.clusters is not None
                                    else None))

    def _check_datastore_matches_model(self) -> None:
        assert self.retriever is not None and self.capture is not None
        meta = self.retriever.ds.meta
        problems = []
        if meta.dim != self.capture.dim:
            problems.append(f"key dim: datastore {meta.dim}, model {self.capture.dim}")
        if not same_key_state(meta.keytype, self.keytype, self.num_layers):
            problems.append(f"key type: datastore {meta.keytype!r}, --knn-keytype "
                            f"{self.keytype_arg!r} (in this {self.num_layers}-layer model)")
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

    @property
    def wants_lm_features(self) -> bool:
        """Whether the scorer must hand over the LM's entropy and max log-prob per token
        (lambda_model.lm_features): saved with the neighbours, or read by a lambda model."""
        if self.retriever is None:
            return False
        lam = self.lambda_model
        return bool(self.task_cfg.knn_save_neighbors) or (lam is not None and (
            lam.needs_lm_features or lam.needs_agreement))

    # ---- start of the pass (called from the task's eval_lm_dataloader) ----
    @property
    def started(self) -> bool:
        return self.progress is not None

    def begin(self, total_tokens: Optional[int]) -> None:
        """Open the writers and start progress lines; ``total_tokens``: the tokens this shard
        will score (None if unknown)."""
        assert self.capture is not None, "begin() before the model was bound"
        if self.started:
            return
        if self.dump:
            self._open_dump(total_tokens)
        if self.retriever is not None and self.task_cfg.knn_save_neighbors:
            self._open_neighbors()
        what = " + ".join(name for name, on in (("dump", self.dump), ("kNN-LM", self.knnlm),
                                                ("cache", self.cache)) if on)
        if self.num_shards > 1:
            what += f", shard {self.shard_id} of {self.num_shards}"
        self.progress = EvalProgress(total_tokens, what=f"progress ({what})")

    def _open_dump(self, expected_rows: Optional[int]) -> None:
        assert self.capture is not None
        prefix = self.task_cfg.dstore_mmap
        if self.num_shards > 1:
            prefix = str(shard_prefix(prefix, self.shard_id, self.num_shards))
        self.writer = DatastoreWriter(prefix, self.capture.dim,
                                      "float16" if self.task_cfg.dstore_fp16 else "float32",
                                      expected_rows=expected_rows)
        self.dstore_prefix = prefix

    def _open_neighbors(self) -> None:
        assert self.retriever is not None
        base = self.task_cfg.knn_save_neighbors
        prefix = base
        if self.num_shards > 1:
            prefix = str(shard_prefix(base, self.shard_id, self.num_shards))
            # this sharded pass replaces whatever was saved at the base prefix before
            for stale in (neighbors_manifest_path(base), neighbors_meta_path(base)):
                stale.unlink(missing_ok=True)
        self.nbr_writer = NeighborWriter(prefix, self.retriever.k,
                                         with_l2=self.retriever.ds.keys is not None,
                                         with_cache=self.cache,
                                         query_dim=(self.retriever.ds.dim if self.policy
                                                    else None),
                                         with_lm_features=True)
        self.nbr_prefix = prefix

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
        """Dump and/or rescore one scored batch; the interpolated log-probs replace each
        hypothesis' positional scores, where eval-lm reads them."""
        if not self.started:
            self.begin(None)
        b = self._collect(sample, hypos)
        if self.wants_lm_features:
            self._take_lm_features(b, hypos)
        if self.writer is not None:
            self._dump(sample, b)
        if self.knnlm or self.cache:
            lm = torch.cat([h[0]["positional_scores"][b.skip:] for h in hypos]).float()
            final, knn_lp, retrieved = self._knn(lm, b, sample)
            cache_lp = None
            if self.cache:
                cache_lp = self._cache(sample, b).to(lm.device)
                final = interpolate_cache(final, cache_lp, self.task_cfg.cache_lmbda)
            if self.nbr_writer is not None and retrieved is not None:
                self._save_neighbors(b, lm, retrieved, cache_lp)
            check_finite(final, lambda i: self._nonfinite_line(sample, b, i, lm, knn_lp,
                                                               cache_lp, final, retrieved))
            self.sum_logp["lm"] += float(lm.sum())
            self.sum_logp["final"] += float(final.sum())
            self.n_scored += len(final)
            self._write_back(hypos, b, final)
            if self.observers:
                self._notify(sample, b, lm, knn_lp, cache_lp, final, retrieved)
        self._report_progress(len(b.targets))

    @staticmethod
    def _take_lm_features(b: _Batch, hypos: list) -> None:
        """The scorer's LM features of the batch's scored tokens (scorer._score_targets_only)."""
        b.lm_feats = torch.cat([h[0]["lm_features"][b.skip:] for h in hypos]).float()
        b.lm_top = torch.cat([h[0]["lm_argmax"][b.skip:] for h in hypos]).long()
        at = hypos[0][0]["lm_logp_at"] if hypos else None
        pos = torch.cat([torch.arange(h[0]["lm_offset"] + b.skip,
                                      h[0]["lm_offset"] + h[0]["tokens"].numel())
                         for h in hypos]) if hypos else torch.zeros(0, dtype=torch.long)
        b.lm_logp_at = (lambda rows, tokens: at(pos[rows], tokens)) if at is not None else None

    def _collect(self, sample: dict, hypos: list) -> _Batch:
        """The captured states, and the keys and targets of the scored positions."""
        assert self.capture is not None
        feats = self.capture.pop()  # (B, T, C)
        bsz = len(hypos)
        if feats.shape[0] != bsz:
            raise RuntimeError(f"captured states for {feats.shape[0]} rows, batch has {bsz}")
        starts = sample.get("start_indices", [0] * bsz)
        skip = 1 if self.add_bos else 0  # eval-lm drops the score of the leading bos
        spans = [(i, int(starts[i]) + skip, h[0]["tokens"].numel() - skip)
                 for i, h in enumerate(hypos)]
        queries = torch.cat([feats[i, s:s + n] for i, s, n in spans]).float()
        targets = torch.cat([h[0]["tokens"][skip:] for h in hypos]).long()
        src = sample["net_input"]["src_tokens"]
        prev = torch.cat([src[i, s:s + n] for i, s, n in spans]).long()
        return _Batch(feats=feats, spans=spans, queries=queries, targets=targets, skip=skip,
                      prev_tokens=prev)

    def _dump(self, sample: dict, b: _Batch) -> None:
        """Append the batch's (key, next token, stream position) rows to the datastore."""
        assert self.writer is not None
        self.writer.add(b.queries.cpu().numpy().astype(self.writer.key_dtype, copy=False),
                        b.targets.cpu().numpy().astype(np.int32), self._positions(sample, b))

    def _positions(self, sample: dict, b: _Batch) -> np.ndarray:
        """(n,) offset of each scored target in the subset's token stream (-1 if unknown)."""
        block_off = self._offsets_for(sample["id"])
        return np.concatenate([block_off[i] + np.arange(n) if block_off[i] >= 0
                               else np.full(n, -1) for i, _, n in b.spans]).astype(np.int64)

    def _knn(self, lm: torch.Tensor, b: _Batch, sample: dict
             ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[Retrieved]]:
        """log p of the targets after the kNN interpolation (Eq. 3), log p_kNN, and what was
        retrieved; the LM's own log-probs (and None, None) when there is no datastore."""
        if self.retriever is None:
            return lm, None, None
        x, skip = self._lambda_inputs(b)
        self._batch_lambdas = None
        if self.policy is None:
            if skip is None:
                knn_lp, retrieved = self.retriever.score(b.queries, b.targets)
            else:
                knn_lp, retrieved = self.retriever.score_subset(b.queries, b.targets, ~skip)
        else:
            knn_lp, retrieved = self._score_streams(sample, b, self.policy, skip)
        if retrieved.modes is None:  # every token searched
            self.mode_counts["search"] += len(b.targets)
        else:
            for name, c in count_modes(retrieved.modes).items():
                self.mode_counts[name] += c
        knn_lp = knn_lp.to(lm.device)
        if self.lambda_model is None:
            final = interpolate(lm, knn_lp, self.task_cfg.lmbda)
        else:
            assert x is not None
            agree = self.lambda_model.needs_agreement
            x.update(knn_features(
                retrieved.dists, self.task_cfg.knn_temp, retrieved.nbr_vals,
                b.lm_at_neighbors(retrieved.nbr_vals) if agree else None,
                b.lm_top if agree else None))
            final = self.lambda_model.mixture_logp(x, lm, self._knn_at_temps(knn_lp, b,
                                                                             retrieved))
            model, n = self.lambda_model, len(lm)
            self._batch_lambdas = lambda: model.lambdas(x, n)  # for a non-finite token's line
        if retrieved.modes is not None and (retrieved.modes == SKIP).any():
            skip = torch.from_numpy(retrieved.modes == SKIP).to(lm.device)
            final = torch.where(skip, lm.float(), final)  # no kNN for this token: p_LM
        return final, knn_lp, retrieved

    def _nonfinite_line(self, sample: dict, b: _Batch, i: int, lm: torch.Tensor,
                        knn_lp: Optional[torch.Tensor], cache_lp: Optional[torch.Tensor],
                        final: torch.Tensor, retrieved: Optional[Retrieved]) -> str:
        """The one line that stops a run at a token whose final log-probability is not
        finite: its place in the subset's token stream, its target, and which of p_LM,
        p_kNN, lambda or the cache made it so."""
        t = self.task_cfg
        pos = int(self._positions(sample, b)[i])
        tgt = int(b.targets[i])
        where = (f"token {pos} of the {self.subset} subset" if pos >= 0 else
                 f"a token of block {int(sample['id'][0])} of the {self.subset} subset")
        sym = self.task.target_dictionary[tgt] if self.task is not None else str(tgt)
        knn = float(knn_lp[i]) if knn_lp is not None else None
        lam: Optional[float] = float(t.lmbda) if knn is not None else None
        source = f"--lmbda {t.lmbda:g}"
        skipped = (retrieved is not None and retrieved.modes is not None
                   and int(retrieved.modes[i]) == SKIP)
        if skipped:
            knn, lam = None, None
        elif knn is not None and self._batch_lambdas is not None:
            lam = float(self._batch_lambdas()[i])
            source = f"--knn-lambda-model {t.knn_lambda_model}"
        reason = nonfinite_reason(
            float(lm[i]), knn, lam, float(cache_lp[i]) if cache_lp is not None else None,
            float(t.cache_lmbda) if cache_lp is not None else None, lambda_source=source)
        return (f"{where} (target {sym!r}) scores log p = {float(final[i]):g}: "
                f"{reason}; stopped rather than print a non-finite perplexity")

    def _knn_at_temps(self, knn_lp: torch.Tensor, b: _Batch, retrieved: Retrieved
                      ) -> torch.Tensor:
        """log p_kNN at the run's temperature (n,), or at each of a MixHead's temps (n, m)."""
        assert self.lambda_model is not None and self.retriever is not None
        if not self.lambda_model.temps:
            return knn_lp
        return torch.stack([self.retriever.log_prob(retrieved, b.targets, t).to(knn_lp.device)
                            for t in self.lambda_model.temps], dim=1)

    def _lambda_inputs(self, b: _Batch
                       ) -> tuple[Optional[dict[str, torch.Tensor]], Optional[np.ndarray]]:
        """The lambda model's features known before the search, and the tokens whose
        search its gate skips (None: no lambda model, or no skipping)."""
        if self.lambda_model is None:
            return None, None
        assert b.prev_tokens is not None
        n = len(b.targets)
        lmf = b.lm_feats if b.lm_feats is not None else torch.zeros(n, 2)
        x = pre_features(lmf, b.prev_tokens, self.lambda_model.freq)
        if self.skip_below <= 0:
            return x, None
        gate = self.lambda_model.gate_lambdas(x, n)
        return x, (gate < self.skip_below).numpy()

    def _score_streams(self, sample: dict, b: _Batch, policy: SearchPolicy,
                       skip: Optional[np.ndarray] = None) -> tuple[torch.Tensor, Retrieved]:
        """p_kNN with pointers (pointers.py): every row of the batch is a stream, scored in
        lockstep; a row continues the pointers of the token before it in the text only if
        that token was scored in an earlier batch (CarriedPointers)."""
        assert self.retriever is not None
        pos = self._positions(sample, b)
        lengths = np.array([n for _, _, n in b.spans], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        first = np.array([pos[s] if n else -1 for s, n in zip(starts, lengths)], np.int64)
        last = np.array([pos[s + n - 1] if n else -1 for s, n in zip(starts, lengths)],
                        np.int64)
        init = self.carried.take(first)
        every = getattr(policy, "searches_every_token", None)
        most = self.clusters.limit if self.clusters is not None else self.retriever.k
        if every is not None and every(most):  # one call, as without pointers
            if skip is None:
                knn_lp, retrieved = self.retriever.score(b.queries, b.targets)
                retrieved.modes = np.zeros(len(b.targets), dtype=np.int8)  # all SEARCH
            else:
                knn_lp, retrieved = self.retriever.score_subset(b.queries, b.targets, ~skip)
            retrieved.n_pointers = np.zeros(len(b.targets), dtype=np.int64)
            final = [np.zeros(0, dtype=np.int64) for _ in lengths]  # the streams go on
        else:
            knn_lp, retrieved, final = self.retriever.score_streams(
                b.queries, b.targets, starts, lengths, init, policy,
                expand=self.clusters.expand if self.clusters is not None else None,
                preset_skip=skip)
        self.carried.keep(last, final)
        fresh = np.zeros(len(b.targets), dtype=np.uint8)
        for s, n, p in zip(starts, lengths, init):
            if n and p is None:
                fresh[s] = 1
        b.fresh = fresh
        return knn_lp, retrieved

    def _notify(self, sample: dict, b: _Batch, lm: torch.Tensor, knn_lp: Optional[torch.Tensor],
                cache_lp: Optional[torch.Tensor], final: torch.Tensor,
                retrieved: Optional[Retrieved]) -> None:
        """Hand the batch's numbers to the observers."""
        ids = sample["id"].cpu().numpy()
        sample_ids = np.concatenate([np.full(n, ids[i], dtype=np.int64) for i, _, n in b.spans])
        scored = ScoredBatch(sample_ids=sample_ids, positions=self._positions(sample, b),
                             targets=b.targets,
                             lm_logp=lm, knn_logp=knn_lp, cache_logp=cache_lp, final_logp=final,
                             retrieved=retrieved)
        for obs in self.observers:
            obs(scored)

    def _cache(self, sample: dict, b: _Batch) -> torch.Tensor:
        """log p_cache of the targets, each row's history being the positions before it."""
        src, tgt = sample["net_input"]["src_tokens"], sample["target"]
        vals = next_tokens(src, tgt, self.task.target_dictionary.pad())
        parts = []
        for i, s, n in b.spans:
            length = s + n
            lp = cache_log_prob(b.feats[i, :length], vals[i, :length], tgt[i, :length],
                                self.task_cfg.cache_theta, self.task_cfg.cache_length)
            parts.append(lp[s:s + n])
        return torch.cat(parts)

    def _save_neighbors(self, b: _Batch, lm: torch.Tensor, retrieved: Retrieved,
                        cache_lp: Optional[torch.Tensor]) -> None:
        """One row per scored token for offline sweeps (sweep.py)."""
        assert self.nbr_writer is not None and self.retriever is not None
        tg = b.targets.cpu().numpy()
        rows = dict(
            targets=tg.astype(np.int32), lm_logp=lm.cpu().numpy().astype(np.float32),
            ids=retrieved.ids.astype(np.int64), faiss_dists=retrieved.faiss_dists,
            match=(retrieved.nbr_vals.cpu().numpy() == tg[:, None]).astype(np.uint8))
        if self.retriever.ds.keys is not None:
            l2 = retrieved.dists if self.retriever.sim_func == "l2" else None
            if l2 is None:
                l2 = recompute_distances(b.queries, retrieved.ids, self.retriever.ds.keys)
            rows["l2_dists"] = l2.cpu().numpy()
        if cache_lp is not None:
            rows["cache_logp"] = cache_lp.cpu().numpy().astype(np.float32)
        assert b.lm_feats is not None and b.prev_tokens is not None
        lmf = b.lm_feats.cpu().numpy()
        assert b.lm_top is not None
        rows.update(lm_entropy=lmf[:, 0], lm_max_logp=lmf[:, 1],
                    prev_tokens=b.prev_tokens.cpu().numpy().astype(np.int32),
                    lm_argmax=b.lm_top.cpu().numpy().astype(np.int32),
                    lm_logp_nbrs=b.lm_at_neighbors(retrieved.nbr_vals).cpu().numpy())
        if self.nbr_writer.query_dim is not None:  # what a pointer replay needs
            assert retrieved.modes is not None and b.fresh is not None
            rows.update(queries=b.queries.cpu().numpy().astype(np.float32),
                        modes=retrieved.modes.astype(np.int8), fresh=b.fresh)
        self.nbr_writer.add(**rows)

    @staticmethod
    def _write_back(hypos: list, b: _Batch, final: torch.Tensor) -> None:
        """Put the interpolated scores where eval-lm reads them."""
        o = 0
        for (_, _, n), h in zip(b.spans, hypos):
            ps = h[0]["positional_scores"].float().clone()
            ps[b.skip:] = final[o:o + n].to(ps.device)
            h[0]["positional_scores"] = ps
            h[0]["score"] = ps.sum() / max(1, ps.numel())
            o += n

    def _report_progress(self, tokens: int) -> None:
        assert self.progress is not None
        counters = {}
        if self.writer is not None:
            counters["datastore entries"] = self.writer.size
        if self.retriever is not None:
            counters["kNN searches"] = self.mode_counts["search"]
        self.progress.update(tokens, counters)

    # ---- end of run ----
    def finish(self) -> None:
        """Finish the files, sum over ranks, write the shard manifests, log the summary."""
        entries = self._finish_dump()
        self._finish_neighbors()
        totals = {"tokens": float(self.n_scored), "lm": self.sum_logp["lm"],
                  "final": self.sum_logp["final"], "entries": float(entries),
                  **{f"mode_{m}": float(c) for m, c in self.mode_counts.items()}}
        distributed = _distributed()
        if distributed:  # every rank's files are finished once this returns
            totals = dict(zip(totals, _sum_over_ranks(list(totals.values()))))
        writes_manifests = self.num_shards > 1 and (
            not distributed or torch.distributed.get_rank() == 0)
        if writes_manifests:
            self._write_manifests()
        if self.writer is not None and (self.num_shards == 1 or writes_manifests):
            self._note_dstore_size(distributed, int(totals["entries"]))
        self._log_summary(totals, distributed)
        self.close()

    def _finish_dump(self) -> int:
        """Finish this shard's datastore; returns its number of entries (0 without a dump)."""
        if self.writer is None:
            return 0
        fairseq_version, plugin_version = _versions()
        meta = self.writer.finish(
            keytype=self.keytype, model_path=self.checkpoint, model_sha256=self.model_sha,
            dict_size=self.dict_size, dict_sha256=self.dict_sha, subset=self.subset,
            context_window=self.context_window, tokens_per_sample=self.tokens_per_sample,
            sample_break_mode=self.break_mode, fairseq_version=fairseq_version,
            plugin_version=plugin_version, shard_id=self.shard_id,
            num_shards=self.num_shards)
        logger.info("wrote datastore %s: %d entries", self.dstore_prefix, meta.size)
        return int(meta.size)

    def _finish_neighbors(self) -> None:
        if self.nbr_writer is None or self.retriever is None:
            return
        t = self.task_cfg
        shard = ({"shard_id": self.shard_id, "num_shards": self.num_shards}
                 if self.num_shards > 1 else {})
        pointers = ({"min_pointers": t.knn_min_pointers, "modes": dict(self.mode_counts),
                     "clusters": t.knn_clusters} if self.policy is not None else None)
        self.nbr_writer.finish(
            subset=self.subset, dstore=str(self.retriever.ds.prefix),
            datastore=self.retriever.ds.meta.fingerprint(), probe=t.probe,
            sim_func=self.retriever.sim_func, temperature=t.knn_temp, lmbda=t.lmbda,
            cache_theta=t.cache_theta if self.cache else None,
            cache_length=t.cache_length if self.cache else None, pointers=pointers,
            index=str(t.indexfile) if t.indexfile else None,
            torch_exact=bool(t.knn_torch_exact), **shard)

    def _write_manifests(self) -> None:
        """Tie the shards together once all have finished (the last one to finish does)."""
        if self.writer is not None:
            try_write_manifest(self.task_cfg.dstore_mmap, self.num_shards)
        if self.nbr_writer is not None:
            write_neighbors_manifest(self.task_cfg.knn_save_neighbors, self.num_shards)

    def _note_dstore_size(self, distributed: bool, total: int) -> None:
        """--dstore-size at dump time was the authors' preallocation: we keep every scored
        token, so a different count is no error; say which number counts."""
        want = self.task_cfg.dstore_size
        prefix = self.task_cfg.dstore_mmap
        if want is None:
            return
        if self.num_shards > 1 and not distributed:  # separate runs: the manifest has it
            try:
                total = read_meta(prefix).size
            except DatastoreError:  # a later shard writes the manifest
                return
        if total != want:
            logger.warning("--dstore-size %d: the dump wrote %d entries to %s; its meta file "
                           "holds the size that counts (--dstore-size is not needed)", want,
                           total, prefix)

    def _log_summary(self, totals: dict[str, float], distributed: bool) -> None:
        if self.retriever is not None and self.retriever.timing:
            t = dict(self.retriever.timing)
            nq = int(t.pop("queries", 0))
            logger.info("kNN-LM time by stage over %d queries: %s", nq,
                        ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
        n = int(totals["tokens"])
        if not n:
            return
        where = (f" (all {torch.distributed.get_world_size()} ranks)" if distributed else
                 f" (shard {self.shard_id} of {self.num_shards})" if self.num_shards > 1 else "")
        what = " + ".join(name for name, on in (("kNN-LM", self.knnlm),
                                                ("continuous cache", self.cache)) if on)
        logger.info("%s%s: %d tokens; LM ppl %.4f -> final ppl %.4f", what, where, n,
                    ppl_from_nll(-totals["lm"] / n), ppl_from_nll(-totals["final"] / n))
        if self.retriever is not None:
            logger.info("%s%s", searches_line(int(totals["mode_search"]), n),
                        f"; {int(totals['mode_pointers'])} from pointers"
                        + (f", {int(totals['mode_skip'])} without kNN"
                           if totals["mode_skip"] else "") if self.policy is not None else
                        f"; {int(totals['mode_skip'])} skipped by the lambda model"
                        if self.skip_below > 0 else "")

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

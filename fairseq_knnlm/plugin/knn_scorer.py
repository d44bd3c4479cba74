"""The kNN part of an eval-lm run (--knnlm): the retriever, the search policy (pointers,
clusters), the lambda model and its gate, and Eq. 3 per batch; it counts the tokens by how
they found their neighbours (searched, from pointers, skipped)."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

import numpy as np
import torch

from fairseq_knnlm.adaptive.lambda_features import knn_features, pre_features
from fairseq_knnlm.adaptive.lambda_file import check_model_flags, load_model
from fairseq_knnlm.adaptive.lambda_model import LambdaModel
from fairseq_knnlm.adaptive.pointers import (
    SKIP,
    CarriedPointers,
    Clusters,
    MinPointers,
    SearchPolicy,
    count_modes,
    load_clusters,
    searches_line,
    split_streams,
)
from fairseq_knnlm.errors import FlagError
from fairseq_knnlm.flags import (
    check_dstore_size,
    clusters_limit,
    normalize_sim_func,
    same_key_state,
)
from fairseq_knnlm.plugin.batch import Batch
from fairseq_knnlm.scoring.knn import interpolate
from fairseq_knnlm.search.retriever import KNNRetriever, Retrieved
from fairseq_knnlm.store.datastore import DatastoreError, read_meta

logger = logging.getLogger(__name__)
Positions = Callable[[dict, Batch], np.ndarray]


class KNNScorer:
    def __init__(self, t: Any) -> None:
        self.t = t
        check_dstore_size(t.dstore_size, read_meta(t.dstore_filename).size, t.dstore_filename)
        self.retriever = KNNRetriever(
            t.dstore_filename, t.indexfile, k=t.k, probe=t.probe, sim_func=t.knn_sim_func,
            temperature=t.knn_temp, keys_in_memory=t.move_dstore_to_mem,
            load_keys=not t.no_load_keys, gpu=t.knn_gpu, mmap_index=t.knn_mmap_index,
            torch_exact=t.knn_torch_exact, engine=t.knn_engine, ray_address=t.ray_address)
        # a lambda per token (lambda_model.py), and the searches its gate skips
        self.skip_below = float(t.knn_skip_below)
        self.lambda_model: Optional[LambdaModel] = None
        if t.knn_lambda_model:
            self.lambda_model = load_model(t.knn_lambda_model)
            if self.skip_below > 0 and self.lambda_model.gate is None:
                raise FlagError(f"--knn-skip-below: --knn-lambda-model {t.knn_lambda_model} "
                                "has no gate (a head that predicts lambda before the search)")
            forced = self.lambda_model.info.get("forced")
            if forced:
                logger.warning("--knn-lambda-model %s: %s", t.knn_lambda_model, forced)
        # the search policy (pointers.py): None searches every token in one call per batch
        self.policy: Optional[SearchPolicy] = None
        self.clusters: Optional[Clusters] = None
        if t.knn_pointers:
            self.policy = MinPointers(t.knn_min_pointers)
            if t.knn_clusters:
                self.clusters = load_clusters(
                    t.knn_clusters, self.retriever.ds,
                    limit=clusters_limit(t.k, t.knn_clusters_limit))
            if t.knn_min_pointers > t.k and not t.knn_clusters:
                logger.info("--knn-min-pointers %d > --k %d: every token is searched (the "
                            "pointers are only followed to be saved)", t.knn_min_pointers, t.k)
        if self.lambda_model is not None:
            self.check_lambda_model()
        self.carried = CarriedPointers()
        self.mode_counts = {"search": 0, "pointers": 0, "skip": 0}  # tokens by mode
        # the lambda model's lambdas of the batch being scored (computed only if needed)
        self._batch_lambdas: Optional[Callable[[], torch.Tensor]] = None

    # ---- checks against the model ----
    def check_lambda_model(self, vocab_size: Optional[int] = None) -> None:
        """The lambda model fits this run's flags (at start-up; with the dictionary's size
        once the task is bound)."""
        assert self.lambda_model is not None
        t = self.t
        check_model_flags(self.lambda_model, t.knn_lambda_model, t.k, t.knn_temp,
                          normalize_sim_func(t.knn_sim_func), vocab_size=vocab_size,
                          min_pointers=t.knn_min_pointers if t.knn_pointers else None,
                          clusters=(self.clusters.num_clusters if self.clusters is not None
                                    else None))

    def check_model(self, dim: int, keytype: str, keytype_arg: str, num_layers: int,
                    dict_size: int, dict_sha: str, checkpoint: str,
                    model_sha: Optional[str]) -> None:
        """The datastore (and the lambda model) belong to the model being scored."""
        if self.lambda_model is not None:
            self.check_lambda_model(vocab_size=dict_size)
        meta = self.retriever.ds.meta
        problems = []
        if meta.dim != dim:
            problems.append(f"key dim: datastore {meta.dim}, model {dim}")
        if not same_key_state(meta.keytype, keytype, num_layers):
            problems.append(f"key type: datastore {meta.keytype!r}, --knn-keytype "
                            f"{keytype_arg!r} (in this {num_layers}-layer model)")
        if meta.dict_sha256 and meta.dict_sha256 != dict_sha:
            problems.append(f"dictionary: datastore {meta.dict_size} types "
                            f"(sha256 {meta.dict_sha256[:12]}), model {dict_size} types "
                            f"(sha256 {dict_sha[:12]})")
        if meta.model_sha256 and model_sha and meta.model_sha256 != model_sha:
            problems.append(f"model: datastore dumped with {meta.model_path} (sha256 "
                            f"{meta.model_sha256[:12]}), scoring with {checkpoint} "
                            f"(sha256 {model_sha[:12]})")
        if problems:
            raise DatastoreError(f"datastore {self.retriever.ds.prefix} does not match the "
                                 "model: " + "; ".join(problems))

    @property
    def wants_lm_features(self) -> bool:
        """Whether the scorer must hand over the LM's entropy and max log-prob per token
        (lambda_model.lm_features): saved with the neighbours, or read by a lambda model."""
        lam = self.lambda_model
        return bool(self.t.knn_save_neighbors) or (lam is not None and (
            lam.needs_lm_features or lam.needs_agreement))

    # ---- per batch ----
    def score(self, lm: torch.Tensor, b: Batch, sample: dict, positions: Positions
              ) -> tuple[torch.Tensor, torch.Tensor, Retrieved]:
        """log p of the targets after the kNN interpolation (Eq. 3), log p_kNN, and what
        was retrieved."""
        t0 = time.perf_counter()
        x, skip = self._lambda_inputs(b)
        if x is not None:
            self.retriever.timing["lambda_pre"] += time.perf_counter() - t0
        self._batch_lambdas = None
        if self.policy is None:
            if skip is None:
                knn_lp, retrieved = self.retriever.score(b.queries, b.targets)
            else:
                knn_lp, retrieved = self.retriever.score_subset(b.queries, b.targets, ~skip)
        else:
            knn_lp, retrieved = self._score_streams(sample, b, self.policy, positions, skip)
        if retrieved.modes is None:  # every token searched
            self.mode_counts["search"] += len(b.targets)
        else:
            for name, c in count_modes(retrieved.modes).items():
                self.mode_counts[name] += c
        knn_lp = knn_lp.to(lm.device)
        if self.lambda_model is None:
            final = interpolate(lm, knn_lp, self.t.lmbda)
        else:
            assert x is not None
            t0 = time.perf_counter()
            agree = self.lambda_model.needs_agreement
            x.update(knn_features(
                retrieved.dists, self.t.knn_temp, retrieved.nbr_vals,
                b.lm_at_neighbors(retrieved.nbr_vals) if agree else None,
                b.lm_top if agree else None))
            t1 = time.perf_counter()
            final = self.lambda_model.mixture_logp(x, lm, self._knn_at_temps(knn_lp, b,
                                                                             retrieved))
            timing = self.retriever.timing
            timing["lambda_features"] += t1 - t0
            timing["lambda_mix"] += time.perf_counter() - t1
            model, n = self.lambda_model, len(lm)
            self._batch_lambdas = lambda: model.lambdas(x, n)  # for a non-finite token's line
        if retrieved.modes is not None and (retrieved.modes == SKIP).any():
            skipped = torch.from_numpy(retrieved.modes == SKIP).to(lm.device)
            final = torch.where(skipped, lm.float(), final)  # no kNN for this token: p_LM
        return final, knn_lp, retrieved

    def lambda_of(self, i: int, retrieved: Optional[Retrieved]) -> tuple[Optional[float], str]:
        """Token i's lambda in the last batch (None if it had no kNN) and where it came
        from, for the line that stops a run at a non-finite score."""
        if (retrieved is not None and retrieved.modes is not None
                and int(retrieved.modes[i]) == SKIP):
            return None, ""
        if self._batch_lambdas is not None:
            return float(self._batch_lambdas()[i]), f"--knn-lambda-model {self.t.knn_lambda_model}"
        return float(self.t.lmbda), f"--lmbda {self.t.lmbda:g}"

    def _knn_at_temps(self, knn_lp: torch.Tensor, b: Batch, retrieved: Retrieved
                      ) -> torch.Tensor:
        """log p_kNN at the run's temperature (n,), or at each of a MixHead's temps (n, m)."""
        assert self.lambda_model is not None
        if not self.lambda_model.temps:
            return knn_lp
        return torch.stack([self.retriever.log_prob(retrieved, b.targets, t).to(knn_lp.device)
                            for t in self.lambda_model.temps], dim=1)

    def _lambda_inputs(self, b: Batch
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

    def _score_streams(self, sample: dict, b: Batch, policy: SearchPolicy,
                       positions: Positions, skip: Optional[np.ndarray] = None
                       ) -> tuple[torch.Tensor, Retrieved]:
        """p_kNN with pointers (pointers.py): every row of the batch is a stream (or several
        of at most --knn-stream-len tokens), scored in lockstep; a row continues the pointers
        of the token before it in the text only if that token was scored in an earlier
        batch (CarriedPointers)."""
        pos = positions(sample, b)
        rows = np.array([n for _, _, n in b.spans], dtype=np.int64)
        starts, lengths, first_of_row = split_streams(rows, int(self.t.knn_stream_len))
        first = np.array([pos[s] if n else -1 for s, n in zip(starts, lengths)], np.int64)
        last = np.array([pos[s + n - 1] if n else -1 for s, n in zip(starts, lengths)],
                        np.int64)
        # a stream continues the text before it only at a row's start (CarriedPointers)
        init = [p if f else None for p, f in zip(self.carried.take(first), first_of_row)]
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
                clusters=self.clusters,
                preset_skip=skip)
        self.carried.keep(last, final)
        fresh = np.zeros(len(b.targets), dtype=np.uint8)
        for s, n, p in zip(starts, lengths, init):
            if n and p is None:
                fresh[s] = 1
        b.fresh = fresh
        return knn_lp, retrieved

    # ---- end of run ----
    def log_timing(self) -> None:
        if self.retriever.timing:
            t = dict(self.retriever.timing)
            nq = int(t.pop("queries", 0))
            logger.info("kNN-LM time by stage over %d queries: %s", nq,
                        ", ".join(f"{k} {v:.2f}s" for k, v in t.items()))

    def searches_summary(self, totals: dict[str, float], n: int) -> str:
        """The 'kNN-LM searches: S of N tokens' line, with the tokens from pointers and
        those skipped."""
        line = searches_line(int(totals["mode_search"]), n)
        if self.policy is not None:
            return line + (f"; {int(totals['mode_pointers'])} from pointers"
                           + (f", {int(totals['mode_skip'])} without kNN"
                              if totals["mode_skip"] else ""))
        if self.skip_below > 0:
            return line + f"; {int(totals['mode_skip'])} skipped by the lambda model"
        return line

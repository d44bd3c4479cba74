"""kNN-LM when generating: ``fairseq-interactive`` / ``fairseq-generate --task
language_modeling --knnlm ...`` and ``KNNLM.sample``. Every decoding step's next-token
distribution is the kNN-LM mixture over the whole vocabulary (scoring.knn.knn_log_probs_full:
the neighbours' softmax(-d/T) weights scatter-added onto their values, Eq. 2-3 in log space,
fp32), so greedy, beam search and sampling all run through fairseq's own SequenceGenerator.

fairseq's generator calls, at every step, ``model.decoder.forward(tokens,
incremental_state=...)`` and then ``model.get_normalized_probs((logits[:, -1:], extra),
log_probs=True, sample=None)``. ``KNNGeneration`` wraps three methods of the model *instance*
(no fairseq source is edited): the decoder's ``forward`` (to see the tokens and take the query
key that the KeyCapture hook recorded: the datastore's key type at the last position), its
``reorder_incremental_state_scripting`` (beam search reorders the hypotheses: the cache's
history and the pointers follow), and the model's ``get_normalized_probs`` (the mixture).
Any other call (training, a full-sequence forward, scoring with a sample) is fairseq's own.

What works per step: a fixed --lmbda or a fitted --knn-lambda-model (with its gate and
--knn-skip-below), --knn-pointers (RetoMaton: the pointers follow the token the generator
chose) with --knn-clusters, the continuous --knn-cache over the prompt and what has been
generated, every --knn-sim-func and --knn-torch-exact. The checks eval-lm runs (flags,
datastore against model, key type and dictionary, the lambda model's fit) run when the model
is built, before any prompt is read.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from fairseq_knnlm.adaptive.lambda_features import (
    knn_features,
    lm_features_argmax,
    logp_at,
    pre_features,
)
from fairseq_knnlm.adaptive.lambda_model import mix_log_probs_full
from fairseq_knnlm.adaptive.pointers import SKIP, count_modes, next_pointers
from fairseq_knnlm.errors import FlagError, KNNLMError
from fairseq_knnlm.flags import canonical_keytype, check_flags
from fairseq_knnlm.plugin.cache_scorer import CacheScorer
from fairseq_knnlm.plugin.hooks import attach_key_capture
from fairseq_knnlm.plugin.knn_scorer import KNNScorer
from fairseq_knnlm.scoring.cache import cache_log_probs_full, interpolate_cache
from fairseq_knnlm.scoring.knn import interpolate, knn_log_probs_full
from fairseq_knnlm.search.retriever import Retrieved
from fairseq_knnlm.store.datastore import dictionary_sha256, sha256_file

logger = logging.getLogger(__name__)

# the checkpoint being loaded, set by the fairseq-interactive / fairseq-generate wrappers and
# by the Python API (the task's build_model does not see it): for the datastore's model check
_CHECKPOINT: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "fairseq_knnlm_generation_checkpoint", default=None)


@contextlib.contextmanager
def loading_checkpoint(path: Optional[str]) -> Iterator[None]:
    token = _CHECKPOINT.set(path)
    try:
        yield
    finally:
        _CHECKPOINT.reset(token)


def wants_generation(t: Any) -> bool:
    return bool(getattr(t, "knnlm", False) or getattr(t, "knn_cache", False))


def check_generation_flags(t: Any) -> None:
    """The eval-lm options that have no meaning when generating, refused in one line."""
    if getattr(t, "save_knnlm_dstore", False):
        raise FlagError("--save-knnlm-dstore writes a datastore while scoring a subset: use "
                        "fairseq-eval-lm, not generation")
    if getattr(t, "knn_save_neighbors", None):
        raise FlagError("--knn-save-neighbors saves an eval-lm pass for knnlm-sweep: use "
                        "fairseq-eval-lm, not generation")
    if getattr(t, "knn_stream_len", 0):
        raise FlagError("--knn-stream-len splits eval-lm's rows into streams; a generated "
                        "text is one stream: drop it")


@dataclass
class StepRecord:
    """The numbers of the last decoding step (for tests and diagnostics), all (n, V) float32
    log-probabilities of the whole vocabulary but ``retrieved`` and ``lmbda``."""

    lm: torch.Tensor
    knn: Optional[torch.Tensor]
    cache: Optional[torch.Tensor]
    final: torch.Tensor
    retrieved: Optional[Retrieved]
    lmbda: Optional[torch.Tensor]  # (n,) lambda per row (None: --lmbda)
    queries: torch.Tensor  # (n, C) the keys searched


def check_prompts(prompts: Sequence[torch.Tensor], unk: int, max_positions: Optional[int],
                  what: Callable[[int], str] = lambda i: f"prompt {i + 1}",
                  unknown_words: Optional[Sequence[Sequence[str]]] = None) -> None:
    """Before any generation: an empty prompt or one longer than the model's positions is
    refused in one line; unknown words (mapped to <unk>) are said once, in one line.
    ``prompts``: the token ids of each prompt, without the eos/bos the task adds."""
    for i, p in enumerate(prompts):
        if p.numel() == 0:
            raise KNNLMError(f"{what(i)} is empty: nothing to continue (give at least one "
                             "word)")
        if max_positions is not None and p.numel() + 1 > max_positions:
            raise KNNLMError(f"{what(i)} has {p.numel()} tokens: with the start token that "
                             f"is more than the model's {max_positions} positions; shorten "
                             "it")
    n_unk = sum(int((p == unk).sum()) for p in prompts)
    if n_unk:
        words = sorted({w for ws in (unknown_words or []) for w in ws})
        shown = ", ".join(repr(w) for w in words[:10]) + (", ..." if len(words) > 10 else "")
        logger.warning("%d word%s of the prompt%s %s not in the model's dictionary, mapped "
                       "to <unk>%s", n_unk, "s" if n_unk > 1 else "",
                       "s" if len(prompts) > 1 else "", "are" if n_unk > 1 else "is",
                       f": {shown}" if shown else "")


class KNNGeneration:
    """The kNN-LM (and/or cache) mixture at every decoding step of one model."""

    def __init__(self, t: Any, model: torch.nn.Module, dictionary: Any,
                 checkpoint: Optional[str] = None) -> None:
        check_flags(t)
        check_generation_flags(t)
        self.t = t
        self.model = model
        self.vocab = len(dictionary)
        keytype = canonical_keytype(t.knn_keytype)
        self.knn = KNNScorer(t) if t.knnlm else None
        self.cache = CacheScorer(t) if t.knn_cache else None
        self.capture, self.num_layers = attach_key_capture(model, keytype)
        if self.knn is not None:
            ckpt = checkpoint or "(checkpoint)"
            model_sha = sha256_file(checkpoint) if checkpoint and Path(checkpoint).exists() \
                else None
            self.knn.check_model(self.capture.dim, keytype, t.knn_keytype, self.num_layers,
                                 self.vocab, dictionary_sha256(list(dictionary.symbols)), ckpt,
                                 model_sha)
        self.lmbda = float(t.lmbda)
        mp = model.max_positions() if hasattr(model, "max_positions") else None
        self.max_positions: Optional[int] = int(mp) if isinstance(mp, (int, np.integer)) \
            else None
        self.enabled = True  # False: fairseq's own distributions (kNN off), state still kept
        # forced prefix steps (the prompt): searched only if True (their scores are then the
        # kNN-LM's, as fairseq-interactive prints them); else the LM's
        self.score_prefix = True
        # the shortest prompt of the batch being generated (set by the task's inference_step)
        self.prefix_length: Optional[int] = None
        self.last: Optional[StepRecord] = None
        self.steps = 0
        self.searched = 0
        self.seconds = 0.0
        self._reset()
        self._pending: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        decoder = model.decoder
        self._orig_normalized = model.get_normalized_probs
        self._orig_forward = decoder.forward
        self._orig_reorder = decoder.reorder_incremental_state_scripting
        model.get_normalized_probs = self._normalized  # instance attributes: no fairseq edit
        decoder.forward = self._forward
        decoder.reorder_incremental_state_scripting = self._reorder
        what = []
        if self.knn is not None:
            what.append(f"kNN-LM (k {t.k}, " + (f"--knn-lambda-model {t.knn_lambda_model}"
                                                 if t.knn_lambda_model else
                                                 f"lambda {t.lmbda:g}")
                        + f", T {t.knn_temp:g}" + (", pointers" if t.knn_pointers else "")
                        + ")")
        if self.cache is not None:
            what.append(f"cache (lambda {t.cache_lmbda:g}, theta {t.cache_theta:g}, "
                        f"length {t.cache_length})")
        logger.info("generation: every step's distribution is the %s mixture over the %d "
                    "tokens of the vocabulary", " + ".join(what), self.vocab)

    # ---- per-generation state ----
    def _reset(self) -> None:
        self.hist: Optional[torch.Tensor] = None  # (rows, s, C) keys of earlier positions
        self.ptr_ids: Optional[np.ndarray] = None  # (rows, k) last step's neighbours
        self.ptr_vals: Optional[np.ndarray] = None

    def remove(self) -> None:
        """Put the model's own methods back and remove the hook."""
        for obj, name in ((self.model, "get_normalized_probs"), (self.model.decoder, "forward"),
                          (self.model.decoder, "reorder_incremental_state_scripting")):
            obj.__dict__.pop(name, None)
        self.capture.remove()

    # ---- the wrapped methods ----
    def _forward(self, prev_output_tokens: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self._orig_forward(prev_output_tokens, *args, **kwargs)
        inc = kwargs.get("incremental_state", args[1] if len(args) > 1 else None)
        feats = self.capture.take()  # (T, B, C) of this forward pass, or None
        self._pending = None
        if inc is not None and feats is not None and not kwargs.get("features_only", False):
            self._pending = (prev_output_tokens, feats[-1].detach())  # (B, C): last position
        return out

    def _reorder(self, incremental_state: Any, new_order: torch.Tensor) -> Any:
        out = self._orig_reorder(incremental_state, new_order)
        order = new_order.long()
        if self.hist is not None:
            self.hist = self.hist.index_select(0, order.to(self.hist.device))
        if self.ptr_ids is not None:
            o = order.cpu().numpy()
            self.ptr_ids, self.ptr_vals = self.ptr_ids[o], self.ptr_vals[o]
        return out

    def _normalized(self, net_output: Any, log_probs: bool, sample: Optional[dict] = None
                    ) -> torch.Tensor:
        pending, self._pending = self._pending, None
        x = net_output[0]
        if (pending is None or sample is not None or x.dim() != 3 or x.shape[1] != 1
                or pending[1].shape[0] != x.shape[0]):
            return self._orig_normalized(net_output, log_probs, sample)
        lp = self._orig_normalized(net_output, log_probs=True, sample=None)
        tokens, q = pending
        t0 = time.perf_counter()
        final = self.step(lp[:, -1].float(), tokens, q)
        self.seconds += time.perf_counter() - t0
        out = final.to(lp.dtype, copy=True).unsqueeze(1)  # the generator edits it in place
        return out if log_probs else out.exp()

    # ---- one step ----
    @torch.no_grad()
    def step(self, lm: torch.Tensor, tokens: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """(n, V) log-probabilities of the next token: ``lm`` (n, V) the LM's, ``tokens``
        (n, s) the generator's tokens so far (bos first), ``q`` (n, C) the key at the last
        position."""
        n, s = tokens.shape
        if s == 1 or self.hist is None or self.hist.shape[0] != n \
                or self.hist.shape[1] != s - 1:
            if s != 1:
                logger.warning("generation state out of step (%d rows, %d tokens): restarted "
                               "the cache and the pointers", n, s)
            self._reset()
            self.hist = q.new_zeros((n, 0, q.shape[1]))
        self.steps += 1
        qf = q.float()
        search = self._searches(s - 1, n) if self.enabled else np.zeros(n, dtype=bool)
        final, knn_full, cache_full, retrieved, lam = lm, None, None, None, None
        if self.knn is not None and search.any():
            knn_full, retrieved, lam, final = self._knn(lm, tokens, qf, search)
        elif self.knn is not None:
            self.ptr_ids = self.ptr_vals = None  # no neighbours: the pointers restart
        if self.cache is not None and self.enabled:
            cache_full = cache_log_probs_full(qf, self.hist, tokens[:, 1:], self.cache.theta,
                                              self.cache.length, self.vocab).to(lm.device)
            final = interpolate_cache(final, cache_full, self.cache.lmbda)
        self.hist = torch.cat([self.hist, q.detach().unsqueeze(1).to(self.hist.dtype)], dim=1)
        self.last = StepRecord(lm=lm, knn=knn_full, cache=cache_full, final=final,
                               retrieved=retrieved, lmbda=lam, queries=qf)
        return final

    def _searches(self, step: int, n: int) -> np.ndarray:
        """(n,) bool: the rows whose step gets kNN: all, unless the prompt is not scored
        and the step is one of the prompt's forced tokens (in every row of the batch)."""
        if self.score_prefix or self.prefix_length is None:
            return np.ones(n, dtype=bool)
        return np.full(n, step >= self.prefix_length, dtype=bool)

    def _knn(self, lm: torch.Tensor, tokens: torch.Tensor, q: torch.Tensor,
             search: np.ndarray) -> tuple[torch.Tensor, Retrieved, Optional[torch.Tensor],
                                          torch.Tensor]:
        assert self.knn is not None
        knn, t, ret = self.knn, self.t, self.knn.retriever
        n = len(q)
        prev = tokens[:, -1].long().cpu()
        x = lm_top = None
        skip = ~search
        lam_model = knn.lambda_model
        if lam_model is not None:
            lm_feats, lm_top = lm_features_argmax(lm)
            x = pre_features(lm_feats, prev, lam_model.freq)
            if knn.skip_below > 0:
                skip = skip | (lam_model.gate_lambdas(x, n) < knn.skip_below).numpy()
        if knn.policy is None:
            if skip.any():
                _, r = ret.score_subset(q, torch.zeros(n, dtype=torch.long), ~skip)
            else:
                r = ret.retrieve(q)
        else:
            init: list[Optional[np.ndarray]] = [None] * n
            if self.ptr_ids is not None and self.ptr_vals is not None:
                nxt = next_pointers(self.ptr_ids, self.ptr_vals, prev.numpy(), ret.continues)
                init = [row[row >= 0] for row in nxt]
            res = ret.run_streams(q, torch.zeros(n, dtype=torch.long), np.arange(n),
                                  np.ones(n, dtype=np.int64), init, knn.policy,
                                  clusters=knn.clusters, preset_skip=skip if skip.any() else None)
            nbr_vals, valid = ret.values(res.ids, q.device)
            r = Retrieved(ids=res.ids, faiss_dists=res.faiss_dists, dists=res.dists,
                          nbr_vals=nbr_vals, valid=valid, modes=res.modes,
                          n_pointers=res.n_pointers)
            for name, c in count_modes(res.modes).items():
                knn.mode_counts[name] += c
        skipped = r.modes == SKIP if r.modes is not None else np.zeros(n, dtype=bool)
        self.searched += int((~skipped).sum())
        self.ptr_ids = np.where(skipped[:, None], -1, np.asarray(r.ids))
        self.ptr_vals = r.nbr_vals.cpu().numpy()
        knn_full = knn_log_probs_full(r.dists, r.nbr_vals, self.vocab, t.knn_temp,
                                      r.valid).to(lm.device)
        lam = None
        if lam_model is None:
            final = interpolate(lm, knn_full, self.lmbda)
        else:
            assert x is not None
            agree = lam_model.needs_agreement
            nv = r.nbr_vals.to(lm.device)
            x.update(knn_features(r.dists, t.knn_temp, r.nbr_vals,
                                  logp_at(lm, nv) if agree else None,
                                  lm_top if agree else None))
            if lam_model.temps:
                comps = torch.stack([knn_log_probs_full(r.dists, r.nbr_vals, self.vocab, tt,
                                                        r.valid).to(lm.device)
                                     for tt in lam_model.temps], dim=2)
            else:
                comps = knn_full
            final = mix_log_probs_full(lam_model.head.log_weights(x, n), lm, comps)
            lam = lam_model.lambdas(x, n).float()
        if skipped.any():
            final = torch.where(torch.from_numpy(skipped).to(lm.device)[:, None], lm, final)
        return knn_full, r, lam, final

    def summary(self) -> str:
        return (f"kNN-LM generation: {self.steps} steps, {self.searched} rows with kNN, "
                f"{self.seconds:.1f}s in the kNN-LM step")


def attach(task: Any, model: torch.nn.Module) -> KNNGeneration:
    """Bind a KNNGeneration to a model the task has just built (task.build_model)."""
    t = getattr(task, "cfg", None) or task.args
    gen = KNNGeneration(t, model, task.target_dictionary, _CHECKPOINT.get())
    model._knnlm_generation = gen  # type: ignore[attr-defined]
    return gen


def generation_of(model: Any) -> Optional[KNNGeneration]:
    return getattr(model, "_knnlm_generation", None)

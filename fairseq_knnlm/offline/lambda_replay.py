"""Lambda models from saved neighbours: the per-token inputs of one pass, fitting, and the
offline replay of ``--knn-lambda-model MODEL --knn-skip-below tau``.

``token_inputs`` reads a pass saved with ``--knn-save-neighbors`` (sweep.py's files, with
the LM features this version saves) into log p_LM, log p_kNN for the model's k, temperature
and distance, and every feature of lambda_model.FEATURES, computed by the functions the
online run uses. ``fit_model`` splits the rows in text order: the first 70% fit the heads,
the next 10% stop the MLP's training early, the last 20% are held out and only reported.
``replay`` scores a model and each threshold tau on a pass: the tokens whose gate lambda is
below tau take p_LM alone (no search), the others the head's lambda; equal to the online
pass (same features, same lambdas), up to float32 rounding of the mixture.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from fairseq_knnlm.adaptive.lambda_features import (
    AGREEMENT_FEATURES,
    FEATURES,
    POINTER_FEATURES,
    POST_FEATURES,
    PRE_FEATURES,
    knn_features,
)
from fairseq_knnlm.adaptive.lambda_fit import best_constant, fit_buckets, fit_mlp
from fairseq_knnlm.adaptive.lambda_model import (
    KINDS,
    ConstantHead,
    Head,
    LambdaModel,
    MixHead,
    uses_search,
)
from fairseq_knnlm.adaptive.pointers import SKIP, MinPointers, count_modes
from fairseq_knnlm.errors import FlagError
from fairseq_knnlm.flags import require_temperature
from fairseq_knnlm.offline.neighbours import LM_FEATURE_ARRAYS, LM_NBR_ARRAYS, Neighbors
from fairseq_knnlm.offline.sweep import (
    DISTS,
    check_replay,
    knn_logp_for_ks,
    missing_last,
    pointer_passes,
    ppl_from_nll,
    selection_order,
    unsearched_tokens,
)

logger = logging.getLogger(__name__)
SPLITS = (0.7, 0.8)  # fit | early stopping | held out, as fractions of the rows in text order


@dataclass
class TokenInputs:
    lm: np.ndarray  # (n,) float64 log p_LM(target)
    knn: np.ndarray  # (n,) float64 log p_kNN(target) at the model's k, T, distance
    x: dict[str, np.ndarray]  # feature name -> (n,) float32
    knns: Optional[np.ndarray] = None  # (n, m) float64 log p_kNN(target) at a MixHead's temps
    temps: tuple[float, ...] = ()  # the temperatures of knns' columns
    # (n,) int8 pointers.SEARCH / POINTERS / SKIP under a pointer policy; None: all searched
    modes: Optional[np.ndarray] = None

    def rows(self, lo: int, hi: int) -> TokenInputs:
        return TokenInputs(self.lm[lo:hi], self.knn[lo:hi],
                           {f: v[lo:hi] for f, v in self.x.items()},
                           self.knns[lo:hi] if self.knns is not None else None, self.temps,
                           self.modes[lo:hi] if self.modes is not None else None)

    def __len__(self) -> int:
        return len(self.lm)


def check_inputs(nb: Neighbors, k: int, temperature: float, dist: str) -> None:
    """What a lambda model needs of a saved pass, as a FlagError naming the flag (a pass
    that searched every token: the pointer policies are replayed from it)."""
    missing = [a for a in LM_FEATURE_ARRAYS if a not in nb.arrays]
    if missing:
        raise FlagError(f"{nb.meta.get('prefix', 'the neighbour file')}: lacks "
                        f"{', '.join(missing)} (saved by an older fairseq-knnlm): save the "
                        "pass again with --knn-save-neighbors")
    if dist not in DISTS:
        raise FlagError(f"--dist must be one of {', '.join(DISTS)}, got {dist!r}")
    if DISTS[dist] not in nb.arrays:
        raise FlagError(f"--dist {dist}: the neighbour file has no {DISTS[dist]} "
                        "(saved with --no-load-keys?)")
    kmax = int(nb.meta["k"])
    if not 0 < k <= kmax:
        raise FlagError(f"--k {k} outside 1..{kmax} (the saved k)")
    if unsearched_tokens(nb):
        raise FlagError("lambda models are fitted on a pass that searched every token (saved "
                        "without --knn-pointers, or with --knn-min-pointers above --k)")
    require_temperature(temperature, "--temp")


def _pre_x(nb: Neighbors, freq: np.ndarray, with_agreement: bool) -> dict[str, np.ndarray]:
    """The feature arrays of a pass (PRE_FEATURES filled from the saved LM features; POST
    ones to fill), without AGREEMENT_FEATURES unless ``with_agreement``."""
    n = nb.n
    x = {f: np.empty(n, dtype=np.float32) for f in FEATURES
         if with_agreement or f not in AGREEMENT_FEATURES}
    x["lm_entropy"][:] = np.asarray(nb.arrays["lm_entropy"], dtype=np.float32)
    x["lm_max_logp"][:] = np.asarray(nb.arrays["lm_max_logp"], dtype=np.float32)
    prev = np.clip(np.asarray(nb.arrays["prev_tokens"], dtype=np.int64), 0, len(freq) - 1)
    x["prev_log_freq"][:] = np.asarray(freq, dtype=np.float32)[prev]
    return x


def _fill_knn(s: int, e: int, d: np.ndarray, ids: np.ndarray, match: np.ndarray,
              vals: np.ndarray, k: int, temperature: float, temps: Sequence[float],
              knn: np.ndarray, knns: Optional[np.ndarray], x: dict[str, np.ndarray],
              lmn: Optional[torch.Tensor] = None, top: Optional[torch.Tensor] = None) -> None:
    """Rows s..e-1 of log p_kNN (at ``temperature`` and each of ``temps``) and the POST
    features, from their neighbours (``d`` (m, k) distances, inf where none; ``ids``;
    ``match``: the neighbour holds the target), as the online run computes them."""
    nv = np.where(ids >= 0, vals[np.where(ids >= 0, ids, 0)], -1)
    knn[s:e] = knn_logp_for_ks(d, match, [k], temperature)[k]
    for j, t in enumerate(temps):
        assert knns is not None
        knns[s:e, j] = knn_logp_for_ks(d, match, [k], t)[k]
    post = knn_features(torch.from_numpy(np.ascontiguousarray(d)), temperature,
                        torch.from_numpy(nv.astype(np.int64)), lmn, top)
    for f in POST_FEATURES:
        if f in x:
            x[f][s:e] = post[f].numpy()


def token_inputs(nb: Neighbors, freq: np.ndarray, k: int, temperature: float,
                 dist: str = "l2", vals: Optional[np.ndarray] = None, chunk: int = 32768,
                 temps: Sequence[float] = ()) -> TokenInputs:
    """Every token's log p_LM, log p_kNN and features (see the module docstring), and log
    p_kNN at each of ``temps`` (a MixHead's); ``vals`` (N,) the datastore's values (default:
    read from the datastore the pass names)."""
    check_inputs(nb, k, temperature, dist)
    for t in temps:
        check_inputs(nb, k, t, dist)
    if vals is None:
        vals, _ = datastore_values(nb)
    n = nb.n
    lm = np.asarray(nb.arrays["lm_logp"], dtype=np.float64)
    knn = np.empty(n, dtype=np.float64)
    knns = np.empty((n, len(temps)), dtype=np.float64) if temps else None
    agree = all(a in nb.arrays for a in LM_NBR_ARRAYS)  # AGREEMENT_FEATURES possible
    x = _pre_x(nb, freq, agree)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        ids = np.asarray(nb.arrays["ids"][s:e])
        valid = ids >= 0
        d = np.where(valid, np.asarray(nb.arrays[DISTS[dist]][s:e], dtype=np.float32), np.inf)
        match = np.asarray(nb.arrays["match"][s:e]).astype(bool) & valid
        order = None
        if not missing_last(valid):
            order = selection_order(ids, None, "faiss")
            ids, d, match = (np.take_along_axis(a, order, axis=1) for a in (ids, d, match))
        lmn = None
        if agree:
            lmn = np.asarray(nb.arrays["lm_logp_nbrs"][s:e], dtype=np.float32)
            if order is not None:
                lmn = np.take_along_axis(lmn, order, axis=1)
            lmn = torch.from_numpy(np.array(lmn[:, :k], dtype=np.float32))
        top = (torch.from_numpy(np.asarray(nb.arrays["lm_argmax"][s:e], dtype=np.int64))
               if agree else None)
        _fill_knn(s, e, d[:, :k], ids[:, :k], match[:, :k], vals, k, temperature, temps,
                  knn, knns, x, lmn, top)
    return TokenInputs(lm, knn, x, knns, tuple(float(t) for t in temps))


def pointer_token_inputs(nb: Neighbors, ds: Any, freq: np.ndarray, k: int, temperature: float,
                         min_pointers: int, temps: Sequence[float] = (),
                         skip: Optional[np.ndarray] = None, clusters: Any = None
                         ) -> TokenInputs:
    """``token_inputs`` of the neighbours a run with ``--knn-pointers --knn-min-pointers
    min_pointers`` finds: the full-search pass replayed (sweep.pointer_passes; its datastore
    ``ds`` with keys), each token's neighbours the saved search results or its pointers
    (exact L2), their features (knn_log_count among them) and modes; ``skip`` (n,) bool:
    the tokens a gate skips (no kNN, no pointers after them); ``clusters``
    (pointers.Clusters): --knn-clusters. AGREEMENT_FEATURES are left out (p_LM at the
    pointers' values was not saved)."""
    check_inputs(nb, k, temperature, "l2")
    check_replay(nb, [min_pointers], [0.0], [temperature, *temps])
    if k != int(nb.meta["k"]):
        raise FlagError(f"--k {k}: pointers are replayed at the saved k ({nb.meta['k']})")
    n = nb.n
    vals = np.asarray(ds.vals[:, 0], dtype=np.int64)
    knn = np.empty(n, dtype=np.float64)
    knns = np.empty((n, len(temps)), dtype=np.float64) if temps else None
    x = _pre_x(nb, freq, False)
    modes = np.zeros(n, dtype=np.int8)
    for lo, hi, tg, res in pointer_passes(nb, ds, MinPointers(int(min_pointers)),
                                          clusters=clusters, preset_skip=skip):
        valid = res.ids >= 0
        match = valid & (vals[np.where(valid, res.ids, 0)] == tg[:, None])
        _fill_knn(lo, hi, res.dists.numpy(), res.ids, match, vals, k, temperature, temps,
                  knn, knns, x)
        modes[lo:hi] = res.modes
    lm = np.asarray(nb.arrays["lm_logp"], dtype=np.float64)
    return TokenInputs(lm, knn, x, knns, tuple(float(t) for t in temps), modes)


def check_features(inp: TokenInputs, features: Sequence[str], what: str) -> None:
    """FlagError when ``features`` need arrays the saved pass lacks (AGREEMENT_FEATURES: a
    pass saved before they existed)."""
    missing = [f for f in features if f not in inp.x]
    if missing:
        raise FlagError(f"{what} reads {', '.join(missing)}: the neighbour file lacks "
                        f"{', '.join(LM_NBR_ARRAYS)} (saved by an older fairseq-knnlm): save "
                        "the pass again with --knn-save-neighbors")


def open_pass_datastore(nb: Neighbors, dstore: Optional[str] = None,
                        load_keys: bool = False) -> Any:
    """The datastore the pass searched (``dstore`` or the one its meta names), checked
    against the pass's fingerprint; with its keys for a pointer replay."""
    from fairseq_knnlm.store.datastore import DatastoreError, open_datastore

    prefix = dstore or nb.meta.get("dstore")
    if not prefix:
        raise FlagError("the neighbour file does not name its datastore: pass --dstore PREFIX")
    try:
        ds = open_datastore(prefix, load_keys=load_keys)
    except DatastoreError as e:
        raise FlagError(f"--dstore {prefix}: {e}") from None
    if "datastore" in nb.meta and ds.meta.fingerprint() != nb.meta["datastore"]:
        raise FlagError(f"--dstore {prefix} is not the datastore the pass searched (its "
                        "fingerprint differs)")
    return ds


def datastore_values(nb: Neighbors, dstore: Optional[str] = None) -> tuple[np.ndarray, int]:
    """(N,) int64 values of the datastore the pass searched (its meta names it), and its
    dictionary size (for lambda_model.freq_table)."""
    ds = open_pass_datastore(nb, dstore)
    vals = np.asarray(ds.vals[:, 0], dtype=np.int64)
    return vals, int(ds.meta.dict_size or int(vals.max()) + 1)


def _ppl(nll: np.ndarray) -> float:
    return ppl_from_nll(float(nll.mean())) if len(nll) else math.nan


def fit_model(inp: TokenInputs, kind: str, freq: np.ndarray, k: int, temperature: float,
              dist: str, features: Optional[Sequence[str]] = None, buckets: int = 32,
              gate: bool = True, hidden: int = 32, steps: int = 1500, seed: int = 1,
              splits: tuple[float, float] = SPLITS) -> tuple[LambdaModel, dict[str, Any]]:
    """Fit a lambda head of ``kind`` (and a gate on PRE_FEATURES) on the first rows; return
    the model and a report of held-out perplexities (LM, the best fixed lambda of the fit
    rows, the head, and where the gate skips). With ``inp.knns`` (token_inputs' ``temps``)
    an mlp head is a MixHead over those temperatures. Inputs of a pointer policy
    (``pointer_token_inputs``) fit a model for that policy: the caller sets its
    ``min_pointers``; the report gives the searched fraction instead of the gate's skips
    (a skip changes the pointers after it: ``replay_with_pointers`` replays thresholds)."""
    if kind not in KINDS:
        raise FlagError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    temps = tuple(float(t) for t in inp.temps) if inp.knns is not None else ()
    if temps and kind != "mlp":
        raise FlagError(f"--temps: a mixture of temperatures needs --kind mlp, not {kind}")
    n = len(inp)
    a, b = int(n * splits[0]), int(n * splits[1])
    if a < 10 or b - a < 1 or n - b < 1:
        raise FlagError(f"the neighbour file has {n} tokens: too few to fit and hold out")
    fit, stop, held = inp.rows(0, a), inp.rows(a, b), inp.rows(b, n)
    both = inp.rows(0, b)
    fixed = best_constant(both.lm, both.knn)
    init = min(max(fixed, 0.01), 0.99)  # the MLPs start at the fixed lambda
    head: Head
    if kind == "constant":
        head = ConstantHead(fixed)
    elif kind == "buckets":
        feat = (features or ["knn_min_dist"])
        if len(feat) != 1 or feat[0] not in FEATURES:
            raise FlagError(f"--features for buckets: one of {', '.join(FEATURES)}, got {feat}")
        check_features(inp, feat, "--features")
        head = fit_buckets(both.x[feat[0]], both.lm, both.knn, feat[0], buckets)
    else:
        feat = list(features or FEATURES)
        bad = [f for f in feat if f not in FEATURES]
        if bad:
            raise FlagError(f"--features: unknown {bad}; choose from {', '.join(FEATURES)}")
        if features is None:  # all that this pass has (counts vary only with pointers)
            feat = [f for f in feat if f in inp.x
                    and (inp.modes is not None or f not in POINTER_FEATURES)]
        check_features(inp, feat, "--features")
        head = fit_mlp(fit.x, fit.lm, fit.knns if temps else fit.knn, stop.x, stop.lm,
                       stop.knns if temps else stop.knn, feat, hidden=hidden, steps=steps,
                       init_lambda=init, seed=seed)
    gate_head: Optional[Head] = None
    if not uses_search(head):
        gate_head = head
    elif gate:
        gate_head = fit_mlp(fit.x, fit.lm, fit.knn, stop.x, stop.lm, stop.knn,
                            list(PRE_FEATURES), hidden=hidden, steps=steps,
                            init_lambda=init, seed=seed)
    model = LambdaModel(kind=kind, head=head, gate=gate_head, k=k, temperature=temperature,
                        dist=dist, freq=np.asarray(freq, np.float32), temps=temps)
    # the best fixed lambda scored by the same function on the same held-out tokens
    constant = LambdaModel(kind="constant", head=ConstantHead(fixed), gate=None, k=k,
                           temperature=temperature, dist=dist, freq=model.freq)
    report = {
        "rows": {"fit": a, "early_stop": b - a, "held_out": n - b},
        "fixed_lambda": fixed,
        "held_out_ppl": {
            "lm": _ppl(-held.lm),
            "fixed_lambda": _ppl(searched_nll(held, constant)),
            "model": _ppl(searched_nll(held, model)),
        },
    }
    if held.modes is not None:
        report["held_out_modes"] = count_modes(held.modes)
    elif gate_head is not None:
        report["held_out_skips"] = replay(held, model, default_taus())
    return model, report


def default_taus() -> list[float]:
    return [0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5]


def _torch_x(x: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {f: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for f, v in x.items()}


def searched_nll(inp: TokenInputs, model: LambdaModel) -> np.ndarray:
    """(n,) float64 -log p of each token when searched, as the model mixes online
    (``LambdaModel.mixture_logp``, float32, from the head's log weights)."""
    xt = _torch_x(inp.x)
    if isinstance(model.head, MixHead):
        if inp.knns is None or tuple(inp.temps) != tuple(model.temps):
            raise FlagError("the lambda model mixes temperatures "
                            f"{list(model.temps)}: token_inputs(temps=...) must give them")
        knn = inp.knns
    else:
        knn = inp.knn
    lp = model.mixture_logp(xt, torch.from_numpy(np.asarray(inp.lm, np.float32)),
                            torch.from_numpy(np.asarray(knn, np.float32)))
    return -lp.numpy().astype(np.float64)


def _check_taus(taus: Sequence[float]) -> None:
    if any(not 0.0 <= t <= 1.0 for t in taus) or not taus:
        raise FlagError(f"--skip-below values must lie in [0, 1], got {list(taus)}")


def _gate(model: LambdaModel, x: dict[str, np.ndarray], n: int, taus: Sequence[float]
          ) -> Optional[np.ndarray]:
    """(n,) the gate's lambdas where a tau > 0 needs them (FlagError without a gate)."""
    if not any(t > 0 for t in taus):
        return None
    if model.gate is None:
        raise FlagError("--skip-below: the lambda model has no gate")
    return model.gate_lambdas(_torch_x({f: x[f] for f in model.gate.features}), n).numpy()


def replay(inp: TokenInputs, model: LambdaModel, taus: Sequence[float]
           ) -> list[dict[str, Any]]:
    """Perplexity and searches for each skip threshold tau (0: every token searched)."""
    _check_taus(taus)
    if inp.modes is not None:
        raise FlagError("replay: these inputs come from a pointer policy: replay_with_pointers")
    n = len(inp)
    heads = [model.head] + ([model.gate] if model.gate is not None else [])
    check_features(inp, [f for h in heads for f in h.features], "the lambda model")
    searched = searched_nll(inp, model)
    gate = _gate(model, inp.x, n, taus)
    rows = []
    for tau in taus:
        skip = gate < tau if tau > 0 and gate is not None else np.zeros(n, dtype=bool)
        nll = np.where(skip, -inp.lm, searched)
        searches = int(n - skip.sum())
        rows.append({"skip_below": float(tau), "searches": searches, "n_tokens": n,
                     "search_fraction": searches / max(1, n),
                     "loss": float(nll.mean()) / math.log(2) if n else math.nan,
                     "ppl": _ppl(nll)})
    return rows


def replay_with_pointers(nb: Neighbors, ds: Any, model: LambdaModel, taus: Sequence[float],
                         clusters: Any = None) -> list[dict[str, Any]]:
    """``replay`` for a model fitted with pointers (``model.min_pointers``): for each tau the
    pass is replayed under its pointer policy with the gate's skips (a skipped token leaves
    no pointers, as online), tokens scored by the model from their searched or pointer
    neighbours, skipped ones by p_LM; rows also count the tokens scored from pointers.
    ``clusters`` (pointers.Clusters): those of a model fitted with --knn-clusters."""
    _check_taus(taus)
    if model.min_pointers is None:
        raise FlagError("replay_with_pointers: the model was fitted without pointers")
    if (clusters.num_clusters if clusters is not None else None) != model.clusters:
        raise FlagError(f"the lambda model was fitted with --knn-clusters of {model.clusters} "
                        f"clusters; given {clusters.num_clusters if clusters else 'none'}")
    if model.needs_agreement:
        raise FlagError("a lambda model reading p_LM at the neighbours' values "
                        f"({', '.join(AGREEMENT_FEATURES)}) cannot be replayed with pointers")
    n = nb.n
    gate = _gate(model, _pre_x(nb, model.freq, False), n, taus)
    rows = []
    for tau in taus:
        skip = gate < tau if tau > 0 and gate is not None else None
        inp = pointer_token_inputs(nb, ds, model.freq, model.k, model.temperature,
                                   model.min_pointers, model.temps, skip, clusters)
        check_features(inp, model.head.features, "the lambda model")
        assert inp.modes is not None
        nll = np.where(inp.modes == SKIP, -inp.lm, searched_nll(inp, model))
        counts = count_modes(inp.modes)
        rows.append({"skip_below": float(tau), "min_pointers": model.min_pointers,
                     "searches": counts["search"], "pointer_tokens": counts["pointers"],
                     "n_tokens": n, "search_fraction": counts["search"] / max(1, n),
                     "loss": float(nll.mean()) / math.log(2) if n else math.nan,
                     "ppl": _ppl(nll)})
    return rows

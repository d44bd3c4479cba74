"""Adaptive kNN-LM: a per-token lambda, fitted offline, and no search where it cannot help.

Design note
-----------
The paper mixes p = lambda p_kNN + (1 - lambda) p_LM with one lambda for every token. A
*lambda model* predicts lambda per token from features of that token:

* **before the search** (``PRE_FEATURES``, from the LM's own distribution and the text):
  the entropy of p_LM and its largest log-probability (He et al. 2021, "Efficient Nearest
  Neighbor Language Models"), and how often the context's last token occurs in the
  datastore (a log count: rare contexts are where memorisation pays);
* **after the search** (``POST_FEATURES``, from the neighbours' distances): the nearest
  neighbour's distance (Drozdov et al. 2022, "You can't pick your neighbors, or can you?"),
  the entropy of the neighbours' softmax weights, the weight of their most common value, and
  how the neighbours agree with p_LM (``AGREEMENT_FEATURES``: p_LM at the neighbours' values,
  the LM's argmax; the scorer hands these over and ``--knn-save-neighbors`` saves them).

A model holds two *heads*: ``lambda_head`` gives the lambda of every searched token (any
features: ``constant``, ``buckets`` over one feature, or an ``mlp``; or a ``MixHead``, an mlp
whose softmax weighs p_LM and p_kNN at each of several temperatures, the model's ``temps``:
its lambda, 1 - the LM's weight, is shared out among sharp and flat kNN distributions), and
``gate`` (an MLP on ``PRE_FEATURES`` only, or the lambda head itself when that uses no search
feature) predicts lambda before the search; ``--knn-skip-below tau`` skips the search where
the gate's lambda is below tau, and the LM alone scores that token (the runtime's SKIP mode,
pointers.py).

*With pointers* (pointers.py): a model fitted for ``--knn-pointers --knn-min-pointers N``
(``knnlm-fit-lambda --min-pointers N``, its ``min_pointers``) sees each token's neighbours as
that run finds them: the search's, or its live pointers' (exact L2) where at least N are
alive; ``knn_log_count`` tells the two apart (log(1 + k) when searched), so the head lowers
lambda where a few pointers stand in for a search. Fewer searches then come from the pointers,
not from the gate; eval-lm refuses such a model under another pointer policy.

Everything is fitted from a pass saved with ``--knn-save-neighbors`` on a tuning split
(``knnlm-fit-lambda``): the saved rows give log p_LM, log p_kNN for the model's k,
temperature and distance, and the features; a head is fitted to minimise the mixture's NLL
-log(lambda p_kNN + (1 - lambda) p_LM), convex in lambda, so a bucket's lambda is a 1-D
search and an MLP's output is sigmoid(z). Online (``fairseq-eval-lm --knn-lambda-model``)
the same functions compute the same features from the same float32 numbers, so the offline
replay (``knnlm-sweep --lambda-model``) equals the online pass.

Model file (``save_model``): one ``.npz`` holding a JSON ``meta`` (kind, heads' features,
k, temperature, distance, dictionary size, what it was fitted on and how well it did) and the
arrays (the frequency table, each head's parameters). Plain numpy and torch: no fairseq.
"""

from __future__ import annotations

import json
import logging
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from fairseq_knnlm.errors import FlagError

logger = logging.getLogger(__name__)
PathLike = Union[str, Path]
FORMAT = "fairseq-knnlm lambda model"
VERSION = 1

PRE_FEATURES = {
    "lm_entropy": "entropy of p_LM(.|context) in nats",
    "lm_max_logp": "max_v log p_LM(v|context)",
    "prev_log_freq": "log(1 + count in the datastore's values of the context's last token)",
}
POST_FEATURES = {
    "knn_min_dist": "the nearest neighbour's distance (the model's distance and k)",
    "knn_weight_entropy": "entropy of the neighbours' softmax(-d/T) weights, nats",
    "knn_top_mass": "max_v p_kNN(v): the weight of the neighbours' most common value",
    "knn_log_count": "log(1 + number of neighbours): log(1 + k) when searched, the live "
                     "pointers' count when scored from pointers (models fitted with pointers)",
    "knn_lm_agreement": "log sum_v p_kNN(v) p_LM(v): how much p_LM the neighbours' values get",
    "lm_logp_knn_top": "log p_LM(v*), v* = argmax_v p_kNN(v) (the neighbours' best guess)",
    "knn_mass_lm_top": "p_kNN(argmax_v p_LM(v)): the neighbours' weight on the LM's best guess",
}
# POST features that compare the neighbours with p_LM: they need p_LM at the neighbours' values
# and the LM's argmax (saved as PREFIX_lm_logp_nbrs / PREFIX_lm_argmax)
AGREEMENT_FEATURES = ("knn_lm_agreement", "lm_logp_knn_top", "knn_mass_lm_top")
# POST features that only vary when some tokens are scored from pointers (--knn-min-pointers)
POINTER_FEATURES = ("knn_log_count",)
FEATURES = {**PRE_FEATURES, **POST_FEATURES}
KINDS = ("constant", "buckets", "mlp")


# ---- features ----

def lm_features(logp: torch.Tensor) -> torch.Tensor:
    """(n, 2) float32 [entropy, max log-prob] of n log-distributions (n, V)."""
    lp = logp.float()
    ent = torch.special.entr(lp.exp()).sum(-1)
    return torch.stack([ent, lp.max(-1).values], dim=1)


def lm_argmax(logp: torch.Tensor) -> torch.Tensor:
    """(n,) int64 argmax_v of n log-distributions (n, V) (the first of ties, as torch.max)."""
    return logp.float().max(-1).indices


def freq_table(vals: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> np.ndarray:
    """(V,) float32 log(1 + count) of each token among the datastore's values."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for s in range(0, len(vals), chunk):
        v = np.asarray(vals[s:s + chunk]).reshape(-1).astype(np.int64)
        counts += np.bincount(v, minlength=vocab_size)[:vocab_size]
    return np.log1p(counts).astype(np.float32)


def top_value(weights: torch.Tensor, values: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) max over values v of the summed weights of a row's neighbours whose value is v, and
    that v (the smallest of ties; -1 for a row without neighbours), for weights (n, k), 0
    where no neighbour, and values (n, k) int."""
    if not values.shape[1]:
        return torch.zeros(len(values)), torch.full((len(values),), -1, dtype=torch.long)
    vs, order = values.long().sort(dim=1, stable=True)
    ws = weights.gather(1, order)
    c = ws.cumsum(1)
    start = torch.ones_like(vs, dtype=torch.bool)
    start[:, 1:] = vs[:, 1:] != vs[:, :-1]
    # the cumulative weight before each run of equal values, carried along the run
    base = torch.where(start, c - ws, torch.zeros_like(c)).cummax(dim=1).values
    mass, at = (c - base).max(dim=1)
    return mass, vs.gather(1, at[:, None])[:, 0]


def top_value_mass(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(n,) the mass of ``top_value``."""
    return top_value(weights, values)[0]


def agreement_features(logw: torch.Tensor, values: torch.Tensor, top: torch.Tensor,
                       lm_logp_nbrs: torch.Tensor, lm_top: torch.Tensor
                       ) -> dict[str, torch.Tensor]:
    """AGREEMENT_FEATURES of rows with neighbours: ``logw`` (n, k) log softmax weights (-inf
    where no neighbour), ``values`` (n, k) their values (-1 there), ``top`` (n,) the value of
    ``top_value``, ``lm_logp_nbrs`` (n, k) log p_LM at each neighbour's value, ``lm_top`` (n,)
    the LM's argmax."""
    finite = torch.isfinite(logw)
    w = logw.exp().masked_fill(~finite, 0.0)
    lp = lm_logp_nbrs.float().masked_fill(~finite, float("-inf"))
    agree = torch.logsumexp(logw.masked_fill(~finite, float("-inf")) + lp, dim=1)
    first = (values == top[:, None]) & finite
    at = first.float().argmax(dim=1, keepdim=True)  # a neighbour holding v*
    lm_top_lp = lm_logp_nbrs.float().gather(1, at)[:, 0]
    mass_lm = (w * (values == lm_top.long()[:, None]).float()).sum(1)
    return {"knn_lm_agreement": agree, "lm_logp_knn_top": lm_top_lp, "knn_mass_lm_top": mass_lm}


def knn_features(dists: torch.Tensor, temperature: float,
                 values: Optional[torch.Tensor] = None,
                 lm_logp_nbrs: Optional[torch.Tensor] = None,
                 lm_top: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """POST_FEATURES of (n, k) float32 distances (inf where no neighbour), the neighbours'
    values (n, k) (knn_top_mass), and p_LM at them with the LM's argmax (AGREEMENT_FEATURES);
    those without their inputs are left out. A row without neighbours gets 0 for all (it is
    not searched, so no lambda is applied to it)."""
    d = dists.float()
    finite = torch.isfinite(d)
    dmin = d.min(dim=1).values
    logits = (-d / temperature).masked_fill(~finite, float("-inf"))
    logw = torch.log_softmax(logits, dim=1)
    ent = -(logw.exp() * logw.masked_fill(~finite, 0.0)).sum(1)
    any_ = finite.any(dim=1)
    zero = torch.zeros_like(dmin)
    out = {"knn_min_dist": torch.where(any_, dmin, zero),
           "knn_weight_entropy": torch.where(any_, ent, zero),
           "knn_log_count": torch.log1p(finite.sum(1).float())}
    if values is not None:
        vals = values.to(d.device)
        mass, top = top_value(logw.exp().masked_fill(~finite, 0.0), vals)
        out["knn_top_mass"] = torch.where(any_, mass, zero)
        if lm_logp_nbrs is not None and lm_top is not None:
            rows = any_.nonzero()[:, 0]
            agree = agreement_features(logw[rows], vals[rows], top[rows],
                                       lm_logp_nbrs.to(d.device)[rows],
                                       lm_top.to(d.device)[rows])
            for f, v in agree.items():
                out[f] = zero.clone().index_put_((rows,), v.float())
    return out


def needs_agreement(features: Sequence[str]) -> bool:
    return any(f in AGREEMENT_FEATURES for f in features)


def pre_features(lm_feats: torch.Tensor, prev_tokens: torch.Tensor, freq: np.ndarray
                 ) -> dict[str, torch.Tensor]:
    """PRE_FEATURES from ``lm_features`` (n, 2) and the context's last tokens (n,)."""
    table = torch.from_numpy(np.asarray(freq, dtype=np.float32))
    prev = prev_tokens.long().cpu().clamp(0, len(table) - 1)
    return {"lm_entropy": lm_feats[:, 0].float().cpu(),
            "lm_max_logp": lm_feats[:, 1].float().cpu(),
            "prev_log_freq": table[prev]}


# ---- heads ----

@dataclass
class ConstantHead:
    lmbda: float
    features: tuple[str, ...] = ()

    def predict(self, x: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        # float64: interpolate_per_token takes the logs of this very lambda, as knn.interpolate
        # does, so a constant model gives the numbers of --lmbda exactly
        return torch.full((n,), float(self.lmbda), dtype=torch.float64)

    def log_weights(self, x: dict[str, torch.Tensor], n: Optional[int] = None
                    ) -> torch.Tensor:
        """(n, 2) float32 [log(1 - lambda), log lambda], taken in float64 (knn.interpolate's
        numbers for a constant lambda)."""
        assert n is not None
        return lambda_log_weights(self.predict(x, n))

    def params(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"kind": "constant", "lambda": float(self.lmbda)}, {}


@dataclass
class BucketHead:
    """lambda per bucket of one feature: bucket b holds edges[b-1] <= x < edges[b]."""

    feature: str
    edges: np.ndarray  # (B-1,) float32, increasing
    lambdas: np.ndarray  # (B,) float32

    @property
    def features(self) -> tuple[str, ...]:
        return (self.feature,)

    def buckets(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(x.float(), torch.from_numpy(self.edges), right=True)

    def predict(self, x: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        return torch.from_numpy(self.lambdas)[self.buckets(x[self.feature])]

    def log_weights(self, x: dict[str, torch.Tensor], n: Optional[int] = None
                    ) -> torch.Tensor:
        """(n, 2) float32 [log(1 - lambda), log lambda] of each token's bucket."""
        return lambda_log_weights(self.predict(x, len(x[self.feature])))

    def params(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return ({"kind": "buckets", "feature": self.feature},
                {"edges": self.edges, "lambdas": self.lambdas})


@dataclass
class MLPHead:
    """lambda = sigmoid(MLP((x - mean) / std)), ReLU hidden layers."""

    features: tuple[str, ...]
    mean: np.ndarray  # (F,)
    std: np.ndarray  # (F,)
    weights: list[np.ndarray] = field(default_factory=list)  # (out, in) per layer
    biases: list[np.ndarray] = field(default_factory=list)

    def outputs(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """(n, outputs) the last layer's output."""
        h = torch.stack([x[f].float() for f in self.features], dim=1)
        h = (h - torch.from_numpy(self.mean)) / torch.from_numpy(self.std)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.nn.functional.linear(h, torch.from_numpy(w), torch.from_numpy(b))
            if i < len(self.weights) - 1:
                h = torch.relu(h)
        return h

    def logits(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.outputs(x)[:, 0]

    def predict(self, x: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        """lambda = sigmoid(z) (float32: 1.0 exactly for z above ~17; the mixture reads
        ``log_weights`` instead)."""
        return torch.sigmoid(self.logits(x))

    def log_weights(self, x: dict[str, torch.Tensor], n: Optional[int] = None
                    ) -> torch.Tensor:
        """(n, 2) float32 [log(1 - lambda), log lambda] = [logsigmoid(-z), logsigmoid(z)]
        from the logit z, as in training: finite for any finite z."""
        z = self.logits(x)
        logsig = torch.nn.functional.logsigmoid
        return torch.stack([logsig(-z), logsig(z)], dim=1)

    def params(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays = {"mean": self.mean, "std": self.std}
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            arrays[f"w{i}"], arrays[f"b{i}"] = w, b
        return {"kind": "mlp", "features": list(self.features),
                "layers": len(self.weights)}, arrays


@dataclass
class MixHead(MLPHead):
    """Weights per token over (p_LM, p_kNN at each of the model's ``temps``) =
    softmax(MLP(x)): a lambda per token (1 - the LM's weight) shared out among kNN
    distributions of several temperatures (sharp where the nearest neighbours should decide,
    flat where many should vote)."""

    def log_weights(self, x: dict[str, torch.Tensor], n: Optional[int] = None
                    ) -> torch.Tensor:
        """(n, 1 + len(temps)) log weights, the LM's first."""
        return torch.log_softmax(self.outputs(x), dim=1)

    def predict(self, x: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        return -torch.expm1(self.log_weights(x)[:, 0])  # 1 - w_LM

    def params(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta, arrays = super().params()
        return {**meta, "kind": "mix"}, arrays


Head = Union[ConstantHead, BucketHead, MLPHead, MixHead]


def uses_search(head: Head) -> bool:
    return any(f in POST_FEATURES for f in head.features)


@dataclass
class LambdaModel:
    kind: str
    head: Head
    gate: Optional[Head]  # PRE features only; None: no skipping possible
    k: int
    temperature: float
    dist: str  # 'l2' (exact) or 'faiss_l2'
    freq: np.ndarray  # (V,) float32 log(1 + count) of each token in the datastore
    info: dict[str, Any] = field(default_factory=dict)
    temps: tuple[float, ...] = ()  # a MixHead's kNN temperatures; () with one lambda per token
    # the --knn-min-pointers it was fitted under (its neighbours: pointers where at least that
    # many were alive, else a search); None: fitted on neighbours searched for every token
    min_pointers: Optional[int] = None
    clusters: Optional[int] = None  # with pointers: the --knn-clusters' number of clusters

    @property
    def needs_lm_features(self) -> bool:
        heads = [self.head] + ([self.gate] if self.gate is not None else [])
        return any(f in ("lm_entropy", "lm_max_logp") for h in heads for f in h.features)

    @property
    def needs_agreement(self) -> bool:
        """Whether a head reads p_LM at the neighbours' values (AGREEMENT_FEATURES)."""
        return needs_agreement(self.head.features)

    def lambdas(self, x: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        """(n,) lambda of searched tokens: float32, or float64 for a constant head (its exact
        value: interpolate_per_token then gives knn.interpolate's numbers)."""
        return self.head.predict(x, n)

    def mixture_logp(self, x: dict[str, torch.Tensor], lm_logp: torch.Tensor,
                     knn_logps: torch.Tensor) -> torch.Tensor:
        """log p of the targets: ``knn_logps`` (n,) at the model's temperature, or (n, m) at
        its ``temps`` for a MixHead; the one function the online run, the replay and the
        fitter's held-out report call (``mix_log_prob`` of the head's log weights)."""
        if isinstance(self.head, MixHead) and knn_logps.dim() != 2:
            raise ValueError("a MixHead mixes log p_kNN at each of its temps: (n, m)")
        lw = self.head.log_weights(x, len(lm_logp))
        return mix_log_prob(lw, lm_logp, knn_logps)

    def gate_lambdas(self, x: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        """(n,) float32 lambda predicted before the search (for --knn-skip-below)."""
        if self.gate is None:
            raise FlagError("this lambda model has no gate (no head without search features)")
        return self.gate.predict(x, n).float()


# ---- interpolation with a lambda per token ----

def lambda_log_weights(lmbda: torch.Tensor) -> torch.Tensor:
    """(n, 2) float32 [log(1 - lambda), log lambda] of lambdas in [0, 1], the logs taken in
    float64 and rounded to float32 (as knn.interpolate does with a scalar lambda)."""
    lam = lmbda.double()
    with torch.no_grad():
        return torch.stack([torch.log1p(-lam), torch.log(lam)], dim=1).float()


def mix_log_prob(log_weights: torch.Tensor, lm_logp: torch.Tensor,
                 knn_logps: torch.Tensor) -> torch.Tensor:
    """log sum_c w_c p_c per token, in float32 log space: ``log_weights`` (n, C), the LM's
    first; components log p_LM (n,) and log p_kNN (n,) (C = 2) or (n, C - 1). With two
    components: logaddexp(log p_LM + log(1-lambda), log p_kNN + log lambda), and a weight of
    exactly 0 (log -inf) gives the other component exactly (lambda 0: p_LM, lambda 1: p_kNN),
    so a constant lambda gives knn.interpolate's numbers."""
    lw = log_weights.float().to(lm_logp.device)
    lm = lm_logp.float()
    knn = knn_logps.float()
    if knn.dim() == 1:
        knn = knn[:, None]
    if lw.shape[1] != 1 + knn.shape[1]:
        raise ValueError(f"{lw.shape[1]} weights for {1 + knn.shape[1]} components")
    if knn.shape[1] == 1:
        out = torch.logaddexp(lm + lw[:, 0], knn[:, 0] + lw[:, 1])
        out = torch.where(lw[:, 1] == float("-inf"), lm, out)
        return torch.where(lw[:, 0] == float("-inf"), knn[:, 0], out)
    comps = torch.cat([lm[:, None], knn], dim=1)
    terms = (lw + comps).masked_fill(lw == float("-inf"), float("-inf"))
    return torch.logsumexp(terms, dim=1)


def interpolate_per_token(lm_logp: torch.Tensor, knn_logp: torch.Tensor,
                          lmbda: torch.Tensor) -> torch.Tensor:
    """log(lambda_i p_kNN + (1 - lambda_i) p_LM) per token, in float32 (lambda 0: p_LM,
    lambda 1: p_kNN exactly). The logs of lambda are taken in float64 and rounded to float32,
    as knn.interpolate does with a scalar lambda, so a constant lambda gives its numbers."""
    return mix_log_prob(lambda_log_weights(lmbda.to(lm_logp.device)), lm_logp, knn_logp)


# ---- fitting (float64 numpy and float32 torch; no fairseq) ----

def mixture_nll(lm: np.ndarray, knn: np.ndarray, lmbda: Union[float, np.ndarray]) -> np.ndarray:
    """-log(lambda p_kNN + (1 - lambda) p_LM) per token (float64)."""
    lam = np.asarray(lmbda, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return -np.logaddexp(np.asarray(lm, np.float64) + np.log1p(-lam),
                             np.asarray(knn, np.float64) + np.log(lam))


def best_constant(lm: np.ndarray, knn: np.ndarray, iters: int = 60) -> float:
    """The lambda in [0, 1] minimising the mean mixture NLL (convex: ternary search)."""
    if len(lm) == 0:
        return 0.0
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        if mixture_nll(lm, knn, a).mean() <= mixture_nll(lm, knn, b).mean():
            hi = b
        else:
            lo = a
    lam = (lo + hi) / 2
    # the ends are allowed: a bucket where kNN never helps gets exactly 0 (its tokens then
    # cost no search when used as a gate)
    cands = [0.0, lam, 1.0]
    return float(min(cands, key=lambda x: mixture_nll(lm, knn, x).mean()))


def fit_buckets(x: np.ndarray, lm: np.ndarray, knn: np.ndarray, feature: str,
                num_buckets: int) -> BucketHead:
    """Quantile buckets of ``x`` and each bucket's best lambda."""
    if num_buckets < 1:
        raise FlagError(f"--buckets must be >= 1, got {num_buckets}")
    x = np.asarray(x, dtype=np.float32)
    qs = np.quantile(x, np.linspace(0, 1, num_buckets + 1)[1:-1]) if num_buckets > 1 else []
    edges = np.unique(np.asarray(qs, dtype=np.float32))
    head = BucketHead(feature, edges, np.zeros(len(edges) + 1, dtype=np.float32))
    b = head.buckets(torch.from_numpy(x)).numpy()
    lams = np.array([best_constant(lm[b == i], knn[b == i]) for i in range(len(edges) + 1)],
                    dtype=np.float32)
    head.lambdas = lams
    return head


def _matrix(x: dict[str, np.ndarray], features: Sequence[str]) -> np.ndarray:
    return np.stack([np.asarray(x[f], dtype=np.float32) for f in features], axis=1)


def fit_mlp(x_fit: dict[str, np.ndarray], lm_fit: np.ndarray, knn_fit: np.ndarray,
            x_val: dict[str, np.ndarray], lm_val: np.ndarray, knn_val: np.ndarray,
            features: Sequence[str], hidden: int = 32, layers: int = 2, steps: int = 1500,
            lr: float = 3e-3, weight_decay: float = 1e-4, init_lambda: float = 0.25,
            seed: int = 1, eval_every: int = 25, patience: int = 300) -> MLPHead:
    """An MLPHead fitted by full-batch Adam on the mixture NLL of the fit rows, keeping the
    parameters with the lowest NLL on the validation rows (early stopping). ``knn_fit`` and
    ``knn_val`` of shape (n, m) (log p_kNN at m temperatures) fit a MixHead instead."""
    gen = torch.Generator().manual_seed(seed)
    xf = torch.from_numpy(_matrix(x_fit, features))
    xv = torch.from_numpy(_matrix(x_val, features))
    mean = xf.mean(0)
    std = xf.std(0).clamp_min(1e-6)
    knn_fit, knn_val = np.asarray(knn_fit), np.asarray(knn_val)
    m = knn_fit.shape[1] if knn_fit.ndim == 2 else 0  # kNN components of a MixHead
    dims = [len(features)] + [hidden] * layers + [1 + m if m else 1]
    net = []
    for i in range(len(dims) - 1):
        lin = torch.nn.Linear(dims[i], dims[i + 1])
        with torch.no_grad():
            bound = 1 / math.sqrt(dims[i])
            lin.weight.uniform_(-bound, bound, generator=gen)
            lin.bias.uniform_(-bound, bound, generator=gen)
        net.append(lin)
    with torch.no_grad():  # start near the fixed-lambda model
        net[-1].weight.mul_(0.01)
        if m:  # lambda shared equally among the temperatures
            net[-1].bias.copy_(torch.tensor([math.log(1 - init_lambda)]
                                            + [math.log(init_lambda / m)] * m))
        else:
            net[-1].bias.fill_(math.log(init_lambda / (1 - init_lambda)))
    params = [p for lin in net for p in lin.parameters()]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    lm_f, knn_f = torch.from_numpy(np.asarray(lm_fit, np.float32)), \
        torch.from_numpy(np.asarray(knn_fit, np.float32))
    lm_v, knn_v = torch.from_numpy(np.asarray(lm_val, np.float32)), \
        torch.from_numpy(np.asarray(knn_val, np.float32))

    def forward(x: torch.Tensor) -> torch.Tensor:
        h = (x - mean) / std
        for i, lin in enumerate(net):
            h = lin(h)
            if i < len(net) - 1:
                h = torch.relu(h)
        return h if m else h[:, 0]

    def loss(z: torch.Tensor, lm: torch.Tensor, knn: torch.Tensor) -> torch.Tensor:
        if m:
            comps = torch.cat([lm[:, None], knn], dim=1)
            return -torch.logsumexp(torch.log_softmax(z, dim=1) + comps, dim=1).mean()
        logsig = torch.nn.functional.logsigmoid
        return -torch.logaddexp(lm + logsig(-z), knn + logsig(z)).mean()

    best_val, best_state, since = math.inf, None, 0
    for step in range(steps + 1):
        if step % eval_every == 0:
            with torch.no_grad():
                v = float(loss(forward(xv), lm_v, knn_v)) if len(xv) else 0.0
            if v < best_val - 1e-7:
                best_val, since = v, 0
                best_state = [p.detach().clone() for p in params]
            else:
                since += eval_every
                if since >= patience:
                    break
        if step == steps:
            break
        opt.zero_grad()
        loss(forward(xf), lm_f, knn_f).backward()
        opt.step()
    assert best_state is not None
    ws = [best_state[2 * i].numpy().astype(np.float32) for i in range(len(net))]
    bs = [best_state[2 * i + 1].numpy().astype(np.float32) for i in range(len(net))]
    return (MixHead if m else MLPHead)(tuple(features), mean.numpy().astype(np.float32),
                                       std.numpy().astype(np.float32), ws, bs)


def head_nll(head: Head, x: dict[str, np.ndarray], lm: np.ndarray, knn: np.ndarray) -> float:
    """Mean mixture NLL of a head (``mix_log_prob`` of its log weights, as online, in
    float32); ``knn`` (n,) or, for a MixHead, (n, m)."""
    n = len(lm)
    if not n:
        return 0.0
    lw = head.log_weights({f: torch.from_numpy(np.asarray(x[f], np.float32))
                           for f in head.features}, n)
    lp = mix_log_prob(lw, torch.from_numpy(np.asarray(lm, np.float32)),
                      torch.from_numpy(np.asarray(knn, np.float32)))
    return float(-lp.double().mean())


# ---- the model file ----

def _head_from(meta: dict[str, Any], arrays: dict[str, np.ndarray], path: PathLike) -> Head:
    kind = meta.get("kind")
    if kind == "constant":
        return ConstantHead(float(meta["lambda"]))
    if kind == "buckets":
        return BucketHead(str(meta["feature"]), arrays["edges"].astype(np.float32),
                          arrays["lambdas"].astype(np.float32))
    if kind in ("mlp", "mix"):
        n = int(meta["layers"])
        cls = MixHead if kind == "mix" else MLPHead
        return cls(tuple(meta["features"]), arrays["mean"].astype(np.float32),
               arrays["std"].astype(np.float32),
               [arrays[f"w{i}"].astype(np.float32) for i in range(n)],
               [arrays[f"b{i}"].astype(np.float32) for i in range(n)])
    raise FlagError(f"{path}: unknown head kind {kind!r}")


def save_model(path: PathLike, model: LambdaModel) -> None:
    """Write the model as one .npz (meta JSON + arrays), atomically."""
    path = Path(path)
    head_meta, head_arrays = model.head.params()
    arrays: dict[str, np.ndarray] = {"freq": np.asarray(model.freq, np.float32)}
    arrays.update({f"head.{k}": v for k, v in head_arrays.items()})
    gate_meta = None
    if model.gate is not None:
        gate_meta, gate_arrays = model.gate.params()
        arrays.update({f"gate.{k}": v for k, v in gate_arrays.items()})
    meta = {"format": FORMAT, "version": VERSION, "kind": model.kind, "head": head_meta,
            "gate": gate_meta, "k": model.k, "temperature": model.temperature,
            "dist": model.dist, "vocab_size": int(len(model.freq)),
            "temps": list(model.temps), "min_pointers": model.min_pointers,
            "clusters": model.clusters, **model.info}
    arrays["meta"] = np.array(json.dumps(meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    tmp.replace(path)


def load_model(path: PathLike, flag: str = "--knn-lambda-model") -> LambdaModel:
    """A model written by ``save_model``; FlagError naming ``flag`` and the file otherwise."""
    path = Path(path)
    if not path.exists():
        raise FlagError(f"{flag} {path}: file not found (fit one with knnlm-fit-lambda)")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("a .npy array, not an .npz archive")
        with z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("meta")))
        if not isinstance(meta, dict):
            raise ValueError("its meta is not a JSON object")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise FlagError(f"{flag} {path}: not a lambda model file ({e})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise FlagError(f"{flag} {path}: not a lambda model file of version {VERSION} "
                        f"(format {meta.get('format')!r}, version {meta.get('version')!r})")
    try:
        model = _model_from(meta, arrays, path)
    except FlagError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
        raise FlagError(f"{flag} {path}: a damaged lambda model file ({type(e).__name__}: "
                        f"{e})") from None
    problem = _model_problem(model)
    if problem:
        raise FlagError(f"{flag} {path}: a damaged lambda model file ({problem})")
    return model


def _model_from(meta: dict[str, Any], arrays: dict[str, np.ndarray], path: PathLike
                ) -> LambdaModel:
    head = _head_from(meta["head"], {k[5:]: v for k, v in arrays.items()
                                     if k.startswith("head.")}, path)
    gate = (_head_from(meta["gate"], {k[5:]: v for k, v in arrays.items()
                                      if k.startswith("gate.")}, path)
            if meta.get("gate") else None)
    info = {k: v for k, v in meta.items() if k not in (
        "format", "version", "kind", "head", "gate", "k", "temperature", "dist", "vocab_size",
        "temps", "min_pointers", "clusters")}
    temps = meta.get("temps", [])
    if not isinstance(temps, list):
        raise TypeError(f"temps must be a list, got {temps!r}")
    return LambdaModel(kind=str(meta["kind"]), head=head, gate=gate, k=int(meta["k"]),
                       temperature=float(meta["temperature"]), dist=str(meta["dist"]),
                       freq=arrays["freq"].astype(np.float32), info=info,
                       temps=tuple(float(t) for t in temps),
                       min_pointers=(int(meta["min_pointers"])
                                     if meta.get("min_pointers") is not None else None),
                       clusters=(int(meta["clusters"])
                                 if meta.get("clusters") is not None else None))


def _head_problem(head: Head, what: str, n_out: int) -> Optional[str]:
    """What is wrong with a loaded head's parameters (None: nothing)."""
    if isinstance(head, ConstantHead):
        ok = math.isfinite(head.lmbda) and 0.0 <= head.lmbda <= 1.0
        return None if ok else f"{what} lambda {head.lmbda}"
    if isinstance(head, BucketHead):
        if head.feature not in FEATURES:
            return f"{what} reads an unknown feature {head.feature!r}"
        if len(head.lambdas) != len(head.edges) + 1:
            return f"{what}: {len(head.lambdas)} lambdas for {len(head.edges)} edges"
        lam = head.lambdas
        if not (np.isfinite(lam).all() and (lam >= 0).all() and (lam <= 1).all()):
            return f"{what} lambdas outside [0, 1]"
        return None if np.isfinite(head.edges).all() else f"{what} edges not finite"
    unknown = [f for f in head.features if f not in FEATURES]
    if unknown:
        return f"{what} reads unknown features {unknown}"
    width = len(head.features)
    if head.mean.shape != (width,) or head.std.shape != (width,):
        return f"{what}: mean/std of shape {head.mean.shape}, {width} features"
    for i, (w, b) in enumerate(zip(head.weights, head.biases)):
        if w.ndim != 2 or w.shape[1] != width or b.shape != (w.shape[0],):
            return f"{what} layer {i}: weights {w.shape}, biases {b.shape}, input {width}"
        width = w.shape[0]
    if width != n_out:
        return f"{what}: {width} outputs, {n_out} expected"
    arrays = [head.mean, head.std, *head.weights, *head.biases]
    if not all(np.isfinite(a).all() for a in arrays):
        return f"{what} parameters not finite"
    return None


def _model_problem(m: LambdaModel) -> Optional[str]:
    if m.k < 1:
        return f"k {m.k}"
    if not (math.isfinite(m.temperature) and m.temperature > 0):
        return f"temperature {m.temperature}"
    if any(not (math.isfinite(t) and t > 0) for t in m.temps):
        return f"temps {list(m.temps)}"
    if m.dist not in ("l2", "faiss_l2"):
        return f"distance {m.dist!r}"
    if m.freq.ndim != 1 or not len(m.freq) or not np.isfinite(m.freq).all():
        return "frequency table missing or not finite"
    if isinstance(m.head, MixHead) and not m.temps:
        return "a mixture head without temps"
    n_out = 1 + len(m.temps) if isinstance(m.head, MixHead) else 1
    problem = _head_problem(m.head, "head", n_out)
    if problem is None and m.gate is not None:
        problem = _head_problem(m.gate, "gate", 1)
        if problem is None and isinstance(m.gate, MixHead):
            problem = "gate is a mixture head"
    return problem


def check_model_flags(model: LambdaModel, path: PathLike, k: int, temperature: float,
                      sim_func: str, vocab_size: Optional[int] = None,
                      min_pointers: Optional[int] = None, clusters: Optional[int] = None
                      ) -> None:
    """The run's --k, --knn-temp and --knn-sim-func must be those the model was fitted for
    (its lambdas are only right for that p_kNN), and so must its pointer policy
    (``min_pointers``: the run's --knn-min-pointers, None without --knn-pointers;
    ``clusters``: the number of clusters of its --knn-clusters, None without) for a model
    fitted with pointers."""
    diffs = []
    if model.min_pointers is not None:
        if min_pointers != model.min_pointers:
            run = (f"--knn-min-pointers {min_pointers}" if min_pointers is not None
                   else "no --knn-pointers")
            diffs.append(f"{run} (fitted for --knn-pointers --knn-min-pointers "
                         f"{model.min_pointers})")
        if clusters != model.clusters:
            run = (f"--knn-clusters of {clusters} clusters" if clusters is not None
                   else "no --knn-clusters")
            fit = (f"fitted with --knn-clusters of {model.clusters} clusters"
                   if model.clusters is not None else "fitted on plain pointers")
            diffs.append(f"{run} ({fit})")
    if k != model.k:
        diffs.append(f"--k {k} (fitted for {model.k})")
    if not math.isclose(temperature, model.temperature, rel_tol=1e-9):
        diffs.append(f"--knn-temp {temperature:g} (fitted for {model.temperature:g})")
    if sim_func != model.dist:
        diffs.append(f"--knn-sim-func {sim_func} (fitted for {model.dist})")
    if vocab_size is not None and vocab_size != len(model.freq):
        diffs.append(f"dictionary of {vocab_size} types (fitted for {len(model.freq)})")
    if diffs:
        raise FlagError(f"--knn-lambda-model {path} does not fit this run: "
                        + "; ".join(diffs))

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

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from fairseq_knnlm.adaptive.lambda_features import POST_FEATURES, needs_agreement
from fairseq_knnlm.errors import FlagError

logger = logging.getLogger(__name__)
PathLike = Union[str, Path]

KINDS = ("constant", "buckets", "mlp")


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


def mix_log_probs_full(log_weights: torch.Tensor, lm_logp: torch.Tensor,
                       knn_logps: torch.Tensor) -> torch.Tensor:
    """``mix_log_prob`` over the whole vocabulary, for generation: ``log_weights`` (n, C)
    one set of weights per row (a lambda model's head), ``lm_logp`` (n, V), ``knn_logps``
    (n, V) or (n, V, C - 1) (a MixHead's temperatures); returns (n, V) float32."""
    n, v = lm_logp.shape
    knn = knn_logps if knn_logps.dim() == 3 else knn_logps.unsqueeze(-1)
    lw = log_weights.float().to(lm_logp.device).repeat_interleave(v, dim=0)
    out = mix_log_prob(lw, lm_logp.reshape(-1), knn.reshape(n * v, -1))
    return out.view(n, v)

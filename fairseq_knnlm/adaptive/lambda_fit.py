"""Fitting a lambda model's heads from saved rows (float64 numpy and float32 torch): the mixture's
NLL, the best constant lambda (a 1-D convex search), buckets over one feature, the MLP heads
(Adam on -log(lambda p_kNN + (1 - lambda) p_LM)) and ``head_nll``, the held-out score that
uses the online mixing (``mix_log_prob``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

from fairseq_knnlm.adaptive.lambda_model import BucketHead, Head, MixHead, MLPHead, mix_log_prob
from fairseq_knnlm.errors import FlagError

logger = logging.getLogger(__name__)
PathLike = Union[str, Path]



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

"""The lambda model's neighbour features (``lambda_features.knn_features``) as one compiled
(numba) pass per token over its k neighbours, instead of two dozen whole-(n, k) torch passes
and a sort: the distances' softmax, its entropy, the neighbour count, the weight of the
neighbours' most common value (summed per value into a vocabulary-sized scratch array, not
sorted) and the agreement with p_LM, all read from the row while it is in cache.

The numbers are ``knn_features_torch``'s up to float rounding (sums in float64 here, float32
there; tests/adaptive/test_feature_kernel.py compares them): every CPU caller (eval-lm, the
replay, the fitter) goes through this kernel, so online and offline stay equal bit for bit.

Compiled on first use and cached on disk (numba's ``cache=True``), like ``kernels``.
"""

from __future__ import annotations

import logging

import numpy as np

# see kernels.py: numba logs every bytecode to fairseq's DEBUG root logger otherwise
logging.getLogger("numba").setLevel(logging.WARNING)

from numba import njit  # noqa: E402

# columns of ``neighbour_features``'s output
MIN_DIST, WEIGHT_ENTROPY, LOG_COUNT, TOP_MASS, TOP_VALUE = 0, 1, 2, 3, 4
AGREEMENT, LM_LOGP_TOP, MASS_LM_TOP = 5, 6, 7
COLUMNS = 8


@njit(cache=True, nogil=True)
def neighbour_features(d: np.ndarray, temperature: float, values: np.ndarray,
                       lmn: np.ndarray, lm_top: np.ndarray, scratch: np.ndarray,
                       mark: np.ndarray, out: np.ndarray) -> None:
    """Row i of ``out`` (n, COLUMNS) float64 from the distances ``d[i]`` (k,) float32 (inf
    where no neighbour): the nearest distance, the entropy of w = softmax(-d/T) (log-softmax
    in float32 as torch computes the logits, the rest in float64), log(1 + count); with
    ``values`` (n, k) int64 (-1 where none; (0, 0) to leave out): the largest summed weight
    of one value and that value (the smallest of ties; -1 without neighbours); with ``lmn``
    (n, k) float32 log p_LM at the neighbours' values and ``lm_top`` (n,) the LM's argmax
    ((0, 0) and (0,) to leave out): log sum_j w_j p_LM(v_j), log p_LM of the top value (at
    its first neighbour) and the weight on ``lm_top``. Rows without neighbours get 0 (and
    TOP_VALUE -1). ``scratch`` (V,) float64 zeros and ``mark`` (V,) bool False, V > every
    value: left so."""
    n, k = d.shape
    with_vals = values.shape[0] == n
    with_agree = with_vals and lmn.shape[0] == n
    touched = np.empty(k, dtype=np.int64)
    lg = np.empty(k, dtype=np.float32)
    ex = np.empty(k, dtype=np.float64)
    t = np.float32(temperature)
    for i in range(n):
        cnt = 0
        dmin = np.inf
        m = -np.inf
        for j in range(k):
            x = d[i, j]
            if x < np.inf:
                cnt += 1
                if x < dmin:
                    dmin = x
                lg[j] = -x / t
                if lg[j] > m:
                    m = lg[j]
            else:
                lg[j] = -np.inf
        for c in range(COLUMNS):
            out[i, c] = 0.0
        if cnt == 0:
            out[i, TOP_VALUE] = -1.0
            continue
        s = 0.0
        for j in range(k):
            if lg[j] > -np.inf:
                ex[j] = np.exp(np.float64(lg[j]) - m)
                s += ex[j]
        lse = m + np.log(s)
        ent = 0.0
        nt = 0
        agree = 0.0
        for j in range(k):
            if lg[j] == -np.inf:
                continue
            lw = np.float64(lg[j]) - lse
            w = ex[j] / s
            ent -= w * lw
            if not with_vals:
                continue
            v = values[i, j]
            if with_agree:
                agree += w * np.exp(np.float64(lmn[i, j]))
                if v == lm_top[i]:
                    out[i, MASS_LM_TOP] += w
            if v >= 0:
                if v >= len(scratch):  # no bounds checks in compiled code
                    raise IndexError("a neighbour's value is past the vocabulary")
                if not mark[v]:
                    mark[v] = True
                    touched[nt] = v
                    nt += 1
                scratch[v] += w
        out[i, MIN_DIST] = dmin
        out[i, WEIGHT_ENTROPY] = ent
        out[i, LOG_COUNT] = np.log1p(np.float64(cnt))
        if not with_vals:
            continue
        best = -1.0
        top = -1
        for q in range(nt):
            v = touched[q]
            mass = scratch[v]
            if mass > best or (mass == best and v < top):
                best, top = mass, v
            scratch[v] = 0.0
            mark[v] = False
        out[i, TOP_MASS] = max(best, 0.0)
        out[i, TOP_VALUE] = top
        if not with_agree:
            continue
        # p_LM >= 1e-45 (float32) and the largest weight >= 1 / k: no float64 underflow
        out[i, AGREEMENT] = np.log(agree)
        for j in range(k):
            if lg[j] > -np.inf and values[i, j] == top:
                out[i, LM_LOGP_TOP] = lmn[i, j]
                break

"""Exact nearest-neighbour search with torch over keys held in memory (``--knn-torch-exact``).

For datastores whose keys fit in (GPU) memory, without faiss-gpu: queries of a batch against
key chunks with one matmul each, ``-2 q.k + |k|^2`` (``|q|^2`` is the same for every key of a
query), a running top-k over the chunks, then the candidates' exact squared L2 (or negated
inner product) recomputed in float32 and the k nearest kept. On the GPU the keys are held
in float16 and the matmul runs in float16 (float32 accumulation); the candidate list is
``k + margin`` long so that the float16 ranking errors near the k-th key are re-ranked away
by the exact float32 distances. On the CPU the keys are held in float32.

``TorchExactIndex.search`` has FAISS's signature (float32 (n, D) -> distances, ids), so the
retriever uses it in place of a FAISS index; its distances are the exact ones.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


class TorchExactIndex:
    """Exact search over ``keys`` (N, D) (any array with row slices: memmap, ConcatRows)."""

    def __init__(self, keys: Any, metric: str = "l2", device: str = "cpu",
                 chunk_rows: int = 1 << 18, margin: int = 0) -> None:
        if metric not in ("l2", "dot"):
            raise ValueError(f"metric must be l2 or dot, got {metric!r}")
        self.metric = metric
        self.device = torch.device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.ntotal, self.d = int(keys.shape[0]), int(keys.shape[1])
        self.chunk_rows = int(chunk_rows)
        # float16 scores rank near-ties wrongly: keep extra candidates for the exact re-rank
        self.margin = margin if margin > 0 else (64 if self.dtype == torch.float16 else 8)
        self.keys = torch.empty((self.ntotal, self.d), dtype=self.dtype, device=self.device)
        self.sqnorms = torch.empty(self.ntotal, dtype=torch.float32, device=self.device)
        step = 1 << 18
        for s in range(0, self.ntotal, step):  # copy in slices: the file may exceed RAM
            part = torch.from_numpy(np.ascontiguousarray(keys[s:s + step], dtype=np.float32))
            part = part.to(self.device)
            self.keys[s:s + len(part)] = part.to(self.dtype)
            self.sqnorms[s:s + len(part)] = part.square().sum(1)
        logger.info("torch exact search: %d keys of dim %d in %s %s (%.2f GB)", self.ntotal,
                    self.d, self.device, str(self.dtype).replace("torch.", ""),
                    self.keys.numel() * self.keys.element_size() / 1e9)

    def _candidates(self, q: torch.Tensor, kk: int) -> torch.Tensor:
        """(n, kk) ids of the kk best keys by matmul score, chunk by chunk."""
        n = q.shape[0]
        best_s = torch.full((n, 0), float("inf"), device=self.device)
        best_i = torch.zeros((n, 0), dtype=torch.int64, device=self.device)
        qc = q.to(self.dtype)
        for s in range(0, self.ntotal, self.chunk_rows):
            e = min(self.ntotal, s + self.chunk_rows)
            score = (qc @ self.keys[s:e].T).float().mul_(-2.0 if self.metric == "l2" else -1.0)
            if self.metric == "l2":
                score += self.sqnorms[s:e]
            top = min(kk, e - s)
            v, i = torch.topk(score, top, dim=1, largest=False, sorted=False)
            best_s = torch.cat([best_s, v], 1)
            best_i = torch.cat([best_i, i + s], 1)
            if best_s.shape[1] > kk:
                best_s, j = torch.topk(best_s, kk, dim=1, largest=False, sorted=False)
                best_i = torch.gather(best_i, 1, j)
        return best_i

    @torch.no_grad()
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances (n, k) float32, ids (n, k) int64), nearest first; exact squared L2 or
        negated inner product."""
        q = torch.as_tensor(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)
        kk = min(self.ntotal, k + self.margin)
        ids = self._candidates(q, kk)
        rows = self.keys[ids].float()  # (n, kk, D)
        if self.metric == "l2":
            d = (rows - q.unsqueeze(1)).square_().sum(-1)
        else:
            d = -torch.bmm(rows, q.unsqueeze(-1)).squeeze(-1)
        d, order = torch.sort(d, dim=1, stable=True)
        ids = torch.gather(ids, 1, order)
        kout = min(k, kk)
        dist = d[:, :kout].cpu().numpy()
        found = ids[:, :kout].cpu().numpy()
        if kout < k:  # fewer keys than k: FAISS's padding
            dist = np.pad(dist, ((0, 0), (0, k - kout)), constant_values=math.inf)
            found = np.pad(found, ((0, 0), (0, k - kout)), constant_values=-1)
        return dist.astype(np.float32), found.astype(np.int64)

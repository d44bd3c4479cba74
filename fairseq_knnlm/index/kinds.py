"""Index settings and kinds: ``IndexSettings`` (the paper's IVFPQ, OPQ/PCA + IVFPQ, fast-scan
IVFPQ, flat), their validation before any file is read (``validate_settings``,
``validate_build_args``, ``check_settings`` against the datastore's size), ``new_index``, the
sidecar path INDEX.meta.json and the lazy FAISS / GPU handles (``require_gpu``, ``_to_gpu``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from fairseq_knnlm.errors import FlagError, KNNLMError

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]


INDEX_TYPES = ("ivfpq", "flat", "opq-ivfpq", "pca-ivfpq", "ivfpq-fastscan", "ivf-rabitq")
# kinds FAISS has no GPU version of, and that the on-disk build cannot merge
CPU_ONLY_TYPES = ("ivfpq-fastscan", "ivf-rabitq")
# ivfpq-fastscan: the same IVF lists and bytes per vector, but 2 x code_size sub-quantizers of
# 4 bits scanned with SIMD (faiss "PQ{M}x4fs"): on WikiText-2 (2 cores) ~5x the queries/s of
# the paper's 8-bit PQ at recall@1024 0.80 instead of 0.89 (benchmarks/search_bench.py).
# CPU only, not --on-disk.
# ivf-rabitq: the same IVF lists with RaBitQ codes (faiss "IVF{n},RaBitQ", FAISS >= 1.11): one
# bit per dimension plus two floats per vector (dim/8 + 8 bytes: 40 for dim 256); --code-size
# does not apply. CPU only, not --on-disk.
MIN_POINTS_PER_CENTROID = 39  # below this FAISS warns that k-means is under-trained


class IndexBuildError(KNNLMError):
    """Bad settings or inputs for an index build, reported before any work is done."""


class IndexFlagError(IndexBuildError, FlagError):
    """A build flag out of range (also a ValueError)."""


@dataclass
class IndexSettings:
    index_type: str = "ivfpq"
    ncentroids: int = 4096
    code_size: int = 64
    train_size: int = 1_000_000
    probe: int = 32
    seed: int = 1
    pca_dim: int = 512

    def describe(self, dim: int) -> str:
        if self.index_type == "flat":
            return "Flat"
        if self.index_type == "ivfpq-fastscan":
            return f"IVF{self.ncentroids},PQ{2 * self.code_size}x4fs"
        if self.index_type == "ivf-rabitq":
            return f"IVF{self.ncentroids},RaBitQ"
        pre = {"ivfpq": "", "opq-ivfpq": f"OPQ{self.code_size},",
               "pca-ivfpq": f"PCA{self.pca_dim},"}[self.index_type]
        return f"{pre}IVF{self.ncentroids},PQ{self.code_size}"


def _faiss():
    import faiss  # imported lazily: the datastore and maths modules do not need it

    return faiss


def meta_path(index_path: PathLike) -> Path:
    return Path(f"{index_path}.meta.json")


def _require(ok: bool, flag: str, value: Any, rule: str = "must be positive") -> None:
    if not ok:
        raise IndexFlagError(f"{flag} {rule}, got {value}")


def validate_settings(settings: IndexSettings) -> None:
    """Refuse settings no datastore can make sense of (before any file is read): FAISS would
    segfault (--ncentroids 0) or raise a SWIG traceback (negative values)."""
    if settings.index_type not in INDEX_TYPES:
        raise IndexFlagError(f"--index-type must be one of {INDEX_TYPES}, "
                             f"got {settings.index_type!r}")
    for flag, v in (("--ncentroids", settings.ncentroids), ("--code-size", settings.code_size),
                    ("--train-size", settings.train_size), ("--probe", settings.probe),
                    ("--pca-dim", settings.pca_dim)):
        _require(v > 0, flag, v)
    _require(settings.seed >= 0, "--seed", settings.seed, "must be >= 0")  # numpy's rule


def validate_build_args(add_chunk: int = 1, checkpoint_every: int = 1,
                        shard_size: Optional[int] = None, workers: int = 1) -> None:
    """Refuse build arguments out of range (--num-keys-to-add-at-a-time 0 would loop forever)."""
    _require(add_chunk > 0, "--num-keys-to-add-at-a-time", add_chunk)
    _require(checkpoint_every > 0, "--checkpoint-every", checkpoint_every)
    _require(workers > 0, "--workers", workers)
    if shard_size is not None:
        _require(shard_size > 0, "--add-shard-size", shard_size,
                 "must be positive (or 0 on the command line: one part per datastore shard)")


def check_settings(settings: IndexSettings, ntotal: int, dim: int) -> IndexSettings:
    """Validate settings against the datastore; pick a smaller ncentroids if needed (logged)."""
    validate_settings(settings)
    if ntotal <= 0:
        raise IndexBuildError("the datastore is empty")
    if settings.index_type == "flat":
        return settings
    eff_dim = settings.pca_dim if settings.index_type == "pca-ivfpq" else dim
    if settings.index_type == "pca-ivfpq" and settings.pca_dim > dim:
        raise IndexBuildError(f"--pca-dim {settings.pca_dim} exceeds the key dimension {dim}")
    if settings.index_type == "ivf-rabitq":
        if not hasattr(_faiss(), "IndexIVFRaBitQ"):
            raise IndexBuildError("--index-type ivf-rabitq needs FAISS >= 1.11 (IndexIVFRaBitQ); "
                                  f"this faiss is {_faiss().__version__}")
    elif settings.index_type == "ivfpq-fastscan":
        m = 2 * settings.code_size  # 4-bit sub-quantizers: two per byte
        if settings.code_size <= 0 or eff_dim % m != 0:
            ok = [c for c in (8, 16, 32, 48, 64, 96, 128) if eff_dim % (2 * c) == 0]
            raise IndexBuildError(
                f"--index-type ivfpq-fastscan uses 2 x --code-size = {m} sub-quantizers of 4 "
                f"bits, which must divide the dimension {eff_dim}; try --code-size in {ok}")
    elif settings.code_size <= 0 or eff_dim % settings.code_size != 0:
        divisors = [m for m in (8, 16, 32, 48, 64, 96, 128) if eff_dim % m == 0]
        raise IndexBuildError(
            f"--code-size {settings.code_size} must divide the dimension {eff_dim} (one "
            f"sub-quantizer per {eff_dim}/M dims); try one of {divisors}")
    n_train = min(settings.train_size, ntotal)
    if n_train < 256:
        raise IndexBuildError(
            f"only {n_train} keys to train on: PQ needs at least 256 (2^8 codes); use "
            "--index-type flat for a datastore this small")
    nc = settings.ncentroids
    if n_train < nc * MIN_POINTS_PER_CENTROID:
        best = 1 << max(0, int(np.log2(max(1, n_train // MIN_POINTS_PER_CENTROID))))
        logger.warning(
            "%d training keys are too few for %d centroids (FAISS wants ~%d per centroid): "
            "using --ncentroids %d; pass it explicitly to silence this", n_train, nc,
            MIN_POINTS_PER_CENTROID, best)
        settings = IndexSettings(**{**asdict(settings), "ncentroids": best})
    return settings


def new_index(settings: IndexSettings, dim: int) -> Any:
    """An untrained FAISS index for the settings (L2 metric throughout, as in the paper)."""
    faiss = _faiss()
    if settings.index_type == "flat":
        return faiss.IndexFlatL2(dim)
    if settings.index_type == "ivfpq":
        quantizer = faiss.IndexFlatL2(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, settings.ncentroids, settings.code_size, 8)
        index.own_fields = True
        quantizer.this.disown()
        return index
    return faiss.index_factory(dim, settings.describe(dim), faiss.METRIC_L2)


def _gpu_available() -> bool:
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def require_gpu() -> None:
    if not _gpu_available():
        raise IndexBuildError(
            "--gpu needs a CUDA build of FAISS and a visible GPU; this faiss has "
            f"{'no GPU support' if not hasattr(_faiss(), 'StandardGpuResources') else '0 GPUs'}"
            " (pip install 'fairseq-knnlm[gpu]' on a CUDA machine)")


def _to_gpu(index: Any, all_gpus: bool = False) -> Any:
    """A GPU copy of the index: on GPU 0, or (all_gpus, more than one visible) split over
    every GPU with faiss's IndexShards, each GPU holding 1/N of the vectors."""
    faiss = _faiss()
    ngpu = faiss.get_num_gpus()
    if all_gpus and ngpu > 1:
        co = faiss.GpuMultipleClonerOptions()
        co.useFloat16 = True
        co.shard = True  # IndexShards rather than replicas: the index need not fit one GPU
        logger.info("sharding the index over %d GPUs", ngpu)
        return faiss.index_cpu_to_all_gpus(index, co, ngpu=ngpu)
    res = faiss.StandardGpuResources()
    co = faiss.GpuClonerOptions()
    co.useFloat16 = True  # fp16 lookup tables: needed for 64-byte PQ codes on GPU
    gi = faiss.index_cpu_to_gpu(res, 0, index, co)
    gi._res = res  # keep the resources alive as long as the index
    return gi

"""Loading a built index: its sidecar record (``read_index_record``), the check that it belongs
to this datastore and dump (``check_index_matches``), ``load_index`` (nprobe, memory mapping,
GPU), ``set_probe`` and the batched ``search``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Union

import numpy as np

from fairseq_knnlm.index.kinds import (
    CPU_ONLY_TYPES,
    IndexBuildError,
    _faiss,
    _to_gpu,
    meta_path,
    require_gpu,
)
from fairseq_knnlm.store.datastore import (
    Datastore,
    DatastoreError,
)

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]



def read_index_record(index_path: PathLike) -> dict[str, Any]:
    """The sidecar of a finished index; raises if the index is missing or unfinished."""
    index_path = Path(index_path)
    if not index_path.exists():
        raise DatastoreError(f"FAISS index {index_path} not found")
    mp = meta_path(index_path)
    if not mp.exists():
        raise DatastoreError(f"{mp} not found: {index_path} was not built by knnlm-build-index "
                             "(or its build did not finish); rebuild it")
    return json.loads(mp.read_text())


def check_index_matches(index_path: PathLike, ds: Datastore) -> dict[str, Any]:
    """Refuse an index that was built from another datastore, or from another dump of this
    one (dump id), naming both sides. An index recorded before dump ids existed is checked
    on the fields it recorded, as long as the datastore is that old too (no dump id)."""
    rec = read_index_record(index_path)
    built = rec.get("datastore", {})
    have = ds.meta.fingerprint()
    legacy = "dump_id" not in built and ds.meta.dump_id is None
    diffs = [f"{k}: index built from {built.get(k)!r}, datastore has {v!r}"
             for k, v in have.items() if built.get(k) != v and not (legacy and k not in built)]
    if diffs:
        hint = ("the datastore was dumped again after the index was built: rebuild it with "
                "knnlm-build-index" if built.get("dump_id") != have["dump_id"] else "")
        raise DatastoreError(f"{index_path} does not belong to datastore {ds.prefix}: "
                             + "; ".join(diffs) + (f" ({hint})" if hint else ""))
    return rec


def load_index(index_path: PathLike, probe: int = 32, gpu: bool = False,
               mmap: bool = False) -> Any:
    """Read an index, set nprobe, optionally memory-map it (IO_FLAG_MMAP: the inverted lists
    stay on disk; an on-disk index's lists are always memory-mapped from INDEX.ivfdata) or
    move it to the GPU(s)."""
    faiss = _faiss()
    mp = meta_path(index_path)
    rec = json.loads(mp.read_text()) if mp.exists() else {}
    on_disk = bool(rec.get("on_disk"))
    kind = rec.get("settings", {}).get("index_type")
    if gpu and kind in CPU_ONLY_TYPES:
        raise IndexBuildError(f"{index_path} is an {kind} index, which FAISS cannot "
                              "move to a GPU: drop --knn-gpu or build an ivfpq index")
    if on_disk:
        # the lists are memory-mapped from INDEX.ivfdata already (IO_FLAG_MMAP would crash
        # faiss here), found next to INDEX wherever the pair was moved
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR
    else:
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    index = faiss.read_index(str(index_path), flags)
    set_probe(index, probe)
    if gpu:
        require_gpu()
        index = _to_gpu(index, all_gpus=True)
        set_probe(index, probe)
    return index


def set_probe(index: Any, probe: int) -> None:
    """Set nprobe on an IVF index (also under a pre-transform, on GPU, or sharded over
    GPUs); no-op for flat indexes."""
    faiss = _faiss()
    try:
        faiss.extract_index_ivf(index).nprobe = probe
        return
    except (RuntimeError, AttributeError):
        pass
    if hasattr(faiss, "GpuParameterSpace") and not hasattr(index, "nprobe"):
        try:  # IndexShards / IndexReplicas of GPU indexes
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", probe)
            return
        except RuntimeError:
            pass
    if hasattr(index, "nprobe"):
        index.nprobe = probe


def search(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Batched search; float32 C-contiguous queries, returns (dists (n,k), ids (n,k))."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    return index.search(q, k)

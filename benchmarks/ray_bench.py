"""Ray on one machine (local Ray, this machine's cores): the sharded build with 1 and 2 Ray
tasks, and the kNN retrieval (FAISS search + exact L2 of k neighbours, what eval-lm's kNN
part does per token) in this process against 1 and 2 Ray actors, with the fan-out overhead
per batch. All measured in one run, ratios printed against the in-process numbers.

    python benchmarks/ray_bench.py --dstore runs/wikitext2_quick/dstore/train \
        --trained runs/wikitext2_quick/dstore/train.index.trained \
        --queries runs/wikitext2_quick/speed/nbrs_valid_lam_mlp \
        --work runs/ray_bench --json runs/ray_bench/ray_bench.json

--trained: a trained index of --dstore (its .json record next to it), copied so that every
build here adds to the same quantizer (training is timed once, separately, with --train);
--queries: a saved pass with queries (PREFIX_queries.npy, held-out tokens) or a datastore
(its keys). The 1-shard Ray index must answer exactly as the one-piece index built in this
process from the same trained index, and 2 actors as IndexShards over the same 2 shards
(checked on every query measured).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from fairseq_knnlm.index.build import build_index, train_index
from fairseq_knnlm.index.kinds import IndexSettings
from fairseq_knnlm.index.ray_build import ray_runner
from fairseq_knnlm.index.sharded import build_index_sharded
from fairseq_knnlm.search.retriever import KNNRetriever
from fairseq_knnlm.store.datastore import open_datastore


def _queries(path: str, n: int) -> torch.Tensor:
    from fairseq_knnlm.offline.neighbours import load_neighbors

    try:
        arr = load_neighbors(path).arrays["queries"]
    except Exception:  # noqa: BLE001  (a datastore instead)
        arr = open_datastore(path).keys
    return torch.from_numpy(np.array(arr[:n], dtype=np.float32))


def _retrieve_rate(r: KNNRetriever, q: torch.Tensor, batch: int) -> tuple[float, list]:
    """Tokens/s of r.retrieve over q in batches (one warm-up batch first), and what it
    returned (ids, FAISS distances, exact distances) per batch."""
    r.retrieve(q[:batch])
    got = []
    t0 = time.perf_counter()
    for s in range(0, len(q), batch):
        x = r.retrieve(q[s:s + batch])
        got.append((x.ids, x.faiss_dists, x.dists.numpy()))
    return len(q) / (time.perf_counter() - t0), got


def _same(a: list, b: list) -> bool:
    """Bit-equal ids, FAISS distances and exact distances, batch by batch."""
    return all(np.array_equal(x, y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))


def _call_ms(r: KNNRetriever, q: torch.Tensor, reps: int) -> float:
    """Median milliseconds of one retrieve call on q."""
    r.retrieve(q)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        r.retrieve(q)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _settings(trained_json: Path) -> IndexSettings:
    return IndexSettings(**json.loads(trained_json.read_text())["settings"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dstore", required=True)
    p.add_argument("--trained", required=True)
    p.add_argument("--queries", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--json", default=None)
    p.add_argument("--n-queries", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1024, help="queries per retrieve call")
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--probe", type=int, default=32)
    p.add_argument("--train", action="store_true", help="also time training once")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    trained = Path(a.trained)
    settings = _settings(Path(f"{trained}.json"))
    out: dict = {"cpus": os.cpu_count(), "k": a.k, "probe": a.probe, "batch": a.batch,
                 "n_queries": a.n_queries, "settings": settings.describe(0)}

    def seed(name: str) -> Path:
        """A build at work/name that reuses the given trained index (same quantizer)."""
        idx = work / name
        for suffix in ("", ".meta.json"):
            Path(f"{idx}{suffix}").unlink(missing_ok=True)
        for f in work.glob(f"{name}.shard*"):
            f.unlink()
        shutil.copy(trained, f"{idx}.trained")
        shutil.copy(f"{trained}.json", f"{idx}.trained.json")
        return idx

    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING",
             log_to_driver=False)
    out["ray_init_s"] = time.perf_counter() - t0

    # ---- build ----
    if a.train:  # training once, as every build does first (the builds below reuse it)
        ds = open_datastore(a.dstore)
        t0 = time.perf_counter()
        train_index(ds, settings, progress=False)
        out["build_train_s"] = time.perf_counter() - t0
    one = seed("one.index")
    t0 = time.perf_counter()
    build_index(a.dstore, one, settings, progress=False)
    out["build_in_process_s"] = time.perf_counter() - t0
    for n in (1, 2):
        idx = seed(f"ray{n}.index")
        t0 = time.perf_counter()
        build_index_sharded(a.dstore, idx, settings, num_shards=n, runner=ray_runner(),
                            threads=max(1, (os.cpu_count() or 1) // n), progress=False)
        out[f"build_ray_{n}_tasks_s"] = time.perf_counter() - t0

    # ---- search ----
    q = _queries(a.queries, a.n_queries)
    kw = {"k": a.k, "probe": a.probe}
    local = KNNRetriever(a.dstore, one, **kw)
    local2 = KNNRetriever(a.dstore, work / "ray2.index", **kw)  # IndexShards, this process
    out["in_process_tok_s"], ref = _retrieve_rate(local, q, a.batch)
    out["in_process_2_shards_tok_s"], ref2 = _retrieve_rate(local2, q, a.batch)
    small = q[:1]
    out["in_process_call_ms_1_query"] = _call_ms(local, small, 30)
    out["in_process_call_ms_batch"] = _call_ms(local, q[:a.batch], 5)
    del local2
    for n, exact in ((1, "actors"), (2, "actors"), (2, "owners"), (2, "driver")):
        os.environ["FAIRSEQ_KNNLM_RAY_EXACT"] = exact
        if exact != "actors":  # exact distances for the merged k only: owners, or here
            r = KNNRetriever(a.dstore, work / f"ray{n}.index", engine="ray", **kw)
            rate, ids = _retrieve_rate(r, q, a.batch)
            assert _same(ids, ref2), f"{exact} differs"
            out[f"ray_{n}_actors_exact_{exact}_tok_s"] = rate
            out[f"ray_{n}_actors_exact_{exact}_vs_in_process"] = rate / out["in_process_tok_s"]
            r.index.close()
            continue
        t0 = time.perf_counter()
        r = KNNRetriever(a.dstore, work / f"ray{n}.index", engine="ray", **kw)
        out[f"ray_{n}_actors_start_s"] = time.perf_counter() - t0
        rate, ids = _retrieve_rate(r, q, a.batch)
        want = ref if n == 1 else ref2
        assert _same(ids, want), f"{n} actors differ"
        out[f"ray_{n}_actors_tok_s"] = rate
        out[f"ray_{n}_actors_call_ms_1_query"] = _call_ms(r, small, 30)
        out[f"ray_{n}_actors_call_ms_batch"] = _call_ms(r, q[:a.batch], 5)
        r.index.close()
    ray.shutdown()
    for n in (1, 2):
        out[f"ray_{n}_actors_vs_in_process"] = out[f"ray_{n}_actors_tok_s"] / out[
            "in_process_tok_s"]
        out[f"fanout_overhead_ms_1_query_{n}_actors"] = (
            out[f"ray_{n}_actors_call_ms_1_query"] - out["in_process_call_ms_1_query"])
        out[f"fanout_overhead_ms_batch_{n}_actors"] = (
            out[f"ray_{n}_actors_call_ms_batch"] - out["in_process_call_ms_batch"])
        out[f"build_ray_{n}_tasks_vs_in_process"] = (out[f"build_ray_{n}_tasks_s"] /
                                                     out["build_in_process_s"])
    for key, v in out.items():
        print(f"{key}: {v:.4g}" if isinstance(v, float) else f"{key}: {v}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

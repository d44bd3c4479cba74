"""knnlm-plan: disk, RAM and GPU memory each step of kNN-LM needs, before you start.

    knnlm-plan --tokens 103227021 --dim 1024 --key-dtype float16     # WikiText-103 (paper)
    knnlm-plan --tokens 3000000000 --dim 1024 --key-dtype float16    # a 3B-token corpus

Pure arithmetic from the file formats (raw keys, int32 values, int64 positions) and FAISS's
IVFPQ layout (code_size bytes + an 8-byte id per vector, float32 centroids); model memory
and FAISS's transient buffers are not included. The on-disk rows are for
``knnlm-build-index --on-disk`` (parts of --add-shard-size rows, --workers processes);
``--shards N`` adds what each Ray task of ``--engine ray --shards N`` and each actor of
``--knn-engine ray`` needs (docs/ray.md).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Optional

GB = 1e9


@dataclass
class Plan:
    keys_disk: float
    vals_disk: float
    pos_disk: float
    train_sample_ram: float
    index_bytes: float
    keys_ram_if_loaded: float
    part_bytes: float = 0.0
    chunk_bytes: float = 0.0
    workers: int = 1
    shards: int = 0  # --shards / Ray actors of a sharded index (0: no Ray rows)
    keys_bytes_per_row: int = 2
    tokens: int = 0
    dim: int = 0

    def actor_bytes(self, keys_in_memory: bool = False) -> float:
        """RAM of one Ray actor of the search: its shard's index (+ its keys in RAM)."""
        per = self.index_bytes / max(1, self.shards)
        return per + (self.keys_ram_if_loaded / max(1, self.shards) if keys_in_memory else 0)

    def ray_rows(self) -> list[tuple[str, str, str]]:
        n = self.shards
        rows_per = -(-self.tokens // n)
        task = self.index_bytes / n + self.chunk_bytes
        return [
            (f"index: add --engine ray --shards {n}",
             f"RAM per task about {task / GB:,.2f} GB (one shard's index, {rows_per:,} rows, "
             f"+ one chunk of float32 keys); at most as many tasks at once as CPUs",
             f"disk {self.index_bytes / GB:,.1f} GB in {n} shard files + the manifest"),
            (f"search --knn-engine ray ({n} actors)",
             f"RAM per actor {self.actor_bytes() / GB:,.2f} GB (its shard's index); with "
             f"--move-dstore-to-mem {self.actor_bytes(True) / GB:,.2f} GB (+ its "
             f"{self.keys_ram_if_loaded / n / GB:,.1f} GB of keys)",
             f"in all {self.index_bytes / GB:,.1f} GB (+ {self.keys_ram_if_loaded / GB:,.1f} GB "
             "keys in RAM, or read from the memmap by the node holding each shard); each node "
             "must see its shards' files"),
        ]

    def rows(self) -> list[tuple[str, str, str]]:
        dstore = self.keys_disk + self.vals_disk + self.pos_disk
        return [
            ("dump (eval-lm --save-knnlm-dstore)",
             f"disk {dstore / GB:,.1f} GB (keys {self.keys_disk / GB:,.1f}, values "
             f"{self.vals_disk / GB:,.2f}, positions {self.pos_disk / GB:,.2f})",
             "RAM: model + one batch (keys go straight to the memmap)"),
            ("index: train",
             f"RAM {self.train_sample_ram / GB:,.1f} GB for the float32 training sample",
             f"GPU (--gpu) about {self.train_sample_ram / GB:,.1f} GB"),
            ("index: add",
             f"RAM {self.index_bytes / GB:,.1f} GB (the index grows in RAM; keys stream from "
             "disk in chunks)", f"disk {self.index_bytes / GB:,.1f} GB for the index file"),
            ("index: add --on-disk",
             f"RAM about {self.workers} x {(self.part_bytes + self.chunk_bytes) / GB:,.2f} GB "
             f"(workers: {self.workers}, each holding one part's codes + one chunk of float32 "
             "keys); "
             "independent of the datastore size",
             f"disk {self.index_bytes / GB:,.1f} GB INDEX.ivfdata (+ as much for the parts "
             "until the merge)"),
            ("search (eval-lm --knnlm)",
             f"RAM {self.index_bytes / GB:,.1f} GB index (or mmap it: --knn-mmap-index; an "
             "--on-disk index is always mapped, RAM = the lists probed); "
             f"exact L2 reads keys from the {self.keys_disk / GB:,.1f} GB memmap "
             f"(--move-dstore-to-mem: +{self.keys_ram_if_loaded / GB:,.1f} GB RAM)",
             f"GPU (--knn-gpu) about {self.index_bytes / GB:,.1f} GB in all, split over the "
             "visible GPUs (IndexShards) when there are several"),
        ]


def plan(tokens: int, dim: int, key_dtype: str = "float16", code_size: int = 64,
         ncentroids: int = 4096, train_size: int = 1_000_000, add_shard_size: int = 5_000_000,
         add_chunk: int = 500_000, workers: int = 1, shards: int = 0) -> Plan:
    kb = {"float16": 2, "float32": 4}[key_dtype]
    index = tokens * (code_size + 8) + ncentroids * dim * 4
    return Plan(keys_disk=tokens * dim * kb, vals_disk=tokens * 4, pos_disk=tokens * 8,
                train_sample_ram=min(train_size, tokens) * dim * 4, index_bytes=index,
                keys_ram_if_loaded=tokens * dim * kb,
                part_bytes=min(add_shard_size, tokens) * (code_size + 8) + ncentroids * dim * 4,
                chunk_bytes=min(add_chunk, tokens) * dim * 4, workers=workers, shards=shards,
                keys_bytes_per_row=kb * dim, tokens=tokens, dim=dim)


def cli_main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="knnlm-plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, required=True, help="datastore entries (target tokens)")
    p.add_argument("--dim", type=int, required=True, help="key dimension")
    p.add_argument("--key-dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--code-size", type=int, default=64)
    p.add_argument("--ncentroids", type=int, default=4096)
    p.add_argument("--train-size", type=int, default=1_000_000)
    p.add_argument("--add-shard-size", type=int, default=5_000_000, help="--on-disk part size")
    p.add_argument("--num-keys-to-add-at-a-time", type=int, default=500_000)
    p.add_argument("--workers", type=int, default=1, help="--on-disk worker processes")
    p.add_argument("--shards", type=int, default=0,
                   help="also the rows of a sharded build and search on Ray (--engine ray "
                        "--shards N, --knn-engine ray): what each task and actor needs")
    a = p.parse_args(argv)
    if a.shards < 0:
        print(f"knnlm-plan: error: --shards must be >= 1 (0: no Ray rows), got {a.shards}",
              file=sys.stderr)
        return 2
    pl = plan(a.tokens, a.dim, a.key_dtype, a.code_size, a.ncentroids, a.train_size,
              a.add_shard_size, a.num_keys_to_add_at_a_time, a.workers, a.shards)
    print(f"{a.tokens:,} keys x {a.dim} dims ({a.key_dtype}); IVF{a.ncentroids},PQ{a.code_size}")
    print("| step | needs | also |")
    print("|---|---|---|")
    for step, need, also in pl.rows() + (pl.ray_rows() if a.shards else []):
        print(f"| {step} | {need} | {also} |")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())

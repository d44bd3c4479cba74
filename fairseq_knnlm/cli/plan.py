"""knnlm-plan: disk, RAM and GPU memory each step of kNN-LM needs, before you start.

    knnlm-plan --tokens 103227021 --dim 1024 --key-dtype float16     # WikiText-103 (paper)
    knnlm-plan --tokens 3000000000 --dim 1024 --key-dtype float16    # a 3B-token corpus

Pure arithmetic from the file formats (raw keys, int32 values, int64 positions) and FAISS's
IVFPQ layout (code_size bytes + an 8-byte id per vector, float32 centroids); model memory
and FAISS's transient buffers are not included.
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
            ("search (eval-lm --knnlm)",
             f"RAM {self.index_bytes / GB:,.1f} GB index (or mmap it: --knn-mmap-index); "
             f"exact L2 reads keys from the {self.keys_disk / GB:,.1f} GB memmap "
             f"(--move-dstore-to-mem: +{self.keys_ram_if_loaded / GB:,.1f} GB RAM)",
             f"GPU (--knn-gpu) about {self.index_bytes / GB:,.1f} GB"),
        ]


def plan(tokens: int, dim: int, key_dtype: str = "float16", code_size: int = 64,
         ncentroids: int = 4096, train_size: int = 1_000_000) -> Plan:
    kb = {"float16": 2, "float32": 4}[key_dtype]
    index = tokens * (code_size + 8) + ncentroids * dim * 4
    return Plan(keys_disk=tokens * dim * kb, vals_disk=tokens * 4, pos_disk=tokens * 8,
                train_sample_ram=min(train_size, tokens) * dim * 4, index_bytes=index,
                keys_ram_if_loaded=tokens * dim * kb)


def cli_main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="knnlm-plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, required=True, help="datastore entries (target tokens)")
    p.add_argument("--dim", type=int, required=True, help="key dimension")
    p.add_argument("--key-dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--code-size", type=int, default=64)
    p.add_argument("--ncentroids", type=int, default=4096)
    p.add_argument("--train-size", type=int, default=1_000_000)
    a = p.parse_args(argv)
    pl = plan(a.tokens, a.dim, a.key_dtype, a.code_size, a.ncentroids, a.train_size)
    print(f"{a.tokens:,} keys x {a.dim} dims ({a.key_dtype}); IVF{a.ncentroids},PQ{a.code_size}")
    print("| step | needs | also |")
    print("|---|---|---|")
    for step, need, also in pl.rows():
        print(f"| {step} | {need} | {also} |")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())

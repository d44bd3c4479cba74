"""knnlm-build-index: build the FAISS index of a datastore (paper: IVFPQ 4096 / 64 bytes).

    knnlm-build-index --dstore-mmap runs/wt2/dstore/train --faiss-index runs/wt2/dstore/train.index

Size, dimension and dtypes come from the datastore's meta file (or, for a sharded dump, its
manifest). An interrupted build resumes from its last checkpoint when run again with the same
arguments. Also: python -m fairseq_knnlm.cli.build_index.

Beyond RAM: --on-disk adds ranges of --add-shard-size rows in --workers processes and merges
their inverted lists into INDEX.ivfdata (memory-mapped at query time):

    knnlm-build-index --dstore-mmap big --faiss-index big.index --on-disk --workers 2
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from ..datastore import DatastoreError
from ..index import (
    INDEX_TYPES,
    IndexBuildError,
    IndexSettings,
    build_index,
    build_index_ondisk,
)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="knnlm-build-index", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dstore-mmap", required=True, help="datastore prefix (from the dump)")
    p.add_argument("--faiss-index", required=True, help="output index path")
    p.add_argument("--index-type", default="ivfpq", choices=INDEX_TYPES,
                   help="ivfpq (paper), flat (exact, small datastores), opq-ivfpq, pca-ivfpq")
    p.add_argument("--ncentroids", type=int, default=4096,
                   help="IVF lists (paper: 4096; lowered automatically, with a warning, when "
                        "the datastore has fewer than 39 keys per centroid)")
    p.add_argument("--code-size", type=int, default=64,
                   help="PQ bytes per vector = sub-quantizers of 8 bits (paper: 64); must "
                        "divide the dimension")
    p.add_argument("--train-size", type=int, default=1_000_000,
                   help="keys sampled without replacement to train on (paper: 1M)")
    p.add_argument("--probe", type=int, default=32, help="nprobe recorded for search (paper: 32)")
    p.add_argument("--seed", type=int, default=1, help="seed of the training sample")
    p.add_argument("--pca-dim", type=int, default=512, help="output dim of pca-ivfpq")
    p.add_argument("--num-keys-to-add-at-a-time", type=int, default=500_000,
                   help="keys read from the memmap and added per chunk (bounds RAM)")
    p.add_argument("--checkpoint-every", type=int, default=5_000_000,
                   help="save the partial index every this many added keys (for resuming)")
    p.add_argument("--starting-point", type=int, default=None,
                   help="check that the build resumes at this key (default: detected)")
    p.add_argument("--gpu", action="store_true", help="train and add on GPU (CUDA FAISS)")
    p.add_argument("--on-disk", action="store_true",
                   help="inverted lists in INDEX.ivfdata (OnDiskInvertedLists), built part by "
                        "part: RAM bounded by --add-shard-size, not the datastore")
    p.add_argument("--add-shard-size", type=int, default=5_000_000,
                   help="--on-disk: rows per part (each part's codes stay in its worker's RAM: "
                        "rows x (code size + 8) bytes); 0 = one part per datastore shard")
    p.add_argument("--workers", type=int, default=1,
                   help="--on-disk: parts built in parallel processes (FAISS threads are "
                        "split between them)")
    p.add_argument("--keep-parts", action="store_true",
                   help="--on-disk: keep INDEX.parts/ after the merge")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def cli_main(argv: Optional[list[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | "
                        "%(message)s")
    settings = IndexSettings(index_type=args.index_type, ncentroids=args.ncentroids,
                             code_size=args.code_size, train_size=args.train_size,
                             probe=args.probe, seed=args.seed, pca_dim=args.pca_dim)
    try:
        if args.on_disk:
            if args.gpu:
                raise IndexBuildError("--on-disk builds on CPU: drop --gpu")
            build_index_ondisk(args.dstore_mmap, args.faiss_index, settings,
                               shard_size=args.add_shard_size or None, workers=args.workers,
                               add_chunk=args.num_keys_to_add_at_a_time,
                               progress=not args.no_progress, keep_parts=args.keep_parts)
        else:
            build_index(args.dstore_mmap, args.faiss_index, settings,
                        add_chunk=args.num_keys_to_add_at_a_time,
                        starting_point=args.starting_point,
                        checkpoint_every=args.checkpoint_every, gpu=args.gpu,
                        progress=not args.no_progress)
    except (IndexBuildError, DatastoreError) as e:
        print(f"knnlm-build-index: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())

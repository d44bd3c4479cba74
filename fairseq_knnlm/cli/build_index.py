"""knnlm-build-index: build the FAISS index of a datastore (paper: IVFPQ 4096 / 64 bytes).

    knnlm-build-index --dstore-mmap runs/wt2/dstore/train --faiss-index runs/wt2/dstore/train.index

Size, dimension and dtypes come from the datastore's meta file (or, for a sharded dump, its
manifest). An interrupted build resumes from its last checkpoint when run again with the same
arguments (a checkpoint made from an earlier dump of the datastore is discarded, with a
warning). Also: python -m fairseq_knnlm.cli.build_index.

The authors' build_dstore.py command line works unchanged (underscore spellings are aliases;
--dstore_size and --dimension are checked against the meta file, --dstore_fp16 is implied by
it):

    knnlm-build-index --dstore_mmap checkpoints/dstore --dstore_size 103225485 \\
        --dimension 1024 --faiss_index checkpoints/knn.index \\
        --num_keys_to_add_at_a_time 500000 --starting_point 0 --dstore_fp16 \\
        --ncentroids 4096 --code_size 64 --probe 32 --seed 1

Beyond RAM: --on-disk adds ranges of --add-shard-size rows in --workers processes and merges
their inverted lists into INDEX.ivfdata (memory-mapped at query time):

    knnlm-build-index --dstore-mmap big --faiss-index big.index --on-disk --workers 2

Beyond one machine: --shards N (or --engine ray) adds N slices of the datastore (0: its own
shards) to copies of the trained index, one index file per shard, and writes at
--faiss-index a manifest tying them (eval-lm's --indexfile takes it, with --knn-engine ray
or in one process); --engine ray runs the shards as Ray tasks (docs/ray.md):

    knnlm-build-index --dstore-mmap big --faiss-index big.index --engine ray --shards 8

Progress: a bar on a terminal; in a log file, a line every 30 s (keys done, keys/s, ETA).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from fairseq_knnlm.errors import KNNLMError
from fairseq_knnlm.flags import check_engine_flags, check_shards_flag
from fairseq_knnlm.index.build import build_index
from fairseq_knnlm.index.kinds import (
    INDEX_TYPES,
    IndexBuildError,
    IndexFlagError,
    IndexSettings,
    validate_build_args,
    validate_settings,
)
from fairseq_knnlm.index.ondisk import build_index_ondisk
from fairseq_knnlm.index.sharded import build_index_sharded
from fairseq_knnlm.store.datastore import DatastoreMeta, read_meta

logger = logging.getLogger("fairseq_knnlm.cli.build_index")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="knnlm-build-index", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dstore-mmap", "--dstore_mmap", dest="dstore_mmap", required=True,
                   help="datastore prefix (from the dump)")
    p.add_argument("--faiss-index", "--faiss_index", dest="faiss_index", required=True,
                   help="output index path")
    p.add_argument("--index-type", default="ivfpq", choices=INDEX_TYPES,
                   help="ivfpq (paper), flat (exact, small datastores), opq-ivfpq, pca-ivfpq")
    p.add_argument("--ncentroids", type=int, default=4096,
                   help="IVF lists (paper: 4096; lowered automatically, with a warning, when "
                        "the datastore has fewer than 39 keys per centroid)")
    p.add_argument("--code-size", "--code_size", dest="code_size", type=int, default=64,
                   help="PQ bytes per vector = sub-quantizers of 8 bits (paper: 64); must "
                        "divide the dimension")
    p.add_argument("--train-size", type=int, default=1_000_000,
                   help="keys sampled without replacement to train on (paper: 1M)")
    p.add_argument("--probe", type=int, default=32, help="nprobe recorded for search (paper: 32)")
    p.add_argument("--seed", type=int, default=1, help="seed of the training sample")
    p.add_argument("--pca-dim", type=int, default=512, help="output dim of pca-ivfpq")
    p.add_argument("--num-keys-to-add-at-a-time", "--num_keys_to_add_at_a_time",
                   dest="num_keys_to_add_at_a_time", type=int, default=500_000,
                   help="keys read from the memmap and added per chunk (bounds RAM)")
    p.add_argument("--checkpoint-every", type=int, default=5_000_000,
                   help="save the partial index every this many added keys (for resuming)")
    p.add_argument("--starting-point", "--starting_point", dest="starting_point", type=int,
                   default=None, help="check that the build resumes at this key (default: "
                                      "detected; 0 = a fresh build)")
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
    p.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="where the shards are built: local (this process) or ray (one Ray "
                        "task per shard; an embedded local Ray unless --ray-address); ray "
                        "implies a sharded build (--shards, default: the datastore's shards)")
    p.add_argument("--ray-address", default=None,
                   help="--engine ray: the Ray cluster to join (default: RAY_ADDRESS, else a "
                        "local Ray started for the build)")
    p.add_argument("--shards", type=int, default=None,
                   help="a sharded index of this many slices of the datastore (0: one per "
                        "datastore shard): one index file per shard + a manifest at "
                        "--faiss-index; with --on-disk the shards are merged into one "
                        "on-disk index instead. Resumable: finished shards are kept")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (nor progress log lines)")
    g = p.add_argument_group("the authors' build_dstore.py flags (checked, not needed: the "
                             "meta file has these)")
    g.add_argument("--dstore-size", "--dstore_size", dest="dstore_size", type=int,
                   default=None, help="must equal the datastore's size")
    g.add_argument("--dimension", type=int, default=None,
                   help="must equal the datastore's key dimension")
    g.add_argument("--dstore-fp16", "--dstore_fp16", dest="dstore_fp16", action="store_true",
                   help="accepted; the key dtype comes from the meta file")
    return p


def _spelling(argv: list[str], *names: str) -> str:
    """The spelling of a flag the user typed (for messages), else the first name."""
    for a in argv:
        for n in names:
            if a == n or a.startswith(n + "="):
                return n
    return names[0]


def check_declared(meta: DatastoreMeta, args: argparse.Namespace, argv: list[str]) -> None:
    """The authors' hand-typed --dstore_size / --dimension must agree with the meta file (a
    wrong size was the classic bug: rows silently left out or read past the end)."""
    for value, have, names, what in (
            (args.dstore_size, meta.size, ("--dstore_size", "--dstore-size"), "entries"),
            (args.dimension, meta.dim, ("--dimension",), "dimensions")):
        if value is not None and value != have:
            flag = _spelling(argv, *names)
            raise IndexFlagError(
                f"{flag} {value} disagrees with the datastore {args.dstore_mmap}: its meta "
                f"file says {have} {what}; drop {flag} (it is read from the meta file)")
    if args.dstore_fp16 and meta.key_dtype != "float16":
        logger.warning("--dstore-fp16: the keys of %s are %s (from its meta file); using "
                       "that", args.dstore_mmap, meta.key_dtype)


def cli_main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | "
                        "%(message)s")
    settings = IndexSettings(index_type=args.index_type, ncentroids=args.ncentroids,
                             code_size=args.code_size, train_size=args.train_size,
                             probe=args.probe, seed=args.seed, pca_dim=args.pca_dim)
    try:
        # every flag is checked before any file is read or written
        validate_settings(settings)
        validate_build_args(add_chunk=args.num_keys_to_add_at_a_time,
                            checkpoint_every=args.checkpoint_every,
                            shard_size=args.add_shard_size or None, workers=args.workers)
        if args.starting_point is not None and args.starting_point < 0:
            raise IndexFlagError(f"--starting-point must be >= 0, got {args.starting_point}")
        if args.on_disk and args.gpu:
            raise IndexBuildError("--on-disk builds on CPU: drop --gpu")
        check_engine_flags(args.engine, args.ray_address, False, False, engine_flag="--engine")
        check_shards_flag(args.shards, args.engine, args.gpu)
        check_declared(read_meta(args.dstore_mmap), args, argv)
        if args.engine == "ray" or args.shards is not None:
            runner, threads = None, 0
            if args.engine == "ray":
                from fairseq_knnlm.index.ray_build import ray_runner

                runner, threads = ray_runner(args.ray_address), 1
            build_index_sharded(args.dstore_mmap, args.faiss_index, settings,
                                num_shards=args.shards or None,
                                add_chunk=args.num_keys_to_add_at_a_time, runner=runner,
                                threads=threads, merge_on_disk=args.on_disk,
                                progress=not args.no_progress)
        elif args.on_disk:
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
    except KNNLMError as e:
        print(f"knnlm-build-index: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())

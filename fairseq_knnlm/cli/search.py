"""knnlm-search: search the queries of a saved pass again, in bulk, and write a neighbour file
set that knnlm-sweep and knnlm-fit-lambda read (offline/bulk_search.py).

    # the LM pass (GPU) saves its queries once (every token searched, queries saved):
    fairseq-eval-lm ... --knnlm --k 1024 --knn-pointers --knn-min-pointers 1025 \\
        --knn-save-neighbors runs/nbrs/valid_q
    # the search (a CPU cluster, sharded index on Ray):
    knnlm-search runs/nbrs/valid_q --indexfile big.index --k 1024 --out runs/nbrs/valid_big \\
        --knn-engine ray [--ray-address HEAD:6379]
    knnlm-sweep runs/nbrs/valid_big --lambdas 0.1,0.25 --temps 1

Also: python -m fairseq_knnlm.cli.search.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from fairseq_knnlm.errors import KNNLMError


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="knnlm-search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("queries", help="a saved pass with its queries (--knn-save-neighbors PREFIX "
                                   "of a --knn-pointers pass)")
    p.add_argument("--indexfile", required=True,
                   help="the index to search (a sharded index's manifest for --knn-engine ray)")
    p.add_argument("--out", required=True, help="prefix of the neighbour files to write")
    p.add_argument("--dstore", default=None,
                   help="datastore prefix (default: the one the saved pass names)")
    p.add_argument("--k", type=int, default=1024, help="neighbours per query")
    p.add_argument("--probe", type=int, default=32, help="IVF lists probed per query")
    p.add_argument("--knn-engine", default="local", choices=["local", "ray"],
                   help="local (this process) or ray (one actor per shard)")
    p.add_argument("--ray-address", default=None, help="the Ray cluster to join")
    p.add_argument("--batch-size", type=int, default=1024, help="queries per search call")
    p.add_argument("--move-dstore-to-mem", action="store_true",
                   help="keys in RAM (each Ray actor: its shard's rows)")
    return p


def cli_main(argv: Optional[list[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | "
                        "%(message)s")
    from fairseq_knnlm.offline.bulk_search import search_saved

    try:
        search_saved(args.queries, args.out, args.dstore, args.indexfile, k=args.k,
                     probe=args.probe, engine=args.knn_engine, ray_address=args.ray_address,
                     batch_size=args.batch_size, keys_in_memory=args.move_dstore_to_mem)
    except KNNLMError as e:
        print(f"knnlm-search: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())

"""Cluster a datastore for pointers (RetoMaton, Alon et al. 2022): --knn-clusters.

    knnlm-clusters runs/wt2/dstore/train runs/wt2/dstore/train.c2k \
        --num-clusters 2000

k-means (FAISS) over a sample of the keys, then every row assigned to its nearest centroid.
With ``--knn-pointers --knn-clusters PREFIX`` a pointer stands for the members of its
cluster (up to 128 per cluster, nearest to the centroid first; 2k candidates in all), so
pointers survive tokens whose exact successor did not match; ``knnlm-sweep
--pointer-thresholds ... --clusters PREFIX`` replays it offline.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from fairseq_knnlm.adaptive.pointers import _cluster_paths, build_clusters
from fairseq_knnlm.errors import FlagError, KNNLMError
from fairseq_knnlm.store.datastore import open_datastore


def cli_main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="knnlm-clusters", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dstore", help="datastore prefix")
    p.add_argument("out", help="prefix of the cluster files to write")
    p.add_argument("--num-clusters", type=int, required=True,
                   help="number of k-means clusters (RetoMaton: about 1 per 100-200 rows)")
    p.add_argument("--niter", type=int, default=20, help="k-means iterations")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(message)s")
    try:
        for path in _cluster_paths(a.out).values():  # before the k-means, not after
            if path.is_dir():
                raise FlagError(f"out {a.out}: {path} is a directory: give another prefix")
        meta = build_clusters(open_datastore(a.dstore), a.out, a.num_clusters, niter=a.niter,
                              seed=a.seed)
    except (KNNLMError, ValueError, OSError) as e:
        print(f"knnlm-clusters: error: {e}", file=sys.stderr)
        return 2
    print(f"{a.out}: {meta['num_clusters']} clusters of {meta['size']:,} rows")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())

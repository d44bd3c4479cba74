"""knnlm-manifest: tie the shards of a sharded dump into one datastore.

    knnlm-manifest runs/wt103/dstore/train --num-shards 4

Checks that PREFIX_shard0ofN ... PREFIX_shard{N-1}ofN are finished dumps of the same model,
dictionary, key type and settings, then writes PREFIX_manifest.json. A sharded dump writes it
itself when its last shard finishes; use this for shards dumped on separate machines and
copied together (or to rewrite a manifest after moving shards). Also: python -m
fairseq_knnlm.cli.manifest.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from fairseq_knnlm.store.datastore import DatastoreError
from fairseq_knnlm.store.shards import write_manifest


def cli_main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="knnlm-manifest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prefix", help="datastore prefix given to --dstore-mmap")
    p.add_argument("--num-shards", type=int, required=True, help="N of PREFIX_shardIofN")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s | %(message)s")
    try:
        m = write_manifest(a.prefix, a.num_shards)
    except DatastoreError as e:
        print(f"knnlm-manifest: error: {e}", file=sys.stderr)
        return 2
    print(f"{a.prefix}: {m['num_shards']} shards, {m['size']:,} entries")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())

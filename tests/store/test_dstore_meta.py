"""The datastore's on-disk record (dstore_meta.py): the module below datastore.py and
shards.py (no import circle), the fingerprint an index must match, and the dump id of a
sharded datastore. No fairseq needed."""

from __future__ import annotations

import os
import subprocess
import sys

from fairseq_knnlm.errors import KNNLMError
from fairseq_knnlm.store.meta import (
    FINGERPRINT_FIELDS,
    DatastoreError,
    DatastoreMeta,
    combined_dump_id,
)


def test_layering_has_no_import_circle():
    """dstore_meta imports neither datastore nor shards; shards does not import datastore;
    the public names are still importable from datastore.py."""
    code = ("import sys; import fairseq_knnlm.store.meta; "
            "assert 'fairseq_knnlm.store.datastore' not in sys.modules; "
            "assert 'fairseq_knnlm.store.shards' not in sys.modules; "
            "import fairseq_knnlm.store.shards; "
            "assert 'fairseq_knnlm.store.datastore' not in sys.modules; "
            "from fairseq_knnlm.store.datastore import DatastoreError, ShardNotReady, keys_path, "
            "meta_path, read_meta, DatastoreMeta; "
            "from fairseq_knnlm.store.shards import manifest_path, read_manifest, shard_prefix")
    env = {**os.environ, "FAIRSEQ_KNNLM_NO_FAIRSEQ": "1"}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


def test_errors_are_user_errors():
    from fairseq_knnlm.index.kinds import IndexBuildError, IndexFlagError

    assert issubclass(DatastoreError, KNNLMError) and issubclass(IndexBuildError, KNNLMError)
    assert issubclass(IndexFlagError, ValueError)


def test_fingerprint_covers_what_changes_the_keys():
    m = DatastoreMeta(size=10, dim=4, key_dtype="float16", keytype="ffn_input_after_ln",
                      subset="train", context_window=512, tokens_per_sample=3072,
                      sample_break_mode="none", dump_id="ab")
    fp = m.fingerprint()
    assert tuple(fp) == FINGERPRINT_FIELDS
    assert fp["dump_id"] == "ab" and fp["context_window"] == 512 and fp["subset"] == "train"
    old = DatastoreMeta.from_dict({"size": 10, "dim": 4, "key_dtype": "float16",
                                   "keytype": "ffn_input_after_ln"})  # before dump ids
    assert old.dump_id is None and old.fingerprint()["dump_id"] is None


def test_combined_dump_id_depends_on_every_shard_in_order():
    a = combined_dump_id(["x", "y"])
    assert a and a != combined_dump_id(["y", "x"]) and a != combined_dump_id(["x", "z"])
    assert a == combined_dump_id(["x", "y"])
    assert combined_dump_id([None, None]) is None
    assert combined_dump_id([None, "y"]) is not None

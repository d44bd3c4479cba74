"""Capacity planner: sizes follow from the file formats (checked against a real dump's files)
and agree with the paper's WikiText-103 scale."""

from __future__ import annotations

import numpy as np

from fairseq_knnlm.cli.plan import cli_main, plan
from fairseq_knnlm.store.datastore import DatastoreWriter, keys_path, pos_path, vals_path


def test_plan_matches_real_files(tmp_path):
    w = DatastoreWriter(tmp_path / "ds", 48, "float16")
    w.add(np.zeros((1000, 48), np.float32), np.arange(1000), np.arange(1000))
    w.finish(keytype="ffn_input_after_ln")
    p = plan(1000, 48, "float16")
    assert p.keys_disk == keys_path(tmp_path / "ds").stat().st_size
    assert p.vals_disk == vals_path(tmp_path / "ds").stat().st_size
    assert p.pos_disk == pos_path(tmp_path / "ds").stat().st_size


def test_wikitext103_scale(capsys):
    p = plan(103_227_021, 1024, "float16")
    assert 211e9 < p.keys_disk < 212e9  # ~211 GB of fp16 keys, as the paper's setup implies
    assert 7e9 < p.index_bytes < 8e9  # 64-byte codes + ids
    assert cli_main(["--tokens", "103227021", "--dim", "1024"]) == 0
    assert "211.4" in capsys.readouterr().out


def test_ondisk_build_ram_is_bounded_by_flags_not_size():
    small, big = plan(50_000_000, 1024), plan(3_000_000_000, 1024)
    assert small.part_bytes == big.part_bytes and small.chunk_bytes == big.chunk_bytes
    assert big.part_bytes + big.chunk_bytes < 3e9 < big.index_bytes  # vs 216 GB in one piece
    assert plan(1000, 48).part_bytes < plan(50_000_000, 48).part_bytes  # small stores: smaller


def test_ray_rows_say_what_each_actor_needs(capsys):
    p = plan(103_227_021, 1024, "float16", shards=8)
    assert p.actor_bytes() == p.index_bytes / 8
    assert p.actor_bytes(True) == (p.index_bytes + p.keys_ram_if_loaded) / 8
    assert cli_main(["--tokens", "103227021", "--dim", "1024", "--shards", "8"]) == 0
    out = capsys.readouterr().out
    assert "search --knn-engine ray (8 actors) | RAM per actor 0.93 GB" in out
    assert cli_main(["--tokens", "10", "--dim", "8", "--shards", "-1"]) == 2

"""The hydra configs of examples/hydra compose with the installed fairseq + hydra-core (through
the real fairseq-hydra-train, which prints the composed config with --cfg and trains nothing),
and use only hydra settings that hydra-core 1.0.x also has (fairseq 0.12.2 on Python 3.10 pins
hydra-core 1.0, where e.g. hydra.job.chdir fails with "Key 'chdir' not in 'JobConf'")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "examples" / "hydra").glob("*.yaml"))
BIN = Path(sys.executable).parent

# the fields of hydra-core 1.0.7's structured configs (hydra/conf/__init__.py: HydraConf,
# JobConf, RunDir), the oldest hydra-core that fairseq 0.12.2 installs
HYDRA_1_0_FIELDS = {
    "hydra": {"run", "sweep", "hydra_logging", "job_logging", "sweeper", "launcher", "help",
              "hydra_help", "output_subdir", "overrides", "job", "runtime", "verbose"},
    "hydra.job": {"name", "override_dirname", "id", "num", "config_name", "env_set", "env_copy",
                  "config"},
    "hydra.run": {"dir"},
}


def test_there_are_configs() -> None:
    assert {p.name for p in CONFIGS} >= {"wikitext2_lm.yaml", "wikitext103_lm.yaml"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_hydra_keys_exist_in_hydra_core_1_0(config: Path) -> None:
    node = yaml.safe_load(config.read_text()).get("hydra", {}) or {}
    unknown = sorted(set(node) - HYDRA_1_0_FIELDS["hydra"])
    for group in ("job", "run"):
        sub = node.get(group) or {}
        unknown += [f"{group}.{k}" for k in sorted(set(sub) - HYDRA_1_0_FIELDS[f"hydra.{group}"])]
    assert not unknown, f"{config.name}: hydra keys that hydra-core 1.0 lacks: {unknown}"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_composes_with_fairseq_hydra_train(config: Path, tmp_path: Path) -> None:
    p = subprocess.run(
        [str(BIN / "fairseq-hydra-train"), "--config-dir", str(config.parent), "--config-name",
         config.stem, f"task.data={tmp_path}", "--cfg", "all"],
        cwd=tmp_path, text=True, capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = yaml.safe_load(p.stdout)
    assert cfg["task"]["_name"] == "language_modeling"
    assert cfg["task"]["data"] == str(tmp_path)
    assert cfg["model"]["_name"] == "transformer_lm"
    crit = cfg["criterion"]
    assert (crit if isinstance(crit, str) else crit["_name"]) == "adaptive_loss"
    # no change of directory on any hydra version: fairseq's run dir "."
    assert cfg["hydra"]["run"]["dir"] == "."
    assert not list(tmp_path.iterdir()), "composing must not write anything"

#!/usr/bin/env bash
# The whole kNN-LM pipeline of the paper on WikiText-103, steps 01-07 in order; steps 01, 02,
# 04 and 05 are skipped when their output exists (02 also when CKPT points to a checkpoint).
# Run from the repository root after install.sh:
#   WIKITEXT103_DIR=/data/wikitext-103 bash examples/wikitext103/run_all.sh       # GPUs, days
#   SMALL=1 WIKITEXT103_DIR=../shared/data/wikitext-2 bash examples/wikitext103/run_all.sh
# SMALL=1 is a CPU smoke test of every script (~3 min on 2 cores); see README.md for the
# full-scale disk (~220 GB), RAM and time.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "$HERE/../../.venv/bin/activate" ]; then
  # shellcheck disable=SC1091
  source "$HERE/../../.venv/bin/activate"
fi
for step in 01_prepare_data 02_train_lm 03_eval_lm 04_dump_datastore 05_build_index \
            06_eval_knnlm 07_sweep; do
  echo "=== $step ($(date +%H:%M:%S))"
  start=$(date +%s)
  bash "$HERE/$step.sh"
  echo "=== $step done in $(( $(date +%s) - start )) s"
done

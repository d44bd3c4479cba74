#!/usr/bin/env bash
# The whole CPU-scale kNN-LM pipeline on WikiText-2, each step skipped when its output exists.
# Run from the repository root after install.sh:
#   WIKITEXT2_DIR=../shared/data/wikitext-2 bash examples/wikitext2/run_all.sh
# Expect ~1.5-2 h on 2 cores (measured on a shared machine: train 39 min, base eval 8 min,
# dump 19 min, index 5 min, step 6 with its valid tuning 32 min).
# QUICK=1 runs the same six steps on a slice with 3 min of training (~15 min, written to
# runs/wikitext2_quick; see common.sh for what its numbers mean).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "$HERE/../../.venv/bin/activate" ]; then
  # shellcheck disable=SC1091
  source "$HERE/../../.venv/bin/activate"
fi
for step in 01_prepare_data 02_train_lm 03_eval_lm 04_dump_datastore 05_build_index 06_eval_knnlm; do
  echo "=== $step ($(date +%H:%M:%S))"
  start=$(date +%s)
  bash "$HERE/$step.sh"
  echo "=== $step done in $(( $(date +%s) - start )) s"
done

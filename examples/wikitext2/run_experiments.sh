#!/usr/bin/env bash
# Every CPU-scale experiment of the paper after the base pipeline (run_all.sh steps 01-05),
# each step timed into $RUN_DIR/experiment_times.md:
#   06 Table 1 + Figure 4 (k) + exact vs FAISS distances   08 Table 4 / Figure 5 (domains)
#   13 adaptive lambda (issue #15)   09 Figure 2 (datastore size)   10 Table 5 (key types)
#   11 flat vs IVFPQ
# Steps whose outputs exist are skipped by the scripts themselves (06 always re-runs).
# Run from the repository root:
#   WIKITEXT2_DIR=../shared/data/wikitext-2 bash examples/wikitext2/run_all.sh   # once
#   bash examples/wikitext2/run_experiments.sh
# Measured step times (2 shared cores) are in examples/wikitext2/README.md.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "$HERE/../../.venv/bin/activate" ]; then
  # shellcheck disable=SC1091
  source "$HERE/../../.venv/bin/activate"
fi
RUN_DIR="${RUN_DIR:-$HERE/../../runs/wikitext2}"
STEPS="${STEPS:-06_eval_knnlm 08_domain_adaptation 13_adaptive_lambda 09_datastore_size 10_keytypes 11_flat_vs_ivfpq}"
TIMES="$RUN_DIR/experiment_times.md"
echo "| step | seconds | finished |" > "$TIMES"; echo "|---|---|---|" >> "$TIMES"
total=0
for step in $STEPS; do
  echo "=== $step ($(date +%H:%M:%S))"
  start=$(date +%s)
  bash "$HERE/$step.sh"
  took=$(( $(date +%s) - start )); total=$(( total + took ))
  echo "| $step | $took | $(date +%H:%M:%S) |" >> "$TIMES"
  echo "=== $step done in $took s"
done
echo "| all | $total | |" >> "$TIMES"
cat "$TIMES"

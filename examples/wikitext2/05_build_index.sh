#!/usr/bin/env bash
# Step 5: IVFPQ index with the paper's settings (4096 lists, 64-byte codes, 1M training keys).
# ~15-20 min on 2 cores (k-means of 1M x 256 into 4096 centroids dominates).
# Run: bash examples/wikitext2/05_build_index.sh
source "$(dirname "$0")/common.sh"
if [ -f "$INDEX.meta.json" ] && [ -z "${FORCE_INDEX:-}" ]; then echo "$INDEX exists, skipping"; exit 0; fi
# QUICK=1: ~170K keys are too few for 4096 lists (FAISS wants >= 39 training keys each)
if [ "$QUICK" = 1 ]; then NCENTROIDS="${NCENTROIDS:-512}"; fi
NCENTROIDS="${NCENTROIDS:-4096}"
knnlm-build-index --dstore-mmap "$DSTORE" --faiss-index "$INDEX" --index-type ivfpq \
  --ncentroids "$NCENTROIDS" --code-size 64 --train-size 1000000 --probe 32 --seed 1 \
  2>&1 | tee "$LOG_DIR/build_index.log"

#!/usr/bin/env bash
# Step 4: dump the train datastore: one (key, next token) pair per train token, the key being
# the input of the last layer's feed-forward block after its LayerNorm (paper Table 5).
# fairseq 0.12 subtracts --context-window from --tokens-per-sample: 3072 / 1536 gives blocks
# of 1536 scored tokens, each behind >= 1536 tokens of context (the first block excepted),
# the paper's ">= 1536 tokens of context" within the model's 3072 positions.
# Full scale: 103,227,021 keys x 1024 dims fp16 = 211 GB (DSTORE_keys.npy) + values (int32)
# 0.4 GB + positions (int64) 0.8 GB: put RUN_DIR/DSTORE on a disk with >= 215 GB free.
# One forward pass over the 103M train tokens with 1536 of every 3072 positions scored:
# on the order of hours on one V100/A100-class GPU (estimate; EVAL_EXTRA_ARGS=--fp16 helps).
# SMALL=1: the slice's ~1.1M train tokens x 64 dims (~140 MB), ~1 min on 2 cores.
# Run: bash examples/wikitext103/04_dump_datastore.sh
source "$(dirname "$0")/common.sh"
if [ -f "${DSTORE}_meta.json" ] && [ -z "${FORCE_DUMP:-}" ]; then
  echo "$DSTORE exists, skipping"; exit 0
fi
mkdir -p "$(dirname "$DSTORE")"
# shellcheck disable=SC2086
run fairseq-eval-lm "$DATA_BIN" --path "$CKPT" --user-dir "$USER_DIR" --gen-subset train \
  --save-knnlm-dstore --dstore-mmap "$DSTORE" --dstore-fp16 --knn-keytype "$KEYTYPE" \
  --tokens-per-sample "$DUMP_TOKENS_PER_SAMPLE" --context-window "$DUMP_CONTEXT_WINDOW" \
  --sample-break-mode none --max-tokens "$MAX_TOKENS" --softmax-batch "$SOFTMAX_BATCH" \
  $DEVICE_ARGS $EVAL_EXTRA_ARGS 2>&1 | tee "$LOG_DIR/dump_train.log"

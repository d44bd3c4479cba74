#!/usr/bin/env bash
# Step 3: perplexity of the base LM on valid and test (stock fairseq-eval-lm; the plugin is
# loaded but idle). Paper (Table 1, base LM): 17.96 dev / 18.65 test.
# Blocks of complete lines, each scored token behind >= 2560 tokens of context: fairseq 0.12
# subtracts --context-window from --tokens-per-sample, so 3072 / 2560 feeds blocks of <= 512
# scored tokens behind a 2560-token window (<= 3072 positions, as in training).
# Full scale: ~5-10 min per split on one GPU (an estimate). SMALL=1: seconds.
# Run: bash examples/wikitext103/03_eval_lm.sh
source "$(dirname "$0")/common.sh"
for split in valid test; do
  # shellcheck disable=SC2086
  run fairseq-eval-lm "$DATA_BIN" --path "$CKPT" --user-dir "$USER_DIR" --gen-subset "$split" \
    --context-window "$EVAL_CONTEXT_WINDOW" --tokens-per-sample "$EVAL_TOKENS_PER_SAMPLE" \
    --sample-break-mode complete --max-tokens "$MAX_TOKENS" --softmax-batch "$SOFTMAX_BATCH" \
    $DEVICE_ARGS $EVAL_EXTRA_ARGS 2>&1 | tee "$LOG_DIR/eval_base_$split.log"
done

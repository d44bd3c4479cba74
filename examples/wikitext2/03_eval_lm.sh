#!/usr/bin/env bash
# Step 3: perplexity of the base LM on valid and test (stock fairseq-eval-lm).
# Run: bash examples/wikitext2/03_eval_lm.sh
source "$(dirname "$0")/common.sh"
for split in valid test; do
  fairseq-eval-lm "$DATA_BIN" "${EVAL_FLAGS[@]}" --gen-subset "$split" 2>&1 | tee "$LOG_DIR/eval_base_$split.log"
done

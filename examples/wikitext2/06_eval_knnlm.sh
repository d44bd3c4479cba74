#!/usr/bin/env bash
# Step 6: kNN-LM perplexity on valid and test with the paper's retrieval (k=1024, probe 32,
# exact L2). LMBDA and KNN_TEMP default to the values tuned on validation (07_tune.sh).
# Run: bash examples/wikitext2/06_eval_knnlm.sh
source "$(dirname "$0")/common.sh"
LMBDA="${LMBDA:-0.3}"; KNN_TEMP="${KNN_TEMP:-10}"; K="${K:-1024}"
for split in valid test; do
  fairseq-eval-lm "$DATA_BIN" --path "$CKPT" --user-dir "$REPO/fairseq_knnlm" \
    --gen-subset "$split" --tokens-per-sample "$TOKENS_PER_SAMPLE" \
    --context-window "$CONTEXT_WINDOW" --sample-break-mode none --max-tokens "$MAX_TOKENS" \
    --cpu --num-workers 0 --knnlm --dstore-filename "$DSTORE" --indexfile "$INDEX" \
    --k "$K" --lmbda "$LMBDA" --knn-temp "$KNN_TEMP" --probe 32 --knn-sim-func l2 \
    2>&1 | tee "$LOG_DIR/eval_knnlm_$split.log"
done

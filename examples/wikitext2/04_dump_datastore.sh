#!/usr/bin/env bash
# Step 4: dump the train datastore: one (key, next token) pair per train token
# (2,088,628 entries of 256 dims, fp16: ~1.1 GB). Every key sees >= CONTEXT_WINDOW tokens of
# prior context except in the first block. Run: bash examples/wikitext2/04_dump_datastore.sh
source "$(dirname "$0")/common.sh"
KEYTYPE="${KEYTYPE:-ffn_input_after_ln}"
if [ -f "${DSTORE}_meta.json" ] && [ -z "${FORCE_DUMP:-}" ]; then echo "$DSTORE exists, skipping"; exit 0; fi
fairseq-eval-lm "$DATA_BIN" "${EVAL_FLAGS[@]}" --gen-subset train \
  --save-knnlm-dstore --dstore-mmap "$DSTORE" --dstore-fp16 --knn-keytype "$KEYTYPE" \
  2>&1 | tee "$LOG_DIR/dump_train.log"

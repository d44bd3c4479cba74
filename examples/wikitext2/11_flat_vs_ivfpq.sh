#!/usr/bin/env bash
# Step 11 (paper Section 3 / Table 1 footnote): exact flat search against the IVFPQ index, and
# exact L2 against FAISS's quantised distances, on step 10's setting (10% train datastore with
# ffn_input_after_ln keys, first 700 lines of valid). Flat search over all 209K keys is cheap
# at that size; over the full 2.09M keys it would take ~10x longer per query.
# Needs step 10 (its ffn_input_after_ln datastore and IVFPQ neighbours). ~4 min on 2 cores.
# Run: bash examples/wikitext2/11_flat_vs_ivfpq.sh
source "$(dirname "$0")/common.sh"
KT_DIR="$RUN_DIR/keytypes"; SLICE_BIN="$KT_DIR/data-bin"; ds="$KT_DIR/dstore/ffn_input_after_ln"
[ -f "$ds.flat.index.meta.json" ] || knnlm-build-index --dstore-mmap "$ds" --faiss-index "$ds.flat.index" \
  --index-type flat --no-progress > "$LOG_DIR/flat_index.log" 2>&1
[ -f "$RUN_DIR/nbrs/valid_flat_meta.json" ] || fairseq-eval-lm "$SLICE_BIN" "${EVAL_FLAGS[@]}" \
  --gen-subset valid --knnlm --dstore-filename "$ds" --indexfile "$ds.flat.index" --k 1024 \
  --knn-save-neighbors "$RUN_DIR/nbrs/valid_flat" > "$LOG_DIR/knn_valid_flat.log" 2>&1
python "$HERE/plots.py" flat-vs-ivfpq --run-dir "$RUN_DIR"

#!/usr/bin/env bash
# Step 10 (paper Table 5 analogue): which hidden state to use as the key. For speed, each key
# type gets a datastore over the first 10% of the train split (about 210K tokens, its own
# IVFPQ index) and is scored on the first VALID_LINES lines of valid (34K tokens), with
# lambda and temperature tuned on that slice. Default: the six key types of the paper's
# Table 5 (KEYTYPES=... adds ffn_output / attn_output, which the dump also supports).
# ~5 min per key type on 2 cores. Run: bash examples/wikitext2/10_keytypes.sh
source "$(dirname "$0")/common.sh"
KEYTYPES="${KEYTYPES:-ffn_input_after_ln ffn_input_before_ln attn_input_after_ln attn_input_before_ln model_output model_output_after_ln}"
FRAC_LINES="${FRAC_LINES:-3668}"    # first 10% of wiki.train.tokens' 36,718 lines
VALID_LINES="${VALID_LINES:-700}"   # first 700 of 3,760 lines: 34K tokens, 1/6 the cost
KT_DIR="$RUN_DIR/keytypes"; SLICE_BIN="$KT_DIR/data-bin"
mkdir -p "$KT_DIR"
if [ ! -f "$SLICE_BIN/valid.bin" ]; then
  python - "$DATA_BIN" "$KT_DIR" "$FRAC_LINES" "$VALID_LINES" <<'PY'
import sys
from fairseq.data import data_utils
from fairseq.data.dictionary import Dictionary
bin_dir, out, n_train, n_valid = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
d = Dictionary.load(f"{bin_dir}/dict.txt")
for split, n in (("train", n_train), ("valid", n_valid)):
    ds = data_utils.load_indexed_dataset(f"{bin_dir}/{split}", d)
    with open(f"{out}/{split}_slice.txt", "w") as f:
        for i in range(n):
            f.write(d.string(ds[i][:-1]) + "\n")
PY
  fairseq-preprocess --only-source --srcdict "$DATA_BIN/dict.txt" --trainpref "$KT_DIR/train_slice.txt" \
    --validpref "$KT_DIR/valid_slice.txt" --destdir "$SLICE_BIN" --workers 2 \
    > "$LOG_DIR/keytypes_preprocess.log" 2>&1
fi
for kt in $KEYTYPES; do
  start=$(date +%s)
  ds="$KT_DIR/dstore/$kt"
  [ -f "${ds}_meta.json" ] || fairseq-eval-lm "$SLICE_BIN" "${EVAL_FLAGS[@]}" --gen-subset train \
    --save-knnlm-dstore --dstore-mmap "$ds" --dstore-fp16 --knn-keytype "$kt" > "$LOG_DIR/keytype_dump_$kt.log" 2>&1
  [ -f "$ds.index.meta.json" ] || knnlm-build-index --dstore-mmap "$ds" --faiss-index "$ds.index" \
    --no-progress > "$LOG_DIR/keytype_index_$kt.log" 2>&1
  [ -f "$RUN_DIR/nbrs/valid_keytype_${kt}_meta.json" ] || fairseq-eval-lm "$SLICE_BIN" "${EVAL_FLAGS[@]}" \
    --gen-subset valid --knnlm --dstore-filename "$ds" --indexfile "$ds.index" --k 1024 --probe 32 \
    --knn-keytype "$kt" --knn-save-neighbors "$RUN_DIR/nbrs/valid_keytype_$kt" > "$LOG_DIR/keytype_knn_$kt.log" 2>&1
  echo "$kt: $(grep -oE 'Perplexity: [0-9.]+' "$LOG_DIR/keytype_knn_$kt.log" | tail -1) ($(( $(date +%s) - start )) s)"
done
python "$HERE/plots.py" keytypes --run-dir "$RUN_DIR" --keytypes "$KEYTYPES"

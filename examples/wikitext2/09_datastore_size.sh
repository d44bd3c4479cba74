#!/usr/bin/env bash
# Step 9 (paper Figure 2 analogue): perplexity and tuned lambda against datastore size: the
# first 10%, 25% and 50% of the train datastore (a prefix of the corpus) and all of it, each
# with its own IVFPQ index (paper settings; fewer centroids where the data is too small).
# Needs step 6's valid neighbours for 100%. ~25 min on 2 cores.
# Run: bash examples/wikitext2/09_datastore_size.sh
source "$(dirname "$0")/common.sh"
FRACS="${FRACS:-0.1 0.25 0.5}"
N=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['size'])" "${DSTORE}_meta.json")
for f in $FRACS; do
  n=$(python -c "print(int($N * $f))")
  sub="$RUN_DIR/dstore_size/train_$f"
  if [ ! -f "${sub}_meta.json" ]; then
    python -c "from fairseq_knnlm.store.datastore import head_datastore as h; import sys; h(sys.argv[1], sys.argv[2], int(sys.argv[3]))" "$DSTORE" "$sub" "$n"
  fi
  if [ ! -f "$sub.index.meta.json" ]; then
    knnlm-build-index --dstore-mmap "$sub" --faiss-index "$sub.index" --no-progress \
      2>&1 | tee "$LOG_DIR/index_size_$f.log" | grep -E "ncentroids|wrote"
  fi
  if [ ! -f "$RUN_DIR/nbrs/valid_size_${f}_meta.json" ]; then
    fairseq-eval-lm "$DATA_BIN" "${EVAL_FLAGS[@]}" --gen-subset valid \
      --knnlm --dstore-filename "$sub" --indexfile "$sub.index" --k 1024 --probe 32 \
      --knn-save-neighbors "$RUN_DIR/nbrs/valid_size_$f" 2>&1 | tee "$LOG_DIR/knn_valid_size_$f.log" | grep Perplexity
  fi
done
python "$HERE/plots.py" datastore-size --run-dir "$RUN_DIR" --fracs "$FRACS 1.0"

#!/usr/bin/env bash
# Step 12: knnlm-explain, the neighbours behind the predictions (paper Fig. 6) and which tokens
# gain from retrieval (paper Section 6).
#   12a  LENGTH valid tokens from START: terminal table, JSON, a web page and its screenshot
#        (headless Chromium, if installed); only the blocks holding those tokens are scored
#   12b  the whole valid subset: aggregate tables (by the target's train frequency and by
#        the longest n-gram ending at it that occurs in train) and their plot
# Needs steps 1-5 (model, datastore, index). Run: bash examples/wikitext2/12_explain.sh
source "$(dirname "$0")/common.sh"
K="${K:-1024}"; LAMBDA="${LAMBDA:-0.25}"; TEMP="${TEMP:-10}"
START="${START:-1000}"; LENGTH="${LENGTH:-120}"
OUT="$RUN_DIR/explain"; mkdir -p "$OUT"
KNN=(--dstore-filename "$DSTORE" --indexfile "$INDEX" --k "$K" --probe 32 --lmbda "$LAMBDA"
     --knn-temp "$TEMP")
name="valid_${START}_${LENGTH}"
# 12a
knnlm-explain "$DATA_BIN" "${EVAL_FLAGS[@]}" --gen-subset valid "${KNN[@]}" \
  --start "$START" --length "$LENGTH" --json "$OUT/$name.json" --html "$OUT/$name.html" \
  2> "$LOG_DIR/explain_$name.log" | tee "$OUT/$name.txt"
if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then
  bash "$HERE/explain_screenshot.sh" "$OUT/$name.html" "$OUT/$name.png" best
else
  echo "no chromium: skipping the screenshot (apt-get install -y chromium)"
fi
# 12b
knnlm-explain "$DATA_BIN" "${EVAL_FLAGS[@]}" --gen-subset valid "${KNN[@]}" --top 1 \
  --rows 1 --marks 5 --aggregate --plot "$OUT/aggregate_valid.png" \
  --json "$OUT/aggregate_valid.json" 2> "$LOG_DIR/explain_aggregate_valid.log" \
  | tee "$OUT/aggregate_valid.txt"

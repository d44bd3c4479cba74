#!/usr/bin/env bash
# Step 8 (paper Table 4 / Figure 5 analogue): the WikiText-2 LM on tiny-shakespeare, without and
# with a tiny-shakespeare datastore. Same vocabulary as the LM: out-of-vocabulary words map to
# <unk> (fairseq-preprocess reports how many). lambda is tuned on shakespeare valid only.
# ~10 min on 2 cores. Run: SHAKESPEARE=../shared/data/tinyshakespeare/input.txt bash examples/wikitext2/08_domain_adaptation.sh
source "$(dirname "$0")/common.sh"
SHAKESPEARE="${SHAKESPEARE:-$REPO/../shared/data/tinyshakespeare/input.txt}"
SH_DIR="$RUN_DIR/shakespeare"; SH_BIN="$SH_DIR/data-bin"; SH_DSTORE="$SH_DIR/dstore/train"
shakespeare_datastore "$SH_DIR"
# --knn-pointers with a threshold above k searches every token (plain kNN-LM) and saves the
# queries and stream starts that 13_adaptive_lambda.sh replays pointer policies from
KNN=(--knnlm --dstore-filename "$SH_DSTORE" --indexfile "$SH_DSTORE.index" --k 1024 --probe 32
     --knn-pointers --knn-min-pointers 1025)
fairseq-eval-lm "$SH_BIN" "${EVAL_FLAGS[@]}" --gen-subset valid "${KNN[@]}" --lmbda 0.65 \
  --knn-save-neighbors "$SH_DIR/nbrs/valid" 2>&1 | tee "$LOG_DIR/shakespeare_knn_valid.log" | grep -E "Perplexity"
knnlm-sweep "$SH_DIR/nbrs/valid" --lambdas 0,0.1,0.2,0.3,0.4,0.5,0.6,0.65,0.7,0.8,0.9,0.95 \
  --temps 1,2,5,10,20,50 --dists l2 --json "$RUN_DIR/sweep_shakespeare_valid.json" \
  --plot-dir "$RUN_DIR/plots/shakespeare_valid" --label "tiny-shakespeare valid" | tee "$LOG_DIR/sweep_shakespeare_valid.log"
read -r LAM TEMP KB < <(python -c "import json,sys; b=json.load(open(sys.argv[1]))['best']; print(b['lambda'], b['temperature'], b['k'])" "$RUN_DIR/sweep_shakespeare_valid.json")
echo "tuned on shakespeare valid: lambda=$LAM T=$TEMP k=$KB"
fairseq-eval-lm "$SH_BIN" "${EVAL_FLAGS[@]}" --gen-subset test 2>&1 | tee "$LOG_DIR/shakespeare_base_test.log" | grep -E "Perplexity"
# (its saved neighbours are what 13_adaptive_lambda.sh replays lambda models on)
fairseq-eval-lm "$SH_BIN" "${EVAL_FLAGS[@]}" --gen-subset test "${KNN[@]}" --k "$KB" --lmbda "$LAM" \
  --knn-temp "$TEMP" --knn-save-neighbors "$SH_DIR/nbrs/test" 2>&1 \
  | tee "$LOG_DIR/shakespeare_knn_test.log" | grep -E "Perplexity"

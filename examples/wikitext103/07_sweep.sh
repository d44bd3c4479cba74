#!/usr/bin/env bash
# Step 7: tune on valid without searching again: one kNN-LM pass (k=K, with the cache at
# CACHE_THETA) saves every token's neighbours, distances and LM / cache log-probs, then
# knnlm-sweep scores lambda in 0..1, k in 1..K (powers of two), T=1, exact and FAISS
# distances and cache weights offline: $RUN_DIR/sweep_valid.json and the paper's Fig. 4
# (ppl vs k) and Fig. 5 (ppl vs lambda) style plots in $PLOT_DIR. Theta needs a new pass.
# Full scale: the pass costs about one 06 kNN run; the saved neighbours of the 217,646 valid
# tokens take ~217,646 x 1024 x (8 id + 4 + 4 distances + 1 match) B = ~3.8 GB.
# SMALL=1: ~30 s. Run: bash examples/wikitext103/07_sweep.sh
source "$(dirname "$0")/common.sh"
NBRS="$NBR_DIR/valid"
SWEEP_LAMBDAS="${SWEEP_LAMBDAS:-0,0.05,0.1,0.15,0.2,0.25,0.3,0.35,0.4,0.45,0.5,0.55,0.6,0.65,\
0.7,0.75,0.8,0.85,0.9,0.95,1}"
# powers of two up to K: 1,2,4,...,1024 at full scale
SWEEP_KS="${SWEEP_KS:-$(k=1 ks=1; while [ $((k * 2)) -le "$K" ]; do k=$((k * 2)) ks="$ks,$k"; done
                       echo "$ks")}"
SWEEP_TEMPS="${SWEEP_TEMPS:-1}"
SWEEP_DISTS="${SWEEP_DISTS:-l2,faiss_l2}"
SWEEP_CACHE_LAMBDAS="${SWEEP_CACHE_LAMBDAS:-0,0.05,0.1,0.15,0.2,0.3}"
mkdir -p "$NBR_DIR"
# shellcheck disable=SC2086
run fairseq-eval-lm "$DATA_BIN" --path "$CKPT" --user-dir "$USER_DIR" --gen-subset valid \
  --context-window "$EVAL_CONTEXT_WINDOW" --tokens-per-sample "$EVAL_TOKENS_PER_SAMPLE" \
  --sample-break-mode complete --max-tokens "$MAX_TOKENS" --softmax-batch "$SOFTMAX_BATCH" \
  --knn-keytype "$KEYTYPE" --knnlm --dstore-filename "$DSTORE" --indexfile "$INDEX" \
  --k "$K" --lmbda "$LMBDA" --probe "$PROBE" --knn-sim-func "$SIM_FUNC" --knn-temp "$KNN_TEMP" \
  --knn-cache --cache-lmbda "$CACHE_LMBDA" --cache-theta "$CACHE_THETA" \
  --cache-length "$CACHE_LENGTH" --knn-save-neighbors "$NBRS" $DEVICE_ARGS $EVAL_EXTRA_ARGS \
  2>&1 | tee "$LOG_DIR/save_neighbors_valid.log"
if ! command -v knnlm-sweep >/dev/null 2>&1 || ! knnlm-sweep --help >/dev/null 2>&1; then
  echo "07_sweep: knnlm-sweep is not installed (or does not run) in this environment:"
  echo "skipping the sweep; neighbours are saved at $NBRS. Once it is available, run:"
  echo "  knnlm-sweep $NBRS --lambdas $SWEEP_LAMBDAS --ks $SWEEP_KS --temps $SWEEP_TEMPS" \
       "--dists $SWEEP_DISTS --cache-lambdas $SWEEP_CACHE_LAMBDAS" \
       "--plot-dir $PLOT_DIR --json $RUN_DIR/sweep_valid.json"
  exit 0
fi
run knnlm-sweep "$NBRS" --lambdas "$SWEEP_LAMBDAS" --ks "$SWEEP_KS" --temps "$SWEEP_TEMPS" \
  --dists "$SWEEP_DISTS" --cache-lambdas "$SWEEP_CACHE_LAMBDAS" \
  --plot-dir "$PLOT_DIR" --json "$RUN_DIR/sweep_valid.json" 2>&1 | tee "$LOG_DIR/sweep_valid.log"

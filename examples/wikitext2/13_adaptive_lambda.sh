#!/usr/bin/env bash
# Step 13 (issue #15): a per-token lambda fitted on valid, and no search where it cannot help.
#   13a one kNN-LM pass on valid (k 1024, probe 32, exact L2) saving neighbours + LM features
#   13b knnlm-sweep on valid: the best fixed lambda x temperature x k = the baseline
#   13c one kNN-LM pass on test at that setting (k 1024 saved: FAISS's top-k' are its first k')
#   13d knnlm-fit-lambda on valid (buckets: Drozdov et al. 2022; mlp: He et al. 2021, with
#       features comparing the neighbours with p_LM; mix: that mlp sharing its lambda out among
#       p_kNN at MIX_TEMPS), for the tuned k and T; knnlm-sweep --lambda-model on test at every
#       --knn-skip-below in TAUS
#       and mix fitted for pointers (--min-pointers N for N in PTR_MINS: the model sees what a
#       run with --knn-pointers --knn-min-pointers N finds, and how many), replayed on test
#       under that policy at each tau in PTR_TAUS (one pointer replay per tau)
#   13e the same on tiny-shakespeare, from the neighbours 08_domain_adaptation.sh saved, and
#       mix fitted for pointers with clusters (RetoMaton: knnlm-clusters, 2000 clusters; models
#       mixclN for N in CL_MINS: --min-pointers N --clusters PREFIX); not on WikiText-2, whose
#       2.09M keys would take longer to cluster than the rest of this step
#   adaptive_table.py writes $RUN_DIR/adaptive_lambda/table.md and the plot.
#   13f (issue #14) pointer thresholds replayed offline on valid from 13a's pass (its queries)
# Nothing is tuned on test: the fixed lambda, T, k, the models and the thresholds' meaning come
# from valid; test only reports. ~75 min on 2 cores (two kNN-LM passes; 13e reuses 08's).
# Run: bash examples/wikitext2/13_adaptive_lambda.sh
source "$(dirname "$0")/common.sh"
NBR="$RUN_DIR/nbrs_lambda"; OUT="$RUN_DIR/adaptive_lambda"; mkdir -p "$NBR" "$OUT"
MIX_TEMPS="${MIX_TEMPS:-1,3,10,30,100}"
PTR_MINS="${PTR_MINS:-1 4}"
PTR_TAUS="${PTR_TAUS:-0,0.2}"
CL_MINS="${CL_MINS:-128 512}"
TAUS="${TAUS:-0,0.02,0.05,0.1,0.15,0.2,0.25,0.3,0.35,0.4,0.5,0.6,0.7,0.8,0.9}"
LAMBDAS=0,0.05,0.1,0.15,0.2,0.25,0.3,0.35,0.4,0.45,0.5,0.55,0.6,0.65,0.7,0.75,0.8,0.85,0.9,0.95
KNN=(--knnlm --dstore-filename "$DSTORE" --indexfile "$INDEX" --probe 32 --k 1024)
best_of() {  # best_of SWEEP_JSON -> "lambda temperature k"
  python -c "import json,sys; b=json.load(open(sys.argv[1]))['best']; print(b['lambda'], b['temperature'], b['k'])" "$1"
}
fit_and_replay() {  # fit_and_replay NAME VALID_NBR TEST_NBR LAMBDA T K [CLUSTERS_PREFIX]
  local name=$1 valid=$2 test=$3 lam=$4 temp=$5 k=$6 clusters=${7:-}
  local ptr=()
  for n in $PTR_MINS; do ptr+=("mixptr$n"); done
  if [ -n "$clusters" ]; then for n in $CL_MINS; do ptr+=("mixcl$n"); done; fi
  for kind in buckets mlp mix "${ptr[@]}"; do
    local how=(--kind "$kind") taus="$TAUS"
    [ "$kind" != mix ] || how=(--kind mlp --temps "$MIX_TEMPS")
    if [[ "$kind" == mixptr* ]]; then
      how=(--kind mlp --temps "$MIX_TEMPS" --min-pointers "${kind#mixptr}"); taus="$PTR_TAUS"
    elif [[ "$kind" == mixcl* ]]; then
      how=(--kind mlp --temps "$MIX_TEMPS" --min-pointers "${kind#mixcl}" --clusters "$clusters")
      taus="$PTR_TAUS"
    fi
    knnlm-fit-lambda "$valid" --out "$OUT/${name}_$kind.npz" "${how[@]}" --k "$k" \
      --temp "$temp" --json "$OUT/${name}_${kind}_fit.json" | tee "$LOG_DIR/${name}_${kind}_fit.log"
    knnlm-sweep "$test" --lambda-model "$OUT/${name}_$kind.npz" --skip-below "$taus" \
      --lambdas "$lam" --json "$OUT/${name}_${kind}_test.json" | tee "$LOG_DIR/${name}_${kind}_test.log"
  done
}
# 13a
[ -f "$NBR/valid_meta.json" ] || fairseq-eval-lm "$DATA_BIN" "${EVAL_FLAGS[@]}" --gen-subset valid \
  "${KNN[@]}" --lmbda 0.25 --knn-temp 10 --knn-pointers --knn-min-pointers 1025 \
  --knn-save-neighbors "$NBR/valid" 2>&1 \
  | tee "$LOG_DIR/lambda_knn_valid.log" | grep -E "Perplexity|kNN-LM"
# 13b
knnlm-sweep "$NBR/valid" --lambdas "$LAMBDAS" --temps 1,2,5,10,20,50,100 --dists l2 \
  --json "$OUT/sweep_valid.json" > "$LOG_DIR/lambda_sweep_valid.log"
sed -n 1,4p "$LOG_DIR/lambda_sweep_valid.log"
read -r LAM TEMP KB < <(best_of "$OUT/sweep_valid.json")
echo "best fixed on valid (exact L2): lambda=$LAM T=$TEMP k=$KB"
# 13c
[ -f "$NBR/test_meta.json" ] || fairseq-eval-lm "$DATA_BIN" "${EVAL_FLAGS[@]}" --gen-subset test \
  "${KNN[@]}" --lmbda "$LAM" --knn-temp "$TEMP" --knn-pointers --knn-min-pointers 1025 \
  --knn-save-neighbors "$NBR/test" 2>&1 \
  | tee "$LOG_DIR/lambda_knn_test.log" | grep -E "Perplexity|kNN-LM"
# 13d
fit_and_replay wikitext2 "$NBR/valid" "$NBR/test" "$LAM" "$TEMP" "$KB"
# 13e
SH="$RUN_DIR/shakespeare"
if [ -f "$SH/nbrs/test_meta.json" ] && [ -f "$RUN_DIR/sweep_shakespeare_valid.json" ]; then
  read -r SLAM STEMP SKB < <(best_of "$RUN_DIR/sweep_shakespeare_valid.json")
  [ -f "$SH/clusters/train.c2k_meta.json" ] || knnlm-clusters "$SH/dstore/train" \
    "$SH/clusters/train.c2k" --num-clusters 2000 | tee "$LOG_DIR/shakespeare_clusters.log"
  fit_and_replay shakespeare "$SH/nbrs/valid" "$SH/nbrs/test" "$SLAM" "$STEMP" "$SKB" \
    "$SH/clusters/train.c2k"
else
  echo "13e skipped: run 08_domain_adaptation.sh first"
fi
python "$HERE/adaptive_table.py" "$OUT" | tee "$LOG_DIR/adaptive_table.log"
# 13f (issue #14) pointers on the full datastore, replayed from 13a's pass (it saved the queries:
# --knn-pointers with a threshold above k searches every token, as plain kNN-LM)
if [ -n "${POINTER_THRESHOLDS:-8,64,256,1025}" ]; then
  knnlm-sweep "$NBR/valid" --pointer-thresholds "${POINTER_THRESHOLDS:-8,64,256,1025}" \
    --lambdas "$LAM" --temps "$TEMP" --json "$OUT/pointers_valid.json" --plot-dir "$OUT" \
    --label "WT-2 valid, 2.09M keys:" | tee "$LOG_DIR/pointers_valid.log"
fi

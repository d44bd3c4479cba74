#!/usr/bin/env bash
# Step 6: kNN-LM on WikiText-2, every weight tuned on validation only, then test.
#   6a  cache flatness theta: cache-only passes on valid (cheap: no retrieval)
#   6b  one kNN-LM pass on valid (k=1024, probe 32) saving neighbours + cache log-probs
#   6c  knnlm-sweep on valid: lambda x k x temperature x {exact L2, FAISS} x cache weight
#   6d  one kNN-LM pass on test with the best valid setting (its perplexity is printed by
#       eval-lm), saving neighbours, and table.py scores every Table-1 row on test from them
# ~25 min on 2 cores. Run: bash examples/wikitext2/06_eval_knnlm.sh
source "$(dirname "$0")/common.sh"
K="${K:-1024}"
# the committed full run used 0.003 0.01 0.03 (best: 0.03); QUICK=1's best was 0.1, the edge of
# 0.01-0.1, hence 0.3 too (a tuned value must lie inside its grid)
CACHE_THETAS="${CACHE_THETAS:-0.01 0.03 0.1 0.3}"
NBR="$RUN_DIR/nbrs"; mkdir -p "$NBR"
evallm() {  # evallm SPLIT LOGNAME [extra flags...]
  local split=$1 name=$2; shift 2
  fairseq-eval-lm "$DATA_BIN" "${EVAL_FLAGS[@]}" --gen-subset "$split" "$@" 2>&1 | tee "$LOG_DIR/$name.log" | grep -E "Perplexity|tokens; LM ppl"
}
ppl_of() { grep -oE "Perplexity: [0-9.]+" "$LOG_DIR/$1.log" | tail -1 | cut -d' ' -f2; }

# 6a
best_theta=""; best_ppl=""
for th in $CACHE_THETAS; do
  evallm valid "cache_valid_theta$th" --knn-cache --cache-lmbda 0.1 --cache-theta "$th" \
    --cache-length "$CONTEXT_WINDOW"
  p=$(ppl_of "cache_valid_theta$th")
  if [ -z "$best_ppl" ] || awk "BEGIN{exit !($p < $best_ppl)}"; then best_ppl=$p; best_theta=$th; fi
done
echo "cache theta tuned on valid: $best_theta (ppl $best_ppl at cache lambda 0.1)"
KNN=(--knnlm --dstore-filename "$DSTORE" --indexfile "$INDEX" --k "$K" --probe 32
     --knn-cache --cache-theta "$best_theta" --cache-length "$CONTEXT_WINDOW")
# 6b (lambda/temperature here only decide the printed number; the sweep re-scores)
evallm valid knnlm_valid "${KNN[@]}" --lmbda 0.25 --knn-temp 1 --cache-lmbda 0 \
  --knn-save-neighbors "$NBR/valid"
# 6c
knnlm-sweep "$NBR/valid" --lambdas 0,0.05,0.1,0.15,0.2,0.25,0.3,0.35,0.4,0.5,0.6,0.7 \
  --temps 1,2,5,10,20,50 --dists l2,faiss_l2 --cache-lambdas 0,0.05,0.1,0.15,0.2,0.3,0.4,0.5,0.6 \
  --json "$RUN_DIR/sweep_valid.json" --plot-dir "$RUN_DIR/plots/valid" --label "WikiText-2 valid" \
  | tee "$LOG_DIR/sweep_valid.log"
read -r LAM TEMP KBEST CL < <(python - "$RUN_DIR/sweep_valid.json" <<'PY'
import json, sys
b = json.load(open(sys.argv[1]))["best_per_dist"]["l2"]
print(b["lambda"], b["temperature"], b["k"], b["cache_lambda"])
PY
)
echo "best on valid (exact L2): lambda=$LAM T=$TEMP k=$KBEST cache_lambda=$CL"
# 6d
evallm test knnlm_test "${KNN[@]}" --lmbda "$LAM" --knn-temp "$TEMP" --cache-lmbda "$CL" \
  --knn-save-neighbors "$NBR/test"
python "$HERE/table.py" --valid-sweep "$RUN_DIR/sweep_valid.json" --valid "$NBR/valid" \
  --test "$NBR/test" --out "$RUN_DIR/table1.md" | tee "$LOG_DIR/table1.log"

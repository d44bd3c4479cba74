#!/usr/bin/env bash
# Step 6: valid and test perplexity of the base LM, + kNN-LM, + continuous cache, + both,
# and a summary table. Paper: base 17.96 / 18.65, kNN-LM 16.06 / 16.12, kNN-LM + cache
# 15.81 / 15.79 (dev / test). kNN-LM: the paper's k=1024, lambda 0.25, 32 probes, exact
# squared L2 recomputed from the stored keys, temperature 1. The cache (Grave et al. 2017)
# holds the previous CACHE_LENGTH=2560 positions; CACHE_LMBDA / CACHE_THETA default to
# placeholders: tune them on valid (07 sweeps the cache weight offline, one theta per pass)
# and report test with the values chosen on valid, e.g.
#   CACHE_LMBDA=0.1 CACHE_THETA=0.3 bash examples/wikitext103/06_eval_knnlm.sh
# Full scale: the keys (211 GB) are memory-mapped and read at random (1024 rows per token):
# fast local SSD or enough RAM for the page cache matters more than the GPU; the index
# (~7.5 GB) is loaded into RAM. Expect hours per kNN run (an estimate). SMALL=1: ~1 min.
# Run: bash examples/wikitext103/06_eval_knnlm.sh
source "$(dirname "$0")/common.sh"
KNN_ARGS=(--knnlm --dstore-filename "$DSTORE" --indexfile "$INDEX" --k "$K" --lmbda "$LMBDA"
          --probe "$PROBE" --knn-sim-func "$SIM_FUNC" --knn-temp "$KNN_TEMP")
CACHE_ARGS=(--knn-cache --cache-lmbda "$CACHE_LMBDA" --cache-theta "$CACHE_THETA"
            --cache-length "$CACHE_LENGTH")
eval_split() {  # eval_split NAME SPLIT [extra flags...]
  local name="$1" split="$2"
  shift 2
  # shellcheck disable=SC2086
  run fairseq-eval-lm "$DATA_BIN" --path "$CKPT" --user-dir "$USER_DIR" --gen-subset "$split" \
    --context-window "$EVAL_CONTEXT_WINDOW" --tokens-per-sample "$EVAL_TOKENS_PER_SAMPLE" \
    --sample-break-mode complete --max-tokens "$MAX_TOKENS" --softmax-batch "$SOFTMAX_BATCH" \
    --knn-keytype "$KEYTYPE" $DEVICE_ARGS $EVAL_EXTRA_ARGS "$@" \
    2>&1 | tee "$LOG_DIR/eval_${name}_$split.log"
}
for split in valid test; do
  # the base LM's run is 03's (same flags): redone only when its log is missing or older
  # than the checkpoint
  log="$LOG_DIR/eval_base_$split.log"
  if [ "${DRY_RUN:-0}" = 1 ] || ! [ "$log" -nt "$CKPT" ] || ! grep -q Perplexity "$log"; then
    eval_split base "$split"
  fi
  eval_split knnlm "$split" "${KNN_ARGS[@]}"
  eval_split cache "$split" "${CACHE_ARGS[@]}"
  eval_split knnlm_cache "$split" "${KNN_ARGS[@]}" "${CACHE_ARGS[@]}"
done
[ "${DRY_RUN:-0}" = 1 ] && exit 0
echo "perplexity (paper: base 17.96/18.65, kNN-LM 16.06/16.12, kNN-LM+cache 15.81/15.79)"
printf '%-12s %10s %10s\n' setting valid test | tee "$LOG_DIR/summary.txt"
for name in base knnlm cache knnlm_cache; do
  ppl() { grep -o 'Perplexity: [0-9.]*' "$LOG_DIR/eval_${name}_$1.log" | tail -1 | cut -d' ' -f2; }
  printf '%-12s %10s %10s\n' "$name" "$(ppl valid)" "$(ppl test)" | tee -a "$LOG_DIR/summary.txt"
done

# Shared settings of the WikiText-2 scripts: every path is a variable you can override.
# Sourced by the numbered scripts; not meant to be run on its own.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
# raw WikiText-2 (wiki.{train,valid,test}.tokens); downloaded by 01_prepare_data.sh when unset
WIKITEXT2_DIR="${WIKITEXT2_DIR:-}"
# QUICK=1: the same six steps on a slice (the first QUICK_TRAIN_LINES lines of train, about
# 8% or ~170K tokens, and QUICK_EVAL_LINES of valid and test, ~8% or ~17K tokens each), the
# same model trained for QUICK_TRAIN_HOURS (3 min) and a 512-list index: ~15 min on 2 cores,
# to see the pipeline work end to end. Its perplexities are those of an undertrained LM on a
# small datastore: compare kNN-LM with the base LM of the same run, never with the full run.
QUICK="${QUICK:-0}"
[ "$QUICK" = 0 ] || QUICK=1
QUICK_TRAIN_LINES="${QUICK_TRAIN_LINES:-3000}"
QUICK_EVAL_LINES="${QUICK_EVAL_LINES:-300}"
if [ "$QUICK" = 1 ]; then RUN_DIR="${RUN_DIR:-$REPO/runs/wikitext2_quick}"; fi
RUN_DIR="${RUN_DIR:-$REPO/runs/wikitext2}"        # everything this pipeline writes
DATA_BIN="${DATA_BIN:-$RUN_DIR/data-bin}"         # fairseq-preprocess output
CKPT_DIR="${CKPT_DIR:-$RUN_DIR/checkpoints}"
CKPT="${CKPT:-$CKPT_DIR/checkpoint_best.pt}"
DSTORE="${DSTORE:-$RUN_DIR/dstore/train}"         # datastore prefix (train split)
INDEX="${INDEX:-$DSTORE.index}"
LOG_DIR="${LOG_DIR:-$RUN_DIR/logs}"
# The base LM sees 512 tokens; evaluation and the dump give every scored token >= 256 tokens
# of prior context (blocks of 512-256=256 scored tokens, each behind a 256-token window).
TOKENS_PER_SAMPLE="${TOKENS_PER_SAMPLE:-512}"
CONTEXT_WINDOW="${CONTEXT_WINDOW:-256}"
MAX_TOKENS="${MAX_TOKENS:-8192}"                  # eval batch size in tokens
PY="${PY:-python}"
# the eval-lm flags every step shares (data, model, context and batching); add the step's own
EVAL_FLAGS=(--path "$CKPT" --user-dir "$REPO/fairseq_knnlm" --tokens-per-sample "$TOKENS_PER_SAMPLE"
            --context-window "$CONTEXT_WINDOW" --sample-break-mode none --max-tokens "$MAX_TOKENS"
            --cpu --num-workers 0)
mkdir -p "$RUN_DIR" "$LOG_DIR"
export PYTHONUNBUFFERED=1

# tiny-shakespeare as a domain datastore in DIR (08_domain_adaptation.sh, 15_generation.sh):
# split and binarize with the LM's dictionary (out-of-vocabulary words map to <unk>), dump the
# train split, build its index; each step skipped when its output exists. Logs to $LOG_DIR.
shakespeare_datastore() {
  local dir="$1" bin="$1/data-bin" ds="$1/dstore/train"
  mkdir -p "$dir"
  if [ ! -f "$bin/test.bin" ]; then
    $PY "$HERE/tokenize_shakespeare.py" "$SHAKESPEARE" "$dir/raw" | tee "$LOG_DIR/shakespeare_split.log"
    fairseq-preprocess --only-source --srcdict "$DATA_BIN/dict.txt" \
      --trainpref "$dir/raw/train.txt" --validpref "$dir/raw/valid.txt" \
      --testpref "$dir/raw/test.txt" --destdir "$bin" --workers 2 \
      2>&1 | tee "$LOG_DIR/shakespeare_preprocess.log" | grep -E "replaced|types"
  fi
  if [ ! -f "${ds}_meta.json" ]; then
    fairseq-eval-lm "$bin" "${EVAL_FLAGS[@]}" --gen-subset train --save-knnlm-dstore \
      --dstore-mmap "$ds" --dstore-fp16 2>&1 | tee "$LOG_DIR/shakespeare_dump.log" | grep -E "Perplexity|datastore"
  fi
  if [ ! -f "$ds.index.meta.json" ]; then
    knnlm-build-index --dstore-mmap "$ds" --faiss-index "$ds.index" --no-progress \
      2>&1 | tee "$LOG_DIR/shakespeare_index.log" | grep -E "ncentroids|wrote"
  fi
}

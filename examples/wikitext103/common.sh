# Shared settings of the WikiText-103 scripts: the paper's full-scale kNN-LM pipeline
# (Khandelwal et al. 2020). Every path and size is a variable you can override from the
# environment. Sourced by the numbered scripts; not meant to be run on its own.
#
# SMALL=1 switches to a tiny CPU setup (a slice of the given corpus, a 2-layer 64-d LM, a
# small index) that runs every script end to end in a few minutes: a smoke test of the
# pipeline, not a reproduction. Without SMALL, every setting below is the paper's.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
SMALL="${SMALL:-0}"
[ "$SMALL" = 0 ] || SMALL=1   # any non-zero value means small

# ---- paths ----
# raw WikiText-103 (wiki.{train,valid,test}.tokens); downloaded by 01 when unset (full scale)
WIKITEXT103_DIR="${WIKITEXT103_DIR:-}"
WIKITEXT103_URL="${WIKITEXT103_URL:-https://s3.amazonaws.com/research.metamind.io/wikitext/\
wikitext-103-v1.zip}"
if [ "$SMALL" = 1 ]; then RUN_DIR="${RUN_DIR:-$REPO/runs/wikitext103_small}"
else RUN_DIR="${RUN_DIR:-$REPO/runs/wikitext103}"; fi   # everything this pipeline writes
DATA_BIN="${DATA_BIN:-$RUN_DIR/data-bin}"         # fairseq-preprocess output
CKPT_DIR="${CKPT_DIR:-$RUN_DIR/checkpoints}"
# an existing checkpoint here (e.g. the published adaptive_lm_wiki103.v2 model.pt) skips 02;
# its dict.txt must then be the one 01 binarizes with (SRCDICT)
CKPT="${CKPT:-$CKPT_DIR/checkpoint_best.pt}"
SRCDICT="${SRCDICT:-}"                           # optional dict.txt for 01 (the checkpoint's)
DSTORE="${DSTORE:-$RUN_DIR/dstore/train}"         # datastore prefix (train split)
INDEX="${INDEX:-$DSTORE.index}"
NBR_DIR="${NBR_DIR:-$RUN_DIR/nbrs}"               # saved neighbours for 07's offline sweep
PLOT_DIR="${PLOT_DIR:-$RUN_DIR/plots}"
LOG_DIR="${LOG_DIR:-$RUN_DIR/logs}"
USER_DIR="${USER_DIR:-$REPO/fairseq_knnlm}"       # or "$(knnlm-user-dir)" outside the repo

# ---- settings: the paper's (full) and the smoke test's (SMALL=1) ----
if [ "$SMALL" = 0 ]; then
  # base LM: Baevski & Auli (2019) adaptive-input Transformer, fairseq's transformer_lm_wiki103
  ARCH_ARGS="${ARCH_ARGS:---arch transformer_lm_wiki103}"
  TRAIN_TOKENS_PER_SAMPLE="${TRAIN_TOKENS_PER_SAMPLE:-3072}"
  TRAIN_MAX_TOKENS="${TRAIN_MAX_TOKENS:-3072}"    # per GPU; x 8 GPUs x UPDATE_FREQ 3
  UPDATE_FREQ="${UPDATE_FREQ:-3}"
  MAX_UPDATE="${MAX_UPDATE:-286000}"
  LR_PERIOD_UPDATES="${LR_PERIOD_UPDATES:-270000}"
  WARMUP_UPDATES="${WARMUP_UPDATES:-16000}"
  # evaluation (03, 06, 07): 3072-token samples, >= 2560 tokens of context per scored token
  EVAL_TOKENS_PER_SAMPLE="${EVAL_TOKENS_PER_SAMPLE:-3072}"
  EVAL_CONTEXT_WINDOW="${EVAL_CONTEXT_WINDOW:-2560}"
  # datastore dump (04): blocks of 3072-1536=1536 scored tokens behind >= 1536 of context
  DUMP_TOKENS_PER_SAMPLE="${DUMP_TOKENS_PER_SAMPLE:-3072}"
  DUMP_CONTEXT_WINDOW="${DUMP_CONTEXT_WINDOW:-1536}"
  MAX_TOKENS="${MAX_TOKENS:-3072}"                # eval batch size in tokens (one block)
  # FAISS index (05): IVFPQ, 4096 lists, 64-byte codes, trained on 1M keys, 32 lists probed
  NCENTROIDS="${NCENTROIDS:-4096}"
  CODE_SIZE="${CODE_SIZE:-64}"
  INDEX_TRAIN_SIZE="${INDEX_TRAIN_SIZE:-1000000}"
  # kNN-LM (06, 07): 1024 neighbours, lambda 0.25, exact L2 from the stored keys, T = 1
  K="${K:-1024}"
  # continuous cache over the evaluated text (06): length = the eval context window;
  # CACHE_LMBDA and CACHE_THETA are placeholders: tune them on valid (see 06 and 07)
  CACHE_LENGTH="${CACHE_LENGTH:-2560}"
  DEVICE_ARGS="${DEVICE_ARGS:-}"                  # GPUs (fairseq uses all visible ones)
else
  # lines of each split copied by 01; on WikiText-2 (same text as WikiText-103): train
  # ~170K tokens / ~13K types, valid and test ~17K tokens each
  TRAIN_LINES="${TRAIN_LINES:-3000}"
  EVAL_LINES="${EVAL_LINES:-300}"
  # 2 layers, 64 dims, adaptive input + softmax like the paper's model (cutoffs scaled to the
  # slice's vocabulary); max positions 1024 because eval-lm silently skips blocks longer than
  # the model's positions, and break mode complete makes a long paragraph one block
  ARCH_ARGS="${ARCH_ARGS:---arch transformer_lm --decoder-layers 2 --decoder-embed-dim 64 \
--decoder-input-dim 64 --decoder-output-dim 64 --decoder-ffn-embed-dim 256 \
--decoder-attention-heads 2 --decoder-normalize-before --no-decoder-final-norm \
--adaptive-input --adaptive-input-cutoff 1000,5000 --adaptive-softmax-cutoff 1000,5000 \
--tie-adaptive-weights --tie-adaptive-proj --max-target-positions 1024}"
  TRAIN_TOKENS_PER_SAMPLE="${TRAIN_TOKENS_PER_SAMPLE:-256}"
  TRAIN_MAX_TOKENS="${TRAIN_MAX_TOKENS:-1024}"
  UPDATE_FREQ="${UPDATE_FREQ:-1}"
  MAX_UPDATE="${MAX_UPDATE:-50}"
  LR_PERIOD_UPDATES="${LR_PERIOD_UPDATES:-40}"
  WARMUP_UPDATES="${WARMUP_UPDATES:-10}"
  EVAL_TOKENS_PER_SAMPLE="${EVAL_TOKENS_PER_SAMPLE:-256}"
  EVAL_CONTEXT_WINDOW="${EVAL_CONTEXT_WINDOW:-128}"
  DUMP_TOKENS_PER_SAMPLE="${DUMP_TOKENS_PER_SAMPLE:-256}"
  DUMP_CONTEXT_WINDOW="${DUMP_CONTEXT_WINDOW:-128}"
  MAX_TOKENS="${MAX_TOKENS:-4096}"
  # 512 lists (>= 39 training keys each) so that 32 probes scan ~6% of the keys, as 32 of
  # 4096 lists scan <1% at full scale; with 64 lists the search was 4x slower
  NCENTROIDS="${NCENTROIDS:-512}"
  CODE_SIZE="${CODE_SIZE:-16}"
  INDEX_TRAIN_SIZE="${INDEX_TRAIN_SIZE:-20000}"
  K="${K:-64}"
  CACHE_LENGTH="${CACHE_LENGTH:-128}"
  DEVICE_ARGS="${DEVICE_ARGS:---cpu --num-workers 0}"
  # one thread: as fast for a model this small, and 2-4x faster when the cores are shared
  # (measured: 4.2 s vs 17.8 s for the valid slice next to a 2-thread training run)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
# the same at both scales
KEYTYPE="${KEYTYPE:-ffn_input_after_ln}"          # paper Table 5: input of the last FFN, after LN
SOFTMAX_BATCH="${SOFTMAX_BATCH:-1024}"            # bounds the memory of the 267K-way softmax
PROBE="${PROBE:-32}"
LMBDA="${LMBDA:-0.25}"
KNN_TEMP="${KNN_TEMP:-1}"
SIM_FUNC="${SIM_FUNC:-l2}"                        # exact squared L2 from the stored keys
INDEX_SEED="${INDEX_SEED:-1}"
CACHE_LMBDA="${CACHE_LMBDA:-0.1}"                 # not the paper's: tune on valid
CACHE_THETA="${CACHE_THETA:-0.05}"                # not the paper's: tune on valid
# extra fairseq-eval-lm flags for 03/04/06/07, e.g. --fp16 as in the authors' commands
# (faster; keys are stored in fp16 anyway; perplexities may move in the last digit)
EVAL_EXTRA_ARGS="${EVAL_EXTRA_ARGS:-}"
# --gpu for knnlm-build-index when FAISS sees a GPU (auto), or force 0 / 1
INDEX_GPU="${INDEX_GPU:-auto}"
# --fp16 for training (02): the authors trained the 247M model in mixed precision (Baevski &
# Auli's recipe with --fp16). auto = on when torch sees a CUDA GPU, off on CPU (fairseq's fp16
# needs CUDA); FP16=1 / FP16=0 force it.
FP16="${FP16:-auto}"
if [ "$FP16" = auto ]; then
  if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
      >/dev/null 2>&1; then FP16=1; else FP16=0; fi
fi
if [ "$FP16" = 1 ]; then TRAIN_FP16_ARGS="--fp16"; else TRAIN_FP16_ARGS=""; fi

mkdir -p "$RUN_DIR" "$LOG_DIR"
export PYTHONUNBUFFERED=1

# run CMD...: print the command (first line of each log), then run it. DRY_RUN=1 prints the
# commands and runs nothing: tests/test_wikitext103_scripts.py checks the resolved settings.
run() {
  echo "+ $*"
  [ "${DRY_RUN:-0}" = 1 ] || "$@"
}

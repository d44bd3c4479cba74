#!/usr/bin/env bash
# Step 2: train the small base LM on 2 CPU cores: a 3-layer 256-d Transformer with adaptive
# input and adaptive softmax (cutoffs 2000,10000, tied) -- a full 33K softmax is ~5x slower
# here. Stops after TRAIN_HOURS of cumulative training (default 0.65 h = 39 min; ~4,300
# tokens/s on an idle machine). Re-running with FORCE_TRAIN=1 and a larger TRAIN_HOURS resumes
# from checkpoint_last.pt.
# Run: bash examples/wikitext2/02_train_lm.sh
source "$(dirname "$0")/common.sh"
if [ "$QUICK" = 1 ]; then TRAIN_HOURS="${TRAIN_HOURS:-${QUICK_TRAIN_HOURS:-0.05}}"; fi
TRAIN_HOURS="${TRAIN_HOURS:-0.65}"
if [ -f "$CKPT" ] && [ -z "${FORCE_TRAIN:-}" ]; then echo "$CKPT exists, skipping"; exit 0; fi
fairseq-train "$DATA_BIN" --task language_modeling \
  --arch transformer_lm --decoder-layers 3 --decoder-embed-dim 256 \
  --decoder-input-dim 256 --decoder-output-dim 256 `# else fairseq adds 512-d projections` \
  --decoder-ffn-embed-dim 1024 --decoder-attention-heads 4 --decoder-normalize-before \
  --adaptive-input --adaptive-input-factor 4 --adaptive-input-cutoff 2000,10000 \
  --adaptive-softmax-cutoff 2000,10000 --adaptive-softmax-factor 4 --tie-adaptive-weights \
  --criterion adaptive_loss --ddp-backend legacy_ddp `# adaptive_loss needs legacy_ddp` \
  --dropout 0.1 --attention-dropout 0.1 \
  --tokens-per-sample "$TOKENS_PER_SAMPLE" --sample-break-mode none --max-tokens 4096 \
  --optimizer adam --adam-betas '(0.9, 0.98)' --weight-decay 0.01 --clip-norm 1.0 \
  --lr 0.002 --lr-scheduler inverse_sqrt --warmup-updates 300 --warmup-init-lr 1e-07 \
  --stop-time-hours "$TRAIN_HOURS" --max-epoch 50 --cpu --num-workers 0 \
  --save-dir "$CKPT_DIR" --no-epoch-checkpoints --save-interval-updates 250 \
  --keep-interval-updates 1 --log-format simple --log-interval 50 --seed 1 \
  2>&1 | tee -a "$LOG_DIR/train.log"

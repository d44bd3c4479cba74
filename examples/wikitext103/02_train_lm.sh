#!/usr/bin/env bash
# Step 2: train the base LM, Baevski & Auli (2019)'s adaptive-input Transformer, with the
# command of fairseq's examples/language_model/README.adaptive_inputs.md (247M parameters).
# Skipped when CKPT exists: point CKPT at the published model instead of training, e.g.
#   curl -fLO https://dl.fbaipublicfiles.com/fairseq/models/lm/adaptive_lm_wiki103.v2.tar.bz2
#   tar xjf adaptive_lm_wiki103.v2.tar.bz2   # model.pt + dict.txt
#   SRCDICT=$PWD/adaptive_lm_wiki103.v2/dict.txt bash .../01_prepare_data.sh
#   export CKPT=$PWD/adaptive_lm_wiki103.v2/model.pt
# Hardware: the recipe assumes 8 GPUs (--max-tokens 3072 x 8 GPUs x --update-freq 3 =
# 73,728 tokens per update, 286K updates); expect on the order of days on 8 V100-class
# GPUs (not measured here). Fewer GPUs: raise UPDATE_FREQ to keep 73,728 tokens per update.
# SMALL=1: a 2-layer 64-d model for MAX_UPDATE=50 updates on CPU (~20 s).
# Run: bash examples/wikitext103/02_train_lm.sh
source "$(dirname "$0")/common.sh"
if [ -f "$CKPT" ] && [ -z "${FORCE_TRAIN:-}" ]; then echo "$CKPT exists, skipping"; exit 0; fi
# transformer_lm_wiki103 (fairseq/models/transformer_lm.py): 16 layers, 1024 dims, FFN 4096,
# 8 attention heads, pre-norm blocks and no final LayerNorm, sinusoidal positions, adaptive
# input and adaptive softmax (cutoffs 20000,60000, factor 4, tied weights and projections),
# dropout 0.3 / attention 0.1 / activation 0.1 / adaptive softmax 0.2. (Our task text said
# 16 heads; fairseq's registered architecture, which the paper's checkpoint uses, has 8.)
# --ddp-backend legacy_ddp: adaptive_loss does not work with the c10d backend.
# --no-epoch-checkpoints is ours (disk only): ~200 epochs x 3 GB checkpoints otherwise.
# --fp16 (TRAIN_FP16_ARGS, common.sh): on when torch sees CUDA, as the authors trained; off on
# CPU, where fairseq has no fp16 training. FP16=0 turns it off on a GPU.
# shellcheck disable=SC2086  # ARCH_ARGS, DEVICE_ARGS and TRAIN_FP16_ARGS are word lists
run fairseq-train "$DATA_BIN" --task language_modeling $ARCH_ARGS \
  --max-update "$MAX_UPDATE" --lr 1.0 --t-mult 2 --lr-period-updates "$LR_PERIOD_UPDATES" \
  --lr-scheduler cosine --lr-shrink 0.75 --warmup-updates "$WARMUP_UPDATES" \
  --warmup-init-lr 1e-07 --stop-min-lr 1e-09 --optimizer nag --min-lr 0.0001 --clip-norm 0.1 \
  --criterion adaptive_loss --max-tokens "$TRAIN_MAX_TOKENS" --update-freq "$UPDATE_FREQ" \
  --tokens-per-sample "$TRAIN_TOKENS_PER_SAMPLE" --seed 1 --sample-break-mode none \
  --skip-invalid-size-inputs-valid-test --ddp-backend=legacy_ddp \
  --save-dir "$CKPT_DIR" --no-epoch-checkpoints --log-format simple --log-interval 100 \
  $DEVICE_ARGS $TRAIN_FP16_ARGS 2>&1 | tee "$LOG_DIR/train.log"

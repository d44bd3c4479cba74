#!/usr/bin/env bash
# Step 1: binarize WikiText-103 for fairseq, word level (fairseq-preprocess --only-source).
# Full scale: train 1,801,350 lines = 103,227,021 tokens with one </s> per line (the datastore
# size), valid 217,646 and test 245,569 tokens; 267,735 types in dict.txt (267,744 entries
# with fairseq's 4 specials, padded to a multiple of 8). ~10-20 min with 20 workers, ~0.5 GB.
# SMALL=1: the first TRAIN_LINES / EVAL_LINES lines of each split are copied to
# $RUN_DIR/slice/ and binarized from there (seconds).
# Input: WIKITEXT103_DIR with wiki.{train,valid,test}.tokens; without it, downloads the
# standard release (WIKITEXT103_URL, 181 MB zip, needs internet).
# Run: WIKITEXT103_DIR=/data/wikitext-103 bash examples/wikitext103/01_prepare_data.sh
source "$(dirname "$0")/common.sh"
PREPROCESS_WORKERS="${PREPROCESS_WORKERS:-$([ "$SMALL" = 1 ] && echo 2 || echo 20)}"
if [ -f "$DATA_BIN/test.bin" ]; then echo "$DATA_BIN exists, skipping"; exit 0; fi
if [ -z "$WIKITEXT103_DIR" ]; then
  WIKITEXT103_DIR="$RUN_DIR/raw/wikitext-103"
  if [ ! -f "$WIKITEXT103_DIR/wiki.train.tokens" ]; then
    echo "WIKITEXT103_DIR not set: downloading $WIKITEXT103_URL"
    mkdir -p "$RUN_DIR/raw"
    run curl -fL "$WIKITEXT103_URL" -o "$RUN_DIR/raw/wikitext-103-v1.zip"
    run unzip -q -o "$RUN_DIR/raw/wikitext-103-v1.zip" -d "$RUN_DIR/raw"  # wikitext-103/*.tokens
  fi
fi
for s in train valid test; do
  [ -f "$WIKITEXT103_DIR/wiki.$s.tokens" ] || [ "${DRY_RUN:-0}" = 1 ] ||
    { echo "missing $WIKITEXT103_DIR/wiki.$s.tokens" >&2; exit 1; }
done
TEXT="$WIKITEXT103_DIR"
if [ "$SMALL" = 1 ]; then
  TEXT="$RUN_DIR/slice"
  mkdir -p "$TEXT"
  head -n "$TRAIN_LINES" "$WIKITEXT103_DIR/wiki.train.tokens" > "$TEXT/wiki.train.tokens"
  for s in valid test; do
    head -n "$EVAL_LINES" "$WIKITEXT103_DIR/wiki.$s.tokens" > "$TEXT/wiki.$s.tokens"
  done
  echo "SMALL=1: sliced $TRAIN_LINES train / $EVAL_LINES valid+test lines into $TEXT"
fi
DICT_ARGS=()
[ -z "$SRCDICT" ] || DICT_ARGS=(--srcdict "$SRCDICT")   # e.g. the published model's dict.txt
run fairseq-preprocess --only-source "${DICT_ARGS[@]}" \
  --trainpref "$TEXT/wiki.train.tokens" \
  --validpref "$TEXT/wiki.valid.tokens" \
  --testpref "$TEXT/wiki.test.tokens" \
  --destdir "$DATA_BIN" --workers "$PREPROCESS_WORKERS" 2>&1 | tee "$LOG_DIR/preprocess.log"

#!/usr/bin/env bash
# Step 1: binarize WikiText-2 for fairseq (word level, the train split's 33,280-type dictionary).
# Input: WIKITEXT2_DIR with wiki.{train,valid,test}.tokens (e.g. ../shared/data/wikitext-2);
# without it, downloads the standard release (needs internet). ~30 s on 2 cores.
# Run: WIKITEXT2_DIR=../shared/data/wikitext-2 bash examples/wikitext2/01_prepare_data.sh
source "$(dirname "$0")/common.sh"
if [ -z "$WIKITEXT2_DIR" ]; then
  WIKITEXT2_DIR="$RUN_DIR/raw/wikitext-2"
  if [ ! -f "$WIKITEXT2_DIR/wiki.train.tokens" ]; then
    echo "WIKITEXT2_DIR not set: downloading WikiText-2 to $WIKITEXT2_DIR"
    mkdir -p "$RUN_DIR/raw"
    # pytorch/examples ships byte-identical copies of the tokenized WikiText-2 splits
    base="https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2"
    mkdir -p "$WIKITEXT2_DIR"
    for s in train valid test; do
      curl -fsSL "$base/$s.txt" -o "$WIKITEXT2_DIR/wiki.$s.tokens"
    done
  fi
fi
for s in train valid test; do
  [ -f "$WIKITEXT2_DIR/wiki.$s.tokens" ] || { echo "missing $WIKITEXT2_DIR/wiki.$s.tokens" >&2; exit 1; }
done
if [ -f "$DATA_BIN/test.bin" ]; then echo "$DATA_BIN exists, skipping"; exit 0; fi
if [ "$QUICK" = 1 ]; then  # the first lines of each split (whole articles of the same text)
  slice="$RUN_DIR/slice"; mkdir -p "$slice"
  head -n "$QUICK_TRAIN_LINES" "$WIKITEXT2_DIR/wiki.train.tokens" > "$slice/wiki.train.tokens"
  for s in valid test; do
    head -n "$QUICK_EVAL_LINES" "$WIKITEXT2_DIR/wiki.$s.tokens" > "$slice/wiki.$s.tokens"
  done
  echo "QUICK=1: $QUICK_TRAIN_LINES train lines, $QUICK_EVAL_LINES valid/test lines in $slice"
  WIKITEXT2_DIR="$slice"
fi
fairseq-preprocess --only-source \
  --trainpref "$WIKITEXT2_DIR/wiki.train.tokens" \
  --validpref "$WIKITEXT2_DIR/wiki.valid.tokens" \
  --testpref "$WIKITEXT2_DIR/wiki.test.tokens" \
  --destdir "$DATA_BIN" --workers 2 2>&1 | tee "$LOG_DIR/preprocess.log"

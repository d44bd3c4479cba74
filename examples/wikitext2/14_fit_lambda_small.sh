#!/usr/bin/env bash
# The small setup of issue 23, as a new user would run it: a 2-layer LM trained for 120
# updates on ~24K WikiText-2 train tokens, its train split as a flat-index datastore, k 32,
# T 10, neighbours saved on valid; knnlm-fit-lambda with its defaults (k and T from the saved
# neighbours), then eval-lm on test with the model and --knn-skip-below 0.05. The fitter
# must save a model no worse than the best fixed lambda on its held-out tokens, or refuse in
# one line; eval-lm must print a finite perplexity with whatever it saved (--force included).
# ~3 min on 2 cores. Needs WIKITEXT2_DIR (raw wiki.*.tokens). Writes $RUN_DIR (default
# runs/wikitext2_small).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
: "${WIKITEXT2_DIR:?set WIKITEXT2_DIR to the raw WikiText-2 folder}"
RUN_DIR="${RUN_DIR:-$REPO/runs/wikitext2_small}"
BIN="$(dirname "$(command -v fairseq-eval-lm)")"
mkdir -p "$RUN_DIR/raw"
head -n 520 "$WIKITEXT2_DIR/wiki.train.tokens" > "$RUN_DIR/raw/train.txt"
head -n 150 "$WIKITEXT2_DIR/wiki.valid.tokens" > "$RUN_DIR/raw/valid.txt"
head -n 150 "$WIKITEXT2_DIR/wiki.test.tokens" > "$RUN_DIR/raw/test.txt"
wc -w "$RUN_DIR"/raw/*.txt
rm -rf "$RUN_DIR/bin" "$RUN_DIR/ckpt"
"$BIN/fairseq-preprocess" --only-source --trainpref "$RUN_DIR/raw/train.txt" \
  --validpref "$RUN_DIR/raw/valid.txt" --testpref "$RUN_DIR/raw/test.txt" \
  --destdir "$RUN_DIR/bin" --workers 2 > "$RUN_DIR/preprocess.log" 2>&1
"$BIN/fairseq-train" "$RUN_DIR/bin" --task language_modeling --arch transformer_lm \
  --decoder-layers 2 --decoder-embed-dim 128 --decoder-ffn-embed-dim 256 \
  --decoder-attention-heads 4 --tokens-per-sample 128 --sample-break-mode none \
  --max-tokens 2048 --optimizer adam --lr 0.001 --max-update 120 --cpu --num-workers 0 \
  --save-dir "$RUN_DIR/ckpt" --no-epoch-checkpoints --log-format simple --seed 1 \
  > "$RUN_DIR/train.log" 2>&1
EV=(--path "$RUN_DIR/ckpt/checkpoint_last.pt" --user-dir "$REPO/fairseq_knnlm"
    --tokens-per-sample 128 --context-window 64 --sample-break-mode none --max-tokens 4096
    --cpu --num-workers 0)
"$BIN/fairseq-eval-lm" "$RUN_DIR/bin" "${EV[@]}" --gen-subset test 2>&1 | grep "Perplexity"
"$BIN/fairseq-eval-lm" "$RUN_DIR/bin" "${EV[@]}" --gen-subset train --save-knnlm-dstore \
  --dstore-mmap "$RUN_DIR/ds/train" > "$RUN_DIR/dump.log" 2>&1
"$BIN/knnlm-build-index" --dstore-mmap "$RUN_DIR/ds/train" --faiss-index "$RUN_DIR/ds/flat.index" \
  --index-type flat --no-progress > "$RUN_DIR/index.log" 2>&1
KNN=(--knnlm --dstore-filename "$RUN_DIR/ds/train" --indexfile "$RUN_DIR/ds/flat.index"
     --k 32 --lmbda 0.25 --knn-temp 10)
"$BIN/fairseq-eval-lm" "$RUN_DIR/bin" "${EV[@]}" --gen-subset valid "${KNN[@]}" \
  --knn-save-neighbors "$RUN_DIR/nb/valid" 2>&1 | grep "Perplexity"
"$BIN/fairseq-eval-lm" "$RUN_DIR/bin" "${EV[@]}" --gen-subset test "${KNN[@]}" 2>&1 | grep "Perplexity"
rm -f "$RUN_DIR/lam.model"
for force in "" "--force"; do
  echo "== knnlm-fit-lambda $RUN_DIR/nb/valid --out $RUN_DIR/lam.model $force"
  if "$BIN/knnlm-fit-lambda" "$RUN_DIR/nb/valid" --out "$RUN_DIR/lam.model" $force \
      2>&1 | grep -v "^20..-" ; then :; fi
  if [ -f "$RUN_DIR/lam.model" ]; then break; fi
done
echo "== eval-lm test with the model, --knn-skip-below 0.05"
"$BIN/fairseq-eval-lm" "$RUN_DIR/bin" "${EV[@]}" --gen-subset test "${KNN[@]}" \
  --knn-lambda-model "$RUN_DIR/lam.model" --knn-skip-below 0.05 2>&1 \
  | grep -E "Perplexity|kNN-LM searches|error"

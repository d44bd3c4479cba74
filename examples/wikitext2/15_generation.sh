#!/usr/bin/env bash
# Step 15 (issue #26): open-ended generation with and without kNN-LM, measured on WikiText-2
# test (the LM of steps 1-5 and its train datastore) and on tiny-shakespeare (the domain
# datastore of 08_domain_adaptation.sh, built here into GEN_DIR if 08 has not run): PROMPTS
# prompts of 128 tokens, 64 generated tokens, greedy and top-p 0.9 (seed 1), base LM and
# kNN-LM; benchmarks/generation.py has the protocol and the metrics. Writes only GEN_DIR.
# kNN-LM settings: WikiText-2's come from step 6's valid sweep (best without the cache) when
# RUN_DIR/sweep_valid.json exists, Shakespeare's from 08's sweep when it exists, else the
# paper's domain-adaptation lambda 0.65 with WikiText-2's k and temperature.
# Run: QUICK=1 WIKITEXT2_DIR=../shared/data/wikitext-2 bash examples/wikitext2/15_generation.sh
#      (QUICK=1 RUN_DIR=... GEN_DIR=... reads a run elsewhere and writes GEN_DIR only)
GEN_DIR_ARG="${GEN_DIR:-}"
source "$(dirname "$0")/common.sh"
GEN_DIR="${GEN_DIR_ARG:-$RUN_DIR/generation}"
LOG_DIR="$GEN_DIR/logs"; mkdir -p "$GEN_DIR" "$LOG_DIR"
PROMPTS="${PROMPTS:-200}"; BATCH="${BATCH:-50}"; SPEED_PROMPTS="${SPEED_PROMPTS:-5}"
SHAKESPEARE="${SHAKESPEARE:-$REPO/../shared/data/tinyshakespeare/input.txt}"
WIKITEXT2_DIR="${WIKITEXT2_DIR:-$REPO/../shared/data/wikitext-2}"

# WikiText-2 prompts: the full test split (QUICK=1's data-bin holds only a slice of it, too
# short for disjoint prompts), binarized with the model's dictionary
EVAL_BIN="$DATA_BIN"
if [ "$QUICK" = 1 ] && [ -f "$WIKITEXT2_DIR/wiki.test.tokens" ]; then
  EVAL_BIN="$GEN_DIR/wikitext2-test-bin"
  if [ ! -f "$EVAL_BIN/test.bin" ]; then
    fairseq-preprocess --only-source --srcdict "$DATA_BIN/dict.txt" \
      --testpref "$WIKITEXT2_DIR/wiki.test.tokens" --destdir "$EVAL_BIN" --workers 2 \
      2>&1 | tee "$LOG_DIR/wikitext2_test_preprocess.log" | grep -E "replaced|types"
  fi
fi
read -r K LAM TEMP SIM < <($PY - "$RUN_DIR/sweep_valid.json" <<'PY'
import json, os, sys
p = sys.argv[1]
b = json.load(open(p))["best_without_cache"] if os.path.exists(p) else {}
print(b.get("k", 1024), b.get("lambda", 0.25), b.get("temperature", 1.0), b.get("dist", "l2"))
PY
)
echo "WikiText-2 kNN-LM: k=$K lambda=$LAM T=$TEMP dist=$SIM"
$PY "$REPO/benchmarks/generation.py" --ckpt "$CKPT" --data "$DATA_BIN" --eval-data "$EVAL_BIN" \
  --eval-split test --dstore "$DSTORE" --index "$INDEX" --k "$K" --lmbda "$LAM" --temp "$TEMP" \
  --sim-func "$SIM" --prompts "$PROMPTS" --batch "$BATCH" --speed-prompts "$SPEED_PROMPTS" \
  --label "WikiText-2 test" --out "$GEN_DIR/wikitext2.json" 2>&1 | tee "$LOG_DIR/wikitext2.log"

# tiny-shakespeare: 08's datastore, or its first steps here
SH_DIR="$RUN_DIR/shakespeare"
if [ ! -f "$SH_DIR/dstore/train.index.meta.json" ]; then
  SH_DIR="$GEN_DIR/shakespeare"
  shakespeare_datastore "$SH_DIR"
fi
read -r SK SLAM STEMP < <($PY - "$RUN_DIR/sweep_shakespeare_valid.json" "$K" "$TEMP" <<'PY'
import json, os, sys
p = sys.argv[1]
b = json.load(open(p))["best"] if os.path.exists(p) else {}
print(b.get("k", sys.argv[2]), b.get("lambda", 0.65), b.get("temperature", sys.argv[3]))
PY
)
echo "tiny-shakespeare kNN-LM: k=$SK lambda=$SLAM T=$STEMP"
$PY "$REPO/benchmarks/generation.py" --ckpt "$CKPT" --data "$SH_DIR/data-bin" --eval-split test \
  --dstore "$SH_DIR/dstore/train" --index "$SH_DIR/dstore/train.index" --k "$SK" --lmbda "$SLAM" \
  --temp "$STEMP" --prompts "$PROMPTS" --batch "$BATCH" --speed-prompts "$SPEED_PROMPTS" \
  --label "tiny-shakespeare test" --out "$GEN_DIR/shakespeare.json" 2>&1 | tee "$LOG_DIR/shakespeare.log"
# tiny-shakespeare test has ~10K tokens: 200 windows of 192 tokens overlap (each prompt shares
# text with its neighbours, which lowers the pooled distinct-n of the true continuations);
# the same measurement on as many disjoint windows as fit
SH_DISJOINT="${SH_DISJOINT:-53}"
$PY "$REPO/benchmarks/generation.py" --ckpt "$CKPT" --data "$SH_DIR/data-bin" --eval-split test \
  --dstore "$SH_DIR/dstore/train" --index "$SH_DIR/dstore/train.index" --k "$SK" --lmbda "$SLAM" \
  --temp "$STEMP" --prompts "$SH_DISJOINT" --batch "$BATCH" --speed-prompts "$SPEED_PROMPTS" \
  --label "tiny-shakespeare test, disjoint prompts" --out "$GEN_DIR/shakespeare_disjoint.json" \
  2>&1 | tee "$LOG_DIR/shakespeare_disjoint.log"

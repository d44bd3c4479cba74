#!/usr/bin/env bash
# Step 5: the FAISS index of the datastore with the paper's settings: IVFPQ with 4096 lists,
# 64-byte PQ codes, trained on 1M keys sampled with seed 1, 32 lists probed at search time.
# Full scale: the index holds 103M x (64-byte code + 8-byte id) = ~7.5 GB; training reads
# 1M keys (4 GB in fp32), adding streams the 211 GB of keys in chunks of 500K (2 GB).
# Hours on CPU, much less with a CUDA FAISS (--gpu, picked automatically when FAISS sees a
# GPU). Interrupted builds resume from INDEX.partial when re-run with the same command.
# SMALL=1: 64 lists, 16-byte codes, 20K training keys (~30 s).
# Run: bash examples/wikitext103/05_build_index.sh
source "$(dirname "$0")/common.sh"
if [ -f "$INDEX.meta.json" ] && [ -z "${FORCE_INDEX:-}" ]; then
  echo "$INDEX exists, skipping"; exit 0
fi
if [ "$INDEX_GPU" = auto ]; then
  INDEX_GPU=$(python -c "import faiss; print(int(faiss.get_num_gpus() > 0))" 2>/dev/null || echo 0)
fi
GPU_ARGS=()
[ "$INDEX_GPU" = 1 ] && GPU_ARGS=(--gpu)
run knnlm-build-index --dstore-mmap "$DSTORE" --faiss-index "$INDEX" --index-type ivfpq \
  --ncentroids "$NCENTROIDS" --code-size "$CODE_SIZE" --train-size "$INDEX_TRAIN_SIZE" \
  --probe "$PROBE" --seed "$INDEX_SEED" "${GPU_ARGS[@]}" --no-progress \
  2>&1 | tee "$LOG_DIR/build_index.log"

#!/usr/bin/env bash
# Set up .venv with fairseq, FAISS and this plugin, without pulling a CUDA torch on CPU machines.
#   bash install.sh              # CPU (faiss-cpu)
#   KNNLM_FAISS=gpu bash install.sh   # CUDA machine (faiss-gpu-cu12)
# Order matters: torch first (pinned: here a local CPU wheel; a bare `torch` requirement would
# fetch a multi-GB CUDA build), then fairseq built against it without build isolation (with
# isolation, pip builds fairseq in a fresh env that downloads CUDA torch: ~6 min more).
# Takes ~7 min on a fresh 2-core machine (fairseq compiles C++ extensions); seconds when done.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"   # pick your own build, e.g. a CUDA one on GPU hosts
FAISS_EXTRA="${KNNLM_FAISS:-cpu}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then "$PY" -m venv "$VENV"; fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
pip_q() { pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
if ! python -c "import fairseq, faiss, fairseq_knnlm" >/dev/null 2>&1; then
  pip_q --upgrade pip setuptools wheel
  pip_q "$TORCH_SPEC" cython "numpy>=1.21"
  pip_q --no-build-isolation -e ".[$FAISS_EXTRA,dev]"
fi
python -c "import torch, fairseq, faiss, fairseq_knnlm; print('ok: torch', torch.__version__, '| fairseq', fairseq.__version__, '| faiss', faiss.__version__, '| fairseq_knnlm', fairseq_knnlm.__version__)"

#!/usr/bin/env bash
# Set up .venv with fairseq, FAISS and this plugin, without pulling a CUDA torch on CPU machines.
#   bash install.sh                        # CPU (faiss-cpu)
#   KNNLM_FAISS=gpu bash install.sh        # CUDA 12 machine: Meta's official faiss-gpu
#   KNNLM_FAISS=gpu-cu13 bash install.sh   # CUDA 13 machine: Meta's faiss-gpu-cuvs (Py >= 3.11)
# Ray (the [ray] extra: sharded build/search, docs/ray.md) is installed too; KNNLM_RAY=0 skips
# it (the default engine never imports Ray).
# On GPU hosts also pick a CUDA torch, e.g. TORCH_SPEC="torch==2.13.0" with the matching
# --index-url in PIP_INDEX_URL/PIP_EXTRA_INDEX_URL.
# Order matters: torch first (pinned: here a local CPU wheel; a bare `torch` requirement would
# fetch a multi-GB CUDA build), then fairseq built against it without build isolation (with
# isolation, pip builds fairseq in a fresh env that downloads CUDA torch: ~6 min more).
# Takes ~7 min on a fresh 2-core machine (fairseq compiles C++ extensions); seconds when done.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"   # pick your own build, e.g. a CUDA one on GPU hosts
FAISS_EXTRA="${KNNLM_FAISS:-cpu}"
RAY_EXTRA=",ray"; RAY_IMPORT=", ray"
if [ "${KNNLM_RAY:-1}" = "0" ]; then RAY_EXTRA=""; RAY_IMPORT=""; fi
case "$FAISS_EXTRA" in
  cpu|gpu|gpu-cu13) ;;
  *) echo "install.sh: KNNLM_FAISS must be cpu, gpu (CUDA 12) or gpu-cu13 (CUDA 13), got '$FAISS_EXTRA'" >&2; exit 2 ;;
esac
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then "$PY" -m venv "$VENV"; fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
pip_q() { pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
# the FAISS distribution the extra installs (all three provide the same `faiss` module)
case "$FAISS_EXTRA" in cpu) FAISS_DIST=faiss-cpu ;; gpu) FAISS_DIST=faiss-gpu ;; *) FAISS_DIST=faiss-gpu-cuvs ;; esac
# every console script of pyproject.toml present (an older install lacks newer commands)
scripts_ok() {
  python - "$VENV" <<'PY'
import pathlib, re, sys
text = pathlib.Path("pyproject.toml").read_text()
block = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
names = re.findall(r"^([\w-]+)\s*=", block, re.M)
sys.exit(0 if all((pathlib.Path(sys.argv[1]) / "bin" / n).exists() for n in names) else 1)
PY
}
if ! python -c "import fairseq, faiss, numba, fairseq_knnlm$RAY_IMPORT" >/dev/null 2>&1 \
    || ! pip show -q "$FAISS_DIST" >/dev/null 2>&1 || ! scripts_ok; then
  pip_q --upgrade pip setuptools wheel
  pip_q "$TORCH_SPEC" cython "numpy>=1.21"
  for other in faiss-cpu faiss-gpu faiss-gpu-cuvs faiss-gpu-cu12; do  # one faiss module only
    if [ "$other" != "$FAISS_DIST" ] && pip show -q "$other" >/dev/null 2>&1; then
      pip uninstall -y -q "$other"
    fi
  done
  pip_q --no-build-isolation -e ".[$FAISS_EXTRA,dev$RAY_EXTRA]"
fi
python -c "import torch, fairseq, faiss, fairseq_knnlm; print('ok: torch', torch.__version__, '| fairseq', fairseq.__version__, '| faiss', faiss.__version__, '| fairseq_knnlm', fairseq_knnlm.__version__)"

"""fairseq-knnlm: kNN-LM (Khandelwal et al. 2020) as a fairseq user-dir plugin.

    fairseq-eval-lm DATA --path CKPT --user-dir fairseq_knnlm --knnlm ...

Importing the package registers the kNN-LM options on fairseq's language_modeling task and
wires the scorer into fairseq-eval-lm (plugin/, the only code that imports fairseq); the
stages below it (store, index, scoring, adaptive, search, offline, explain) need neither
fairseq nor a GPU. docs/architecture.md draws them and the files between them.
"""

import os

__version__ = "0.1.0"
# set by processes that only need the plain modules (index-build workers): importing fairseq
# and torch costs ~300 MB of RSS per process
NO_FAIRSEQ_ENV = "FAIRSEQ_KNNLM_NO_FAIRSEQ"

# idle OpenMP threads spin; when small FAISS calls alternate with torch work (pointer runs)
# spinning threads take the cores from the work. PASSIVE makes idle threads sleep. libgomp
# reads it when it loads: after this line where this package is imported before torch (the
# knnlm-* tools); in eval-lm torch loads first, and search/retriever.py's torch_threads and
# faiss_threads set the thread counts around the gathers and the searches instead.
# Set the variable yourself to choose otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if os.environ.get(NO_FAIRSEQ_ENV) != "1":
    try:
        import fairseq  # noqa: F401
    except ImportError:  # the plain modules work without fairseq
        pass
    else:
        from fairseq_knnlm.plugin import (
            eval_lm_patch,  # noqa: F401  (registration only)
            generate_patch,  # noqa: F401  (registration only)
            task,  # noqa: F401  (registration only)
        )


def __getattr__(name: str):  # noqa: ANN202  (lazy: the API imports fairseq)
    if name == "KNNLM":
        from fairseq_knnlm.plugin.api import KNNLM

        return KNNLM
    raise AttributeError(f"module 'fairseq_knnlm' has no attribute {name!r}")

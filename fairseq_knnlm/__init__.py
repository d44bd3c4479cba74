"""fairseq-knnlm: kNN-LM (Khandelwal et al. 2020) as a fairseq user-dir plugin.

    fairseq-eval-lm DATA --path CKPT --user-dir fairseq_knnlm --knnlm ...

Importing the package registers the kNN-LM options on fairseq's language_modeling task and
wires the scorer into fairseq-eval-lm; the maths lives in plain modules (datastore, index,
knn, cache, sweep) that need neither fairseq nor a GPU.
"""

__version__ = "0.1.0"

try:
    import fairseq  # noqa: F401
except ImportError:  # the plain modules work without fairseq
    pass
else:
    from . import eval_lm_patch, task  # noqa: F401  (registration only)

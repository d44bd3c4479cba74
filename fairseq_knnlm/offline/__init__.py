"""offline: what is done from a saved pass without searching again: the saved-neighbours format
and the sweeps over k, lambda, T, cache and pointer thresholds (sweep), lambda-model inputs,
fitting and replay (lambda_replay). Imports store, scoring, adaptive; no fairseq."""

"""offline: what is done from a saved pass without searching again: the saved-neighbours
file set (neighbours), the sweeps over k, lambda, T, cache and pointer thresholds (sweep),
lambda-model inputs, fitting runs and replay (lambda_replay). Imports store, scoring,
adaptive; no fairseq."""

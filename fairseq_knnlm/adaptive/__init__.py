"""adaptive: retrieval that adapts per token: the pointer policy, its lockstep stepping and
RetoMaton's clusters (pointers); lambda models: features (lambda_features), heads, the model
and the log-space mixing (lambda_model), fitting maths (lambda_fit) and the model file
(lambda_file). Imports store and scoring; no fairseq."""

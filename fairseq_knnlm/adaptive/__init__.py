"""adaptive: retrieval that adapts per token: the pointer policy, its lockstep stepping and
RetoMaton's clusters (pointers); lambda models: features, heads, fitting maths and the model
file (lambda_model). Imports store and scoring; no fairseq."""

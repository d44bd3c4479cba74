"""search: the retriever (FAISS or exact torch search over a datastore, exact L2 from stored
keys, p_kNN of a batch, streams with pointers). Comes after adaptive in the import order
because the retriever steps the pointer policy (adaptive.pointers.run_streams) with its own
search. Imports store, index, scoring, adaptive; no fairseq."""

"""store: the datastore on disk: growable raw memmaps (memmaps), the meta record and its
validation (meta), the writer and reader (datastore), sharded datastores read as one
(shards). Imports errors and flags only; no torch model, no fairseq."""

"""index: the FAISS index of a datastore: settings and kinds (IVFPQ, fast-scan, flat, ...),
training sample, in-RAM and on-disk builds with resume, loading (nprobe, mmap, GPU) and
search (build). Imports store; no fairseq."""

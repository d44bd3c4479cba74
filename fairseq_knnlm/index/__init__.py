"""index: the FAISS index of a datastore: settings and kinds (IVFPQ, fast-scan, flat, ...;
kinds), training sample and in-RAM build with resume (build), the on-disk build over worker
processes (ondisk), loading (nprobe, mmap, GPU) and search (load). Imports store; no
fairseq."""

"""explain: knnlm-explain's per-token document (document), the self-contained HTML page (html)
and the Section 6 aggregates (aggregate). Imports store and scoring; no fairseq."""

"""scoring: the maths of one token's score: p_kNN from distances and the interpolation of Eq.
2-3 (knn), the continuous cache (cache), and the check that no non-finite score is printed
(finite). Imports store (row gathers); no fairseq."""

"""Dataclass options of the plugin. fairseq turns each field into a flag (``dstore_mmap`` ->
``--dstore-mmap``) with its help text, for ``fairseq-eval-lm --user-dir fairseq_knnlm``.

Flag names follow the authors' fairseq 0.9 fork (urvashik/knnlm) so that its users can move
over; defaults are the paper's WikiText-103 settings unless a comment says otherwise.
"""


from dataclasses import dataclass, field
from typing import Optional

from fairseq.tasks.language_modeling import LanguageModelingConfig

from fairseq_knnlm.flags import DEFAULT_KEYTYPE

DEFAULT_MIN_POINTERS = 64


@dataclass
class KNNLMOptions:
    # ---- datastore dump (save-keys) ----
    save_knnlm_dstore: bool = field(default=False, metadata={
        "help": "write a kNN-LM datastore (keys, next-token values, positions, meta) for "
                "the --gen-subset while evaluating"})
    dstore_mmap: Optional[str] = field(default=None, metadata={
        "help": "datastore prefix to write: PREFIX_keys.npy, PREFIX_vals.npy, PREFIX_pos.npy, "
                "PREFIX_meta.json"})
    dstore_fp16: bool = field(default=False, metadata={
        "help": "store keys as float16 (halves disk; distances are still computed in fp32)"})
    knn_keytype: str = field(default=DEFAULT_KEYTYPE, metadata={
        "help": "hidden state used as key f(c) (paper Table 5): ffn_input_after_ln (best; "
                "the authors' name: last_ffn_input), ffn_input_before_ln, ffn_output, "
                "attn_input_after_ln, attn_input_before_ln, attn_output, model_output, "
                "model_output_after_ln; ':LAYER' picks a layer"})
    dstore_size: Optional[int] = field(default=None, metadata={
        "help": "the authors' datastore size flag, not needed (the meta file has the size): "
                "with --knnlm it must equal the datastore's size; with a dump it is only "
                "compared with the number of entries written"})
    # ---- kNN-LM scoring ----
    knnlm: bool = field(default=False, metadata={
        "help": "interpolate the LM with a kNN distribution over a datastore (paper Eq. 3)"})
    dstore_filename: Optional[str] = field(default=None, metadata={
        "help": "datastore prefix to search (as written by --dstore-mmap)"})
    indexfile: Optional[str] = field(default=None, metadata={
        "help": "FAISS index built by knnlm-build-index from that datastore"})
    k: int = field(default=1024, metadata={"help": "neighbours retrieved per token (paper: 1024)"})
    lmbda: float = field(default=0.25, metadata={
        "help": "kNN interpolation weight lambda (paper: 0.25 in domain, 0.65 domain adaptation)"})
    probe: int = field(default=32, metadata={"help": "IVF lists probed per query (paper: 32)"})
    knn_temp: float = field(default=1.0, metadata={
        "help": "softmax temperature over -distance (paper: 1; small models like ~10)"})
    knn_sim_func: str = field(default="l2", metadata={
        "help": "l2: squared L2 recomputed from full-precision keys (paper's best); faiss_l2 "
                "(the authors' name: do_not_recomp_l2): FAISS's quantized distances (faster, "
                "worse); dot: inner product"})
    move_dstore_to_mem: bool = field(default=False, metadata={
        "help": "copy the keys into RAM instead of memory-mapping them"})
    no_load_keys: bool = field(default=False, metadata={
        "help": "do not open the keys (only valid with --knn-sim-func faiss_l2 / "
                "do_not_recomp_l2)"})
    knn_gpu: bool = field(default=False, metadata={
        "help": "search on the GPU (needs a CUDA FAISS build)"})
    knn_mmap_index: bool = field(default=False, metadata={
        "help": "memory-map the FAISS index (IO_FLAG_MMAP) instead of reading it into RAM"})
    knn_engine: str = field(default="local", metadata={
        "help": "where the kNN search runs: local (this process; a sharded index as faiss "
                "IndexShards) or ray (one Ray actor per shard of a sharded index, built by "
                "knnlm-build-index --shards N / --engine ray; docs/ray.md)"})
    ray_address: Optional[str] = field(default=None, metadata={
        "help": "with --knn-engine ray: the Ray cluster to join (default: RAY_ADDRESS, else "
                "an embedded local Ray started for the run)"})
    knn_save_neighbors: Optional[str] = field(default=None, metadata={
        "help": "save retrieved neighbours (ids, distances, LM log-probs) to this prefix for "
                "offline sweeps with knnlm-sweep; with --knn-pointers also the queries and "
                "each token's mode, for knnlm-sweep --pointer-thresholds"})
    knn_torch_exact: bool = field(default=False, metadata={
        "help": "exact search with torch over the keys held in memory instead of a FAISS "
                "index (--indexfile not needed): float32 keys on the CPU, float16 on the GPU "
                "with --knn-gpu (for keys that fit in GPU memory, without faiss-gpu)"})
    # ---- fewer searches: pointers (RetoMaton, Alon et al. 2022) ----
    knn_pointers: bool = field(default=False, metadata={
        "help": "follow pointers: the datastore rows after the previous token's neighbours "
                "whose value was the token seen become this token's candidates; search only "
                "when fewer than --knn-min-pointers are alive. Logs 'kNN-LM searches: S of N "
                "tokens (x%%)' at the end"})
    knn_min_pointers: int = field(default=DEFAULT_MIN_POINTERS, metadata={
        "help": "with --knn-pointers: use the pointers as the neighbours (exact distances "
                "from the keys, or from the index's codes with faiss_l2) when at least this "
                "many are alive, else search; above --k it always searches (= plain kNN-LM)"})
    knn_stream_len: int = field(default=0, metadata={
        "help": "with --knn-pointers: step each row's scored tokens as streams of at most "
                "this many tokens, all together (rows x len/N queries per FAISS call instead "
                "of one per row); each stream starts without pointers (one search more per "
                "stream, counted in the searches line). 0: a row is one stream"})
    knn_clusters: Optional[str] = field(default=None, metadata={
        "help": "with --knn-pointers: cluster files (knnlm-clusters) "
                "so that each pointer stands for the members of its cluster (RetoMaton); "
                "--knn-min-pointers then counts these candidates"})
    knn_clusters_limit: int = field(default=0, metadata={
        "help": "with --knn-clusters: at most this many candidates per token (its pointers, "
                "then their clusters' members), each measured exactly at a pointer step; "
                "fewer cost less per step. 0: 2 x --k (RetoMaton's)"})
    # ---- adaptive lambda (Drozdov et al. 2022, He et al. 2021) ----
    knn_lambda_model: Optional[str] = field(default=None, metadata={
        "help": "a lambda per token from this model (knnlm-fit-lambda) instead of --lmbda; "
                "--k, --knn-temp and --knn-sim-func must be those it was fitted for"})
    knn_skip_below: float = field(default=0.0, metadata={
        "help": "with --knn-lambda-model: no kNN search where the lambda the model predicts "
                "before searching (its gate: LM entropy, max log-prob, context frequency) is "
                "below this; the LM alone scores those tokens. 0 searches every token"})
    # ---- continuous cache (Grave et al. 2017) ----
    knn_cache: bool = field(default=False, metadata={
        "help": "interpolate a continuous cache over the recent history of the evaluated "
                "text; its hidden state is the --knn-keytype state (not the final layer output "
                "of Grave et al.), so --cache-theta depends on the key type"})
    cache_lmbda: float = field(default=0.1, metadata={"help": "cache interpolation weight"})
    cache_theta: float = field(default=0.05, metadata={
        "help": "cache flatness theta in exp(theta h.h_i) (tune on validation)"})
    cache_length: int = field(default=512, metadata={
        "help": "how many previous positions the cache holds (<= --context-window to be full)"})
    # ---- diagnostics ----
    knn_debug: bool = field(default=False, metadata={
        "help": "print the full traceback of kNN-LM errors (bad flags, missing or mismatched "
                "files), which are otherwise reported in one line; or set FAIRSEQ_KNNLM_DEBUG=1"})


@dataclass
class KNNLanguageModelingConfig(LanguageModelingConfig, KNNLMOptions):
    """fairseq's language_modeling options plus the kNN-LM ones (all off by default)."""

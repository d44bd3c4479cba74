"""Every rule on a kNN-LM flag, in one place: plain functions that raise a FlagError naming
the flag, run before anything is opened or loaded.

``check_flags`` checks an eval-lm run's options (the task config, or any object with the
KNNLMOptions fields): ranges, and the flags each option needs. The rules a value obeys
wherever it is given (a k, a temperature, a lambda, a probe count) are the small
``require_*`` functions that ``check_flags``, the retriever and the offline tools share. The
key types (``--knn-keytype``) are named here too, for the key capture (plugin hooks) and the
datastore checks.

Plain Python: imports nothing but errors.py, so every stage may call it.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from fairseq_knnlm.errors import FlagError

# name -> (module attribute of the layer or decoder, "input" or "output", description)
KEY_TYPES: dict[str, str] = {
    "ffn_input_after_ln": "input of the FFN's first linear layer, after its LayerNorm "
    "(paper Table 5 best)",
    "ffn_input_before_ln": "the residual stream entering the FFN block, before its LayerNorm",
    "ffn_output": "output of the FFN (second linear layer), before dropout and residual",
    "attn_input_after_ln": "input of self-attention after its LayerNorm (MHSA input after LN)",
    "attn_input_before_ln": "the layer's input, before the self-attention LayerNorm",
    "attn_output": "output of self-attention, before dropout and residual",
    "model_output": "output of the layer (for the last layer: the model output before the "
    "final LayerNorm)",
    "model_output_after_ln": "the decoder's final output after its final LayerNorm "
    "(last layer only)",
}
DEFAULT_KEYTYPE = "ffn_input_after_ln"
# the authors' fork (urvashik/knnlm) names the paper's key 'last_ffn_input'
KEYTYPE_ALIASES: dict[str, str] = {"last_ffn_input": "ffn_input_after_ln"}


def parse_keytype(spec: str) -> tuple[str, int]:
    """'ffn_input_after_ln' -> (name, -1); 'ffn_output:2' -> (name, 2); aliases resolved
    ('last_ffn_input' -> ('ffn_input_after_ln', -1))."""
    name, _, layer = spec.partition(":")
    name = KEYTYPE_ALIASES.get(name, name)
    if name not in KEY_TYPES:
        valid = ", ".join(sorted(KEY_TYPES))
        raise ValueError(f"unknown key type {spec!r}; valid key types: {valid} "
                         "(optionally ':LAYER', e.g. ffn_input_after_ln:-1)")
    try:
        layer_idx = int(layer) if layer else -1
    except ValueError:
        raise ValueError(f"bad layer in key type {spec!r}: {layer!r} is not an integer") from None
    if name == "model_output_after_ln" and layer and layer_idx != -1:
        raise ValueError("model_output_after_ln exists only after the last layer")
    return name, layer_idx


def resolve_keytype(spec: str, num_layers: int) -> tuple[str, int]:
    """The state a key type names in a model of ``num_layers`` layers: (name, 0-based layer).

    'ffn_input_after_ln', 'ffn_input_after_ln:-1', 'last_ffn_input' and (2 layers)
    'ffn_input_after_ln:1' all give ('ffn_input_after_ln', 1): compare these, not the text."""
    name, layer = parse_keytype(spec)
    if not -num_layers <= layer < num_layers:
        raise ValueError(f"key type {spec!r}: the model has {num_layers} layers")
    return name, layer % num_layers



# ---- rules one value obeys wherever it is given ----

def _require(ok: bool, message: str) -> None:
    if not ok:
        raise FlagError(message)


def _in_unit_interval(x: float) -> bool:
    return math.isfinite(x) and 0.0 <= x <= 1.0


def require_positive_int(value: int, flag: str, what: str = "") -> None:
    """``flag`` must be an integer >= 1 (k, probe, lengths)."""
    _require(value >= 1, f"{flag} must be >= 1{what}, got {value}")


def require_temperature(value: float, flag: str) -> None:
    """A kNN temperature: finite and > 0."""
    _require(math.isfinite(value) and value > 0, f"{flag} must be > 0, got {value}")


def require_temperatures(values: Sequence[float], flag: str) -> None:
    """A list of kNN temperatures: at least one, each finite and > 0."""
    _require(bool(values) and all(math.isfinite(t) and t > 0 for t in values),
             f"{flag} must be finite and > 0, got {list(values)}")


def require_lambda(value: float, flag: str) -> None:
    """An interpolation weight: in [0, 1]."""
    _require(_in_unit_interval(value), f"{flag} must be in [0, 1], got {value}")


SIM_FUNCS = ("l2", "faiss_l2", "dot")
# other names for --knn-sim-func: the authors' fork calls FAISS's distances do_not_recomp_l2
SIM_FUNC_ALIASES = {"do_not_recomp_l2": "faiss_l2"}


def normalize_sim_func(name: str) -> str:
    """The canonical --knn-sim-func name ('do_not_recomp_l2' -> 'faiss_l2'); FlagError for
    an unknown one."""
    canon = SIM_FUNC_ALIASES.get(name, name)
    if canon not in SIM_FUNCS:
        names = ", ".join((*SIM_FUNCS, *SIM_FUNC_ALIASES))
        raise FlagError(f"--knn-sim-func must be one of {names}, got {name!r}")
    return canon


def check_retrieval_flags(k: int, probe: int, temperature: float, sim_func: str,
                          load_keys: bool, torch_exact: bool, has_index: bool) -> str:
    """What a kNN search needs (eval-lm's --knnlm, the retriever, the Python API); returns
    the distance's canonical name."""
    sim = normalize_sim_func(sim_func)
    _require(has_index or torch_exact, "--knnlm needs --dstore-filename PREFIX and "
             "--indexfile INDEX (or --knn-torch-exact)")
    require_positive_int(k, "--k")
    require_positive_int(probe, "--probe", " (IVF lists searched per query)")
    require_temperature(temperature, "--knn-temp")
    _require(load_keys or sim == "faiss_l2",
             f"--no-load-keys leaves no keys to compute '{sim_func}' distances from: "
             "use --knn-sim-func faiss_l2 or drop --no-load-keys")
    _require(not (torch_exact and not load_keys),
             "--knn-torch-exact searches the keys held in memory: drop --no-load-keys")
    return sim


ENGINES = ("local", "ray")


def check_engine_flags(engine: str, ray_address: Optional[str], torch_exact: bool,
                       gpu: bool, engine_flag: str = "--knn-engine") -> None:
    """Where the search (or build) runs: 'local' (this process) or 'ray' (one actor per
    shard of a sharded index, search/ray_search.py); --ray-address only with ray."""
    _require(engine in ENGINES, f"{engine_flag} must be one of {', '.join(ENGINES)}, "
             f"got {engine!r}")
    _require(not ray_address or engine == "ray",
             f"--ray-address names the Ray cluster of {engine_flag} ray: add "
             f"{engine_flag} ray or drop --ray-address")
    if engine == "ray":
        _require(not torch_exact, f"--knn-torch-exact searches in this process: drop it or "
                 f"{engine_flag} ray")
        _require(not gpu, f"{engine_flag} ray searches the shards on the Ray workers' CPUs: "
                 "drop --knn-gpu")


def check_shards_flag(shards: Optional[int], engine: str, gpu: bool) -> None:
    """knnlm-build-index's --shards / --engine: a sharded build (one index per slice)."""
    check_engine_flags(engine, None, False, False, engine_flag="--engine")
    if shards is not None:
        _require(shards >= 0, f"--shards must be >= 1 (or 0: the datastore's own shards), "
                 f"got {shards}")
    sharded = engine == "ray" or shards is not None
    _require(not (sharded and gpu), "--shards / --engine ray build on CPU: drop --gpu")


# ---- an eval-lm run's options ----

def check_flags(t: Any) -> None:
    """Range of every numeric kNN-LM flag, and the flags each option needs, for the options
    that are on; a FlagError naming the flag. ``t`` is the task config (or any object with
    the KNNLMOptions fields)."""
    try:
        parse_keytype(t.knn_keytype)
    except ValueError as e:
        raise FlagError(f"--knn-keytype: {e}") from None
    if t.dstore_size is not None:
        _require(t.dstore_size >= 1, f"--dstore-size must be >= 1, got {t.dstore_size}")
    if t.save_knnlm_dstore:
        _require(bool(t.dstore_mmap), "--save-knnlm-dstore needs --dstore-mmap PREFIX")
    if t.knnlm:
        sim = check_retrieval_flags(t.k, t.probe, t.knn_temp, t.knn_sim_func,
                                    not t.no_load_keys, bool(t.knn_torch_exact),
                                    bool(t.dstore_filename and t.indexfile))
        require_lambda(t.lmbda, "--lmbda")
        check_engine_flags(getattr(t, "knn_engine", "local"), getattr(t, "ray_address", None),
                           bool(t.knn_torch_exact), bool(t.knn_gpu))
        if t.knn_pointers:
            _require(t.knn_min_pointers >= 0,
                     f"--knn-min-pointers must be >= 0, got {t.knn_min_pointers}")
            _require(t.knn_stream_len >= 0,
                     f"--knn-stream-len must be >= 0 (0: a row is one stream), got "
                     f"{t.knn_stream_len}")
            _require(not (t.knn_gpu and sim == "faiss_l2" and not t.knn_torch_exact),
                     "--knn-pointers with FAISS distances (faiss_l2) reads the index's codes, "
                     "which a GPU index does not offer: drop --knn-gpu or use --knn-sim-func l2")
            _require(not (getattr(t, "knn_engine", "local") == "ray" and sim == "faiss_l2"),
                     "--knn-pointers with FAISS distances (faiss_l2) reads the index's codes, "
                     "which stay with the Ray actors: use --knn-sim-func l2")
    else:
        _require(not t.knn_save_neighbors,
                 "--knn-save-neighbors saves what the kNN search retrieved: it needs --knnlm")
        _require(not t.knn_pointers, "--knn-pointers steers the kNN search: it needs --knnlm")
        _require(not t.knn_torch_exact, "--knn-torch-exact is a kNN search: it needs --knnlm")
        _require(not t.knn_lambda_model,
                 "--knn-lambda-model weighs the kNN distribution: it needs --knnlm")
        _require(getattr(t, "knn_engine", "local") == "local" and
                 not getattr(t, "ray_address", None),
                 "--knn-engine / --ray-address choose where the kNN search runs: they need "
                 "--knnlm")
    require_lambda(t.knn_skip_below, "--knn-skip-below")
    _require(not (t.knn_skip_below > 0 and t.knn_save_neighbors),
             "--knn-save-neighbors with --knn-skip-below would save no neighbours for the "
             "skipped tokens: save a pass without --knn-skip-below and replay thresholds with "
             "knnlm-sweep --lambda-model MODEL --skip-below ...")
    _require(t.knn_skip_below == 0.0 or bool(t.knn_lambda_model),
             "--knn-skip-below thresholds a lambda model's prediction: it needs "
             "--knn-lambda-model MODEL")
    _require(not t.knn_stream_len or (t.knnlm and t.knn_pointers),
             "--knn-stream-len splits the pointers' streams: it needs --knnlm --knn-pointers")
    _require(not t.knn_clusters or (t.knnlm and t.knn_pointers),
             "--knn-clusters extends the pointers: it needs --knnlm --knn-pointers")
    _require(not t.knn_clusters_limit or bool(t.knn_clusters),
             "--knn-clusters-limit caps the clusters' candidates: it needs --knn-clusters")
    _require(t.knn_clusters_limit >= 0,
             f"--knn-clusters-limit must be >= 0 (0: 2 x --k), got {t.knn_clusters_limit}")
    _require(not (t.knn_clusters_limit and t.knn_lambda_model),
             "--knn-clusters-limit: lambda models are fitted for the default limit (2 x --k): "
             "drop --knn-clusters-limit or --knn-lambda-model")
    if t.knn_cache:
        require_lambda(t.cache_lmbda, "--cache-lmbda")
        require_temperature(t.cache_theta, "--cache-theta")
        require_positive_int(t.cache_length, "--cache-length")


def check_subset_not_empty(data: str, subset: str) -> None:
    """--gen-subset must hold tokens: a binarized split of 0 tokens (DATA/SUBSET.bin of 0
    bytes) would die in fairseq's reader ('cannot mmap an empty file')."""
    first = str(data).split(":")[0]
    path = Path(first) / f"{subset}.bin"
    _require(not (path.exists() and path.stat().st_size == 0),
             f"--gen-subset {subset}: {path} is empty (0 tokens): nothing to score")


def check_dstore_size(dstore_size: Optional[int], actual: int, prefix: Any) -> None:
    """--dstore-size (the authors' flag) must agree with the datastore's meta file, if given."""
    _require(dstore_size is None or dstore_size == actual,
             f"--dstore-size {dstore_size} disagrees with the datastore {prefix}, which has "
             f"{actual} entries (its meta file's size): fix --dstore-size or drop it")


def check_model_overrides(model_overrides: Optional[str], keytype: str) -> None:
    """The authors' dump command also passes --model-overrides "{'knn_keytype': ...}" (their
    fork read the key type from the model's args). Here --knn-keytype decides: an override
    that names another key type is refused rather than silently ignored."""
    try:
        overrides = ast.literal_eval(model_overrides or "{}")
    except (ValueError, SyntaxError):  # fairseq itself reports what it cannot read
        return
    other = overrides.get("knn_keytype") if isinstance(overrides, dict) else None
    if other is None:
        return
    try:
        same = parse_keytype(str(other)) == parse_keytype(keytype)
    except ValueError as e:
        raise FlagError(f"--model-overrides knn_keytype: {e}") from None
    _require(same, f"--model-overrides sets knn_keytype {other!r} but --knn-keytype is "
             f"{keytype!r}: the key type comes from --knn-keytype; give both the same value")


def canonical_keytype(spec: str) -> str:
    """The key type as a datastore's meta records it: an alias replaced by the name it stands
    for ('last_ffn_input' -> 'ffn_input_after_ln'), a ':LAYER' suffix kept as given."""
    name, _ = parse_keytype(spec)
    _, sep, layer = spec.partition(":")
    return name + sep + layer


def same_key_state(a: str, b: str, num_layers: int) -> bool:
    """Whether two key types name the same hidden state of a model with ``num_layers`` layers
    ('ffn_input_after_ln:1' and 'last_ffn_input' do in a 2-layer model)."""
    try:
        return resolve_keytype(a, num_layers) == resolve_keytype(b, num_layers)
    except ValueError:  # a layer the model does not have: not the model's state
        return False


def clusters_limit(k: int, limit: int = 0) -> int:
    """The most candidates the clusters give a token (--knn-clusters-limit, sweep's
    --clusters-limit): ``limit``, or 2 x k for 0 (RetoMaton's, the default)."""
    return int(limit) if limit > 0 else 2 * int(k)

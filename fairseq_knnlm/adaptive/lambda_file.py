"""The lambda model file: one ``.npz`` holding a JSON ``meta`` (kind, heads' features, k,
temperature, distance, dictionary size, what it was fitted on and how well it did) and the
arrays (the frequency table, each head's parameters). ``save_model``; ``load_model`` validates
format, version, shapes and finiteness and refuses a damaged file in one line;
``check_model_flags`` refuses a model used with other k, T, distance or pointer flags.
"""

from __future__ import annotations

import json
import logging
import math
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from fairseq_knnlm.adaptive.lambda_features import FEATURES
from fairseq_knnlm.adaptive.lambda_model import (
    BucketHead,
    ConstantHead,
    Head,
    LambdaModel,
    MixHead,
    MLPHead,
)
from fairseq_knnlm.errors import FlagError

logger = logging.getLogger(__name__)
PathLike = Union[str, Path]

FORMAT = "fairseq-knnlm lambda model"
VERSION = 1


# ---- the model file ----

def _head_from(meta: dict[str, Any], arrays: dict[str, np.ndarray], path: PathLike) -> Head:
    kind = meta.get("kind")
    if kind == "constant":
        return ConstantHead(float(meta["lambda"]))
    if kind == "buckets":
        return BucketHead(str(meta["feature"]), arrays["edges"].astype(np.float32),
                          arrays["lambdas"].astype(np.float32))
    if kind in ("mlp", "mix"):
        n = int(meta["layers"])
        cls = MixHead if kind == "mix" else MLPHead
        return cls(tuple(meta["features"]), arrays["mean"].astype(np.float32),
               arrays["std"].astype(np.float32),
               [arrays[f"w{i}"].astype(np.float32) for i in range(n)],
               [arrays[f"b{i}"].astype(np.float32) for i in range(n)])
    raise FlagError(f"{path}: unknown head kind {kind!r}")


def save_model(path: PathLike, model: LambdaModel) -> None:
    """Write the model as one .npz (meta JSON + arrays), atomically."""
    path = Path(path)
    head_meta, head_arrays = model.head.params()
    arrays: dict[str, np.ndarray] = {"freq": np.asarray(model.freq, np.float32)}
    arrays.update({f"head.{k}": v for k, v in head_arrays.items()})
    gate_meta = None
    if model.gate is not None:
        gate_meta, gate_arrays = model.gate.params()
        arrays.update({f"gate.{k}": v for k, v in gate_arrays.items()})
    meta = {"format": FORMAT, "version": VERSION, "kind": model.kind, "head": head_meta,
            "gate": gate_meta, "k": model.k, "temperature": model.temperature,
            "dist": model.dist, "vocab_size": int(len(model.freq)),
            "temps": list(model.temps), "min_pointers": model.min_pointers,
            "clusters": model.clusters, **model.info}
    arrays["meta"] = np.array(json.dumps(meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    tmp.replace(path)


def load_model(path: PathLike, flag: str = "--knn-lambda-model") -> LambdaModel:
    """A model written by ``save_model``; FlagError naming ``flag`` and the file otherwise."""
    path = Path(path)
    if not path.exists():
        raise FlagError(f"{flag} {path}: file not found (fit one with knnlm-fit-lambda)")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("a .npy array, not an .npz archive")
        with z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("meta")))
        if not isinstance(meta, dict):
            raise ValueError("its meta is not a JSON object")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise FlagError(f"{flag} {path}: not a lambda model file ({e})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise FlagError(f"{flag} {path}: not a lambda model file of version {VERSION} "
                        f"(format {meta.get('format')!r}, version {meta.get('version')!r})")
    try:
        model = _model_from(meta, arrays, path)
    except FlagError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
        raise FlagError(f"{flag} {path}: a damaged lambda model file ({type(e).__name__}: "
                        f"{e})") from None
    problem = _model_problem(model)
    if problem:
        raise FlagError(f"{flag} {path}: a damaged lambda model file ({problem})")
    return model


def _model_from(meta: dict[str, Any], arrays: dict[str, np.ndarray], path: PathLike
                ) -> LambdaModel:
    head = _head_from(meta["head"], {k[5:]: v for k, v in arrays.items()
                                     if k.startswith("head.")}, path)
    gate = (_head_from(meta["gate"], {k[5:]: v for k, v in arrays.items()
                                      if k.startswith("gate.")}, path)
            if meta.get("gate") else None)
    info = {k: v for k, v in meta.items() if k not in (
        "format", "version", "kind", "head", "gate", "k", "temperature", "dist", "vocab_size",
        "temps", "min_pointers", "clusters")}
    temps = meta.get("temps", [])
    if not isinstance(temps, list):
        raise TypeError(f"temps must be a list, got {temps!r}")
    return LambdaModel(kind=str(meta["kind"]), head=head, gate=gate, k=int(meta["k"]),
                       temperature=float(meta["temperature"]), dist=str(meta["dist"]),
                       freq=arrays["freq"].astype(np.float32), info=info,
                       temps=tuple(float(t) for t in temps),
                       min_pointers=(int(meta["min_pointers"])
                                     if meta.get("min_pointers") is not None else None),
                       clusters=(int(meta["clusters"])
                                 if meta.get("clusters") is not None else None))


def _head_problem(head: Head, what: str, n_out: int) -> Optional[str]:
    """What is wrong with a loaded head's parameters (None: nothing)."""
    if isinstance(head, ConstantHead):
        ok = math.isfinite(head.lmbda) and 0.0 <= head.lmbda <= 1.0
        return None if ok else f"{what} lambda {head.lmbda}"
    if isinstance(head, BucketHead):
        if head.feature not in FEATURES:
            return f"{what} reads an unknown feature {head.feature!r}"
        if len(head.lambdas) != len(head.edges) + 1:
            return f"{what}: {len(head.lambdas)} lambdas for {len(head.edges)} edges"
        lam = head.lambdas
        if not (np.isfinite(lam).all() and (lam >= 0).all() and (lam <= 1).all()):
            return f"{what} lambdas outside [0, 1]"
        return None if np.isfinite(head.edges).all() else f"{what} edges not finite"
    unknown = [f for f in head.features if f not in FEATURES]
    if unknown:
        return f"{what} reads unknown features {unknown}"
    width = len(head.features)
    if head.mean.shape != (width,) or head.std.shape != (width,):
        return f"{what}: mean/std of shape {head.mean.shape}, {width} features"
    for i, (w, b) in enumerate(zip(head.weights, head.biases)):
        if w.ndim != 2 or w.shape[1] != width or b.shape != (w.shape[0],):
            return f"{what} layer {i}: weights {w.shape}, biases {b.shape}, input {width}"
        width = w.shape[0]
    if width != n_out:
        return f"{what}: {width} outputs, {n_out} expected"
    arrays = [head.mean, head.std, *head.weights, *head.biases]
    if not all(np.isfinite(a).all() for a in arrays):
        return f"{what} parameters not finite"
    return None


def _model_problem(m: LambdaModel) -> Optional[str]:
    if m.k < 1:
        return f"k {m.k}"
    if not (math.isfinite(m.temperature) and m.temperature > 0):
        return f"temperature {m.temperature}"
    if any(not (math.isfinite(t) and t > 0) for t in m.temps):
        return f"temps {list(m.temps)}"
    if m.dist not in ("l2", "faiss_l2"):
        return f"distance {m.dist!r}"
    if m.freq.ndim != 1 or not len(m.freq) or not np.isfinite(m.freq).all():
        return "frequency table missing or not finite"
    if isinstance(m.head, MixHead) and not m.temps:
        return "a mixture head without temps"
    n_out = 1 + len(m.temps) if isinstance(m.head, MixHead) else 1
    problem = _head_problem(m.head, "head", n_out)
    if problem is None and m.gate is not None:
        problem = _head_problem(m.gate, "gate", 1)
        if problem is None and isinstance(m.gate, MixHead):
            problem = "gate is a mixture head"
    return problem


def check_model_flags(model: LambdaModel, path: PathLike, k: int, temperature: float,
                      sim_func: str, vocab_size: Optional[int] = None,
                      min_pointers: Optional[int] = None, clusters: Optional[int] = None
                      ) -> None:
    """The run's --k, --knn-temp and --knn-sim-func must be those the model was fitted for
    (its lambdas are only right for that p_kNN), and so must its pointer policy
    (``min_pointers``: the run's --knn-min-pointers, None without --knn-pointers;
    ``clusters``: the number of clusters of its --knn-clusters, None without) for a model
    fitted with pointers."""
    diffs = []
    if model.min_pointers is not None:
        if min_pointers != model.min_pointers:
            run = (f"--knn-min-pointers {min_pointers}" if min_pointers is not None
                   else "no --knn-pointers")
            diffs.append(f"{run} (fitted for --knn-pointers --knn-min-pointers "
                         f"{model.min_pointers})")
        if clusters != model.clusters:
            run = (f"--knn-clusters of {clusters} clusters" if clusters is not None
                   else "no --knn-clusters")
            fit = (f"fitted with --knn-clusters of {model.clusters} clusters"
                   if model.clusters is not None else "fitted on plain pointers")
            diffs.append(f"{run} ({fit})")
    if k != model.k:
        diffs.append(f"--k {k} (fitted for {model.k})")
    if not math.isclose(temperature, model.temperature, rel_tol=1e-9):
        diffs.append(f"--knn-temp {temperature:g} (fitted for {model.temperature:g})")
    if sim_func != model.dist:
        diffs.append(f"--knn-sim-func {sim_func} (fitted for {model.dist})")
    if vocab_size is not None and vocab_size != len(model.freq):
        diffs.append(f"dictionary of {vocab_size} types (fitted for {len(model.freq)})")
    if diffs:
        raise FlagError(f"--knn-lambda-model {path} does not fit this run: "
                        + "; ".join(diffs))

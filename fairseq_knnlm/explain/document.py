"""knnlm-explain's logic: the neighbours behind every kNN-LM prediction (paper Fig. 6).

Plain functions, no fairseq at module level; the CLI (cli/explain.py) wires them to
fairseq-eval-lm's own pass:

- ``Collector`` is a runtime observer (``knnlm_main(cfg, knn_observers=[collector])``): it
  keeps the scorer's own numbers (log p_LM, log p_kNN, the interpolated log p) of the tokens
  whose stream position is in the selected range, and each token's ``top`` nearest neighbours
  with their distances and weights in p_kNN. Nothing is recomputed, so the perplexity of the
  kept tokens is eval-lm's.
- ``token_stream`` / ``load_split_stream`` read a split as the token stream the datastore's
  position map indexes (its lines concatenated); ``contexts`` cuts the training context of a
  neighbour from it: the tokens just before the row's position.
- ``build_doc`` makes the JSON document; ``format_table`` (terminal) and
  ``explain_html.render_html`` (one self-contained page) are functions of that document.
- ``explain_aggregate.aggregate`` answers the paper's Section 6 question over many tokens.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from fairseq_knnlm.scoring.knn import KNN_LOGP_FLOOR

logger = logging.getLogger(__name__)

CONTEXT_TOKENS = 20  # training-context tokens shown before each neighbour


# ---- per-token numbers, from the scorer ----

def neighbour_weights(dists: torch.Tensor, valid: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """(n, k) weight of each neighbour in p_kNN: softmax of -d/T over the real neighbours
    (knn.knn_log_prob's normaliser); 0 for FAISS's empty slots."""
    logits = (-dists.float() / temperature).masked_fill(~valid, float("-inf"))
    w = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(w, nan=0.0)  # a row without any neighbour


@dataclass
class Neighbours:
    """Some neighbours of each token, closest first: (n, m) arrays, row -1 where none."""

    rows: np.ndarray  # datastore rows
    dists: np.ndarray  # the distances p_kNN used
    weights: np.ndarray  # weight in p_kNN (softmax of -d/T over the k neighbours)
    vals: np.ndarray  # the neighbours' tokens
    ranks: np.ndarray  # 1-based rank by distance among the k neighbours

    def take(self, order: np.ndarray) -> Neighbours:
        return Neighbours(*(getattr(self, f)[order] for f in NBR_FIELDS))

    @staticmethod
    def concat(parts: Sequence[Neighbours]) -> Neighbours:
        return Neighbours(*(np.concatenate([getattr(p, f) for p in parts]) for f in NBR_FIELDS))


NBR_FIELDS = ("rows", "dists", "weights", "vals", "ranks")


def top_neighbours(ids: np.ndarray, dists: torch.Tensor, vals: torch.Tensor,
                   valid: torch.Tensor, temperature: float, top: int,
                   among: Optional[torch.Tensor] = None) -> Neighbours:
    """The ``top`` closest of each query's k neighbours (only those in ``among`` if given,
    e.g. the ones carrying the target), with their weights in p_kNN and ranks among all k."""
    w = neighbour_weights(dists, valid, temperature)
    d = dists.float().masked_fill(~valid, float("inf"))
    rank = torch.argsort(torch.argsort(d, dim=1, stable=True), dim=1) + 1
    pick = valid if among is None else valid & among
    order = torch.argsort(d.masked_fill(~pick, float("inf")), dim=1, stable=True)
    order = order[:, :min(top, d.shape[1])]
    ok = torch.gather(pick, 1, order).cpu().numpy()
    rows = np.take_along_axis(np.asarray(ids), order.cpu().numpy(), axis=1)

    def g(t: torch.Tensor) -> np.ndarray:
        return torch.gather(t, 1, order).cpu().numpy()

    return Neighbours(rows=np.where(ok, rows, -1).astype(np.int64),
                      dists=g(d).astype(np.float32), weights=g(w).astype(np.float32),
                      vals=g(vals).astype(np.int64), ranks=g(rank).astype(np.int64))


def _no_neighbours(n: int) -> Neighbours:
    return Neighbours(rows=np.full((n, 0), -1, np.int64), dists=np.zeros((n, 0), np.float32),
                      weights=np.zeros((n, 0), np.float32), vals=np.full((n, 0), -1, np.int64),
                      ranks=np.zeros((n, 0), np.int64))


@dataclass
class TokenTable:
    """The kept tokens, one array entry each, in stream order."""

    positions: np.ndarray  # (n,) offset in the scored subset's token stream
    targets: np.ndarray  # (n,) token ids
    lm_logp: np.ndarray  # (n,) float64 log p_LM (nats)
    knn_logp: Optional[np.ndarray]  # (n,) log p_kNN
    cache_logp: Optional[np.ndarray]  # (n,) log p_cache (with --knn-cache)
    logp: np.ndarray  # (n,) the interpolated log p eval-lm scores
    nbrs: Neighbours  # the closest neighbours
    tgt_nbrs: Neighbours  # the closest neighbours whose token is the target
    n_tgt_nbrs: np.ndarray  # (n,) how many of the k neighbours carry the target

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def gain(self) -> np.ndarray:
        """log p - log p_LM: how much the datastore (and cache) moved each target's log p."""
        return self.logp - self.lm_logp


def perplexity(logp: np.ndarray) -> float:
    """exp of the mean negative log-likelihood (what eval-lm prints as 2**loss in bits)."""
    return float(math.exp(-float(np.mean(logp)))) if len(logp) else float("nan")


class Collector:
    """Runtime observer: keeps the scorer's numbers of the tokens at stream positions in
    [start, end) (end None: to the end of the stream)."""

    def __init__(self, start: int = 0, end: Optional[int] = None, top: int = 5,
                 temperature: float = 1.0) -> None:
        self.start, self.end, self.top, self.temperature = start, end, top, temperature
        self._parts: list[dict[str, Any]] = []
        self.seen = 0  # tokens scored by the pass, kept or not

    def __call__(self, batch: Any) -> None:  # plugin.batch.ScoredBatch
        pos = np.asarray(batch.positions, dtype=np.int64)
        self.seen += len(pos)
        if (pos < 0).any():
            raise RuntimeError("the scorer gave tokens without a stream position")
        keep = pos >= self.start
        if self.end is not None:
            keep &= pos < self.end
        if not keep.any():
            return
        idx = torch.from_numpy(np.nonzero(keep)[0])

        def pick(t: Optional[torch.Tensor]) -> Optional[np.ndarray]:
            return None if t is None else t.detach().cpu()[idx].double().numpy()

        targets = batch.targets.cpu()[idx]
        part: dict[str, Any] = {
            "positions": pos[keep], "targets": targets.numpy().astype(np.int64),
            "lm_logp": pick(batch.lm_logp), "knn_logp": pick(batch.knn_logp),
            "cache_logp": pick(batch.cache_logp), "logp": pick(batch.final_logp)}
        r = batch.retrieved
        if r is not None:
            sel = idx.to(r.dists.device)
            ids, d, v, ok = np.asarray(r.ids)[keep], r.dists[sel], r.nbr_vals[sel], r.valid[sel]
            match = (v == targets.to(v.device).unsqueeze(1)) & ok
            part["nbrs"] = top_neighbours(ids, d, v, ok, self.temperature, self.top)
            part["tgt_nbrs"] = top_neighbours(ids, d, v, ok, self.temperature, self.top,
                                              among=match)
            part["n_tgt_nbrs"] = match.sum(1).cpu().numpy().astype(np.int64)
        else:
            n = int(keep.sum())
            part.update(nbrs=_no_neighbours(n), tgt_nbrs=_no_neighbours(n),
                        n_tgt_nbrs=np.zeros(n, np.int64))
        self._parts.append(part)

    def table(self) -> TokenTable:
        """The kept tokens in stream order (each position once)."""
        if not self._parts:
            raise ValueError("no scored token in the selected range")
        cat: dict[str, Any] = {}
        for name, first in self._parts[0].items():
            vals = [p[name] for p in self._parts]
            cat[name] = (None if first is None else Neighbours.concat(vals)
                         if isinstance(first, Neighbours) else np.concatenate(vals))
        order = np.argsort(cat["positions"], kind="stable")
        cat = {k: (None if v is None else v.take(order) if isinstance(v, Neighbours)
                   else v[order]) for k, v in cat.items()}
        if len(np.unique(cat["positions"])) != len(order):
            raise RuntimeError("a stream position was scored twice")
        return TokenTable(**cat)


# ---- token streams and training contexts ----

def token_stream(dataset: Any) -> np.ndarray:
    """A split's token stream: its items (lines, each ending with eos) concatenated, the
    coordinates of the datastore's position map (TokenBlockDataset's). A fairseq mmap dataset
    whose items fill its .bin file in order is memory-mapped on its own (not through the
    dataset's buffer, which the dataset closes when it is collected)."""
    path, index = getattr(dataset, "_path", None), getattr(dataset, "_index", None)
    if path is not None and index is not None and Path(f"{path}.bin").is_file():
        sizes = np.asarray(index.sizes, dtype=np.int64)
        dtype = np.dtype(index.dtype)
        ptrs = np.asarray(getattr(index, "_pointers", []), dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) * dtype.itemsize
        total = int(sizes.sum())
        if total and len(ptrs) == len(sizes) and np.array_equal(ptrs, starts):
            return np.memmap(f"{path}.bin", dtype=dtype, mode="r", shape=(total,))
    parts = [np.asarray(dataset[i]) for i in range(len(dataset))]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def load_split_stream(data_dir: Union[str, Path], split: str) -> Optional[np.ndarray]:
    """The token stream of DATA/<split> (None if that split is not there)."""
    from fairseq.data import data_utils
    from fairseq.data.dictionary import Dictionary

    dictionary = Dictionary.load(str(Path(data_dir) / "dict.txt"))
    ds = data_utils.load_indexed_dataset(str(Path(data_dir) / split), dictionary)
    return None if ds is None else token_stream(ds)


def contexts(stream: np.ndarray, positions: np.ndarray, n: int) -> list[np.ndarray]:
    """The (up to) ``n`` tokens just before each position of the stream."""
    return [np.asarray(stream[max(0, int(p) - n):int(p)]) for p in positions]


def words(symbols: Sequence[str], ids: Any) -> list[str]:
    return [symbols[int(i)] if 0 <= int(i) < len(symbols) else f"<{int(i)}>" for i in ids]


# ---- the document (JSON), terminal table, HTML ----

@dataclass
class TrainText:
    """Where neighbour contexts come from: the datastore's split stream and the datastore's
    position map, or the reason they are unavailable."""

    stream: Optional[np.ndarray]
    pos: Any  # the datastore's position map (rows -> offsets in ``stream``)
    unavailable: str = ""
    context_tokens: int = CONTEXT_TOKENS


def build_doc(table: TokenTable, symbols: Sequence[str], train: TrainText,
              info: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The JSON document: perplexity of the kept tokens and, per token, its numbers, its
    closest neighbours and its closest neighbours that carry the target (row, distance,
    weight, token, training context)."""
    rows = np.concatenate([table.nbrs.rows.ravel(), table.tgt_nbrs.rows.ravel()])
    uniq = np.unique(rows[rows >= 0])
    pos = np.asarray(train.pos[uniq], dtype=np.int64) if len(uniq) else np.zeros(0, np.int64)
    if train.stream is not None:
        texts = [" ".join(words(symbols, c))
                 for c in contexts(train.stream, pos, train.context_tokens)]
    else:
        texts = [train.unavailable] * len(uniq)
    ctx = {int(r): (int(p), c) for r, p, c in zip(uniq, pos, texts)}

    def listing(nb: Neighbours, i: int, tgt: int) -> list[dict[str, Any]]:
        out = []
        for j in range(nb.rows.shape[1]):
            r = int(nb.rows[i, j])
            if r < 0:
                continue
            v = int(nb.vals[i, j])
            p, c = ctx[r]
            out.append({"row": r, "distance": float(nb.dists[i, j]),
                        "weight": float(nb.weights[i, j]), "token": words(symbols, [v])[0],
                        "token_id": v, "match": v == tgt, "rank": int(nb.ranks[i, j]),
                        "position": p, "context": c})
        return out

    tokens = []
    for i in range(len(table)):
        tgt = int(table.targets[i])
        t = {"position": int(table.positions[i]), "token": words(symbols, [tgt])[0],
             "token_id": tgt, "lm_logp": float(table.lm_logp[i]),
             "knn_logp": None if table.knn_logp is None else float(table.knn_logp[i]),
             "logp": float(table.logp[i]), "gain": float(table.gain[i]),
             "neighbors": listing(table.nbrs, i, tgt),
             "n_target_neighbors": int(table.n_tgt_nbrs[i]),
             "target_neighbors": listing(table.tgt_nbrs, i, tgt)}
        if table.cache_logp is not None:
            t["cache_logp"] = float(table.cache_logp[i])
        tokens.append(t)
    doc = {"perplexity": perplexity(table.logp), "lm_perplexity": perplexity(table.lm_logp),
           "n_tokens": len(table), **(info or {}), "tokens": tokens}
    if train.unavailable:
        doc["context_note"] = train.unavailable
    return doc


def _clip(s: str, width: int) -> str:
    return s if len(s) <= width else s[:width - 1] + "…"


def marked(gains: np.ndarray, n: int) -> dict[int, str]:
    """'++' on the ``n`` tokens kNN helped most (gain > 0), '--' on the ``n`` it hurt most."""
    order = np.argsort(gains, kind="stable")
    out = {int(i): "--" for i in order[:n] if gains[i] < 0}
    out.update({int(i): "++" for i in order[::-1][:n] if gains[i] > 0})
    return out


def _fmt_knn(x: Optional[float]) -> str:
    """log p_kNN for the table: 'none' where no neighbour carries the target (the scorer's
    finite floor, knn.KNN_LOGP_FLOOR)."""
    if x is None:
        return "-"
    return "none" if x <= KNN_LOGP_FLOOR / 2 else f"{x:.2f}"


def format_table(doc: dict[str, Any], max_rows: int = 40, marks: int = 3,
                 details: int = 1, context_words: int = 8) -> str:
    """The terminal view: a line per token (all of them if at most ``max_rows``, else the
    ones marked) with the closest neighbour, the ``marks`` tokens kNN helped (++) and hurt
    (--) most marked, then the neighbours of the ``details`` most helped and hurt tokens."""
    toks = doc["tokens"]
    gains = np.array([t["gain"] for t in toks], dtype=np.float64)
    mark = marked(gains, marks)
    lines = [f"{doc.get('subset', 'tokens')} positions {toks[0]['position']}-"
             f"{toks[-1]['position']} ({len(toks)} tokens): LM ppl {doc['lm_perplexity']:.2f}"
             f" -> kNN-LM ppl {doc['perplexity']:.2f}" + settings_text(doc)]
    shown = range(len(toks))
    if len(toks) > max_rows:
        shown = sorted(mark)
        lines.append(f"(showing the {len(shown)} marked tokens of {len(toks)}; --json / --html "
                     "have all)")
    lines.append(f"{'pos':>7} {'token':<14} {'lnp_LM':>7} {'lnp_kNN':>8} {'lnp':>7} "
                 f"{'gain':>6}    nearest neighbour: token <- training context")
    for i in shown:
        t = toks[i]
        nb = t["neighbors"][0] if t["neighbors"] else None
        near = ""
        if nb is not None:
            ctx = " ".join(nb["context"].split()[-context_words:])
            near = f"{_clip(nb['token'], 12)}{'=' if nb['match'] else ' '} <- …{ctx}"
        lines.append(f"{t['position']:>7} {_clip(t['token'], 14):<14} {t['lm_logp']:>7.2f} "
                     f"{_fmt_knn(t['knn_logp']):>8} {t['logp']:>7.2f} {t['gain']:>+6.2f} "
                     f"{mark.get(i, ''):<2}  {near}".rstrip())
    lines.append("gain = ln p - ln p_LM (nats); ++/-- the tokens kNN helped/hurt most; "
                 "'=' the neighbour's token is the target")
    order = np.argsort(gains, kind="stable")
    picks = [(int(i), "helped most") for i in order[::-1][:details] if gains[i] > 0]
    picks += [(int(i), "hurt most") for i in order[:details] if gains[i] < 0]
    for i, why in picks:
        lines += [""] + _neighbour_lines(toks[i], why, doc.get("k", "k"))
    return "\n".join(lines)


def settings_text(doc: dict[str, Any]) -> str:
    s = [f"{name}={doc[key]:g}" for key, name in (("k", "k"), ("lmbda", "λ"), ("knn_temp", "T"))
         if isinstance(doc.get(key), (int, float))]
    return f" ({', '.join(s)})" if s else ""


def _neighbour_lines(t: dict[str, Any], why: str, k: Any = "k", shown: int = 3) -> list[str]:
    p_lm, p = math.exp(t["lm_logp"]), math.exp(t["logp"])
    head = f"{t['token']!r} at {t['position']} ({why}): p_LM {p_lm:.4f} -> p {p:.4f}"
    if t["knn_logp"] is not None:
        head += f" (p_kNN {math.exp(t['knn_logp']):.4f})"
    out = [head, "  closest neighbours:"] + [_nb_line(nb) for nb in t["neighbors"]]
    n = t.get("n_target_neighbors", 0)
    tgt = [nb for nb in t.get("target_neighbors", []) if nb["rank"] > len(t["neighbors"])]
    out.append(f"  {n} of the {k} neighbours carry {t['token']!r}" +
               ("; the closest of the others:" if tgt and n else ""))
    return out + [_nb_line(nb) for nb in tgt[:shown]]


def _nb_line(nb: dict[str, Any]) -> str:
    hit = "=" if nb["match"] else " "
    return (f"  {nb['rank']:>5}. row {nb['row']:<9} d {nb['distance']:<8.3g} "
            f"w {nb['weight']:.3f} …{nb['context']} [{nb['token']}]{hit}")


# ---- restricting the pass to the blocks that hold the selected tokens ----

def blocks_for_range(slices: np.ndarray, start: int, end: int) -> tuple[int, int]:
    """Blocks [b0, b1) of eval-lm's pass (``slices``: (n, 2) stream [start, end) of each
    block, in order) that hold the stream positions [start, end)."""
    slices = np.asarray(slices, dtype=np.int64)
    b0 = int(np.searchsorted(slices[:, 1], start, side="right"))
    b1 = int(np.searchsorted(slices[:, 0], end, side="left"))
    return b0, max(b1, b0 + 1)


def covering_shard(n_blocks: int, b0: int, b1: int) -> tuple[int, int]:
    """(num_shards, shard_id) whose contiguous run of blocks (shards.contiguous_range) holds
    blocks [b0, b1) with the fewest other blocks: eval-lm with --num-shards/--shard-id then
    scores only that run, each block behind its true left context."""
    from fairseq_knnlm.store.shards import contiguous_range

    for shards in range(n_blocks, 0, -1):
        base, rem = divmod(n_blocks, shards)
        big = rem * (base + 1)  # the first rem shards have base + 1 blocks
        sid = b0 // (base + 1) if b0 < big else rem + (b0 - big) // max(1, base)
        lo, hi = contiguous_range(n_blocks, shards, sid)
        if lo <= b0 and hi >= b1:
            return shards, sid
    return 1, 0


# ---- raw text, binarized like fairseq-preprocess ----

def text_lines(text: str) -> list[str]:
    """Lines of a text as fairseq-preprocess reads a file (a final newline ends the last
    line; empty lines stay: they are a lone eos)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def binarize_text(lines: Sequence[str], dict_path: Union[str, Path],
                  out_prefix: Union[str, Path]) -> dict[str, int]:
    """Write lines as fairseq-preprocess --only-source --srcdict DICT does (mmap dataset,
    eos after every line, unknown words as <unk>); returns lines, tokens, unknown words."""
    from fairseq.data import indexed_dataset
    from fairseq.data.dictionary import Dictionary
    from fairseq.tokenizer import tokenize_line

    d = Dictionary.load(str(dict_path))
    builder = indexed_dataset.make_builder(f"{out_prefix}.bin", impl="mmap",
                                           vocab_size=len(d))
    stats = {"lines": 0, "tokens": 0, "unknown": 0}

    def count(word: str, idx: int) -> None:
        if idx == d.unk_index and word != d.unk_word:
            stats["unknown"] += 1

    for line in lines:
        ids = d.encode_line(line, line_tokenizer=tokenize_line, add_if_not_exist=False,
                            consumer=count, append_eos=True)
        builder.add_item(ids)
        stats["lines"] += 1
        stats["tokens"] += len(ids)
    builder.finalize(f"{out_prefix}.idx")
    return stats


def train_text(data_dir: Path, ds: Any, context_tokens: int) -> Any:
    """Where neighbour contexts come from: DATA/<the datastore's split>, or why not."""
    split = ds.meta.subset
    stream = load_split_stream(data_dir, split) if split else None
    note = ""
    if stream is None:
        note = f"training context unavailable: {data_dir / (split or '?')} not found"
        logger.warning("%s", note)
    elif len(stream) <= int(np.max(ds.pos[:min(ds.size, 1 << 16)], initial=0)):
        stream, note = None, (f"training context unavailable: {data_dir / split} is not the "
                              "split the datastore was dumped from (too short)")
        logger.warning("%s", note)
    return TrainText(stream=stream, pos=ds.pos, unavailable=note, context_tokens=context_tokens)

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
- ``build_doc`` makes the JSON document; ``format_table`` (terminal) and ``render_html``
  (one self-contained page) are functions of that document.
- ``aggregate`` answers the paper's Section 6 question over many tokens: which targets gain
  from retrieval, by their frequency in the training data and by the longest n-gram ending at
  them that occurs in train; ``format_aggregate`` and ``plot_aggregate`` show it.
"""

from __future__ import annotations

import html
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from .knn import KNN_LOGP_FLOOR

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

    def __call__(self, batch: Any) -> None:  # runtime.ScoredBatch
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
             f" -> kNN-LM ppl {doc['perplexity']:.2f}" + _settings(doc)]
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


def _settings(doc: dict[str, Any]) -> str:
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


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;
color:#1d1d1f;background:#fff}
header{padding:10px 16px;border-bottom:1px solid #ddd;background:#fafafa}
header h1{font-size:17px;margin:0 0 4px}
header p{margin:2px 0;font-size:13px;color:#444}
.legend span{display:inline-block;padding:0 6px;margin-right:4px;border-radius:3px}
main{display:flex;gap:12px;padding:12px 16px;align-items:flex-start}
#text{flex:3;line-height:1.9;font-size:15px;min-width:0}
#panel{flex:2;position:sticky;top:8px;font-size:13px;border:1px solid #ccc;border-radius:6px;
padding:8px 10px;background:#fcfcfc;max-height:92vh;overflow:auto;min-width:0}
.tok{padding:1px 2px;border-radius:3px;cursor:pointer;white-space:pre}
.tok:hover,.tok:focus{outline:2px solid #333}
.tok.sel{outline:2px solid #0645ad}
.eos{color:#999}
#panel h2{font-size:15px;margin:2px 0 6px}
#panel h3{font-size:13px;margin:10px 0 2px}
#panel table.num td{padding:1px 8px 1px 0}
.nb{border-top:1px solid #e4e4e4;padding:5px 0}
.nb .meta{color:#555;font-size:12px}
.nb .ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;word-break:break-word}
mark{padding:0 3px;border-radius:3px;font-weight:600}
mark.hit{background:#9be29b}
mark.miss{background:#e4e4e4}
.hint{color:#777}
"""

_JS = """
(function(){
var doc=JSON.parse(document.getElementById('knnlm-data').textContent);
var text=document.getElementById('text'),panel=document.getElementById('panel');
var gainScale=doc.color_scale.gain,lossScale=doc.color_scale.loss;
var spans=[],pinned=-1;
function colour(g){
 if(g>=0){return 'rgba(40,160,40,'+Math.min(1,g/gainScale).toFixed(3)+')';}
 return 'rgba(220,50,47,'+Math.min(1,-g/lossScale).toFixed(3)+')';}
function el(tag,cls,txt){var e=document.createElement(tag);if(cls){e.className=cls;}
 if(txt!==undefined){e.textContent=txt;}return e;}
doc.tokens.forEach(function(t,i){
 var eos=t.token==='</s>';
 var s=el('span','tok'+(eos?' eos':''),eos?'\\u00b6':t.token);
 s.style.background=colour(t.gain);s.dataset.i=i;s.tabIndex=0;
 s.title='gain '+t.gain.toFixed(3);
 text.appendChild(s);text.appendChild(document.createTextNode(' '));
 if(eos){text.appendChild(document.createElement('br'));}
 spans.push(s);});
function fmt(x){return x===null||x===undefined?'-':x.toFixed(3);}
function prob(x){return x===null||x===undefined?'-':Math.exp(x).toPrecision(3);}
function show(i){
 var t=doc.tokens[i];panel.textContent='';
 panel.appendChild(el('h2',null,'\\u201c'+t.token+'\\u201d at position '+t.position));
 var tb=el('table','num'),none=t.knn_logp!==null&&t.knn_logp<=doc.knn_logp_floor/2;
 [['log p_LM',fmt(t.lm_logp),'p_LM '+prob(t.lm_logp)],
  ['log p_kNN',none?'none':fmt(t.knn_logp),none?'no neighbour carries it':
   'p_kNN '+prob(t.knn_logp)],
  ['log p',fmt(t.logp),'p '+prob(t.logp)],
  ['gain',fmt(t.gain),'\\u00d7'+Math.exp(t.gain).toPrecision(3)]].forEach(function(r){
  var tr=el('tr');r.forEach(function(c){tr.appendChild(el('td',null,c));});tb.appendChild(tr);});
 panel.appendChild(tb);
 panel.appendChild(el('p','hint',t.neighbors.length+' nearest neighbours (of k='+doc.k+
  '), closest first; the highlighted token follows the training context'+
  (doc.context_note?' ('+doc.context_note+')':'')));
 t.neighbors.forEach(function(nb){panel.appendChild(nbDiv(nb));});
 var more=(t.target_neighbors||[]).filter(function(nb){return nb.rank>t.neighbors.length;});
 panel.appendChild(el('h3',null,t.n_target_neighbors+' of the '+doc.k+
  ' neighbours carry \u201c'+t.token+'\u201d'+(more.length?'; the closest others:':'')));
 more.forEach(function(nb){panel.appendChild(nbDiv(nb));});}
function nbDiv(nb){
 var d=el('div','nb');
 d.appendChild(el('div','meta','#'+nb.rank+'  row '+nb.row+'  d '+nb.distance.toPrecision(4)+
  '  weight '+nb.weight.toFixed(3)+(nb.match?'  = target':'')));
 var c=el('div','ctx','\u2026'+nb.context+' ');
 c.appendChild(el('mark',nb.match?'hit':'miss',nb.token));d.appendChild(c);
 return d;}
function select(i){if(pinned>=0){spans[pinned].classList.remove('sel');}
 pinned=i;if(i>=0){spans[i].classList.add('sel');show(i);}}
function idx(e){var s=e.target.closest?e.target.closest('.tok'):null;
 return s?parseInt(s.dataset.i,10):-1;}
text.addEventListener('mouseover',function(e){var i=idx(e);if(i>=0&&pinned<0){show(i);}});
text.addEventListener('focusin',function(e){var i=idx(e);if(i>=0&&pinned<0){show(i);}});
text.addEventListener('click',function(e){var i=idx(e);if(i<0){return;}
 select(pinned===i?-1:i);});
var h=location.hash.replace('#',''),start=-1;
if(h==='best'||h==='selftest'){var b=-1;doc.tokens.forEach(function(t,i){
  if(b<0||t.gain>doc.tokens[b].gain){b=i;}});start=b;}
else if(h.indexOf('pos=')===0){var p=parseInt(h.slice(4),10);
 doc.tokens.forEach(function(t,i){if(t.position===p){start=i;}});}
if(start>=0){select(start);spans[start].scrollIntoView({block:'center'});}
if(h==='selftest'&&start>=0){var st=doc.tokens[start];
 var ok=panel.querySelectorAll('.nb').length>=st.neighbors.length&&
  panel.querySelectorAll('mark').length===panel.querySelectorAll('.nb').length&&
  panel.textContent.indexOf(st.token)>=0;
 document.body.dataset.selftest=ok?'ok':'fail';}
document.body.dataset.ready=String(spans.length);
})();
"""

_ERRORS_JS = """window.__errors=[];window.addEventListener('error',function(e){
window.__errors.push(String(e.message));document.body.dataset.errors=window.__errors.join(' | ');});
"""


def _script_json(obj: Any) -> str:
    """JSON safe inside a <script> element (no '</script>', no HTML parsing surprises)."""
    s = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return (s.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def color_scale(nats: float = 1.0) -> dict[str, float]:
    """One scale for gains and losses: full colour at +-``nats`` (p x2.7 at 1 nat). kNN-LM
    cannot lower a target's log p by more than -ln(1 - lambda) (0.29 nats at lambda 0.25),
    so its losses stay pale next to its gains, as they are."""
    return {"gain": nats, "loss": nats}


def _shown_path(path: str) -> str:
    """A path relative to the working directory when it lies below it (shorter headers)."""
    p, cwd = Path(path).resolve(), Path.cwd().resolve()
    return str(p.relative_to(cwd)) if p.is_relative_to(cwd) else str(path)


def render_html(doc: dict[str, Any], title: str = "kNN-LM explained") -> str:
    """One self-contained page (no network: inline CSS, JS and data): the text coloured by the
    gain of each token; hovering a token shows its neighbours, clicking pins it. URL hash
    ``#pos=N`` or ``#best`` selects a token on load."""
    data = {k: v for k, v in doc.items() if k != "aggregate"}
    data["color_scale"] = color_scale()
    data["knn_logp_floor"] = KNN_LOGP_FLOOR
    sc = data["color_scale"]
    summary = (f"{doc.get('subset', '')} positions {doc['tokens'][0]['position']}–"
               f"{doc['tokens'][-1]['position']}: {doc['n_tokens']} tokens; LM perplexity "
               f"{doc['lm_perplexity']:.2f} → kNN-LM perplexity {doc['perplexity']:.2f}"
               f"{_settings(doc)}")
    src = " · ".join(f"{k}: {_shown_path(doc[k])}" for k in ("checkpoint", "dstore")
                     if doc.get(k))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>{html.escape(title)}</title>
<style>{_CSS}</style>
<script>{_ERRORS_JS}</script>
</head><body>
<header><h1>{html.escape(title)}</h1>
<p>{html.escape(summary)}</p>
<p>{html.escape(src)}</p>
<p class="legend">colour = ln p − ln p<sub>LM</sub>:
<span style="background:rgba(40,160,40,1)">≥ +{sc['gain']:g} nat</span>
<span style="background:rgba(40,160,40,.3)">+{sc['gain'] * .3:g}</span>
<span style="background:rgba(220,50,47,.3)">−{sc['loss'] * .3:g}</span>
<span style="background:rgba(220,50,47,1)">≤ −{sc['loss']:g} nat</span>
<span class="hint">hover a token for its neighbours, click to pin</span></p>
</header>
<main><div id="text"></div>
<aside id="panel"><p class="hint">Hover or click a token.</p></aside></main>
<script type="application/json" id="knnlm-data">{_script_json(data)}</script>
<script>{_JS}</script>
</body></html>
"""


# ---- aggregate view (paper Section 6) ----

FREQ_EDGES = (1, 10, 100, 1_000, 10_000)  # train-count buckets: 0, 1-9, ..., >= 10K


def freq_labels(edges: Sequence[int] = FREQ_EDGES) -> list[str]:
    """'0', '1-9', '10-99', ..., '>= 10,000' for the default edges."""
    labels = ["0"] + [f"{lo:,}-{hi - 1:,}" for lo, hi in zip(edges[:-1], edges[1:])]
    return labels + [f">= {edges[-1]:,}"]


def freq_bucket(counts: np.ndarray, edges: Sequence[int] = FREQ_EDGES) -> np.ndarray:
    """Bucket index of each train count: 0 for unseen, then one per decade."""
    return np.searchsorted(np.asarray(edges), counts, side="right")


_MIX = np.uint64(0x9E3779B97F4A7C15)


def _suffix_hashes(stream: np.ndarray, n: int) -> np.ndarray:
    """64-bit hash of the n-gram ending at each position >= n - 1 of ``stream``."""
    s = np.asarray(stream).astype(np.uint64) + np.uint64(1)
    m = len(s) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):  # tokens n-1-j positions before the end
            h = h * _MIX + s[j:j + m]
            h ^= h >> np.uint64(29)
    return h


def longest_train_ngram(stream: np.ndarray, positions: np.ndarray, train: np.ndarray,
                        max_n: int = 8, chunk: int = 1 << 22) -> np.ndarray:
    """For each position p of ``stream``: the largest n <= max_n such that the n tokens
    stream[p-n+1 .. p] (the target and the n-1 before it) occur in ``train`` (0: the target
    never occurs). n-grams are compared by 64-bit hashes; train is read in chunks."""
    positions = np.asarray(positions, dtype=np.int64)
    train = np.asarray(train)
    stream = np.asarray(stream)
    counts = np.bincount(train.astype(np.int64), minlength=int(stream.max(initial=0)) + 1)
    best = (counts[stream[positions].astype(np.int64)] > 0).astype(np.int64)
    alive = np.nonzero(best == 1)[0]
    for n in range(2, max_n + 1):
        alive = alive[positions[alive] >= n - 1]
        if not len(alive):
            break
        q = _suffix_hashes(stream, n)[positions[alive] - (n - 1)]
        found = np.zeros(len(q), dtype=bool)
        for s in range(0, max(1, len(train) - n + 1), chunk):
            found |= np.isin(q, _suffix_hashes(train[s:s + chunk + n - 1], n))
        alive = alive[found]
        best[alive] = n
    return best


def ngram_labels(max_n: int) -> list[str]:
    """'0 (token unseen)', '1 (token only)', '2', '3', '4', '5-7', '>= 8' for max_n 8."""
    if max_n < 2:
        raise ValueError(f"max_n must be >= 2, got {max_n}")
    labels = ["0 (token unseen)", "1 (token only)"] + [str(n) for n in range(2, min(5, max_n))]
    if max_n > 5:
        labels.append("5" if max_n == 6 else f"5-{max_n - 1}")
    return labels + [f">= {max_n}"]


def ngram_bucket(longest: np.ndarray, max_n: int) -> np.ndarray:
    """Index into ngram_labels(max_n) of each longest n-gram length."""
    b = np.minimum(longest, 5 if max_n > 5 else max_n)
    return np.where(longest >= max_n, len(ngram_labels(max_n)) - 1, b)


def bucket_rows(labels: Sequence[str], bucket: np.ndarray, lm: np.ndarray,
                final: np.ndarray) -> list[dict[str, Any]]:
    """Per bucket: tokens, share, LM and kNN-LM perplexity, mean gain (nats), share of
    tokens helped, share of the total gain."""
    gain = final - lm
    total = float(gain.sum())
    out = []
    for b, label in enumerate(labels):
        m = bucket == b
        n = int(m.sum())
        out.append({"bucket": label, "tokens": n, "share": n / max(1, len(lm)),
                    "lm_ppl": perplexity(lm[m]) if n else None,
                    "knnlm_ppl": perplexity(final[m]) if n else None,
                    "mean_gain": float(gain[m].mean()) if n else None,
                    "helped": float((gain[m] > 0).mean()) if n else None,
                    "gain_share": float(gain[m].sum()) / total if n and total else None})
    return out


@dataclass
class Aggregate:
    n_tokens: int
    lm_ppl: float
    knnlm_ppl: float
    by_frequency: list[dict[str, Any]]
    by_ngram: list[dict[str, Any]]
    top_types: list[dict[str, Any]]
    max_n: int
    train_tokens: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def aggregate(table: TokenTable, stream: np.ndarray, train: np.ndarray,
              symbols: Sequence[str], max_n: int = 8, top_types: int = 10) -> Aggregate:
    """Which targets gain from retrieval: by their count in the datastore's split, by the
    longest n-gram ending at them that occurs there, and the types with the largest total
    gain. ``stream`` is the scored subset's token stream (table.positions index it)."""
    counts = np.bincount(np.asarray(train).astype(np.int64),
                         minlength=max(len(symbols), int(table.targets.max()) + 1))
    tc = counts[table.targets]
    by_freq = bucket_rows(freq_labels(), freq_bucket(tc), table.lm_logp, table.logp)
    longest = longest_train_ngram(stream, table.positions, train, max_n=max_n)
    by_ngram = bucket_rows(ngram_labels(max_n), ngram_bucket(longest, max_n), table.lm_logp,
                           table.logp)
    sums = np.bincount(table.targets, weights=table.gain, minlength=len(counts))
    seen = np.bincount(table.targets, minlength=len(counts))
    tops = []
    for t in np.argsort(-sums, kind="stable")[:top_types]:
        if seen[t] == 0:
            break
        tops.append({"token": words(symbols, [t])[0], "count": int(seen[t]),
                     "train_count": int(counts[t]), "mean_gain": float(sums[t] / seen[t]),
                     "total_gain": float(sums[t])})
    return Aggregate(n_tokens=len(table), lm_ppl=perplexity(table.lm_logp),
                     knnlm_ppl=perplexity(table.logp), by_frequency=by_freq, by_ngram=by_ngram,
                     top_types=tops, max_n=max_n, train_tokens=int(len(train)))


def _cell(x: Optional[float], fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _bucket_table(rows: list[dict[str, Any]], first: str) -> list[str]:
    out = [f"| {first} | tokens | share | LM ppl | kNN-LM ppl | mean gain (nats) | "
           "helped | share of total gain |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["tokens"]:
            continue
        out.append(f"| {r['bucket']} | {r['tokens']:,} | {_cell(r['share'], '.1%')} | "
                   f"{_cell(r['lm_ppl'], ',.1f')} | {_cell(r['knnlm_ppl'], ',.1f')} | "
                   f"{_cell(r['mean_gain'], '+.3f')} | {_cell(r['helped'], '.0%')} | "
                   f"{_cell(r['gain_share'], '.1%')} |")
    return out


def format_aggregate(agg: Aggregate) -> str:
    """The aggregate view as markdown tables (readable in a terminal too)."""
    lines = [f"{agg.n_tokens:,} tokens: LM ppl {agg.lm_ppl:.2f} -> kNN-LM ppl "
             f"{agg.knnlm_ppl:.2f}; gain = ln p - ln p_LM; datastore split "
             f"{agg.train_tokens:,} tokens", ""]
    lines += _bucket_table(agg.by_frequency, "target's count in train")
    lines += [""] + _bucket_table(agg.by_ngram, "longest n-gram ending at the target "
                                                "that occurs in train")
    lines += ["", "| target type | tokens | count in train | mean gain | total gain |",
              "|---|---|---|---|---|"]
    for t in agg.top_types:
        lines.append(f"| `{t['token']}` | {t['count']:,} | {t['train_count']:,} | "
                     f"{t['mean_gain']:+.3f} | {t['total_gain']:+.1f} |")
    return "\n".join(lines + agg.notes)


def plot_aggregate(agg: Aggregate, path: Union[str, Path], label: str = "") -> Path:
    """Mean gain per bucket (frequency, n-gram), bars annotated with their token counts."""
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, rows, xlabel in ((axes[0], agg.by_frequency, "target's count in train"),
                             (axes[1], agg.by_ngram, "longest n-gram in train ending at target")):
        rows = [r for r in rows if r["tokens"]]
        names = [r["bucket"] for r in rows]
        vals = [r["mean_gain"] or 0.0 for r in rows]
        bars = ax.bar(range(len(rows)), vals,
                      color=["#2a9d2a" if v >= 0 else "#d9382f" for v in vals])
        for b, r in zip(bars, rows):
            up = b.get_height() >= 0
            ax.annotate(f"{r['tokens']:,}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom" if up else "top", fontsize=7)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean ln p − ln p_LM (nats)")
        ax.axhline(0, color="gray", lw=0.8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{label} which tokens gain from retrieval (bar labels: tokens)".strip(),
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    from .shards import contiguous_range

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

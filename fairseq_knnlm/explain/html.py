"""knnlm-explain's web page: one self-contained HTML file (inline CSS, JS and data, no
network) of an explain document (explain.build_doc): the text coloured by how much the
datastore changed each token's probability; hovering a token shows its neighbours with their
training contexts, clicking pins it.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from fairseq_knnlm.explain.document import settings_text
from fairseq_knnlm.scoring.knn import KNN_LOGP_FLOOR

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
               f"{settings_text(doc)}")
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

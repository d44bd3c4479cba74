"""Open-ended generation with and without kNN-LM (issue #26), measured:

    python benchmarks/generation.py --ckpt runs/wikitext2_quick/checkpoints/checkpoint_best.pt \
        --data runs/wikitext2_quick/data-bin --eval-data DIR --eval-split test \
        --dstore runs/wikitext2_quick/dstore/train --index runs/wikitext2_quick/dstore/train.index \
        --k 1024 --lmbda 0.3 --temp 10 --prompts 200 --out runs/generation/wikitext2.json

Prompts are windows of the eval split's token stream: ``--prompt-len`` tokens (128), then
the true continuation of ``--gen-len`` tokens (64); the windows are spread evenly over the
stream (disjoint when it is long enough; the JSON says). For each prompt: greedy and top-p
(``--top-p`` 0.9, seed ``--seed``) continuations of exactly ``--gen-len`` tokens, from the
base LM and from the kNN-LM (the same model and step: KNNGeneration switched off or on), and
one forced pass over the true continuation giving the log-probability the base LM and the
kNN-LM assign to it.

The text is a token stream whose lines end with eos (WikiText paragraphs, Shakespeare
speeches), so a prompt or a continuation crosses lines; fairseq's SequenceGenerator cannot
take an eos inside a prompt (a forced eos ends the hypothesis), so this script drives the
generator's own per-step call, ``EnsembleModel.forward_decoder`` (the decoder with its
incremental state, then ``get_normalized_probs``: the kNN-LM step of plugin/generation.py),
with its own greedy / top-p choice (fairseq's: pad never chosen; top-p keeps the smallest
set of tokens whose probability reaches p). eos may be generated (it is a newline). The
kNN search is skipped at the prompt's forced steps (their distribution is not used).

Metrics (generation_metrics.py): rep-4 (per continuation, averaged), distinct-2/4 (pooled),
token F1 against the true continuation (averaged), the share of generated 4-grams found in
the datastore's corpus (``--corpus-split`` of ``--data``: the datastore's training text),
and generated tokens/s of each pass (all prompts in one batch, prompt steps included), plus
``--speed-prompts`` prompts decoded one at a time (batch 1, greedy) for tokens/s.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generation_metrics as gm  # noqa: E402

logger = logging.getLogger("benchmarks.generation")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", required=True, help="the model's data-bin (dict.txt, corpus split)")
    p.add_argument("--eval-data", default=None, help="data-bin of the prompts (default --data)")
    p.add_argument("--eval-split", default="test")
    p.add_argument("--corpus-split", default="train",
                   help="split of --data the datastore was dumped from (4-gram lookups)")
    p.add_argument("--dstore", required=True)
    p.add_argument("--index", required=True)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--lmbda", type=float, default=0.25)
    p.add_argument("--temp", type=float, default=1.0)
    p.add_argument("--probe", type=int, default=32)
    p.add_argument("--sim-func", default="l2")
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch", type=int, default=50, help="prompts decoded together")
    p.add_argument("--speed-prompts", type=int, default=5)
    p.add_argument("--hub-prompts", type=int, default=5,
                   help="prompts without a line break generated one at a time through "
                        "KNNLM.generate (fairseq's SequenceGenerator, greedy) for tokens/s")
    p.add_argument("--samples", type=int, default=3, help="side-by-side samples kept")
    p.add_argument("--threads", type=int, default=1,
                   help="torch and FAISS threads (1: on a machine shared with other jobs, "
                        "2 threads of small matrix products waited ~30x longer)")
    p.add_argument("--label", default="")
    p.add_argument("--out", required=True, help="JSON; the markdown table beside it (.md)")
    return p


@torch.no_grad()
def decode(lm: Any, prompts: torch.Tensor, gen_len: int, mode: str, knn: bool,
           targets: Optional[torch.Tensor] = None, top_p: float = 0.9, seed: int = 1,
           ban_eos: bool = False) -> dict[str, Any]:
    """One pass over a batch of prompts (B, P): 'greedy', 'topp' or 'forced' (the
    ``targets`` (B, G) fed token by token). Returns the continuation (B, G), the seconds,
    and for 'forced' the log-probs of the targets under the base LM and the kNN-LM."""
    from fairseq.sequence_generator import EnsembleModel

    g = lm.knn_generation
    d = lm.dictionary
    B, P = prompts.shape
    g.enabled, g.score_prefix, g.prefix_length = knn, False, P
    em = EnsembleModel([lm.model])
    em.eval()
    inc: list[dict] = [{}]
    tokens = torch.full((B, 1 + P + gen_len), d.pad(), dtype=torch.long)
    tokens[:, 0] = d.eos()  # the task's bos for an LM (inference_step)
    tokens[:, 1:1 + P] = prompts
    rng = torch.Generator().manual_seed(seed)
    lm_lp, knn_lp = [], []
    t0 = time.perf_counter()
    for step in range(P + gen_len):
        lp, _ = em.forward_decoder(tokens[:, :step + 1], [], inc, 1.0)
        if step < P:
            continue  # the next token is the prompt's
        j = step - P
        if mode == "forced":
            assert targets is not None
            nxt = targets[:, j]
            lm_lp.append(g.last.lm.gather(1, nxt[:, None])[:, 0].float())
            knn_lp.append(lp.float().gather(1, nxt[:, None])[:, 0])
        else:
            lp = lp.float().clone()
            lp[:, d.pad()] = float("-inf")  # as SequenceGenerator
            if ban_eos:  # as SequenceGenerator before --min-len
                lp[:, d.eos()] = float("-inf")
            if mode == "greedy":
                nxt = lp.argmax(dim=1)
            else:
                probs = lp.exp()
                sp, si = probs.sort(dim=1, descending=True)
                keep = (sp.cumsum(1) - sp) < top_p  # up to the token that reaches p
                sp = sp.masked_fill(~keep, 0.0)
                nxt = si.gather(1, torch.multinomial(sp, 1, generator=rng))[:, 0]
        tokens[:, 1 + P + j] = nxt
    secs = time.perf_counter() - t0
    out: dict[str, Any] = {"tokens": tokens[:, 1 + P:], "seconds": secs}
    if mode == "forced":
        out["lm_logp"] = torch.stack(lm_lp, 1)
        out["knn_logp"] = torch.stack(knn_lp, 1)
    return out


def prompt_windows(stream: np.ndarray, n: int, plen: int, glen: int
                   ) -> tuple[np.ndarray, bool]:
    """Starts of n windows of plen + glen tokens spread evenly over the stream, and whether
    they are disjoint."""
    span = plen + glen
    if len(stream) < span:
        raise SystemExit(f"the eval split has {len(stream)} tokens: fewer than one window")
    starts = np.linspace(0, len(stream) - span, n).round().astype(np.int64)
    return starts, bool(n <= 1 or np.diff(starts).min() >= span)


def run_batches(lm: Any, P: torch.Tensor, T: torch.Tensor, batch: int, **kw: Any
                ) -> dict[str, Any]:
    parts = [decode(lm, P[i:i + batch], T.shape[1], targets=T[i:i + batch], **kw)
             for i in range(0, len(P), batch)]
    out: dict[str, Any] = {"tokens": torch.cat([p["tokens"] for p in parts]),
                           "seconds": sum(p["seconds"] for p in parts)}
    if "lm_logp" in parts[0]:
        out["lm_logp"] = torch.cat([p["lm_logp"] for p in parts])
        out["knn_logp"] = torch.cat([p["knn_logp"] for p in parts])
    return out


def hub_speed(lm: Any, stream: np.ndarray, n: int, plen: int, glen: int) -> dict[str, Any]:
    """Generated tokens/s of ``KNNLM.generate`` (fairseq's SequenceGenerator, greedy, one
    prompt at a time, exactly ``glen`` new tokens: min_len = max_len) on the first ``n``
    windows whose prompt holds no eos (the generator cannot take one), base LM and kNN-LM,
    and whether both continuations equal this script's own greedy loop's (eos banned in
    both, as min_len does)."""
    eos = lm.dictionary.eos()
    starts, s = [], 0
    while len(starts) < n and s + plen + glen <= len(stream):
        if not (stream[s:s + plen] == eos).any():
            starts.append(s)
            s += plen + glen
        else:
            s += 1 + int(np.nonzero(stream[s:s + plen] == eos)[0][-1])
    if not starts:
        return {"prompts": 0}
    out: dict[str, Any] = {"prompts": len(starts)}
    for knn in (False, True):
        secs, same = 0.0, True
        for st in starts:
            prompt = torch.from_numpy(stream[st:st + plen].astype(np.int64))
            t0 = time.perf_counter()
            h = lm.generate(prompt, beam=1, knn=knn, score_prompt=False,
                            max_len_b=plen + glen, min_len=plen + glen)[0]
            secs += time.perf_counter() - t0
            mine = decode(lm, prompt[None], glen, "greedy", knn, ban_eos=True)["tokens"][0]
            same &= bool(torch.equal(h["tokens"][plen:plen + glen], mine))
        out["knnlm" if knn else "base"] = len(starts) * glen / secs
        out["same_as_loop_" + ("knnlm" if knn else "base")] = same
    return out


def metrics(gen: np.ndarray, ref: np.ndarray, corpus: gm.NgramSet) -> dict[str, float]:
    return {"rep4": float(np.mean([gm.rep_n(s, 4) for s in gen])),
            "distinct2": gm.distinct_n(gen, 2), "distinct4": gm.distinct_n(gen, 4),
            "token_f1": float(np.mean([gm.token_f1(s, r) for s, r in zip(gen, ref)])),
            "ngram4_in_corpus": gm.share_in_corpus(gen, corpus)}


def main(argv: Optional[list[str]] = None) -> int:
    a = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(message)s")
    for name in ("fairseq", "fairseq_cli", "fairseq_knnlm", "faiss", "hydra"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from fairseq_knnlm import KNNLM
    from fairseq_knnlm.explain.document import load_split_stream
    from fairseq_knnlm.index.kinds import _faiss

    torch.set_num_threads(a.threads)
    _faiss().omp_set_num_threads(a.threads)

    ckpt = Path(a.ckpt)
    lm = KNNLM.from_pretrained(ckpt.parent, ckpt.name, data_name_or_path=a.data,
                               dstore=a.dstore, index=a.index, k=a.k, lmbda=a.lmbda,
                               temp=a.temp, probe=a.probe, knn_sim_func=a.sim_func)
    stream = load_split_stream(a.eval_data or a.data, a.eval_split)
    corpus_stream = load_split_stream(a.data, a.corpus_split)
    if stream is None or corpus_stream is None:
        raise SystemExit("missing eval or corpus split")
    corpus = gm.NgramSet(corpus_stream, 4, vocab_size=len(lm.dictionary))
    starts, disjoint = prompt_windows(stream, a.prompts, a.prompt_len, a.gen_len)
    win = np.stack([stream[s:s + a.prompt_len + a.gen_len] for s in starts]).astype(np.int64)
    P = torch.from_numpy(win[:, :a.prompt_len])
    T = torch.from_numpy(win[:, a.prompt_len:])
    ref = T.numpy()
    logger.info("%d prompts of %d tokens (%s) from %s/%s (%d tokens)", len(P), a.prompt_len,
                "disjoint" if disjoint else "overlapping", a.eval_data or a.data, a.eval_split,
                len(stream))
    forced = run_batches(lm, P, T, a.batch, mode="forced", knn=True)
    ppl = {"base": gm.perplexity(forced["lm_logp"].double().flatten().tolist()),
           "knnlm": gm.perplexity(forced["knn_logp"].double().flatten().tolist())}
    logger.info("true continuation: base LM ppl %.2f, kNN-LM ppl %.2f", ppl["base"],
                ppl["knnlm"])
    rows, gens = [], {}
    for mode in ("greedy", "topp"):
        for knn in (False, True):
            r = run_batches(lm, P, T, a.batch, mode=mode, knn=knn, top_p=a.top_p, seed=a.seed)
            gen = r["tokens"].numpy()
            gens[(mode, knn)] = gen
            row = {"decoding": "greedy" if mode == "greedy" else f"top-p {a.top_p:g}",
                   "model": "kNN-LM" if knn else "base LM", **metrics(gen, ref, corpus),
                   "tokens_per_s": gen.size / r["seconds"], "seconds": r["seconds"]}
            logger.info("%s", row)
            rows.append(row)
    true_row = {"decoding": "true continuation", "model": "-", **metrics(ref, ref, corpus),
                "tokens_per_s": None, "seconds": None}
    speed = {}
    n1 = min(a.speed_prompts, len(P))
    for knn in (False, True):
        r = run_batches(lm, P[:n1], T[:n1], 1, mode="greedy", knn=knn)
        speed["knnlm" if knn else "base"] = n1 * a.gen_len / r["seconds"]
    logger.info("batch-1 greedy tokens/s: %s", speed)
    hub = hub_speed(lm, stream, a.hub_prompts, a.prompt_len, a.gen_len)
    logger.info("SequenceGenerator, batch 1, greedy: %s", hub)
    d = lm.dictionary

    def text(ids: np.ndarray) -> str:
        return " ".join(d[int(i)] if int(i) != d.eos() else "\\n" for i in ids)

    samples = []
    for i in np.linspace(0, len(P) - 1, min(a.samples, len(P))).round().astype(int):
        samples.append({"prompt_tail": text(P[i, -40:].numpy()), "true": text(ref[i]),
                        **{f"{m}_{'knn' if k else 'base'}": text(g[i])
                           for (m, k), g in gens.items()}})
    res = {"label": a.label, "args": vars(a), "n_prompts": len(P), "disjoint": disjoint,
           "eval_tokens": int(len(stream)), "true_continuation_ppl": ppl, "rows": rows,
           "true_row": true_row, "batch1_greedy_tokens_per_s": speed, "hub_greedy": hub,
           "samples": samples}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return 0


def markdown(res: dict[str, Any]) -> str:
    a = res["args"]
    ppl = res["true_continuation_ppl"]
    lines = [f"**{res['label']}**: {res['n_prompts']} prompts of {a['prompt_len']} tokens "
             f"({'disjoint' if res['disjoint'] else 'overlapping'} windows of the "
             f"{a['eval_split']} split, {res['eval_tokens']} tokens), {a['gen_len']} generated "
             f"tokens; kNN-LM k={a['k']}, λ={a['lmbda']:g}, T={a['temp']:g}, "
             f"probe {a['probe']}, {a['sim_func']} distances; top-p seed {a['seed']}; "
             f"{a['threads']} thread(s).", "",
             f"Perplexity of the true continuation: base LM {ppl['base']:.2f}, kNN-LM "
             f"{ppl['knnlm']:.2f}.", "",
             "| decoding | model | rep-4 ↓ | distinct-2 | distinct-4 | token F1 | 4-grams in "
             "datastore corpus | tokens/s |", "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"] + [res["true_row"]]:
        tps = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] is not None else "-"
        lines.append(f"| {r['decoding']} | {r['model']} | {r['rep4']:.3f} | "
                     f"{r['distinct2']:.3f} | {r['distinct4']:.3f} | {r['token_f1']:.3f} | "
                     f"{r['ngram4_in_corpus']:.3f} | {tps} |")
    s = res["batch1_greedy_tokens_per_s"]
    lines += ["", f"tokens/s: generated tokens over the pass's time, {a['batch']} prompts per "
              f"batch, the {a['prompt_len']} prompt steps included; one prompt at a time "
              f"(greedy, {a['speed_prompts']} prompts): base LM {s['base']:.1f}, kNN-LM "
              f"{s['knnlm']:.1f} tokens/s."]
    h = res.get("hub_greedy") or {}
    if h.get("prompts"):
        same = h["same_as_loop_base"] and h["same_as_loop_knnlm"]
        lines += ["", f"fairseq's SequenceGenerator (`KNNLM.generate`, greedy, one prompt at a "
                  f"time, {h['prompts']} prompts without a line break): base LM "
                  f"{h['base']:.1f}, kNN-LM {h['knnlm']:.1f} tokens/s; its continuations "
                  f"{'equal' if same else 'DIFFER from'} this script's greedy loop's (eos banned "
                  "in both)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

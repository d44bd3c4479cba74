"""knnlm-fit-lambda: fit a per-token lambda model from neighbours saved on a tuning split.

    fairseq-eval-lm ... --gen-subset valid --knnlm --k 1024 --knn-save-neighbors nbrs/valid
    knnlm-fit-lambda nbrs/valid --out lambda_mlp.npz --kind mlp --temp 10
    fairseq-eval-lm ... --gen-subset test --knnlm --k 1024 --knn-temp 10 \\
        --knn-lambda-model lambda_mlp.npz --knn-skip-below 0.1
    knnlm-sweep nbrs/test --lambda-model lambda_mlp.npz --skip-below 0,0.05,0.1,0.2

Kinds (lambda_model.py): constant (the best fixed lambda), buckets (Drozdov et al. 2022: a
lambda per quantile bucket of one feature, by default the nearest neighbour's distance: needs
the search), mlp (He et al. 2021: a small MLP over --features, by default all of them). Every
model also gets a gate, an MLP over the features known before the search (LM entropy, max
log-prob, context frequency), that --knn-skip-below thresholds; a head that needs no search
is its own gate.

Fewer searches with pointers (pointers.py): a model fitted with --min-pointers N sees what a
run with --knn-pointers --knn-min-pointers N finds (the pass must be saved with
--knn-pointers --knn-min-pointers K+1, which searches every token and keeps the queries):

    knnlm-fit-lambda nbrs/valid --out lambda_ptr.npz --kind mlp --temp 10 --temps 1,3,10,30,100 \
        --min-pointers 1
    fairseq-eval-lm ... --knnlm --k 1024 --knn-temp 10 --knn-lambda-model lambda_ptr.npz \
        --knn-pointers --knn-min-pointers 1

The rows are split in text order: 70% fit, 10% early stopping, 20% held out; the held-out
perplexities (LM, best fixed lambda, the model, and the gate's searches against perplexity)
are printed and stored in the model file.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Optional

from fairseq_knnlm.adaptive.lambda_features import FEATURES, POST_FEATURES, freq_table
from fairseq_knnlm.adaptive.lambda_file import save_model
from fairseq_knnlm.adaptive.lambda_model import KINDS
from fairseq_knnlm.adaptive.pointers import load_clusters
from fairseq_knnlm.cli.sweep import floats
from fairseq_knnlm.errors import FlagError, KNNLMError
from fairseq_knnlm.flags import clusters_limit
from fairseq_knnlm.offline.lambda_replay import (
    datastore_values,
    fit_model,
    open_pass_datastore,
    pointer_token_inputs,
    token_inputs,
)
from fairseq_knnlm.offline.neighbours import load_neighbors

logger = logging.getLogger(__name__)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="knnlm-fit-lambda", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("neighbors", help="prefix given to --knn-save-neighbors (a tuning split)")
    p.add_argument("--out", required=True, help="the model file to write (.npz)")
    p.add_argument("--kind", choices=KINDS, default="mlp")
    p.add_argument("--k", type=int, default=None,
                   help="neighbours per token (default: the saved k); eval-lm's --k must match")
    p.add_argument("--temp", type=float, default=None,
                   help="kNN temperature (default: the pass's --knn-temp, from the neighbour "
                        "file; eval-lm's --knn-temp must match)")
    p.add_argument("--dist", choices=("l2", "faiss_l2"), default="l2",
                   help="distance of p_kNN (eval-lm's --knn-sim-func must match)")
    p.add_argument("--temps", type=floats, default=None,
                   help="comma list of kNN temperatures to mix per token (--kind mlp): the "
                        "head then weighs p_LM and p_kNN at each (a lambda per token shared "
                        "out among them); --temp stays the features' and the gate's")
    p.add_argument("--features", default=None,
                   help=f"comma list for the head, from {', '.join(FEATURES)} (mlp: all; "
                        "buckets: knn_min_dist)")
    p.add_argument("--buckets", type=int, default=32, help="buckets for --kind buckets")
    p.add_argument("--hidden", type=int, default=32, help="MLP hidden width")
    p.add_argument("--steps", type=int, default=1500, help="MLP training steps (full batch)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-gate", action="store_true",
                   help="fit no gate (the model then cannot skip searches)")
    p.add_argument("--min-pointers", type=int, default=None,
                   help="fit for a run with --knn-pointers --knn-min-pointers N: the pass "
                        "(saved with --knn-pointers --knn-min-pointers K+1) is replayed under "
                        "that policy and the model sees each token's searched or pointer "
                        "neighbours (and their count, knn_log_count); eval-lm must then use "
                        "the same flags")
    p.add_argument("--clusters", default=None,
                   help="with --min-pointers: fit for --knn-clusters PREFIX (knnlm-clusters); "
                        "eval-lm must then use the same clusters")
    p.add_argument("--dstore", default=None,
                   help="datastore for the context frequencies (default: the pass's own)")
    p.add_argument("--json", default=None, help="also write the report here")
    p.add_argument("--force", action="store_true",
                   help="save the model even when its held-out perplexity is not finite or "
                        "worse than the best fixed lambda's (the model file says so)")
    return p


def settings_from_pass(nb: Any, k: Optional[int], temp: Optional[float]
                       ) -> tuple[int, float]:
    """--k and --temp, each defaulting to the value the pass was saved with (its meta)."""
    saved_k = int(nb.meta["k"])
    saved_t = nb.meta.get("temperature")
    if temp is None:
        if saved_t is None:
            raise FlagError("the neighbour file does not record its --knn-temp: give --temp")
        temp = float(saved_t)
    return (saved_k if k is None else int(k)), float(temp)


def verdict(report: dict[str, Any]) -> Optional[str]:
    """Why the fitted model must not be saved (None: it may): a held-out perplexity that is
    not finite, or one worse than the best fixed lambda's on the same held-out tokens."""
    held = report["held_out_ppl"]
    model, fixed = held["model"], held["fixed_lambda"]
    if not math.isfinite(model):
        return (f"the model's held-out perplexity is {model} (best fixed lambda "
                f"{report['fixed_lambda']:.3f}: {fixed:.3f})")
    if model > fixed:
        return (f"the model is worse than the best fixed lambda {report['fixed_lambda']:.3f} "
                f"on the held-out tokens (ppl {model:.3f} vs {fixed:.3f})")
    return None


def cli_main(argv: Optional[list[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(message)s")
    try:
        if args.clusters and args.min_pointers is None:
            raise FlagError("--clusters extends the pointers: it needs --min-pointers")
        if args.min_pointers is not None and args.min_pointers < 1:
            raise FlagError(f"--min-pointers must be >= 1, got {args.min_pointers}")
        if args.min_pointers is not None and args.dist != "l2":
            raise FlagError("--min-pointers: pointers are measured in exact L2 (--dist l2)")
        nb = load_neighbors(args.neighbors)
        k, temp = settings_from_pass(nb, args.k, args.temp)
        features = [f for f in args.features.split(",") if f] if args.features else None
        vals, vocab = datastore_values(nb, args.dstore)  # read once: frequencies and values
        freq = freq_table(vals, vocab)
        temps = tuple(args.temps or ())
        clusters = None
        if args.min_pointers is None:
            inp = token_inputs(nb, freq, k, temp, args.dist, vals=vals, temps=temps)
        else:
            ds = open_pass_datastore(nb, args.dstore, load_keys=True)
            clusters = (load_clusters(args.clusters, ds, limit=clusters_limit(k)) if args.clusters
                        else None)
            inp = pointer_token_inputs(nb, ds, freq, k, temp, args.min_pointers, temps,
                                       clusters=clusters)
        model, report = fit_model(inp, args.kind, freq, k, temp, args.dist, features,
                                  buckets=args.buckets, gate=not args.no_gate,
                                  hidden=args.hidden, steps=args.steps, seed=args.seed)
        model.min_pointers = args.min_pointers
        model.clusters = clusters.num_clusters if clusters is not None else None
    except (KNNLMError, OSError) as e:
        print(f"knnlm-fit-lambda: error: {e}", file=sys.stderr)
        return 2
    refused = verdict(report)
    model.info = {"fitted_on": str(args.neighbors), "subset": nb.meta.get("subset"),
                  "datastore": nb.meta.get("datastore"), "report": report,
                  "clusters_prefix": args.clusters}
    if refused is not None and args.force:
        model.info["forced"] = f"saved with --force: {refused}"
    held = report["held_out_ppl"]
    uses = [f for f in model.head.features if f in POST_FEATURES]
    mixed = f", mixing T {','.join(f'{t:g}' for t in model.temps)}" if model.temps else ""
    print(f"{args.kind} lambda model ({', '.join(model.head.features) or 'constant'}"
          f"{'; needs the search' if uses else ''}), k={k}, T={temp:g}{mixed}, "
          f"{args.dist}; "
          f"held-out {report['rows']['held_out']} tokens:")
    print(f"  LM ppl {held['lm']:.3f}; best fixed lambda {report['fixed_lambda']:.3f}: "
          f"ppl {held['fixed_lambda']:.3f}; model: ppl {_ppl_text(held['model'])} "
          f"({_diff_text(held['model'], held['fixed_lambda'])} against the fixed lambda)")
    if "held_out_modes" in report:
        c = report["held_out_modes"]
        cl = f" --knn-clusters {args.clusters}" if args.clusters else ""
        print(f"  with --knn-pointers --knn-min-pointers {model.min_pointers}{cl}: searched "
              f"{c['search']} of {report['rows']['held_out']} held-out tokens "
              f"({100 * c['search'] / max(1, report['rows']['held_out']):.1f}%), "
              f"{c['pointers']} from pointers")
    for r in report.get("held_out_skips", []):
        print(f"  gate: --knn-skip-below {r['skip_below']:<5g} searches "
              f"{100 * r['search_fraction']:5.1f}%  ppl {_ppl_text(r['ppl'])}")
    if refused is not None and not args.force:
        print(f"knnlm-fit-lambda: error: {refused}: {args.out} not written (--force saves "
              "it anyway)", file=sys.stderr)
        return 1
    save_model(args.out, model)
    print(f"wrote {args.out}" + (f" ({model.info['forced']})" if refused else ""))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def _ppl_text(ppl: float) -> str:
    return f"{ppl:.3f}" if math.isfinite(ppl) else "not finite"


def _diff_text(model: float, fixed: float) -> str:
    if not (math.isfinite(model) and math.isfinite(fixed)):
        return "no difference measurable"
    return f"{model - fixed:+.3f}, {100 * (model / fixed - 1):+.2f}%"


if __name__ == "__main__":
    sys.exit(cli_main())

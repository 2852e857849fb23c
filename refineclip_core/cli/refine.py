"""``refineclip refine``: phase 2 (Eq. 11-13), comparisons, and the merged checkpoint."""

from __future__ import annotations

import argparse
import sys

from ..features.decomposition import parse_heads
from ..loading.models import ModelSpec, load_model
from ..method.protocol import identify, run_refinement
from ..method.refinement import RefineConfig, export_checkpoint
from .common import positive_int, write_json
from .score import add_protocol_args, open_cache, protocol


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("refine", help="learn diag(θ) (or full/LoRA) from the ablated model and export the edit",
                       description="Phase 2 of RefineCLIP: learn a map of the image embedding with "
                                   "α·L_success + β·L_locality + L_CE on cached embeddings, compare it with "
                                   "zero-shot, the ablated model, standard fine-tuning and a Tip-Adapter cache on "
                                   "held-out images, and write the merged checkpoint.")
    add_protocol_args(p)
    p.add_argument("--heads", default="auto", help="'auto' (Alg. 1) or a list like 11.3,10.7")
    p.add_argument("--strategy", default="diag", choices=["diag", "full", "lora"])
    p.add_argument("--rank", type=positive_int, default=4, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=1e4, help="weight of L_success (Eq. 11)")
    p.add_argument("--beta", type=float, default=1e2, help="weight of L_locality (Eq. 12)")
    p.add_argument("--steps", type=positive_int, default=500)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--no-baselines", action="store_true", help="skip standard fine-tuning and Tip-Adapter")
    p.add_argument("--out", help="write the merged checkpoint here (.safetensors or .pt)")
    p.add_argument("--json", help="write metrics and run configuration here (default: print)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cache = open_cache(args)
    ident = identify(cache, protocol(args))
    heads = ident.heads if args.heads == "auto" else parse_heads(args.heads, cache.manifest.layers,
                                                                  cache.manifest.n_heads)
    cfg = RefineConfig(strategy=args.strategy, alpha=args.alpha, beta=args.beta, steps=args.steps, lr=args.lr,
                       seed=args.seed, rank=args.rank)
    outcome = run_refinement(cache, ident, cfg, heads, baselines=not args.no_baselines)
    exported = None
    if args.out:
        spec = ModelSpec(**cache.manifest.model)
        loaded = load_model(spec)
        exported = str(export_checkpoint(spec.resolved().checkpoint, loaded.model, outcome.refinement.refined,
                                         args.out))
        print(f"wrote {exported}", file=sys.stderr)
    reports = outcome.report.to_dict()
    write_json(args.json, {
        "pair": [[cache.classes[a], cache.classes[b]] for a, b in ident.pairs],
        "heads": [h.as_list() for h in heads],
        "selected": ident.selection.to_dict()["selected"],
        "metrics": reports["reports"],
        "target_metrics": reports["target_reports"],
        "locality": reports["locality"],
        "target_accuracy": reports["target_accuracy"],
        "history": outcome.refinement.history,
        "checkpoint": exported,
        "config": {"cache": str(args.cache), **ident.config.to_dict(), **cfg.to_dict(),
                   "heads_arg": args.heads, "model": cache.manifest.model, "n_eval": int(len(ident.eval_rows)),
                   "sample_rows": ident.sample_rows.tolist()},
    })
    return 0

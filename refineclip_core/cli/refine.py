"""``refineclip refine``: phase 2 (Eq. 11-13), comparisons, the merged checkpoint and the run report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..features.cache import atomic_write_bytes
from ..features.decomposition import parse_heads
from ..loading.models import ModelSpec
from ..method.protocol import identify, make_engine
from ..method.refinement import RefineConfig
from ..reporting.run_report import render_html, run_edit
from .common import positive_int, progress_bar, write_json
from .score import add_protocol_args, open_cache, protocol


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("refine", help="learn diag(θ) (or full/LoRA) from the ablated model and export the edit",
                       description="Phase 2 of RefineCLIP: learn a map of the image embedding with "
                                   "α·L_success + β·L_locality + L_CE on cached embeddings, compare it with "
                                   "zero-shot, the ablated model, standard fine-tuning and a Tip-Adapter cache on "
                                   "held-out images, and write the merged checkpoint and the run report (the same "
                                   "report the dashboard's Refine page offers).")
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
    p.add_argument("--json", help="write the run report (metrics and run configuration) here (default: print)")
    p.add_argument("--html", help="also write the run report as a self-contained HTML page here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cache = open_cache(args)
    engine = make_engine(cache)
    ident = identify(cache, protocol(args), engine)
    heads = ident.heads if args.heads == "auto" else parse_heads(args.heads, cache.manifest.layers,
                                                                  cache.manifest.n_heads)
    cfg = RefineConfig(strategy=args.strategy, alpha=args.alpha, beta=args.beta, steps=args.steps, lr=args.lr,
                       seed=args.seed, rank=args.rank)
    edit = run_edit(cache, ident, engine, cfg, heads, spec=ModelSpec(**cache.manifest.model), export_to=args.out,
                    baselines=not args.no_baselines, progress=progress_bar("refine", unit="step"),
                    extra={"heads_arg": args.heads})
    if edit.checkpoint is not None:
        print(f"wrote {edit.checkpoint}", file=sys.stderr)
    write_json(args.json, edit.report)
    if args.html:
        atomic_write_bytes(Path(args.html), render_html(edit.report).encode())
    return 0

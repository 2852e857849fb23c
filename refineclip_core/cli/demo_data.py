"""``refineclip demo-data``: write a fresh sample of the embedded demo world."""

from __future__ import annotations

import argparse
import sys

from .common import positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-data", help="write a sample of the demo world (class folders or Waterbirds layout)",
                       description="Generate images of the procedural spurious-correlation world the embedded demo "
                                   "model was trained on: class folders plus metadata.csv with groups, or the WILDS "
                                   "Waterbirds layout for the two bird classes (all three splits).")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"],
                   help="train is biased (95%% home background); val/test are group-balanced")
    p.add_argument("--n-per-group", type=positive_int, default=50, help="images per bird group and per other class")
    p.add_argument("--layout", default="folder", choices=["folder", "waterbirds"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo.world import write_world

    out = write_world(args.out, args.split, args.seed, args.n_per_group, args.layout)
    print(f"wrote demo-world {args.layout} data ({args.split}, seed {args.seed}) to {out}", file=sys.stderr)
    return 0

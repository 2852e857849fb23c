"""``refineclip demo-data``: write a fresh sample of the embedded demo world."""

from __future__ import annotations

import argparse

from .common import add_json_arg, emit, positive_int


NEXT_MODEL = {
    "birds": "--model demo",
    "digits": "--model refineclip-digits --model-config assets/digits/refineclip-digits.json "
              "--checkpoint assets/digits/refineclip-digits.safetensors",
}
"""The model trained on each world (the digits model: ``bash scripts/train_digits.sh``)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-data", help="write a sample of the demo world (class folders or Waterbirds layout)",
                       description="Generate images of the procedural spurious-correlation world the embedded demo "
                                   "model was trained on: class folders plus metadata.csv with groups, or the WILDS "
                                   "Waterbirds layout for the two bird classes (all three splits).")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--world", default="birds", choices=["birds", "digits"],
                   help="birds: the demo model's world; digits: scikit-learn's handwritten digits on coloured "
                        "backgrounds (three on red, eight on green in training; the digits model's world)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"],
                   help="train is biased (95%% home background); val/test are group-balanced")
    p.add_argument("--n-per-group", type=positive_int, default=50,
                   help="images per bird group and per other class (digits: val/test hold each handwritten digit of "
                        "their share once per group, this caps them)")
    p.add_argument("--layout", default="folder", choices=["folder", "waterbirds"])
    add_json_arg(p, "what was written (folder, images per class and group)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo.digits import DigitsConfig
    from ..demo.world import write_world
    from ..errors import RefineClipError
    from ..loading.data import load_dataset

    if args.world == "digits":
        if args.layout != "folder":
            raise RefineClipError("The digits world is written as class folders only (--layout folder).")
        out = DigitsConfig().write(args.out, args.split, args.seed, args.n_per_group)
    else:
        out = write_world(args.out, args.split, args.seed, args.n_per_group, args.layout)
    ds = load_dataset(out)
    per_class = {c: sum(r.label == i for r in ds.records) for i, c in enumerate(ds.classes)}
    record = {"out": str(out), "world": args.world, "layout": args.layout, "split": args.split, "seed": args.seed,
              "n_per_group": args.n_per_group, "n_images": len(ds), "per_class": per_class, "groups": ds.groups}
    name = "Digits" if args.world == "digits" else "Demo"
    lines = [f"{name}-world images ({args.layout} layout, split {args.split}, seed {args.seed}): {len(ds)} images of "
             f"{len(ds.classes)} classes in {len(ds.groups)} groups.",
             "  " + ", ".join(f"{c} {n}" for c, n in per_class.items()),
             f"Next: refineclip extract {NEXT_MODEL[args.world]} --data {out} --out CACHE"]
    emit(args, record, lines, [("images and metadata.csv", out)])
    return 0

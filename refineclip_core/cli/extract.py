"""``refineclip extract``: decompose every image once and cache the parts."""

from __future__ import annotations

import argparse
import sys

from ..features.extraction import STORES, ExtractionConfig, extract, init_distributed_from_env
from ..loading.batches import DRAFT_FACTOR, DecodeConfig
from ..loading.data import load_dataset
from ..loading.models import load_model
from .common import add_model_args, add_template_args, layers_arg, model_spec, positive_int, progress_bar, templates


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="extract E and per-head contributions into a feature cache",
                       description="Run the image tower once per image, decompose the embedding into per-head "
                                   "direct contributions (paper Eq. 4) and write them to a resumable cache. "
                                   "Runs data-parallel under torchrun.")
    add_model_args(p)
    p.add_argument("--data", required=True, help="image folder (class sub-folders), folder with metadata.csv, or a CSV")
    p.add_argument("--layout", default="auto", choices=["auto", "folder", "csv", "waterbirds"])
    p.add_argument("--split", help="only images of this split (train/val/test) when the metadata has splits")
    p.add_argument("--out", required=True, help="cache folder (created; resumed if interrupted)")
    p.add_argument("--layers", type=layers_arg, default=4, help="heads of the last K layers (default 4) or 'all'")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--exact-decode", action="store_true",
                   help=f"decode every JPEG pixel (default: JPEGs decode at a reduced scale, at least {DRAFT_FACTOR}x the "
                        "model's input size, before the model's exact resize and crop)")
    p.add_argument("--decode-workers", type=int, metavar="N",
                   help="parallel image decoders (default: one per usable CPU, at most 8; 0: none)")
    p.add_argument("--decode-with", choices=["thread", "process"], default="thread",
                   help="decode in threads (default) or worker processes")
    p.add_argument("--store", choices=STORES, default="auto",
                   help="storage of head contributions and remainders: auto (float32; float64 for fp64 models), "
                        "fp32 or fp16 (half the disk; the decomposition error it adds is what check-decomposition "
                        "reports as stored_max_rel_error)")
    add_template_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    distributed = init_distributed_from_env()
    loaded = load_model(model_spec(args))
    dataset = load_dataset(args.data, layout=args.layout, split=args.split)
    if args.class_names:
        dataset = dataset.renamed(args.class_names.split(","))
    decode = DecodeConfig(exact=args.exact_decode, workers=args.decode_workers, kind=args.decode_with)
    cfg = ExtractionConfig(layers=args.layers, batch_size=args.batch_size, templates=templates(args), decode=decode,
                           store=args.store)
    cache = extract(loaded, dataset, args.out, cfg, progress=progress_bar("extract"))
    if not distributed or int(__import__("os").environ.get("RANK", "0")) == 0:
        print(f"cached {len(cache)} images ({len(cache.skipped)} skipped), {len(cache.classes)} classes, "
              f"layers {cache.manifest.layers} x {cache.manifest.n_heads} heads -> {args.out}", file=sys.stderr)
    return 0

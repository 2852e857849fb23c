"""``refineclip extract``: decompose every image once and cache the parts."""

from __future__ import annotations

import argparse
import os

from ..features.cache import FeatureCache
from ..features.extraction import STORES, ExtractionConfig, extract, init_distributed_from_env
from ..loading.batches import DRAFT_FACTOR, DecodeConfig
from .common import (add_json_arg, add_link_arg, add_model_args, add_template_args, dataset as load_data, emit,
                     layers_arg, load, positive_int, progress_bar, templates)


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
    add_link_arg(p)
    add_template_args(p)
    add_json_arg(p, "what was cached (images, skipped files with reasons, classes, layers, model)")
    p.set_defaults(func=run)


def cache_summary(cache: FeatureCache, out: str) -> list[str]:
    """What a cache holds, in a few lines (the skipped files first few, with their reasons)."""
    man = cache.manifest
    layers = f"{man.layers[0]}-{man.layers[-1]}" if list(man.layers) == list(range(man.layers[0], man.layers[-1] + 1)) \
        else ", ".join(map(str, man.layers))
    lines = [f"Cached {len(cache)} images of {len(cache.classes)} classes"
             + (f" in {len(cache.group_names)} groups" if cache.group_names else "")
             + f": heads of layers {layers} ({man.n_heads} per layer), model {man.model_name}.",
             f"Skipped {len(cache.skipped)} files" + (":" if cache.skipped else ".")]
    lines += [f"  {s.path}: {s.reason}" for s in cache.skipped[:5]]
    if len(cache.skipped) > 5:
        lines.append(f"  ... and {len(cache.skipped) - 5} more (--json PATH lists them all)")
    lines.append(f"Next: refineclip zero-shot --cache {out}")
    return lines


def run(args: argparse.Namespace) -> int:
    distributed = init_distributed_from_env()
    loaded = load(args)
    dataset = load_data(args, layout=args.layout, split=args.split)
    if args.class_names:
        dataset = dataset.renamed(args.class_names.split(","))
    decode = DecodeConfig(exact=args.exact_decode, workers=args.decode_workers, kind=args.decode_with)
    cfg = ExtractionConfig(layers=args.layers, batch_size=args.batch_size, templates=templates(args), decode=decode,
                           store=args.store)
    cache = extract(loaded, dataset, args.out, cfg, progress=progress_bar("extract"))
    if not distributed or int(os.environ.get("RANK", "0")) == 0:
        man = cache.manifest
        record = {"cache": str(args.out), "n_images": len(cache), "n_skipped": len(cache.skipped),
                  "skipped": [{"path": s.path, "reason": s.reason} for s in cache.skipped],
                  "classes": cache.classes, "groups": cache.group_names, "layers": list(man.layers),
                  "n_heads": man.n_heads, "model": man.model, "templates": man.templates}
        emit(args, record, cache_summary(cache, args.out), [("feature cache", args.out)])
    return 0

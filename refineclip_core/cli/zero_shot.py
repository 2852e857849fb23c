"""``refineclip zero-shot``: zero-shot accuracy of the cached model, per class and group."""

from __future__ import annotations

import argparse

from ..features.cache import FeatureCache
from ..features.zeroshot import predict
from ..method.evaluation import cache_report
from .common import accuracy_lines, add_json_arg, emit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zero-shot", help="zero-shot accuracy from a feature cache",
                       description="Zero-shot predictions (cosine similarity to class prompts) for the cached "
                                   "images: overall, per class, per group, average-group and worst-group accuracy, "
                                   "each with its 95% interval and image count, and the largest error pairs.")
    p.add_argument("--cache", required=True, help="feature cache folder")
    p.add_argument("--split", help="only images of this split")
    add_json_arg(p, "every accuracy, interval and count")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cache = FeatureCache(args.cache)
    pred, _ = predict(cache.embeddings, cache.text, cache.scoring)
    mask = cache.splits == args.split if args.split else None
    rep = cache_report(cache, pred, mask)
    record = {
        "n_images": rep.n_images,
        "n_skipped": len(cache.skipped),
        "classes": cache.classes,
        **rep.to_dict(),
        "config": {"cache": str(args.cache), "split": args.split, "model": cache.manifest.model,
                   "templates": cache.manifest.templates},
    }
    head = (f"Zero-shot accuracy of {cache.manifest.model_name} on {rep.n_images} images"
            + (f" of split '{args.split}'" if args.split else "") + f" ({len(cache.skipped)} skipped):")
    rows = None if mask is None else mask.nonzero()[0]
    emit(args, record, [head, *accuracy_lines(rep, predictions=pred, labels=cache.labels, classes=cache.classes,
                                              rows=rows)])
    return 0

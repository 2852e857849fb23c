"""``refineclip zero-shot``: zero-shot accuracy of the cached model, per class and group."""

from __future__ import annotations

import argparse

from ..features.cache import FeatureCache
from ..features.zeroshot import predict
from ..method.evaluation import accuracy_report
from .common import write_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zero-shot", help="zero-shot accuracy from a feature cache",
                       description="Zero-shot predictions (cosine similarity to class prompts) for the cached "
                                   "images: overall, per class, per group, average-group and worst-group accuracy.")
    p.add_argument("--cache", required=True, help="feature cache folder")
    p.add_argument("--split", help="only images of this split")
    p.add_argument("--json", help="write the result here (default: print)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cache = FeatureCache(args.cache)
    pred, _ = predict(cache.embeddings, cache.text, cache.logit_scale)
    mask = cache.splits == args.split if args.split else None
    rep = accuracy_report(pred, cache.labels, cache.classes, cache.groups, cache.group_names, mask)
    write_json(args.json, {
        "n_images": rep.n_images,
        "n_skipped": len(cache.skipped),
        "classes": cache.classes,
        "accuracy": rep.accuracy,
        "per_class": rep.per_class,
        "per_group": rep.per_group,
        "average_group": rep.average_group,
        "worst_group": rep.worst_group,
        "config": {"cache": str(args.cache), "split": args.split, "model": cache.manifest.model,
                   "templates": cache.manifest.templates},
    })
    return 0

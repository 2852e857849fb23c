"""``refineclip check-decomposition``: Σ parts vs a fresh ``encode_image`` (paper Eq. 4)."""

from __future__ import annotations

import argparse
from dataclasses import replace

from ..errors import RefineClipError
from ..features.cache import FeatureCache
from ..features.decomposition import decompose
from ..features.extraction import check_decomposition, load_batch
from ..session.caches import cache_model
from .common import add_json_arg, add_link_arg, add_model_args, dataset as load_data, emit, layers_arg, load, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-decomposition", help="verify that the cached parts sum to encode_image",
                       description="Re-run model.encode_image on the images and report the largest relative "
                                   "difference to the sum of the decomposed parts. Give --cache, or the model "
                                   "and data flags to check without a cache.")
    p.add_argument("--cache", help="feature cache folder made by 'refineclip extract'")
    add_model_args(p, required=False)
    p.add_argument("--data", help="image folder (when no --cache)")
    add_link_arg(p)
    p.add_argument("--layers", type=layers_arg, default="all")
    p.add_argument("--max-images", type=positive_int, help="check only the first N images")
    p.add_argument("--batch-size", type=positive_int, default=32)
    add_json_arg(p, "the result (images checked, dtype, largest relative error)")
    p.set_defaults(func=run)


#: The largest relative error the decomposition is promised to have in each precision (docs/GUIDE.md, "Limits").
EXACT_TO = {"float64": 1e-10, "float32": 1e-5}


def summary(result: dict) -> list[str]:
    bound = EXACT_TO.get(result["dtype"])
    verdict = ("" if bound is None else
               f" (exact: at most {bound:g} expected)" if result["max_rel_error"] <= bound else
               f" - above the {bound:g} expected in {result['dtype']} (see docs/GUIDE.md, Limits)")
    return [f"Sum of the decomposed parts vs encode_image on {result['n_images']} images ({result['dtype']}): "
            f"largest relative error {result['max_rel_error']:.2e}{verdict}."]


def run(args: argparse.Namespace) -> int:
    if args.cache:
        cache = FeatureCache(args.cache)
        spec = cache_model(cache.manifest, cache.root)  # sources confined, fingerprint checked
        if args.precision != "fp32" or args.device != "cpu":
            spec = replace(spec, device=args.device)
        result = check_decomposition(load(args, spec), cache, args.max_images, args.batch_size)
    else:
        if not args.data:
            raise RefineClipError("Give --cache, or --data with the model flags.")
        loaded = load(args)
        dataset = load_data(args)
        records = dataset.records[: args.max_images] if args.max_images else dataset.records
        worst, n = 0.0, 0
        for start in range(0, len(records), args.batch_size):
            batch, keep, _bad = load_batch(loaded, records[start:start + args.batch_size], start)
            if batch is None:
                continue
            dec = decompose(loaded.visual, batch, args.layers)
            e = loaded.model.encode_image(batch).double()
            rel = (dec.reconstruct().double() - e).norm(dim=-1) / e.norm(dim=-1)
            worst, n = max(worst, float(rel.max())), n + len(keep)
        result = {"n_images": n, "dtype": str(loaded.dtype).replace("torch.", ""), "max_rel_error": worst}
    emit(args, result, summary(result))
    return 0

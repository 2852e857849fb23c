"""``refineclip score``: DE_A..DE_D for an error pair and Alg. 1's head choice."""

from __future__ import annotations

import argparse

from ..errors import RefineClipError
from ..features.cache import FeatureCache
from ..method.protocol import DEFAULT_PROTOCOL, ProtocolConfig, identify
from .common import positive_int, write_json


def add_protocol_args(p: argparse.ArgumentParser) -> None:
    """The protocol's options; every default is :data:`DEFAULT_PROTOCOL`'s (one set of defaults)."""
    d = DEFAULT_PROTOCOL
    p.add_argument("--cache", required=True, help="feature cache folder")
    p.add_argument("--pair", default=d.pair,
                   help="error pair TRUE:PRED (class names or indices), 'auto' (largest) or 'both' (it and its "
                        f"reverse; default {d.pair})")
    p.add_argument("--samples-per-class", type=positive_int, default=d.samples_per_class,
                   help=f"labelled samples drawn per class of the pair (paper: 10; default {d.samples_per_class})")
    p.add_argument("--all-samples", action="store_true", help="use every fitting image instead of sampling")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the sample draw (and of the edit)")
    p.add_argument("--top-t", type=positive_int, default=d.top_t, help="length T of each candidate list (Alg. 1)")
    p.add_argument("--selection", default=d.selection, choices=["consensus", "alg1"],
                   help="how heads are chosen: 'consensus' (one ranking from all four scores, best prefix by the "
                        "utility U; the default) or 'alg1' (the paper's Algorithm 1)")
    p.add_argument("--ablation", default=d.ablation, choices=["mean", "zero"],
                   help="how the chosen heads are removed: replaced by their mean over the adaptation images "
                        "('mean', the default) or zeroed (the paper's Eq. 5)")
    p.add_argument("--layers", type=positive_int,
                   help="only heads of the last K cached layers (default: every cached layer)")
    p.add_argument("--fit-split", default=d.fit_split, help="split to sample from (auto: val, else train, else all)")
    p.add_argument("--eval-split", default=d.eval_split,
                   help="split to evaluate on (auto: test, else a held-out share of the rest)")
    p.add_argument("--holdout", type=float, default=d.holdout,
                   help="without a test split: the share of unsampled images held out for evaluation "
                        f"(default {d.holdout}; the rest adapt the edit, unlabelled)")


def protocol(args: argparse.Namespace) -> ProtocolConfig:
    return ProtocolConfig(pair=args.pair, samples_per_class=None if args.all_samples else args.samples_per_class,
                          seed=args.seed, top_t=args.top_t, selection=args.selection, ablation=args.ablation,
                          fit_split=None if args.fit_split == "none" else args.fit_split,
                          eval_split=None if args.eval_split == "none" else args.eval_split, holdout=args.holdout)


def open_cache(args: argparse.Namespace) -> FeatureCache:
    cache = FeatureCache(args.cache)
    if getattr(args, "layers", None):
        layers = cache.manifest.layers
        if args.layers > len(layers):
            raise RefineClipError(f"The cache holds {len(layers)} layers; re-extract with --layers {args.layers}.")
        cache.restrict_layers(layers[-args.layers:])
    return cache


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score every head (DE_A..DE_D) and choose heads by utility (Alg. 1)",
                       description="For an error pair, build W/C/A from a seeded sample, compute DE_A..DE_D "
                                   "(paper Eq. 6-9) for every cached head and run Algorithm 1 (Eq. 10).")
    add_protocol_args(p)
    p.add_argument("--json", help="write the result here (default: print)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cache = open_cache(args)
    ident = identify(cache, protocol(args))
    sel = ident.selection.to_dict()
    pairs = [{"true": cache.classes[a], "pred": cache.classes[b], "true_index": a, "pred_index": b}
             for a, b in ident.pairs]
    write_json(args.json, {
        "pair": pairs[0] if len(pairs) == 1 else pairs,
        "sets": {k: s.sizes() for k, s in ident.sets.items()},
        "scores": {k: s.to_list() for k, s in ident.scores.items()},
        "unavailable": {k: s.reason for k, s in ident.scores.items() if not s.available},
        "curves": sel["curves"],
        "candidates": sel["candidates"],
        "baseline_utility": sel["baseline_utility"],
        "selected": sel["selected"],
        "config": {"cache": str(args.cache), **ident.config.to_dict(), "layers": cache.manifest.layers,
                   "model": cache.manifest.model, "sample_rows": ident.sample_rows.tolist()},
    })
    return 0

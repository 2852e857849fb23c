"""``refineclip score``: DE_A..DE_D for an error pair and Alg. 1's head choice."""

from __future__ import annotations

import argparse

import numpy as np

from ..demo.world import on_demo_world
from ..edit.sanity import sanity_warnings
from ..errors import RefineClipError
from ..features.cache import FeatureCache
from ..features.decomposition import HeadId
from ..method.ablation import MODES
from ..method.protocol import (DEFAULT_PROTOCOL, SELECTION_RULES, Identification, ProtocolConfig, identify,
                               make_engine)
from ..reporting.findings import Findings, findings
from .common import add_json_arg, emit, layers_arg, positive_int, table


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
    p.add_argument("--selection", default=d.selection, choices=list(SELECTION_RULES),
                   help="how heads are chosen: 'stable' (heads ranked by how often the consensus chose them on "
                        "bootstrap resamples of the labelled images, best prefix by the utility U), 'consensus' "
                        "(one ranking from all four scores, best prefix by U) or 'alg1' (the paper's Algorithm 1); "
                        f"default {d.selection}")
    p.add_argument("--resamples", type=int, default=d.resamples,
                   help="bootstrap resamples of the labelled images the choice is repeated on, to show how often "
                        f"each head is chosen (0: none; default {d.resamples})")
    p.add_argument("--ablation", default=d.ablation, choices=MODES,
                   help="how the chosen heads are removed: replaced by their mean over the adaptation images "
                        "('mean', the default) or zeroed (the paper's Eq. 5)")
    p.add_argument("--layers", type=layers_arg, default="all",
                   help="only heads of the last K cached layers, or 'all' (the default: every cached layer)")
    p.add_argument("--fit-split", default=d.fit_split, help="split to sample from (auto: val, else train, else all)")
    p.add_argument("--eval-split", default=d.eval_split,
                   help="split to evaluate on (auto: test, else a held-out share of the rest)")
    p.add_argument("--holdout", type=float, default=d.holdout,
                   help="without a test split: the share of every class x group held out for evaluation before "
                        f"the labelled samples are drawn (default {d.holdout}; the rest adapt the edit, unlabelled)")
    p.add_argument("--min-heldout", type=positive_int, default=d.min_heldout,
                   help="fewest held-out images per group of the edited classes the guard needs to verify an edit "
                        f"(default {d.min_heldout}; fewer is reported, with the numbers)")


def protocol(args: argparse.Namespace) -> ProtocolConfig:
    return ProtocolConfig(pair=args.pair, samples_per_class=None if args.all_samples else args.samples_per_class,
                          seed=args.seed, top_t=args.top_t, selection=args.selection, ablation=args.ablation,
                          resamples=args.resamples,
                          fit_split=None if args.fit_split == "none" else args.fit_split,
                          eval_split=None if args.eval_split == "none" else args.eval_split, holdout=args.holdout,
                          min_heldout=args.min_heldout)


def open_cache(args: argparse.Namespace) -> FeatureCache:
    cache = FeatureCache(args.cache)
    if getattr(args, "layers", "all") != "all":
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
    add_json_arg(p, "every score of every head, the utility curves, the choice and the rows used")
    p.set_defaults(func=run)


def warning_lines(warnings) -> list[str]:
    """The sanity warnings (:mod:`refineclip_core.edit.sanity`), one line each, before the numbers."""
    return [f"Warning ({w.kind}): {w.text}" for w in warnings]


def heads_text(heads: list[HeadId]) -> str:
    return ", ".join(map(str, heads)) if heads else "none"


def identification_lines(cache: FeatureCache, ident: Identification, top: int = 3) -> list[str]:
    """The error pair(s) with their sets, the chosen heads and why, and each score's strongest heads."""
    out = [f"Error pair {key}: W {s['W']}, C {s['C']}, A {s['A']} among the {len(ident.sample_rows)} labelled "
           f"samples" for key, s in ((k, v.sizes()) for k, v in ident.sets.items())]
    sel = ident.selection
    if sel.heads:
        out.append(f"Heads chosen ({sel.score}, first {sel.t} of its ranking): {heads_text(sel.heads)} - utility U "
                   f"{sel.utility:.4f} vs {sel.baseline_utility:.4f} with no head removed (Eq. 10).")
    else:
        out.append(f"No head chosen: no prefix of the rankings beats the utility of removing nothing "
                   f"({sel.baseline_utility:.4f}, Eq. 10).")
    if sel.stability is not None and sel.stability.resamples:
        out.append(sel.stability.summary(sel.heads))
    rows = []
    for name, hs in ident.scores.items():
        if not hs.available:
            rows.append([str(name), f"unavailable: {hs.reason}"])
            continue
        flat = np.asarray(hs.values, dtype=np.float64).reshape(-1)
        order = np.argsort(-flat if hs.descending else flat, kind="stable")[:top]
        H = hs.values.shape[1]
        rows.append([str(name), "  ".join(f"{HeadId(hs.layers[i // H], int(i % H))} {flat[i]:+.3g}" for i in order)])
    out.append(f"Most suspicious heads of each score (top {top}; highest DE_A/DE_C, lowest DE_B/DE_D):")
    out += table(("", ""), rows, align="ll")[1:]
    return out


def findings_lines(f: Findings) -> list[str]:
    """Zero-shot vs the chosen heads removed, on the held-out images (each accuracy with its 95%
    interval and image count)."""
    rows = [["overall", f.accuracy, f.ablated_accuracy],
            [f"worst group ({f.worst_group_name})" if f.worst_group_name else "worst group", f.worst_group,
             f.ablated_worst_group],
            ["error-pair classes", f.target_accuracy, f.ablated_target_accuracy]]
    body = [[r[0], *("–" if e is None else e.format() for e in r[1:])] for r in rows if r[1] is not None]
    out = [f"Removing them ({f.ablation} ablation, Eq. 5) on {f.n_eval} held-out images:"]
    out += table(("", "zero-shot", "heads removed"), body)
    if f.ablated_worst_group_name and f.ablated_worst_group_name != f.worst_group_name:
        out.append(f"  (with the heads removed the worst group is {f.ablated_worst_group_name})")
    return out + [f"  note: {n}" for n in f.notes]


def run(args: argparse.Namespace) -> int:
    cache = open_cache(args)
    engine = make_engine(cache)
    ident = identify(cache, protocol(args), engine)
    found = findings(cache, ident, engine)
    warnings = sanity_warnings(cache, ident, demo_data=on_demo_world(cache.classes))
    sel = ident.selection.to_dict()
    pairs = [{"true": cache.classes[a], "pred": cache.classes[b], "true_index": a, "pred_index": b}
             for a, b in ident.pairs]
    record = {
        "pair": pairs[0] if len(pairs) == 1 else pairs,
        "sets": {str(k): s.sizes() for k, s in ident.sets.items()},
        "scores": {str(k): s.to_list() for k, s in ident.scores.items()},
        "unavailable": {str(k): s.reason for k, s in ident.scores.items() if not s.available},
        "curves": sel["curves"],
        "candidates": sel["candidates"],
        "baseline_utility": sel["baseline_utility"],
        "selected": sel["selected"],
        "stability": sel["stability"],
        "findings": found.to_dict(),
        "warnings": [w.to_dict() for w in warnings],
        "config": {"cache": str(args.cache), **ident.config.to_dict(), "layers": cache.manifest.layers,
                   "model": cache.manifest.model, "sample_rows": ident.sample_rows.tolist()},
    }
    emit(args, record, warning_lines(warnings) + identification_lines(cache, ident) + findings_lines(found))
    return 0

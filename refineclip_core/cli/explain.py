"""``refineclip explain``: say in words which shortcut the removed heads carry (issue 17)."""

from __future__ import annotations

import argparse

from ..errors import RefineClipError
from ..features.decomposition import parse_heads
from ..inspection.diagnosis import attribute_direction, attribute_heads, diagnose, load_vocabulary, summary_lines
from ..session.caches import cache_model
from ..loading.models import load_model
from ..method.protocol import identify, make_engine
from .common import add_json_arg, emit, positive_int
from .score import add_protocol_args, open_cache, protocol


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="name the concepts the removed heads carry (the shortcut behind an error)",
                       description="For an error pair and a head set (default: the protocol's choice, as "
                                   "`refineclip score` makes it), project what removing the heads takes out of the "
                                   "embedding onto the text pool's concepts, rank them by their share of the removed "
                                   "variance, orient them by what the misclassified images carry more than the "
                                   "correct ones, and say it in one sentence per error pair. Prints a summary; "
                                   "--json PATH writes the record (--json - prints only the record).")
    add_protocol_args(p)
    p.add_argument("--heads", default="auto", help="'auto' (the protocol's choice) or a list like 11.3,10.7")
    p.add_argument("--attribute", action="append", metavar="PHRASE",
                   help="known-attribute mode: a phrase for the suspected cue (repeatable, e.g. 'on water'); heads "
                        "are ranked by how much of the direction from --versus to --attribute they write, and the "
                        "best-utility prefix is explained (unless --heads names a set)")
    p.add_argument("--versus", action="append", metavar="PHRASE", help="the contrasting phrase(s), e.g. 'on land'")
    p.add_argument("--text-pool", help="descriptions, one per line (default: the shipped assets/text_pool.txt)")
    p.add_argument("--concepts", type=positive_int, default=8, help="concepts to rank (default 8)")
    add_json_arg(p, "the diagnosis (sentence, ranked concepts with their shares and heads, the control, the settings)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if bool(args.attribute) != bool(args.versus):
        raise RefineClipError("Give --attribute and --versus together: the cue's phrases and the contrasting ones.")
    cache = open_cache(args)
    engine = make_engine(cache)
    ident = identify(cache, protocol(args), engine)
    loaded = load_model(cache_model(cache.manifest, cache.root))
    vocab = load_vocabulary(loaded, args.text_pool)
    heads = None if args.heads == "auto" else parse_heads(args.heads, cache.manifest.layers, cache.manifest.n_heads)
    attribute = None
    if args.attribute:
        direction = attribute_direction(loaded, args.attribute, args.versus)
        attribute = attribute_heads(cache, ident, args.attribute, args.versus, direction, ident.ablation_engine(engine))
        heads = attribute.heads if heads is None else heads
    diagnosis = diagnose(cache, ident, vocab, heads, engine, k=args.concepts)
    record = {**diagnosis.to_dict(),
              "attribute": None if attribute is None else attribute.to_dict(),
              "selection": {"score": ident.selection.score_name, "heads": [str(h) for h in ident.heads]},
              "config": {"cache": str(args.cache), **ident.config.to_dict(), "heads_arg": args.heads,
                         "text_pool": args.text_pool or "assets/text_pool.txt", "model": cache.manifest.model,
                         "sample_rows": ident.sample_rows.tolist()}}
    source = ("the typed attribute " + " / ".join(args.attribute) + " vs " + " / ".join(args.versus)
              if attribute is not None and args.heads == "auto" else
              "the protocol's choice" if args.heads == "auto" else "--heads")
    emit(args, record, [f"Removed heads ({source}): {', '.join(str(h) for h in diagnosis.heads) or 'none'}",
                        *summary_lines(diagnosis)])
    return 0

"""``refineclip describe``: TextSpan descriptions of heads, as the Head inspector shows them (paper Table 5)."""

from __future__ import annotations

import argparse

from ..errors import RefineClipError
from ..features.decomposition import parse_heads
from ..inspection.textspan import MAX_IMAGES, describe_heads, embedded_text_pool
from ..session.caches import cache_model
from ..loading.models import load_model
from ..method.protocol import identify, make_engine
from .common import add_json_arg, emit, positive_int
from .score import add_protocol_args, open_cache, protocol


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("describe", help="TextSpan descriptions of heads: what each one encodes, in words",
                       description="For each head, greedily pick the descriptions of the text pool whose directions "
                                   "explain the most variance of the head's outputs over the cached images (TextSpan, "
                                   "Gandelsman et al.; paper Table 5), with the share each explains. The Head inspector "
                                   "shows the same. Beyond --max-images images a seeded random sample is described. "
                                   "Prints a summary; --json PATH writes the record (--json - prints only the record).")
    add_protocol_args(p)
    p.add_argument("--heads", default="auto",
                   help="'auto' (the protocol's choice, as `refineclip score` makes it), 'all' (every cached head) "
                        "or a list like 11.3,10.7")
    p.add_argument("--k", type=positive_int, default=5, help="descriptions per head (default 5, as in the paper)")
    p.add_argument("--text-pool", help="descriptions, one per line (default: the shipped assets/text_pool.txt)")
    p.add_argument("--max-images", type=positive_int, default=MAX_IMAGES,
                   help=f"describe a seeded random sample of this many images when there are more (default {MAX_IMAGES:,})")
    p.add_argument("--all-images", action="store_true", help="describe every image, however many")
    add_json_arg(p, "the descriptions (texts, shares of variance, images used, the settings)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cache = open_cache(args)
    if args.heads == "auto":
        ident = identify(cache, protocol(args), make_engine(cache))
        heads, source = ident.heads, "the protocol's choice"
        if not heads:
            raise RefineClipError("The protocol chose no head for this cache (no prefix beat removing nothing); "
                                  "name heads with --heads 11.3,10.7 or describe them all with --heads all.")
    elif args.heads == "all":
        heads, source = cache.head_ids(), "every cached head"
    else:
        heads, source = parse_heads(args.heads, cache.manifest.layers, cache.manifest.n_heads), "--heads"
    loaded = load_model(cache_model(cache.manifest, cache.root))
    texts, emb = embedded_text_pool(loaded, args.text_pool)
    descriptions = describe_heads(cache, heads, texts, emb, k=args.k,
                                  max_images=None if args.all_images else args.max_images)
    record = {"heads": [d.to_dict() for d in descriptions],
              "config": {"cache": str(args.cache), "heads_arg": args.heads, "k": args.k,
                         "text_pool": args.text_pool or "assets/text_pool.txt",
                         "max_images": None if args.all_images else args.max_images, "model": cache.manifest.model}}
    first = descriptions[0] if descriptions else None
    over = ("no image" if first is None else
            f"a seeded sample of {first.n_images:,} of {first.sampled_from:,} images" if first.sampled_from
            else f"all {first.n_images:,} images")
    lines = [f"TextSpan descriptions of {len(descriptions)} head(s) ({source}), over {over}, "
             f"pool of {len(texts):,} texts:"]
    for d in descriptions:
        said = "; ".join(f"{t} ({100 * v:.0f}%)" for t, v in zip(d.texts, d.variance_explained))
        lines.append(f"  {d.head}: {said or 'its output does not vary over these images'}")
    emit(args, record, lines)
    return 0

"""Which TextSpan describes a head better: the released algorithm or our centred variant (issue 35)?

On fresh samples of the demo world (every layer extracted: 6 × 8 = 48 heads), each head is described with
5 texts of the shipped pool by both algorithms (:data:`refineclip_core.inspection.textspan.SPAN_METHODS`) on
the val images, and judged on the held-out test images:

* **held-out variance, texts**: the share of the head's variance on the test images inside the span of the
  5 texts' embeddings as they are (the description a reader sees);
* **held-out variance, directions**: the same inside the span of the directions each algorithm used to pick
  them (the released one's texts projected onto the head's top-80 singular directions of the val images; ours
  centred over the pool);
* **agreement**: heads whose first text is the same, and texts the two top-5 lists share;
* **the diagnosis' question**: among the heads the default protocol removes (``DEFAULT_PROTOCOL``, 10
  labelled images per bird class), the share of description texts that name the planted cue (the world's
  :data:`~refineclip_core.demo.world.CUE_WORDS`), against the same share over the other heads.

Results go to ``benchmarks/RESULTS.md`` between the ``textspan:start``/``textspan:end`` markers.

    python benchmarks/textspan_variants.py [--world-seeds 131 132] [--sample-seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.demo_world import replace_section, workdir, world_cache, world_model  # noqa: E402
from refineclip_core.demo.world import CUE_WORDS, names_cue  # noqa: E402
from refineclip_core.features.decomposition import HeadId  # noqa: E402
from refineclip_core.inspection.textspan import (DEFAULT_SPAN, DEFAULT_TEXT_POOL, SPAN_METHODS,  # noqa: E402
                                                 describe_head, encode_text_pool, load_text_pool)
from refineclip_core.inspection.textspan_released import head_subspace  # noqa: E402
from refineclip_core.loading.models import DEMO_DIR  # noqa: E402
from refineclip_core.method.protocol import DEFAULT_PROTOCOL, identify, make_engine  # noqa: E402


def span_share(C: np.ndarray, directions: np.ndarray) -> float:
    """Share of the centred rows ``C``'s variance inside the span of ``directions`` (rows)."""
    if not len(directions):
        return 0.0
    q, _ = np.linalg.qr(np.asarray(directions, dtype=np.float64).T)
    total = float((C ** 2).sum())
    return float(((C @ q) ** 2).sum()) / total if total > 0 else 0.0


def head_rows(cache, layer_pos: int, head: int, rows: np.ndarray) -> np.ndarray:
    return np.asarray(cache.heads[rows, layer_pos, head], dtype=np.float64)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-seeds", type=int, nargs="+", default=[131, 132])
    ap.add_argument("--sample-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-fit", type=int, default=100)
    ap.add_argument("--n-test", type=int, default=250)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    ap.add_argument("--workdir")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    stats = {m: {"texts": [], "directions": []} for m in SPAN_METHODS}
    same_first, shared, n_heads = 0, [], 0
    cue = {m: {"removed": [], "other": []} for m in SPAN_METHODS}
    with workdir(args.workdir, "refineclip-textspan-") as work:
        world, loaded = world_model(DEMO_DIR)
        pool = load_text_pool(DEFAULT_TEXT_POOL)
        emb = encode_text_pool(loaded, pool, work).astype(np.float64)
        stems = CUE_WORDS[world.cue]
        for w in args.world_seeds:
            cache = world_cache(work, world, w, args.n_fit, args.n_test, loaded, layers="all")
            val, test = np.flatnonzero(cache.splits == "val"), np.flatnonzero(cache.splits == "test")
            n_val, n_test = len(val), len(test)
            layers = list(cache.manifest.layers)
            scoped = world_cache(work, world, w, args.n_fit, args.n_test, loaded)      # the protocol's 4 layers
            engine = make_engine(scoped)
            removed = set()
            for s in args.sample_seeds:
                removed |= {str(h) for h in identify(scoped, replace(DEFAULT_PROTOCOL, seed=s), engine).heads}
            picks = {}
            for li, layer in enumerate(layers):
                for h in range(cache.manifest.n_heads):
                    X, Xt = head_rows(cache, li, h, val), head_rows(cache, li, h, test)
                    Ct = Xt - Xt.mean(0)
                    for m in SPAN_METHODS:
                        d = describe_head(X, pool, emb, k=5, method=m)
                        picks[m] = d.indices
                        T = emb[d.indices]
                        own = (T @ head_subspace(X).T) @ head_subspace(X) if m == "released" else T - emb.mean(0)
                        stats[m]["texts"].append(span_share(Ct, T))
                        stats[m]["directions"].append(span_share(Ct, own))
                        share = np.mean([names_cue(pool[i].lower().split(), stems) for i in d.indices]) \
                            if d.indices else 0.0
                        cue[m]["removed" if str(HeadId(layer, h)) in removed else "other"].append(float(share))
                    n_heads += 1
                    same_first += bool(picks["released"][:1] == picks["centred"][:1])
                    shared.append(len(set(picks["released"]) & set(picks["centred"])))
            print(f"world {w}: {n_heads} heads so far ({time.time() - t0:.0f} s); removed {sorted(removed)}",
                  file=sys.stderr, flush=True)
    lines = ["## Which TextSpan: the released algorithm against our centred variant", "",
             f"Written by `python benchmarks/textspan_variants.py` on {time.strftime('%Y-%m-%d')} "
             f"({platform.processor() or platform.machine()}, torch {torch.__version__}) in {time.time() - t0:.0f} s. "
             f"Demo world seeds {args.world_seeds}, every layer extracted ({n_heads} head descriptions in all, "
             f"{n_heads // len(args.world_seeds)} heads per world); each head described with 5 texts of the shipped "
             f"pool ({len(pool):,} texts) on the {n_val} val images and judged on the {n_test} held-out test "
             f"images. Mean (worst head) over heads.", "",
             "| algorithm | held-out variance in the span of the 5 texts | in the span of its own 5 directions | "
             "cue-naming texts: removed heads | other heads |", "|---|---|---|---|---|"]
    for m in SPAN_METHODS:
        t, o = np.array(stats[m]["texts"]), np.array(stats[m]["directions"])
        name = {"released": "TextSpan as released", "centred": "our centred variant"}[m]
        lines.append(f"| {name}{' (default)' if m == DEFAULT_SPAN else ''} | {100 * t.mean():.1f}% "
                     f"({100 * t.min():.1f}%) | {100 * o.mean():.1f}% ({100 * o.min():.1f}%) | "
                     f"{100 * np.mean(cue[m]['removed']):.0f}% of {len(cue[m]['removed'])} heads' texts | "
                     f"{100 * np.mean(cue[m]['other']):.0f}% |")
    lines += ["", f"- Same first text in {same_first} of {n_heads} heads; the two top-5 lists share "
                  f"{np.mean(shared):.1f} texts on average (identical lists: {sum(x == 5 for x in shared)}).",
              "- Removed heads: the union of the heads `DEFAULT_PROTOCOL` chose over sample seeds "
              f"{args.sample_seeds} (10 labelled images per bird class) on each world."]
    body = "\n".join(lines) + "\n"
    print(body)
    replace_section(Path(args.out), "textspan", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

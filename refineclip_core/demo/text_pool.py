"""A pool of short, varied image descriptions for describing attention heads (TextSpan-style).

TextSpan (Gandelsman et al.) explains a head by greedily picking, from a large pool of
image descriptions, the texts whose embeddings span the head's outputs. This module writes
such a pool: a few thousand de-duplicated descriptions generated from templates over objects,
scenes, colours, textures, counts, positions, sizes, image styles and bird parts. It covers
the vocabulary of the embedded demo world (water, waves, lake, grass, forest, sand, sky,
indoor, the demo's shapes and colours, bills and legs) and reads naturally for a real CLIP
too.

``python -m refineclip_core.demo.text_pool --out assets/text_pool.txt`` regenerates
``assets/text_pool.txt`` deterministically (one description per line).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from ..inspection.textspan import load_text_pool

OBJECTS: tuple[str, ...] = (
    # the demo world
    "waterbird", "landbird", "bird", "star", "house", "car", "fish", "tree", "cup",
    # look-alikes and neighbours
    "duck", "goose", "swan", "seagull", "pelican", "heron", "sparrow", "robin", "crow", "parrot",
    "owl", "boat", "ship", "frog", "turtle", "dog", "cat", "horse", "cow", "flower", "bush",
    "rock", "chair", "table", "lamp", "bottle", "mug", "bowl", "truck", "bicycle", "kite",
    "balloon", "ball", "heart", "circle", "square", "triangle",
)

PLURALS: dict[str, str] = {
    "fish": "fish", "goose": "geese", "bush": "bushes",
}

COLORS: tuple[str, ...] = (
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "white", "black", "brown",
    "grey", "teal", "beige", "dark green", "light blue", "dark blue",
)

SCENES: tuple[str, ...] = (
    # water
    "water", "waves", "a lake", "the ocean", "a river", "the sea", "a pond", "a harbour",
    "rippling water", "open water", "a waterfall", "a swamp",
    # land
    "land", "grass", "a forest", "a field", "a meadow", "a lawn", "trees", "bamboo", "a farm",
    "a hill", "a mountain", "a garden", "a park", "dirt", "mud",
    # sky, sand, indoor and others
    "the sky", "clouds", "a sunset", "sand", "a beach", "a desert", "dunes", "snow", "ice",
    "a room", "a kitchen", "a wooden floor", "a tiled floor", "a wall", "a table top",
    "a city street", "a road", "a parking lot", "rocks",
)

SCENE_KINDS: tuple[str, ...] = (
    "water", "land", "sky", "sand", "indoor", "outdoor", "underwater", "beach", "forest",
    "grassland", "ocean", "lake", "river", "desert", "snowy", "urban", "rural", "night", "sunny",
)

TEXTURES: tuple[str, ...] = (
    "wavy", "striped", "dotted", "speckled", "checkered", "rippled", "grainy", "smooth", "rough",
    "furry", "leafy", "wooden", "tiled", "cloudy", "noisy", "blurry", "zigzag", "spotted",
    "gradient", "plain", "patterned", "mottled", "sandy", "grassy", "watery", "shiny",
)

TEXTURE_NOUNS: tuple[str, ...] = (
    "waves", "ripples", "stripes", "dots", "grains", "tiles", "planks", "furrows", "grass blades",
    "tree trunks", "leaves", "clouds", "bricks", "pebbles", "sparkles", "dunes", "noise",
)

POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom",
    "bottom right", "foreground", "background", "corner", "middle", "edge",
)

SIZES: tuple[str, ...] = ("small", "tiny", "large", "big", "medium-sized", "huge")

COUNTS: tuple[str, ...] = ("two", "three", "four", "several", "many", "a few", "a pair of", "a group of")

STYLES: tuple[str, ...] = (
    "a photo of", "a picture of", "an image of", "a drawing of", "a cartoon of", "a painting of",
    "a sketch of", "a clip art of", "a pixelated image of", "a low resolution photo of",
    "a blurry photo of", "a close-up photo of", "a cropped photo of", "a bright photo of",
    "a dark photo of", "a noisy photo of", "an illustration of", "a toy", "a simple icon of",
    "a rendering of",
)

IMAGE_PROPERTIES: tuple[str, ...] = (
    "a bright image", "a dark image", "a noisy image", "a blurry image", "a sharp image",
    "a high contrast image", "a low contrast image", "a colourful image", "a black and white photo",
    "a pastel image", "a saturated image", "a washed out photo", "a pixelated picture",
    "a low resolution picture", "a grainy photo", "an overexposed photo", "an underexposed photo",
    "a minimalist image", "a cluttered image", "an empty scene", "a simple background",
    "a busy background", "a symmetric image", "a tilted photo", "a flat illustration",
    "a warm toned image", "a cold toned image", "a photo taken at noon", "a photo taken at dusk",
    "a photo with a gradient", "a photo with a horizon line",
)

BIRD_PARTS: tuple[str, ...] = (
    "a flat bill", "a broad bill", "a duck bill", "a pointed bill", "a thin beak", "a short beak",
    "a long beak", "a hooked beak", "webbed feet", "thin toes", "long legs", "short legs",
    "thin legs", "orange feet", "black legs", "a round head", "a long neck", "a short tail",
    "a long tail", "spread wings", "folded wings", "a white eye", "a dark eye", "a crest",
)

SHAPES: tuple[str, ...] = (
    "a five-pointed star", "a triangle roof", "a round crown", "two round wheels", "a handle",
    "a rectangle", "an oval", "a circle", "a square", "a polygon", "a silhouette", "an outline",
    "a door and a window", "a fin and a tail", "a trunk", "a curved handle",
)


def _a(phrase: str) -> str:
    """Prefix an indefinite article unless the phrase already has a determiner."""
    first = phrase.split(" ", 1)[0]
    if first in ("a", "an", "the", "two", "three", "four", "several", "many", "some"):
        return phrase
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _plural(noun: str) -> str:
    if noun in PLURALS:
        return PLURALS[noun]
    if noun.endswith(("s", "sh", "ch")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _categories() -> dict[str, list[str]]:
    """Every template family, fully expanded (before sampling)."""
    objs, cols, scenes = OBJECTS, COLORS, SCENES
    cats: dict[str, list[str]] = {}
    cats["style_object"] = [f"{s} {_a(o)}" for s in STYLES for o in objs]
    cats["color_object"] = [f"{_a(c + ' ' + o)}" for c in cols for o in objs]
    cats["object_scene"] = [f"{_a(o)} {prep} {sc}" for o in objs for sc in scenes for prep in ("on", "in front of", "near")]
    cats["color_object_scene"] = [f"{_a(c + ' ' + o)} on {sc}" for c in cols for o in objs for sc in scenes]
    cats["scene"] = ([f"{s} {sc}" for s in STYLES[:8] for sc in scenes]
                     + [f"{_a(k)} scene" for k in SCENE_KINDS]
                     + [f"{_a(k)} background" for k in SCENE_KINDS]
                     + [f"{_a(k)} landscape" for k in SCENE_KINDS]
                     + [f"an image of {sc} only" for sc in scenes]
                     + [f"a view of {sc}" for sc in scenes])
    cats["scene_color"] = [f"{c} {n}" for c in cols for n in (
        "water", "waves", "grass", "sand", "sky", "leaves", "walls", "floor", "tiles", "background")]
    cats["texture"] = ([f"{_a(t)} texture" for t in TEXTURES] + [f"{_a(t)} pattern" for t in TEXTURES]
                       + [f"{_a(t)} background" for t in TEXTURES]
                       + [f"{_a(c + ' ' + t)} background" for c in cols for t in TEXTURES]
                       + [f"a background of {n}" for n in TEXTURE_NOUNS]
                       + [f"an image full of {n}" for n in TEXTURE_NOUNS]
                       + [f"{c} {n}" for c in cols for n in TEXTURE_NOUNS])
    cats["object_texture"] = [f"{_a(t + ' ' + o)}" for t in TEXTURES for o in objs] + [
        f"{_a(o)} on {n}" for o in objs for n in TEXTURE_NOUNS]
    cats["count"] = [f"{c} {_plural(o)}" for c in COUNTS for o in objs] + [
        f"{c} {col} {_plural(o)}" for c in COUNTS for col in cols for o in objs] + [
        f"one {o}" for o in objs] + [f"a single {o}" for o in objs] + [f"no {_plural(o)}" for o in objs]
    cats["position"] = ([f"{_a(o)} in the {p}" for o in objs for p in POSITIONS]
                        + [f"{_a(o)} in the {p} of {sc}" for o in objs for p in POSITIONS for sc in scenes]
                        + [f"an object in the {p}" for p in POSITIONS]
                        + [f"something {c} in the {p}" for c in cols for p in POSITIONS])
    cats["size"] = ([f"{_a(s + ' ' + o)}" for s in SIZES for o in objs]
                    + [f"{_a(s + ' ' + c + ' ' + o)}" for s in SIZES for c in cols for o in objs]
                    + [f"{_a(s)} object" for s in SIZES] + [f"{_a(o)} filling the image" for o in objs]
                    + [f"{_a(o)} far away" for o in objs] + [f"a close-up of {_a(o)}" for o in objs])
    cats["placement"] = [f"{_a(o)} {w}" for o in objs for w in (
        "indoors", "outdoors", "inside a room", "outside", "in a kitchen", "on a water background",
        "on a land background", "on a sand background", "on a sky background", "on an indoor background",
        "in the water", "on the ground", "in the air", "on a table")]
    birds = ("bird", "waterbird", "landbird", "duck", "heron", "sparrow", "seagull", "goose")
    cats["bird_parts"] = ([f"{_a(b)} with {p}" for b in birds for p in BIRD_PARTS]
                          + [f"{_a(c + ' ' + b)} with {p}" for c in cols for b in birds[:3] for p in BIRD_PARTS]
                          + [f"{_a(b)} with {p} and {q}" for b in birds[:3] for p in BIRD_PARTS[:8]
                             for q in BIRD_PARTS[8:14]]
                          + [f"a close-up of {p}" for p in BIRD_PARTS])
    cats["shapes"] = [f"{_a(c + ' ' + s.split(' ', 1)[1])}" if s.startswith(("a ", "an ")) else f"{c} {s}"
                      for c in cols for s in SHAPES] + [f"an object with {s}" for s in SHAPES]
    cats["properties"] = list(IMAGE_PROPERTIES) + [f"{p} of {_a(o)}" for p in (
        "a bright image", "a dark image", "a blurry image", "a noisy image", "a colourful image") for o in objs]
    cats["colors"] = ([f"the colour {c}" for c in cols] + [f"a mostly {c} image" for c in cols]
                      + [f"{c} and {d}" for c in cols for d in cols if c != d]
                      + [f"{_a(c)} object on {_a(d)} background" for c in cols for d in cols if c != d])
    return cats


CATEGORY_QUOTAS: dict[str, int] = {
    "style_object": 260, "color_object": 260, "object_scene": 420, "color_object_scene": 300,
    "scene": 330, "scene_color": 120, "texture": 300, "object_texture": 200, "count": 260,
    "position": 300, "placement": 260, "size": 200, "bird_parts": 260, "shapes": 120, "properties": 120, "colors": 200,
}
"""How many descriptions each template family contributes (at most), before de-duplication."""


def build_text_pool(seed: int = 0, quotas: dict[str, int] | None = None) -> list[str]:
    """The de-duplicated descriptions, in a deterministic shuffled order.

    Each template family is expanded in full, then ``quotas[family]`` of its texts are drawn
    without replacement with a ``numpy`` Generator seeded by ``seed`` (families that are
    smaller than their quota contribute everything). Scene descriptions (the backgrounds of
    the demo world) are always included in full.
    """
    quotas = dict(CATEGORY_QUOTAS if quotas is None else quotas)
    rng = np.random.default_rng(seed)
    seen: dict[str, None] = {}
    for name, texts in _categories().items():
        texts = list(dict.fromkeys(" ".join(t.split()) for t in texts))
        k = len(texts) if name == "scene" else min(quotas.get(name, 0), len(texts))
        for i in sorted(rng.choice(len(texts), size=k, replace=False)):
            seen.setdefault(texts[int(i)], None)
    pool = list(seen)
    order = rng.permutation(len(pool))
    return [pool[int(i)] for i in order]


def write_text_pool(path: str | Path, seed: int = 0) -> Path:
    """Write :func:`build_text_pool` to ``path`` (UTF-8, one description per line)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(build_text_pool(seed)) + "\n", encoding="utf-8")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m refineclip_core.demo.text_pool", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="assets/text_pool.txt")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    out = write_text_pool(args.out, args.seed)
    print(f"wrote {len(load_text_pool(out))} descriptions to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A procedural spurious-correlation world: look-alike birds on backgrounds, plus distractors.

The world mirrors Waterbirds in miniature. Two *target* classes, ``landbird`` and
``waterbird``, share one body plan (body, wing, tail, head, eye) and differ only in small
details: a waterbird has a broad flat bill and short legs ending in webbed feet, a landbird a
thin pointed bill and long legs with thin toes. In the ``train`` split each bird sits on "its"
background kind (water for waterbirds, land for landbirds) with probability ``bias`` (95% by
default), so the background is a shortcut. Six *unrelated* classes (star, house, car, fish,
tree, cup) sit on any of the five background kinds (water, land, sky, sand, indoor) in every
split; they measure what an edit does to classes it should leave alone (locality).

``val`` and ``test`` are balanced: each of the four target groups (class × background kind)
and each unrelated class gets ``n_per_group`` images.

Everything is deterministic given ``seed``: each image is drawn by its own
``numpy.random.Generator`` seeded with ``(seed, split, index)``. Images are drawn at 64 px
(``CANVAS``) and downsampled (Lanczos) to ``WorldConfig.image_size`` (48 px by default, the
input size of the embedded demo model).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

CANVAS = 64
"""Side of the canvas the world is drawn on, in pixels (before downsampling)."""

TARGET_CLASSES: tuple[str, ...] = ("landbird", "waterbird")
"""The two look-alike classes; the index is the WILDS Waterbirds ``y`` (0 land, 1 water)."""

UNRELATED_CLASSES: tuple[str, ...] = ("star", "house", "car", "fish", "tree", "cup")
"""Distractor classes with distinct shapes, drawn on random backgrounds in every split."""

CLASSES: tuple[str, ...] = TARGET_CLASSES + UNRELATED_CLASSES
"""All class names, target classes first."""


def on_demo_world(classes) -> bool:
    """Are images labelled with exactly the demo world's classes (a ``demo-data`` sample), i.e. the
    data the defaults and the diagnosis were checked on?"""
    return sorted(map(str, classes)) == sorted(CLASSES)


BACKGROUNDS: tuple[str, ...] = ("water", "land", "sky", "sand", "indoor")
"""Background kinds. Target groups use the first two (the WILDS ``place``: 0 land, 1 water)."""

TARGET_PLACES: tuple[str, ...] = ("land", "water")
"""Background kinds of the target groups, indexed by the WILDS ``place`` code."""

HOME_BACKGROUND: dict[str, str] = {"landbird": "land", "waterbird": "water"}
"""The background each target class co-occurs with in the biased training split."""

CUES: tuple[str, ...] = ("background", "color")
"""What the biased training split correlates with the bird class (:attr:`WorldConfig.cue`)."""

HOME_COLOR: dict[str, str] = {"landbird": "brown", "waterbird": "white"}
"""With ``cue="color"``: the body colour each target class co-occurs with in training."""

TARGET_COLORS: tuple[str, ...] = ("brown", "white")
"""With ``cue="color"``: the body colours of the target groups (landbird's home colour first)."""

NEUTRAL_COLORS: tuple[str, ...] = ("grey", "black", "yellow", "blue", "red")
"""With ``cue="color"``: the body colours of the training birds that carry no cue (``neutral_frac``)."""

SCENES: dict[str, tuple[str, ...]] = {
    "water": ("lake", "ocean", "river"),
    "land": ("grass", "forest", "field"),
    "sky": ("sky", "clouds"),
    "sand": ("beach", "desert"),
    "indoor": ("room", "kitchen"),
}
"""Scene variants of each background kind (each drawn differently; named in captions)."""

TEXTURES: dict[str, str] = {
    "lake": "ripples",
    "ocean": "waves",
    "river": "flowing water",
    "grass": "grass blades",
    "forest": "tree trunks",
    "field": "furrows",
    "sky": "a gradient",
    "clouds": "white clouds",
    "beach": "sand grains",
    "desert": "dunes",
    "room": "wooden planks",
    "kitchen": "tiles",
}
"""The texture word used in captions for each scene variant."""

SCENE_PHRASES: dict[str, str] = {
    "lake": "a lake",
    "ocean": "the ocean",
    "river": "a river",
    "grass": "grass",
    "forest": "a forest",
    "field": "a field",
    "sky": "the sky",
    "clouds": "clouds",
    "beach": "a beach",
    "desert": "a desert",
    "room": "a room",
    "kitchen": "a kitchen",
}
"""How captions name each scene variant (with its article)."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (200, 40, 40),
    "orange": (235, 130, 30),
    "yellow": (235, 210, 40),
    "green": (60, 160, 60),
    "blue": (50, 90, 210),
    "purple": (130, 60, 170),
    "pink": (235, 130, 170),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
    "brown": (120, 75, 40),
    "grey": (130, 130, 130),
}
"""Named object colours (the name goes into captions)."""

DETAIL_COLORS: tuple[str, ...] = ("orange", "yellow", "black", "red", "grey", "brown")
"""Colours of bills and legs, shared by both bird classes (colour is never a class cue)."""

POSITIONS: tuple[tuple[str, ...], ...] = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
"""Position names on a 3×3 grid (row, column)."""

CUE_WORDS: dict[str, tuple[str, ...]] = {
    "background": ("water", "land", "lake", "ocean", "sea", "river", "pond", "wave", "ripple", "rippl", "grass",
                   "blade", "forest", "trunk", "tree", "field", "furrow", "ground", "dirt", "mud", "meadow", "lawn",
                   "swamp", "harbour", "shore", "beach", "sand", "desert", "dune", "sky", "cloud", "scene",
                   "background", "landscape", "outdoor", "open"),
    "color": tuple(COLORS) + ("gray", "colour", "color", "light", "dark", "beige", "teal"),
}
"""Word stems that name each cue (a concept "names the cue" when one of its words starts with one):
what an explanation of the demo world's errors should say. Checks only; nothing is trained on them."""

BIRD_PART_WORDS: tuple[str, ...] = ("bill", "beak", "flat", "pointed", "broad", "webbed", "feet", "foot", "leg",
                                    "toe", "thin", "long", "short", "wing", "tail", "neck", "crest")
"""Word stems that name the causal cue, the birds' parts (what an explanation of a shortcut should not say)."""


def names_cue(words: Sequence[str], stems: Sequence[str]) -> bool:
    """Whether any of ``words`` starts with one of ``stems`` (:data:`CUE_WORDS`, :data:`BIRD_PART_WORDS`)."""
    return any(w.lower().startswith(s) for w in words for s in stems)


SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
"""Split names and their WILDS codes (also mixed into the per-image seeds)."""


@dataclass(frozen=True)
class WorldConfig:
    """Knobs of the world. The defaults are the ones the embedded demo model was trained on.

    ``bias``: among training birds on water or land, the fraction on their home background.
    ``neutral_frac``: fraction of training birds drawn on a neutral background (sky, sand,
    indoor), where only the bill and legs tell the classes apart. ``detail_scale``:
    multiplies the size of the class cues (bill, legs, feet). ``bird_scale``: multiplies the
    size of the whole bird (birds only).
    ``noise``: maximum standard deviation of the Gaussian pixel noise (0–255 scale).
    ``scale_range``: object size multipliers. ``image_size``: output side in pixels.
    ``cue``: the planted shortcut. ``"background"`` (the default, Waterbirds): training birds
    sit on their home background (:data:`HOME_BACKGROUND`). ``"color"``: training birds have
    their home body colour (:data:`HOME_COLOR`) with probability ``bias`` and sit on water or
    land at random, so the background carries no class information; ``neutral_frac`` of them
    get a colour that is no cue (:data:`NEUTRAL_COLORS`); the balanced splits' four groups are
    class × body colour (``"waterbird in brown"``). A test of whether an explanation follows the
    cue that was planted (issue 17).
    """

    image_size: int = 48
    bias: float = 0.95
    neutral_frac: float = 0.2
    detail_scale: float = 1.5
    bird_scale: float = 1.15
    noise: float = 8.0
    scale_range: tuple[float, float] = (0.8, 1.2)
    cue: str = "background"

    def __post_init__(self) -> None:
        if self.cue not in CUES:
            raise ValueError(f"cue must be one of {', '.join(CUES)}, got {self.cue!r}")
        if not 0.0 <= self.bias <= 1.0:
            raise ValueError(f"bias must be in [0, 1], got {self.bias}")
        if not 0.0 <= self.neutral_frac < 1.0:
            raise ValueError(f"neutral_frac must be in [0, 1), got {self.neutral_frac}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {self.image_size}")
        if self.detail_scale <= 0:
            raise ValueError(f"detail_scale must be positive, got {self.detail_scale}")
        if self.bird_scale <= 0:
            raise ValueError(f"bird_scale must be positive, got {self.bird_scale}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WorldConfig":
        """The inverse of ``dataclasses.asdict`` (as stored in a model's ``metadata.json``)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown world parameters: {', '.join(unknown)}")
        kw = dict(data)
        if "scale_range" in kw:
            kw["scale_range"] = tuple(kw["scale_range"])
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """The knobs as JSON-safe data (the inverse of :meth:`from_dict`). ``cue`` is written only
        when it is not ``"background"``: it came after the committed demo model, whose metadata
        records the world without it, and must keep recording today's defaults."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["scale_range"] = list(self.scale_range)
        if d["cue"] == "background":
            del d["cue"]
        return d

    @property
    def target_groups(self) -> tuple[str, ...]:
        """The four target groups of the balanced splits, in WILDS order (landbird first, the
        landbird's home cue first)."""
        values = TARGET_PLACES if self.cue == "background" else TARGET_COLORS
        return tuple(group_name(c, v, self.cue) for c in TARGET_CLASSES for v in values)

    # What the trainer (demo/train.py) and the benchmarks ask of a world; the digits world
    # (demo/digits.py, DigitsConfig) answers the same.
    kind = "birds"
    model_name = "refineclip-demo"
    classes = CLASSES
    target_classes = TARGET_CLASSES
    unrelated_classes = UNRELATED_CLASSES

    @property
    def caption_family_names(self) -> tuple[str, ...]:
        return CAPTION_FAMILIES

    def training_pool(self, seed: int, n_per_group: int, n_unrelated: int | None = None) -> list["WorldSample"]:
        """The model's training images: a fresh biased ``train`` split."""
        return sample_world("train", seed, n_per_group, self, n_unrelated=n_unrelated)

    def sample(self, split: str, seed: int, n_per_group: int, n_unrelated: int | None = None) -> list["WorldSample"]:
        return sample_world(split, seed, n_per_group, self, n_unrelated=n_unrelated)

    def caption_families(self, sample: "WorldSample") -> dict[str, list[str]]:
        return caption_families(sample)

    def write(self, out_dir: str | Path, split: str, seed: int, n_per_group: int | Mapping[str, int]) -> Path:
        return write_world(out_dir, split, seed, n_per_group, config=self)


@dataclass
class WorldSample:
    """One labelled image of the world.

    ``label`` is the class name, ``background`` the background kind (one of
    :data:`BACKGROUNDS`), ``group`` ``"<bird> on <land|water>"`` for target classes (the
    naming of :mod:`refineclip_core.loading.data`'s Waterbirds loader) and the class name for
    unrelated classes. ``attributes`` holds what the captions talk about (colour, size,
    position, scene, texture, and for birds the bill/legs/feet shapes).
    """

    image: Image.Image
    label: str
    group: str
    background: str
    split: str
    index: int
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def is_target(self) -> bool:
        return self.label in TARGET_CLASSES


def group_name(label: str, value: str, cue: str = "background") -> str:
    """The group of an image: ``"<bird> on <place>"`` for birds (``"<bird> in <colour>"`` when the
    world's cue is the body colour), the class name otherwise.

    (Training birds on neutral backgrounds get ``"<bird> on <sky|sand|indoor>"``.)
    """
    if label not in TARGET_CLASSES:
        return label
    return f"{label} on {value}" if cue == "background" else f"{label} in {value}"


# ----------------------------------------------------------------------------------------------
# Backgrounds (numpy textures, float32 H×W×3 in 0..255)


def _jitter(rng: np.random.Generator, rgb: Sequence[float], amount: float) -> np.ndarray:
    return np.clip(np.asarray(rgb, dtype=np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    return y, x


def _bg_water(rng: np.random.Generator, scene: str, n: int) -> np.ndarray:
    y, x = _grid(n)
    if scene == "ocean":
        base, amp, period, light = (25, 70, 160), 28.0, rng.uniform(5, 7), 1.0
    elif scene == "lake":
        base, amp, period, light = (40, 110, 170), 14.0, rng.uniform(7, 10), 0.6
    else:  # river: teal, diagonal flow
        base, amp, period, light = (30, 130, 150), 20.0, rng.uniform(6, 8), 0.8
    base_c = _jitter(rng, base, 20)
    phase = rng.uniform(0, 2 * math.pi)
    wobble = rng.uniform(1.0, 3.0)
    lam_x = rng.uniform(10, 20)
    coord = y + (0.35 * x if scene == "river" else 0.0)
    wave = np.sin(2 * math.pi * (coord + wobble * np.sin(2 * math.pi * x / lam_x + phase)) / period)
    img = base_c[None, None, :] + amp * wave[..., None] * np.array([0.6, 0.8, 1.0], np.float32)
    # sparkling highlights on wave crests
    crest = (wave > 0.92) & (rng.random((n, n)) < 0.35 * light)
    img[crest] = img[crest] * 0.4 + 255 * 0.6
    return img


def _bg_land(rng: np.random.Generator, scene: str, n: int) -> np.ndarray:
    y, x = _grid(n)
    if scene == "grass":
        base = _jitter(rng, (70, 145, 45), 25)
        img = np.repeat(np.repeat(base[None, None, :], n, 0), n, 1)
        img += rng.normal(0, 10, (n, n, 1)).astype(np.float32)
        for _ in range(int(rng.integers(90, 140))):  # grass blades: short near-vertical strokes
            x0, y0 = rng.uniform(0, n), rng.uniform(0, n)
            length, lean = rng.uniform(3, 8), rng.uniform(-1.5, 1.5)
            shade = rng.uniform(-45, 45)
            for t in np.linspace(0, 1, 6):
                xi, yi = int(x0 + lean * t) % n, int(y0 - length * t) % n
                img[yi, xi] = np.clip(base + shade, 0, 255)
    elif scene == "forest":
        base = _jitter(rng, (35, 85, 35), 15)
        img = np.repeat(np.repeat(base[None, None, :], n, 0), n, 1)
        for _ in range(int(rng.integers(5, 9))):  # trunks
            x0, w = rng.uniform(0, n), rng.uniform(2, 5)
            trunk = _jitter(rng, (85, 55, 30), 15)
            img[:, int(x0):int(x0 + w)] = trunk
        for _ in range(int(rng.integers(14, 22))):  # foliage blobs
            cx, cy, r = rng.uniform(0, n), rng.uniform(0, n * 0.7), rng.uniform(4, 9)
            mask = (x - cx) ** 2 + (y - cy) ** 2 < r * r
            img[mask] = _jitter(rng, (40, 110, 40), 30)
    else:  # field: brown/olive with furrows
        base = _jitter(rng, (140, 115, 60), 20)
        period = rng.uniform(4, 7)
        tilt = rng.uniform(-0.2, 0.2)
        furrow = np.sin(2 * math.pi * (y + tilt * x) / period)
        img = base[None, None, :] + 22 * furrow[..., None]
        img += rng.normal(0, 8, (n, n, 1)).astype(np.float32)
        tuft = rng.random((n, n)) < 0.04
        img[tuft] = _jitter(rng, (90, 140, 50), 20)
    return img


def _bg_sky(rng: np.random.Generator, scene: str, n: int) -> np.ndarray:
    y, _ = _grid(n)
    top, bottom = _jitter(rng, (110, 165, 235), 20), _jitter(rng, (200, 225, 250), 10)
    t = (y / (n - 1))[..., None]
    img = top[None, None, :] * (1 - t) + bottom[None, None, :] * t
    n_clouds = int(rng.integers(3, 6)) if scene == "clouds" else int(rng.integers(0, 2))
    yy, xx = _grid(n)
    for _ in range(n_clouds):
        cx, cy = rng.uniform(0, n), rng.uniform(0, n)
        rx, ry = rng.uniform(6, 14), rng.uniform(3, 6)
        mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
        img[mask] = img[mask] * 0.25 + 245 * 0.75
    return img


def _bg_sand(rng: np.random.Generator, scene: str, n: int) -> np.ndarray:
    y, x = _grid(n)
    base = _jitter(rng, (215, 190, 135), 18)
    if scene == "desert":
        dune = np.sin(2 * math.pi * (y + 4 * np.sin(2 * math.pi * x / rng.uniform(25, 45))) / rng.uniform(14, 22))
        img = base[None, None, :] + 18 * dune[..., None]
    else:
        img = np.repeat(np.repeat(base[None, None, :], n, 0), n, 1)
    img += rng.normal(0, 6, (n, n, 1)).astype(np.float32)
    grains = rng.random((n, n)) < 0.08
    img[grains] -= 35
    return img


def _bg_indoor(rng: np.random.Generator, scene: str, n: int) -> np.ndarray:
    y, x = _grid(n)
    wall = _jitter(rng, (200, 195, 185), 35)
    img = np.repeat(np.repeat(wall[None, None, :], n, 0), n, 1)
    horizon = int(rng.uniform(0.5, 0.7) * n)
    if scene == "room":
        floor = _jitter(rng, (150, 100, 60), 20)
        plank = rng.uniform(5, 8)
        stripes = (np.floor(x / plank) % 2)[horizon:] * 18 - 9
        img[horizon:] = floor[None, None, :] + stripes[..., None]
        lines = (x % plank) < 1
        img[horizon:][lines[horizon:]] -= 30
    else:  # kitchen: tiled floor
        a, b = _jitter(rng, (230, 230, 225), 15), _jitter(rng, (90, 95, 105), 25)
        tile = rng.uniform(5, 8)
        checker = ((np.floor(x / tile) + np.floor(y / tile)) % 2)[horizon:, :, None]
        img[horizon:] = a * checker + b * (1 - checker)
    img[horizon - 1:horizon + 1] = img[horizon - 1:horizon + 1] * 0.6
    return img


_BACKGROUND_DRAWERS: dict[str, Callable[[np.random.Generator, str, int], np.ndarray]] = {
    "water": _bg_water,
    "land": _bg_land,
    "sky": _bg_sky,
    "sand": _bg_sand,
    "indoor": _bg_indoor,
}


# ----------------------------------------------------------------------------------------------
# Foreground objects (Pillow ImageDraw on the 64 px canvas)

_Point = tuple[float, float]


def _shade(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(c * factor, 0, 255)) for c in rgb)  # type: ignore[return-value]


def _ellipse(draw: ImageDraw.ImageDraw, cx: float, cy: float, rx: float, ry: float, fill: Any) -> None:
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)


def _draw_bird(draw: ImageDraw.ImageDraw, label: str, cx: float, cy: float, s: float, facing: int,
               body: tuple[int, int, int], detail: tuple[int, int, int], d: float) -> None:
    """One bird; ``label`` only changes the bill, the legs and the feet (scaled by ``d``).

    ``(cx, cy)`` is roughly the centre of the whole drawing (tail to bill, head to feet).
    """
    f = facing
    cx, cy = cx - f * 4 * s, cy - 4 * s
    # legs first (behind the body)
    leg_top = cy + 5 * s
    for dx in (-3 * s, 2 * s):
        lx = cx + dx
        if label == "waterbird":  # short legs, broad webbed feet
            foot_y = leg_top + 4 * s
            draw.line([(lx, leg_top), (lx, foot_y)], fill=detail, width=max(1, round(1.2 * s)))
            draw.polygon([(lx - 1 * s * d, foot_y), (lx + f * 5 * s * d, foot_y + 0.5 * s),
                          (lx + f * 4 * s * d, foot_y + 3 * s * d)], fill=detail)
        else:  # long thin legs, three thin toes
            foot_y = leg_top + 10 * s * d
            draw.line([(lx, leg_top), (lx, foot_y)], fill=detail, width=1)
            for toe in (-2.5, 0.0, 2.5):
                draw.line([(lx, foot_y), (lx + toe * s * d + f * 1.0 * s, foot_y + 1.5 * s)], fill=detail, width=1)
    # tail, body, wing
    draw.polygon([(cx - f * 9 * s, cy - 2 * s), (cx - f * 17 * s, cy - 6 * s), (cx - f * 16 * s, cy + 2 * s)],
                 fill=_shade(body, 0.8))
    _ellipse(draw, cx, cy, 11 * s, 6.5 * s, body)
    _ellipse(draw, cx - f * 1.5 * s, cy - 0.5 * s, 6.5 * s, 3.5 * s, _shade(body, 0.72))
    # head and eye
    hx, hy, hr = cx + f * 10 * s, cy - 7 * s, 5 * s
    _ellipse(draw, hx, hy, hr, hr, body)
    eye = (250, 250, 250) if sum(body) < 200 else (15, 15, 15)
    _ellipse(draw, hx + f * 1.5 * s, hy - 1.2 * s, 0.9 * s, 0.9 * s, eye)
    # bill
    bx = hx + f * (hr - 0.5)
    if label == "waterbird":  # broad, flat, rounded (duck-like)
        length, half = 7.5 * s * d, 2.2 * s * d
        draw.polygon([(bx, hy - half), (bx + f * length * 0.8, hy - half * 0.6),
                      (bx + f * length, hy + 0.3 * half), (bx + f * length * 0.8, hy + half),
                      (bx, hy + half)], fill=detail)
    else:  # thin and pointed
        length, half = 6.5 * s * d, 0.9 * s * d
        draw.polygon([(bx, hy - half), (bx + f * length, hy + 0.4 * s), (bx, hy + half)], fill=detail)


def _star(draw: ImageDraw.ImageDraw, cx: float, cy: float, s: float, color: Any, rng: np.random.Generator) -> None:
    rot = rng.uniform(0, 2 * math.pi / 5)
    pts = [(cx + (12 if k % 2 == 0 else 5) * s * math.cos(rot + k * math.pi / 5 - math.pi / 2),
            cy + (12 if k % 2 == 0 else 5) * s * math.sin(rot + k * math.pi / 5 - math.pi / 2)) for k in range(10)]
    draw.polygon(pts, fill=color)


def _house(draw: ImageDraw.ImageDraw, cx: float, cy: float, s: float, color: Any, rng: np.random.Generator) -> None:
    w, h = 10 * s, 8 * s
    draw.rectangle([cx - w, cy - h + 4 * s, cx + w, cy + h + 4 * s], fill=color)
    roof = _shade(color, 0.55) if sum(color) > 150 else (170, 60, 50)
    draw.polygon([(cx - w - 2 * s, cy - h + 4 * s), (cx + w + 2 * s, cy - h + 4 * s), (cx, cy - h - 7 * s)], fill=roof)
    door_x = cx + rng.uniform(-5, 5) * s
    draw.rectangle([door_x - 2 * s, cy + 3 * s, door_x + 2 * s, cy + h + 4 * s], fill=(70, 45, 25))
    draw.rectangle([cx - 7 * s, cy - 2 * s, cx - 3 * s, cy + 1.5 * s], fill=(180, 220, 240))


def _car(draw: ImageDraw.ImageDraw, cx: float, cy: float, s: float, color: Any, rng: np.random.Generator) -> None:
    draw.rectangle([cx - 14 * s, cy - 3 * s, cx + 14 * s, cy + 5 * s], fill=color)
    draw.polygon([(cx - 8 * s, cy - 3 * s), (cx - 5 * s, cy - 10 * s), (cx + 6 * s, cy - 10 * s),
                  (cx + 9 * s, cy - 3 * s)], fill=_shade(color, 0.85))
    draw.rectangle([cx - 4.5 * s, cy - 8.5 * s, cx + 5 * s, cy - 4 * s], fill=(190, 225, 245))
    for wx in (-8 * s, 8 * s):
        _ellipse(draw, cx + wx, cy + 5 * s, 4 * s, 4 * s, (20, 20, 20))
        _ellipse(draw, cx + wx, cy + 5 * s, 1.5 * s, 1.5 * s, (170, 170, 170))


def _fish(draw: ImageDraw.ImageDraw, cx: float, cy: float, s: float, color: Any, rng: np.random.Generator) -> None:
    f = 1 if rng.random() < 0.5 else -1
    draw.polygon([(cx - f * 8 * s, cy), (cx - f * 17 * s, cy - 7 * s), (cx - f * 17 * s, cy + 7 * s)],
                 fill=_shade(color, 0.8))
    _ellipse(draw, cx, cy, 11 * s, 6 * s, color)
    draw.polygon([(cx - 2 * s, cy - 5 * s), (cx + 3 * s, cy - 10 * s), (cx + 5 * s, cy - 5 * s)], fill=_shade(color, 0.8))
    eye = (250, 250, 250) if sum(color) < 200 else (15, 15, 15)
    _ellipse(draw, cx + f * 6 * s, cy - 1.5 * s, 1.2 * s, 1.2 * s, eye)


def _tree(draw: ImageDraw.ImageDraw, cx: float, cy: float, s: float, color: Any, rng: np.random.Generator) -> None:
    draw.rectangle([cx - 2 * s, cy, cx + 2 * s, cy + 13 * s], fill=(100, 65, 35))
    _ellipse(draw, cx, cy - 5 * s, 10 * s, 10 * s, color)
    _ellipse(draw, cx - 3 * s, cy - 8 * s, 4 * s, 4 * s, _shade(color, 1.2))


def _cup(draw: ImageDraw.ImageDraw, cx: float, cy: float, s: float, color: Any, rng: np.random.Generator) -> None:
    draw.ellipse([cx + 4 * s, cy - 5 * s, cx + 13 * s, cy + 5 * s], outline=_shade(color, 0.8), width=max(2, round(2.5 * s)))
    draw.polygon([(cx - 9 * s, cy - 9 * s), (cx + 9 * s, cy - 9 * s), (cx + 7 * s, cy + 9 * s), (cx - 7 * s, cy + 9 * s)],
                 fill=color)
    _ellipse(draw, cx, cy - 9 * s, 9 * s, 2 * s, _shade(color, 0.6))


_OBJECT_DRAWERS: dict[str, Callable[..., None]] = {
    "star": _star,
    "house": _house,
    "car": _car,
    "fish": _fish,
    "tree": _tree,
    "cup": _cup,
}


# ----------------------------------------------------------------------------------------------
# Sampling


def _split_code(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    return SPLITS[split]


def _pick_color(rng: np.random.Generator, names: Sequence[str], avoid: np.ndarray) -> str:
    """A colour name from ``names`` that stands out from the mean background colour ``avoid``."""
    order = rng.permutation(len(names))
    for k in order:
        if np.linalg.norm(np.asarray(COLORS[names[k]], np.float32) - avoid) > 90:
            return names[k]
    return names[order[0]]


def _size_name(scale: float, lo: float, hi: float) -> str:
    t = (scale - lo) / max(hi - lo, 1e-9)
    return "small" if t < 1 / 3 else ("large" if t > 2 / 3 else "medium")


def _position_name(cx: float, cy: float, n: int) -> str:
    col = 0 if cx < n * 0.44 else (2 if cx > n * 0.56 else 1)
    row = 0 if cy < n * 0.44 else (2 if cy > n * 0.56 else 1)
    return POSITIONS[row][col]


def render(label: str, background: str, rng: np.random.Generator, config: WorldConfig = WorldConfig(),
           color: str | None = None) -> tuple[Image.Image, dict[str, Any]]:
    """Draw one image of class ``label`` on background kind ``background``.

    ``color``: the body colour of a bird (default: one that stands out from the background).
    Returns the RGB image (``config.image_size`` square) and its caption attributes.
    """
    if label not in CLASSES:
        raise ValueError(f"unknown class {label!r}; classes are {', '.join(CLASSES)}")
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; backgrounds are {', '.join(BACKGROUNDS)}")
    n = CANVAS
    scene = SCENES[background][int(rng.integers(len(SCENES[background])))]
    bg = _BACKGROUND_DRAWERS[background](rng, scene, n)
    lo, hi = config.scale_range
    scale = float(rng.uniform(lo, hi))
    draw_scale = scale * (config.bird_scale if label in TARGET_CLASSES else 1.0)
    margin = min((21 if label in TARGET_CLASSES else 20) * draw_scale, n / 2 - 1)
    cx = float(rng.uniform(margin, n - margin))
    cy = float(rng.uniform(margin, n - margin))
    avoid = bg.reshape(-1, 3).mean(0)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    attrs: dict[str, Any] = {
        "scene": scene,
        "texture": TEXTURES[scene],
        "size": _size_name(scale, lo, hi),
        "position": _position_name(cx, cy, n),
        "scale": round(scale, 4),
        "x": round(cx / n, 4),
        "y": round(cy / n, 4),
    }
    if label in TARGET_CLASSES:
        body_names = ("white", "black", "grey", "brown", "red", "orange", "yellow", "blue", "pink", "purple", "green")
        color = _pick_color(rng, body_names, avoid) if color is None else color
        if color not in COLORS:
            raise ValueError(f"unknown colour {color!r}; colours are {', '.join(COLORS)}")
        detail_name = _pick_color(rng, [c for c in DETAIL_COLORS if c != color], avoid)
        facing = 1 if rng.random() < 0.5 else -1
        _draw_bird(draw, label, cx, cy, draw_scale, facing, COLORS[color], COLORS[detail_name], config.detail_scale)
        water = label == "waterbird"
        attrs.update(color=color, detail_color=detail_name, facing="right" if facing > 0 else "left",
                     bill="flat" if water else "pointed", legs="short" if water else "long",
                     feet="webbed" if water else "thin")
    else:
        color = _pick_color(rng, tuple(COLORS), avoid)
        _OBJECT_DRAWERS[label](draw, cx, cy, scale, COLORS[color], rng)
        attrs.update(color=color)
    # photometric nuisances: brightness/contrast jitter and Gaussian noise
    arr = np.asarray(img, dtype=np.float32)
    gain, offset = rng.uniform(0.85, 1.15), rng.uniform(-15, 15)
    arr = (arr - 128) * gain + 128 + offset
    sigma = rng.uniform(0, config.noise)
    if sigma > 0:
        arr = arr + rng.normal(0, sigma, arr.shape).astype(np.float32)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if config.image_size != n:
        img = img.resize((config.image_size, config.image_size), Image.Resampling.LANCZOS)
    return img, attrs


def plan_split(split: str, n_per_group: int, seed: int, config: WorldConfig = WorldConfig(),
               n_unrelated: int | None = None) -> list[tuple[str, str]]:
    """The (class, background kind) of every image of a split, in a fixed order.

    ``train``: each target class gets ``2 * n_per_group`` images: ``round(neutral_frac · 2n)``
    on neutral backgrounds (sky, sand, indoor, cycling), and of the others ``round(bias · m)``
    on the home background and the rest on the other target background. ``val`` and
    ``test``: each of the four target groups gets ``n_per_group``. Unrelated classes get
    ``n_unrelated`` images each (default ``n_per_group``): on uniformly random backgrounds in
    ``train``, cycling evenly through :data:`BACKGROUNDS` in ``val``/``test``.

    With ``config.cue == "color"`` the same counts hold for body colours instead of backgrounds
    (:data:`HOME_COLOR`, :data:`NEUTRAL_COLORS`; ``val``/``test``: ``n_per_group`` per class ×
    colour), and every bird sits on water or land, half and half, whatever its class.
    """
    return [(label, background) for label, background, _ in _plan(split, n_per_group, seed, config, n_unrelated)]


def _plan(split: str, n_per_group: int, seed: int, config: WorldConfig,
          n_unrelated: int | None) -> list[tuple[str, str, str | None]]:
    code = _split_code(split)
    if n_per_group < 0:
        raise ValueError("n_per_group must be >= 0")
    n_unrel = n_per_group if n_unrelated is None else n_unrelated
    rng = np.random.default_rng([seed, code, 1_000_003])
    by_color = config.cue == "color"
    plan: list[tuple[str, str, str | None]] = []
    for label in TARGET_CLASSES:
        homes, neutral = ((HOME_COLOR, list(NEUTRAL_COLORS)) if by_color else
                          (HOME_BACKGROUND, [b for b in BACKGROUNDS if b not in TARGET_PLACES]))
        values = TARGET_COLORS if by_color else TARGET_PLACES
        if split == "train":
            home = homes[label]
            away = next(v for v in values if v != home)
            total = 2 * n_per_group
            n_neutral = int(round(config.neutral_frac * total))
            n_home = int(round(config.bias * (total - n_neutral)))
            cues = ([home] * n_home + [away] * (total - n_neutral - n_home)
                    + [neutral[k % len(neutral)] for k in range(n_neutral)])
            order = rng.permutation(total)
            if by_color:
                places = [TARGET_PLACES[k % 2] for k in rng.permutation(total)]
                plan += [(label, places[i], cues[k]) for i, k in enumerate(order)]
            else:
                plan += [(label, cues[k], None) for k in order]
        else:
            for value in values:
                plan += ([(label, TARGET_PLACES[k % 2], value) for k in range(n_per_group)] if by_color
                         else [(label, value, None)] * n_per_group)
    for label in UNRELATED_CLASSES:
        if split == "train":
            plan += [(label, BACKGROUNDS[int(k)], None) for k in rng.integers(0, len(BACKGROUNDS), n_unrel)]
        else:
            plan += [(label, BACKGROUNDS[k % len(BACKGROUNDS)], None) for k in range(n_unrel)]
    return plan


def sample_world(split: str, seed: int, n_per_group: int, config: WorldConfig = WorldConfig(),
                 n_unrelated: int | None = None) -> list[WorldSample]:
    """Draw the images of one split (see :func:`plan_split` for the counts).

    Deterministic: the same ``(split, seed, n_per_group, config, n_unrelated)`` gives the
    same images, pixel for pixel; different splits never share a per-image seed.
    """
    code = _split_code(split)
    samples: list[WorldSample] = []
    for index, (label, background, color) in enumerate(_plan(split, n_per_group, seed, config, n_unrelated)):
        rng = np.random.default_rng([seed, code, index])
        image, attrs = render(label, background, rng, config, color)
        group = group_name(label, background) if color is None else group_name(label, color, "color")
        samples.append(WorldSample(image=image, label=label, group=group,
                                   background=background, split=split, index=index, attributes=attrs))
    return samples


# ----------------------------------------------------------------------------------------------
# Captions

_PHOTO = ("a photo of", "a picture of", "an image of")


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


CAPTION_FAMILIES: tuple[str, ...] = ("class_background", "class", "background", "attributes", "detail")
"""Caption families of :func:`caption_families` (``detail`` exists for birds only)."""


def caption_families(sample: WorldSample) -> dict[str, list[str]]:
    """Every caption of one image, grouped by what it talks about (all synonyms included).

    * ``class_background``: class and background ("a photo of a waterbird on a water
      background.", "a waterbird on a lake");
    * ``class``: class only, including the zero-shot template "a photo of a {class}.";
    * ``background``: background only ("a water scene", "a photo of the ocean.");
    * ``attributes``: colour, size, position, texture together with class and scene;
    * ``detail`` (birds only): the bill and legs, without the class name.

    Every caption listed is true of the image, so a trainer can treat any caption of another
    image that appears in this list as a positive (see :mod:`refineclip_core.demo.train`).
    """
    a = sample.attributes
    cls, kind, scene = sample.label, sample.background, SCENE_PHRASES[a["scene"]]
    color, size, pos, texture = a["color"], a["size"], a["position"], a["texture"]
    fam: dict[str, list[str]] = {
        "class_background": [f"{p} {_article(cls)} on {_article(kind)} background." for p in _PHOTO]
        + [f"{_article(cls)} on {_article(kind)} background", f"{_article(cls)} on {scene}"],
        "class": [f"{p} {_article(cls)}." for p in _PHOTO] + [_article(cls)],
        "background": [f"{_article(kind)} scene", f"{_article(kind)} background"]
        + [f"{p} {scene}." for p in _PHOTO],
        "attributes": [
            f"{_article(size)} {color} {cls} on {scene}",
            f"{_article(cls)} in the {pos} of {scene}",
            f"{_article(color)} {cls} on {texture}",
        ],
    }
    if cls in TARGET_CLASSES:
        fam["detail"] = [
            f"a bird with {_article(a['bill'])} bill and {a['legs']} legs",
            f"a bird with {a['feet']} feet",
            f"{_article(color)} bird with {_article(a['bill'])} bill",
        ]
    return fam


def captions(sample: WorldSample, rng: np.random.Generator) -> list[str]:
    """Varied captions for one image: up to two per caption family, picked with ``rng``.

    Class and background are named alone and together; colours, sizes, positions, scenes
    and textures appear in the attribute captions; for birds the bill and legs are described
    without naming the class. The zero-shot template ``"a photo of a {class}."`` is always
    included. :func:`caption_families` lists every caption.
    """
    out: list[str] = []
    for texts in caption_families(sample).values():
        for k in rng.permutation(len(texts))[:2]:
            out.append(texts[int(k)])
    zero_shot = f"a photo of {_article(sample.label)}."
    return out if zero_shot in out else [zero_shot] + out


# ----------------------------------------------------------------------------------------------
# Writing datasets to disk

LAYOUTS = ("folder", "waterbirds")


def write_world(out_dir: str | Path, split: str, seed: int, n_per_group: int | Mapping[str, int],
                layout: str = "folder", config: WorldConfig = WorldConfig()) -> Path:
    """Write a split of the world as PNG files plus ``metadata.csv``; returns ``out_dir``.

    ``layout="folder"``: ``<out>/<class>/<split>_<index>.png`` for every class and
    ``<out>/metadata.csv`` with columns ``path,label,group,split`` (``path`` relative to
    ``out``). ``split`` may also be ``"all"`` (train, val and test into one folder);
    ``n_per_group`` may then be a mapping split -> size (e.g. a larger test split).

    ``layout="waterbirds"``: the WILDS Waterbirds layout for the two target classes only,
    always all three splits (train biased, val/test balanced; ``split`` is ignored):
    ``<out>/<NNN.Class>/<split>_<index>.png`` and ``<out>/metadata.csv`` with columns
    ``img_filename,y,split,place`` (``y`` 0 landbird / 1 waterbird, ``split`` 0 train /
    1 val / 2 test, ``place`` 0 land / 1 water). WILDS has no place for neutral
    backgrounds, so this layout draws its training birds with ``neutral_frac=0``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if layout == "folder":
        splits = list(SPLITS) if split == "all" else [split]
        return write_samples(out, {sp: sample_world(sp, seed, n_per_group[sp] if isinstance(n_per_group, Mapping)
                                                    else n_per_group, config) for sp in splits})
    if isinstance(n_per_group, Mapping):
        raise ValueError("the waterbirds layout takes one n_per_group for all splits")
    rows = []
    wb_config = replace(config, neutral_frac=0.0)
    for sp, code in SPLITS.items():
        for sample in sample_world(sp, seed, n_per_group, wb_config, n_unrelated=0):
            y = TARGET_CLASSES.index(sample.label)
            sub = f"{y + 1:03d}.{sample.label.capitalize()}"
            rel = Path(sub) / f"{sp}_{sample.index:05d}.png"
            (out / sub).mkdir(exist_ok=True)
            sample.image.save(out / rel)
            rows.append({"img_filename": rel.as_posix(), "y": str(y), "split": str(code),
                         "place": str(TARGET_PLACES.index(sample.background))})
    _write_csv(out / "metadata.csv", ["img_filename", "y", "split", "place"], rows)
    return out


def write_samples(out_dir: str | Path, samples: Mapping[str, Sequence[WorldSample]]) -> Path:
    """The folder layout of any world: ``<out>/<class>/<split>_<index>.png`` and ``<out>/metadata.csv``
    (``path,label,group,split``, ``path`` relative to ``out``) for each split's samples."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    for sp, split_samples in samples.items():
        for sample in split_samples:
            rel = Path(sample.label) / f"{sp}_{sample.index:05d}.png"
            (out / rel.parent).mkdir(exist_ok=True)
            sample.image.save(out / rel)
            rows.append({"path": rel.as_posix(), "label": sample.label, "group": sample.group, "split": sp})
    _write_csv(out / "metadata.csv", ["path", "label", "group", "split"], rows)
    return out


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

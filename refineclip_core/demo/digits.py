"""A Colored-MNIST-style world made of real handwritten digits nobody here drew.

The images are scikit-learn's ``load_digits`` (1,797 handwritten digits, 8×8 pixels, 16 grey
levels; the UCI "optdigits" test set, shipped inside the ``scikit-learn`` package: nothing is
downloaded). Each digit is upscaled (bicubic) to most of a ``DigitsConfig.image_size`` canvas
(48 px, the demo model's input size), slightly rotated and shifted, and written in white or black
strokes on a coloured background. The colour is the planted shortcut:

* two *target* digits that look alike (``three`` and ``eight`` by default) each sit on "their"
  background colour (:attr:`DigitsConfig.home_colors`) in ``bias`` (95%) of the biased
  training images; ``neutral_frac`` of them sit on a colour that carries no cue;
* four other digits that look unlike them and unlike each other (*unrelated* classes: zero, one,
  four, six; :attr:`DigitsConfig.unrelated`) sit on any colour, the home colours included;
* as in Colored MNIST, 25% of the target digits' training labels are noisy (``label_noise``: the
  image shows the other target digit's handwriting), so the colour predicts the label better than
  the shape does;
* ``val`` and ``test`` are balanced (and their labels exact): every target digit on each home colour (groups
  ``"three on red"``, ``"three on green"``, ``"eight on red"``, ``"eight on green"``: class ×
  colour), unrelated digits on colours cycled evenly (group = class name).

**Which handwriting goes where.** The 1,797 digits are cut once (class-stratified, a fixed
permutation) into a *model* half, the only images :func:`training_pool` draws (the model is trained
on them), and a *world* half. Each world seed cuts the world half again, class-stratified, into a
``fit`` share (:attr:`DigitsConfig.fit_share`; the ``train`` and ``val`` splits draw from it: the
unlabelled adaptation images and the labelled samples) and the rest, the ``test`` split. A test
image's handwriting is therefore never seen by the model nor by any method fitted on that world.
``val`` and ``test`` show every handwritten digit of their share once per group colour (the
same handwriting on both colours), so their size is fixed by the data (about 36 and 54 per
class); ``n_per_group`` caps it.

Everything is deterministic given the seed: each image is drawn by its own
``numpy.random.Generator`` seeded with ``(seed, split, index)``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from ..errors import RefineClipError
from .world import COLORS, SPLITS, WorldSample, write_samples

DIGIT_NAMES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
"""Class names, in the order of the digits' labels (``DIGIT_NAMES[3] == "three"``)."""

KIND = "digits"
"""The ``kind`` a digits world records in a model's metadata (the bird world records none)."""

MODEL_NAME = "refineclip-digits"
"""open_clip model name of the digits model (the stem of its config file)."""

MODEL_SHARE_SEED = 20_231_797
"""Seed of the fixed cut of the 1,797 digits into the model half and the world half (never changes)."""

ZERO_SHOT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.",
    "a photo of the {}.", "a close-up photo of a {}.", "a photo of a small {}.",
)
"""Prompts whose class fill is always among a digit's captions: the trainer's zero-shot ensemble and the
extraction's default templates (``features.zeroshot.DEFAULT_TEMPLATES``), so both read the model's class words."""

CAPTION_FAMILIES: tuple[str, ...] = ("class_background", "class", "background", "attributes")
"""Caption families of :func:`caption_families`."""

DEFAULT_CAPTION_WEIGHTS: dict[str, float] = {"class_background": 0.3, "class": 0.35, "background": 0.15,
                                             "attributes": 0.2}
"""How often each caption family is drawn when the digits model is trained."""


@dataclass(frozen=True)
class DigitsConfig:
    """Knobs of the digits world; the defaults are the ones the digits model is trained on.

    ``target_classes``: the two look-alike digits; ``unrelated``: the other digits of the world
    (chosen unlike each other, so that the model's largest confusion is the planted one: with all
    ten digits, a small model's confusions among 2/5/7/9 outnumbered it); ``home_colors``: the background colour each
    co-occurs with in training (same order). ``neutral_colors``: colours of the training target
    digits that carry no cue (``neutral_frac`` of them). ``other_colors``: further colours the
    unrelated digits use (besides all of the above). ``bias``: among training target digits on a
    home colour, the share on their own. ``digit_size``: side of the upscaled digit as a share of
    the canvas (range); ``rotation``: maximum tilt in degrees; ``noise``: maximum pixel noise
    (0-255). ``label_noise``: in the model's training pool only, the share of target-class images
    that show the *other* target digit's handwriting under their class's caption and colour, as
    Colored MNIST flips 25% of its labels: the colour then predicts the caption better than the
    shape does, so the model learns the shortcut (without it, the shape of a 3 and an 8 is fully
    predictive and a small model outgrew the colour cue: worst group 80% on its val split). ``fit_share``: share of a world's handwriting that the ``train``/``val`` splits
    draw from (the rest is ``test``).
    """

    image_size: int = 48
    target_classes: tuple[str, str] = ("three", "eight")
    unrelated: tuple[str, ...] = ("zero", "one", "four", "six")
    home_colors: tuple[str, str] = ("red", "green")
    neutral_colors: tuple[str, ...] = ("blue", "yellow", "purple", "grey")
    other_colors: tuple[str, ...] = ("orange", "pink")
    bias: float = 0.95
    neutral_frac: float = 0.1
    label_noise: float = 0.25
    digit_size: tuple[float, float] = (0.6, 0.85)
    rotation: float = 12.0
    noise: float = 8.0
    fit_share: float = 0.4

    def __post_init__(self) -> None:
        for name in ("target_classes", "unrelated", "home_colors", "neutral_colors", "other_colors", "digit_size"):
            object.__setattr__(self, name, tuple(getattr(self, name)))  # lists from JSON
        if len(self.target_classes) != 2 or len(set(self.target_classes)) != 2:
            raise ValueError(f"target_classes must be two different digits, got {self.target_classes}")
        unknown = [c for c in self.target_classes + self.unrelated if c not in DIGIT_NAMES]
        if unknown:
            raise ValueError(f"unknown digit {unknown[0]!r}; digits are {', '.join(DIGIT_NAMES)}")
        if set(self.unrelated) & set(self.target_classes) or len(set(self.unrelated)) != len(self.unrelated):
            raise ValueError("the unrelated digits must differ from the target digits and from each other")
        colours = self.home_colors + self.neutral_colors + self.other_colors
        if len(self.home_colors) != 2 or len(set(colours)) != len(colours):
            raise ValueError("home_colors must be two colours, and no colour may appear twice among the colours")
        bad = [c for c in colours if c not in COLORS]
        if bad:
            raise ValueError(f"unknown colour {bad[0]!r}; colours are {', '.join(COLORS)}")
        if self.neutral_frac > 0 and not self.neutral_colors:
            raise ValueError("neutral_frac > 0 needs at least one neutral colour")
        if not 0.0 <= self.bias <= 1.0:
            raise ValueError(f"bias must be in [0, 1], got {self.bias}")
        if not 0.0 <= self.label_noise < 0.5:
            raise ValueError(f"label_noise must be in [0, 0.5), got {self.label_noise}")
        if not 0.0 <= self.neutral_frac < 1.0:
            raise ValueError(f"neutral_frac must be in [0, 1), got {self.neutral_frac}")
        if not 0.0 < self.fit_share < 1.0:
            raise ValueError(f"fit_share must be in (0, 1), got {self.fit_share}")
        lo, hi = self.digit_size
        if not 0.1 <= lo <= hi <= 1.0:
            raise ValueError(f"digit_size must be a range within [0.1, 1], got {self.digit_size}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {self.image_size}")

    # -- what the trainer and the benchmarks ask of a world -------------------------------------

    kind = KIND
    model_name = MODEL_NAME
    caption_family_names = CAPTION_FAMILIES

    @property
    def classes(self) -> tuple[str, ...]:
        """The world's classes, in digit order."""
        return tuple(c for c in DIGIT_NAMES if c in self.target_classes + self.unrelated)

    @property
    def unrelated_classes(self) -> tuple[str, ...]:
        return tuple(c for c in self.classes if c not in self.target_classes)

    @property
    def colors(self) -> tuple[str, ...]:
        """Every background colour the world uses (home colours first)."""
        return self.home_colors + self.neutral_colors + self.other_colors

    @property
    def target_groups(self) -> tuple[str, ...]:
        """The four target groups (class × home colour), the first target's home colour first."""
        return tuple(group_name(c, v) for c in self.target_classes for v in self.home_colors)

    def home_color(self, label: str) -> str:
        return self.home_colors[self.target_classes.index(label)]

    def training_pool(self, seed: int, n_per_group: int, n_unrelated: int | None = None) -> list[WorldSample]:
        """The model's training images: the biased ``train`` plan drawn from the model half only."""
        return sample_digits("train", seed, n_per_group, self, n_unrelated, source="model")

    def sample(self, split: str, seed: int, n_per_group: int | None, n_unrelated: int | None = None) -> list[WorldSample]:
        return sample_digits(split, seed, n_per_group, self, n_unrelated)

    def caption_families(self, sample: WorldSample) -> dict[str, list[str]]:
        return caption_families(sample)

    def write(self, out_dir: str | Path, split: str, seed: int, n_per_group: int | None | Mapping[str, int | None]) -> Path:
        return write_digits(out_dir, split, seed, n_per_group, self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DigitsConfig":
        """The inverse of :meth:`to_dict` (as stored in a model's ``metadata.json``)."""
        kw = {k: v for k, v in data.items() if k != "kind"}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kw) - known)
        if unknown:
            raise ValueError(f"unknown digits-world parameters: {', '.join(unknown)}")
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": KIND}
        for f in fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d


def group_name(label: str, color: str, config: DigitsConfig | None = None) -> str:
    """``"<digit> on <colour>"`` for target digits, the class name for the others."""
    targets = (config or DigitsConfig()).target_classes
    return f"{label} on {color}" if label in targets else label


# ----------------------------------------------------------------------------------------------
# The handwriting


@lru_cache(maxsize=1)
def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten digits: ``(images, labels)``, images ``(N, 8, 8)`` float in [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - the requirement is pinned
        raise RefineClipError("The digits world needs scikit-learn (pip install scikit-learn): its "
                              "handwritten digits ship inside that package.") from exc
    data = load_digits()
    images = np.asarray(data.images, dtype=np.float32) / 16.0
    images.setflags(write=False)
    labels = np.asarray(data.target, dtype=np.int64)
    labels.setflags(write=False)
    return images, labels


def _stratified_cut(indices_by_class: dict[int, np.ndarray], share: float, rng: np.random.Generator
                    ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    first, second = {}, {}
    for c, idx in indices_by_class.items():
        perm = idx[rng.permutation(len(idx))]
        k = int(round(share * len(idx)))
        first[c], second[c] = np.sort(perm[:k]), np.sort(perm[k:])
    return first, second


def handwriting(source: str, seed: int, config: DigitsConfig = DigitsConfig()) -> dict[int, np.ndarray]:
    """Indices (into :func:`load_digit_images`) per digit label of one share of the handwriting.

    ``source``: ``"model"`` (the fixed half the model is trained on), ``"fit"`` or ``"test"`` (world
    ``seed``'s cut of the other half; ``fit_share`` of it is ``fit``).
    """
    _, labels = load_digit_images()
    by_class = {c: np.flatnonzero(labels == c) for c in range(len(DIGIT_NAMES))}
    model, world = _stratified_cut(by_class, 0.5, np.random.default_rng(MODEL_SHARE_SEED))
    if source == "model":
        return model
    if source not in ("fit", "test"):
        raise ValueError(f"source must be model, fit or test; got {source!r}")
    fit, test = _stratified_cut(world, config.fit_share, np.random.default_rng([seed, 7_919]))
    return fit if source == "fit" else test


# ----------------------------------------------------------------------------------------------
# Drawing


def _luminance(rgb: Sequence[float]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def render_digit(glyph: np.ndarray, color: str, rng: np.random.Generator,
                 config: DigitsConfig = DigitsConfig()) -> tuple[Image.Image, dict[str, Any]]:
    """One 8×8 digit (values in [0, 1]) upscaled, tilted and shifted onto a ``color`` background.

    Strokes are white on dark colours and black on light ones, so the stroke colour carries no
    class information beyond the background's. Returns the RGB image and its caption attributes.
    """
    if color not in COLORS:
        raise ValueError(f"unknown colour {color!r}; colours are {', '.join(COLORS)}")
    n = config.image_size
    lo, hi = config.digit_size
    side = max(4, int(round(rng.uniform(lo, hi) * n)))
    glyph_img = Image.fromarray(np.clip(glyph * 255.0, 0, 255).astype(np.uint8), "L")
    glyph_img = glyph_img.resize((side, side), Image.Resampling.BICUBIC)
    angle = float(rng.uniform(-config.rotation, config.rotation))
    glyph_img = glyph_img.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    alpha_canvas = np.zeros((n, n), dtype=np.float32)
    gw, gh = glyph_img.size
    x0 = int(rng.integers(0, max(n - gw, 0) + 1)) if gw < n else (n - gw) // 2
    y0 = int(rng.integers(0, max(n - gh, 0) + 1)) if gh < n else (n - gh) // 2
    g = np.asarray(glyph_img, dtype=np.float32) / 255.0
    xs, ys = max(x0, 0), max(y0, 0)
    xe, ye = min(x0 + gw, n), min(y0 + gh, n)
    alpha_canvas[ys:ye, xs:xe] = g[ys - y0:ye - y0, xs - x0:xe - x0]
    base = np.clip(np.asarray(COLORS[color], np.float32) + rng.uniform(-18, 18, 3), 0, 255)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    tilt = rng.uniform(-20, 20, 2)
    bg = base[None, None, :] + (tilt[0] * (yy - 0.5) + tilt[1] * (xx - 0.5))[..., None]
    light = _luminance(base) > 150
    stroke = np.array((20, 20, 20) if light else (245, 245, 245), np.float32) + rng.uniform(-10, 10)
    a = np.clip(alpha_canvas, 0, 1)[..., None]
    arr = bg * (1 - a) + stroke[None, None, :] * a
    gain, offset = rng.uniform(0.9, 1.1), rng.uniform(-10, 10)
    arr = (arr - 128) * gain + 128 + offset
    sigma = rng.uniform(0, config.noise)
    if sigma > 0:
        arr = arr + rng.normal(0, sigma, arr.shape).astype(np.float32)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    size = "small" if side < n * (lo + (hi - lo) / 3) else ("large" if side > n * (lo + 2 * (hi - lo) / 3) else "medium")
    cx, cy = (x0 + gw / 2) / n, (y0 + gh / 2) / n
    col = 0 if cx < 0.45 else (2 if cx > 0.55 else 1)
    row = 0 if cy < 0.45 else (2 if cy > 0.55 else 1)
    position = (("top left", "top", "top right"), ("left", "center", "right"),
                ("bottom left", "bottom", "bottom right"))[row][col]
    return img, {"color": color, "stroke": "black" if light else "white", "size": size, "position": position,
                 "angle": round(angle, 2)}


# ----------------------------------------------------------------------------------------------
# Sampling


def plan_digits(split: str, seed: int, n_per_group: int | None, config: DigitsConfig = DigitsConfig(),
                n_unrelated: int | None = None, source: str | None = None) -> list[tuple[str, str, int]]:
    """``(class, colour, image index)`` of every image of a split, in a fixed order.

    ``train``: each target digit gets ``2 * n_per_group`` images: ``round(neutral_frac · 2n)`` on
    neutral colours (cycling), of the rest ``round(bias · m)`` on its home colour and the others on
    the other target's home colour; each unrelated digit ``n_unrelated`` images (default
    ``n_per_group``) on uniformly random colours; the handwriting is drawn with replacement from
    ``source`` (default ``fit``; the trainer uses ``model``, where ``label_noise`` of the target digits'
    images show the other target's handwriting). ``val``/``test``: every handwritten
    digit of its share (``fit`` / ``test``) once per home colour for target digits and once, on a
    colour cycled evenly, for unrelated digits; ``n_per_group`` caps each group.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if n_per_group is not None and n_per_group < 0:
        raise ValueError("n_per_group must be >= 0")
    _, labels = load_digit_images()
    source = source or ("test" if split == "test" else "fit")
    pool = handwriting(source, seed, config)
    rng = np.random.default_rng([seed, SPLITS[split], 1_000_003])
    plan: list[tuple[str, str, int]] = []
    for label in config.classes:
        idx = pool[DIGIT_NAMES.index(label)]
        target = label in config.target_classes
        if split == "train":
            if n_per_group is None:
                raise ValueError("the train split needs n_per_group")
            if target:
                home = config.home_color(label)
                away = next(c for c in config.home_colors if c != home)
                total = 2 * n_per_group
                n_neutral = int(round(config.neutral_frac * total))
                n_home = int(round(config.bias * (total - n_neutral)))
                colours = ([home] * n_home + [away] * (total - n_neutral - n_home)
                           + [config.neutral_colors[k % len(config.neutral_colors)] for k in range(n_neutral)])
                colours = [colours[k] for k in rng.permutation(total)]
            else:
                n = n_per_group if n_unrelated is None else n_unrelated
                colours = [config.colors[int(k)] for k in rng.integers(0, len(config.colors), n)]
            picks = idx[rng.integers(0, len(idx), len(colours))] if len(idx) else np.zeros(0, np.int64)
            if target and source == "model" and config.label_noise > 0:   # Colored MNIST's label noise
                other = pool[DIGIT_NAMES.index(next(c for c in config.target_classes if c != label))]
                flip = rng.random(len(picks)) < config.label_noise
                picks = np.where(flip, other[rng.integers(0, len(other), len(picks))], picks)
            plan += [(label, c, int(i)) for c, i in zip(colours, picks)]
        else:
            chosen = idx[rng.permutation(len(idx))]
            if target:
                cap = len(chosen) if n_per_group is None else min(n_per_group, len(chosen))
                for colour in config.home_colors:
                    plan += [(label, colour, int(i)) for i in chosen[:cap]]
            else:
                n_cap = n_per_group if n_unrelated is None else n_unrelated
                cap = len(chosen) if n_cap is None else min(n_cap, len(chosen))
                offset = int(rng.integers(len(config.colors)))
                plan += [(label, config.colors[(k + offset) % len(config.colors)], int(i))
                         for k, i in enumerate(chosen[:cap])]
    return plan


def sample_digits(split: str, seed: int, n_per_group: int | None, config: DigitsConfig = DigitsConfig(),
                  n_unrelated: int | None = None, source: str | None = None) -> list[WorldSample]:
    """Draw the images of one split (see :func:`plan_digits`); deterministic given the arguments.

    ``WorldSample.background`` holds the background colour and ``attributes["digit_index"]`` the
    index of the handwriting in :func:`load_digit_images`.
    """
    images, labels = load_digit_images()
    code = SPLITS[split] if split in SPLITS else -1
    out: list[WorldSample] = []
    for index, (label, colour, i) in enumerate(plan_digits(split, seed, n_per_group, config, n_unrelated, source)):
        rng = np.random.default_rng([seed, code, index, 0 if source in (None, "fit", "test") else 1])
        image, attrs = render_digit(images[i], colour, rng, config)
        attrs["digit_index"] = i
        attrs["digit"] = DIGIT_NAMES[int(labels[i])]     # the handwriting's own digit (label noise aside)
        out.append(WorldSample(image=image, label=label, group=group_name(label, colour, config), background=colour,
                               split=split, index=index, attributes=attrs))
    return out


# ----------------------------------------------------------------------------------------------
# Captions


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def caption_families(sample: WorldSample) -> dict[str, list[str]]:
    """Every caption true of one digit image, grouped by what it talks about.

    ``class``: the digit alone (every zero-shot template's fill included: "a photo of a eight.");
    ``background``: the colour alone; ``class_background``: both; ``attributes``: size, position
    and stroke colour together with class and colour.
    """
    from ..features.zeroshot import fill_template

    a = sample.attributes
    cls, colour = sample.label, sample.background
    numeral = str(DIGIT_NAMES.index(cls))
    return {
        "class_background": [f"a photo of {_article(cls)} on a {colour} background.",
                             f"a handwritten {cls} on a {colour} background",
                             f"the digit {numeral} on {colour}", f"{_article(cls)} on {colour}"],
        "class": [fill_template(t, cls) for t in ZERO_SHOT_TEMPLATES]
        + [f"a photo of {_article(cls)}.", f"a handwritten {cls}", f"the digit {numeral}", f"the number {cls}"],
        "background": [f"a {colour} background", f"a {colour} image", f"a photo of a {colour} background."],
        "attributes": [f"{_article(a['size'])} {cls} on {colour}",
                       f"{_article(cls)} in the {a['position']} of a {colour} image",
                       f"{_article(cls)} written in {a['stroke']} on {colour}"],
    }


# ----------------------------------------------------------------------------------------------
# Writing to disk


def write_digits(out_dir: str | Path, split: str, seed: int, n_per_group: int | None | Mapping[str, int | None],
                 config: DigitsConfig = DigitsConfig()) -> Path:
    """Write a split (or ``"all"``: train, val and test) as class folders plus ``metadata.csv``
    (``path,label,group,split``), the layout of :func:`refineclip_core.demo.world.write_world`.
    ``n_per_group`` may be a mapping split -> size (``None``: every image of a balanced split)."""
    splits = list(SPLITS) if split == "all" else [split]
    per_split = {}
    for sp in splits:
        n = n_per_group[sp] if isinstance(n_per_group, Mapping) else n_per_group
        per_split[sp] = sample_digits(sp, seed, n, config)
    return write_samples(out_dir, per_split)

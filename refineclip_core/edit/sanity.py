"""Sanity warnings: what a person must know before trusting the numbers shown beside them.

:func:`sanity_warnings` returns a list of :class:`SanityWarning` (a kind, one plain sentence with
the numbers, and the numbers as data) that the CLI prints, the run report lists and the pages show
wherever accuracies are shown:

``chance``
    zero-shot accuracy on the held-out images at or below chance (``1 / number of classes``): the
    model does not know these images, so neither the error pair nor the heads mean much.
``few-errors``
    an error pair whose W (misclassified) or C (correct) labelled samples number fewer than
    :data:`MIN_SET` (5): the heads and the diagnosis were chosen from a handful of images.
``few-heldout``
    a group of the edited classes with fewer than ``ProtocolConfig.min_heldout`` (10) held-out
    images (:func:`~refineclip_core.method.protocol.heldout_shortfall`): the guard cannot verify an edit there.
``untested-data``
    data other than the demo world: the defaults and the diagnosis were checked on the demo world,
    where the cue is known; on other data they are untested (the caller says which data it is).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from ..features.cache import FeatureCache
from ..method.protocol import Identification, heldout_shortfall

WarningKind = Literal["chance", "few-errors", "few-heldout", "untested-data"]

MIN_SET = 5
"""Fewest misclassified (W) or correct (C) labelled samples of a pair before a caution."""

UNTESTED = ("The defaults and the diagnosis were checked on the demo world, where the planted cue is known; on "
            "these images they are untested: read the diagnosis as a hypothesis and trust only the guard's "
            "held-out check.")
"""The ``untested-data`` sentence (the demo world's caption says "checked on the demo world" instead)."""


@dataclass(frozen=True)
class SanityWarning:
    """One warning: its kind, a plain sentence with the numbers, and the numbers as data."""

    kind: WarningKind
    text: str
    numbers: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def sanity_warnings(cache: FeatureCache, ident: Identification, *, demo_data: bool) -> list[SanityWarning]:
    """Every warning that applies to this identification (module docstring); ``demo_data``: the images
    are a sample of the demo world, where the defaults and the diagnosis were checked."""
    out: list[SanityWarning] = []
    labels, rows = cache.labels, ident.eval_rows
    n_classes = len(cache.classes)
    if len(rows) and n_classes:
        acc = float(np.mean(ident.base_predictions[rows] == labels[rows]))
        chance = 1.0 / n_classes
        if acc <= chance:
            out.append(SanityWarning(
                "chance", f"Zero-shot accuracy is {acc:.1%} on {len(rows)} held-out images, at or below chance "
                          f"({chance:.1%} for {n_classes} classes): the model does not recognise these images, so "
                          f"the error pair, the heads and any edit mean little. Check the class names and prompts, "
                          f"or use a model that knows these images.",
                {"accuracy": acc, "chance": chance, "n": int(len(rows)), "classes": n_classes}))
    for key, sets in ident.sets.items():
        w, c = len(sets.W), len(sets.C)
        if w < MIN_SET or c < MIN_SET:
            out.append(SanityWarning(
                "few-errors", f"The heads for {key} were chosen from W = {w} misclassified and C = {c} correctly "
                              f"classified labelled images (fewer than {MIN_SET}): a choice from so few images may "
                              f"not hold on others. Draw more labelled samples per class.",
                {"pair": str(key), "W": w, "C": c, "minimum": MIN_SET}))
    short, sentence = heldout_shortfall(cache, ident)
    if sentence:
        out.append(SanityWarning("few-heldout", sentence, {"minimum": ident.config.min_heldout,
                                                           "groups": [h.to_dict() for h in short]}))
    if not demo_data:
        out.append(SanityWarning("untested-data", UNTESTED))
    return out

"""How much the head choice depends on which labelled images were drawn (issue 23, item 6).

With ~20 labelled images, one unlucky draw can leave a head out that every other draw picks first.
:func:`head_stability` repeats the choice on ``R`` bootstrap resamples of the labelled images (each
class resampled on its own, with replacement, to its own size; the W/C/A sets, the scores and the
choice are all recomputed on the resample, from cached arrays only) and counts, per head, in how many
resamples it was chosen. The counts are what the Heads page, ``refineclip score``/``refine`` and the
run report show ("chosen in 17/20 resamples"); a chosen head picked in fewer than
:data:`ONE_OFF_BELOW` of the resamples is flagged as a one-off choice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import RefineClipError
from ..features.decomposition import HeadId

RESAMPLES = 20
"""How many bootstrap resamples of the labelled images the protocol repeats the choice on."""

ONE_OFF_BELOW = 0.5
"""A head chosen in fewer than this share of the resamples is a one-off choice."""


@dataclass
class HeadStability:
    """Per head, in how many of ``resamples`` bootstrap resamples of the labelled images it was chosen."""

    resamples: int
    counts: dict[HeadId, int] = field(default_factory=dict)   # heads chosen at least once, most often first
    seed: int = 0

    def count(self, head: HeadId) -> int:
        return self.counts.get(head, 0)

    def frequency(self, head: HeadId) -> float:
        """The share of resamples that chose ``head`` (0 when there were none)."""
        return self.count(head) / self.resamples if self.resamples else 0.0

    def is_one_off(self, head: HeadId) -> bool:
        return self.resamples > 0 and self.frequency(head) < ONE_OFF_BELOW

    def one_off(self, heads: Sequence[HeadId]) -> list[HeadId]:
        """The heads of ``heads`` chosen in fewer than :data:`ONE_OFF_BELOW` of the resamples."""
        return [h for h in heads if self.is_one_off(h)]

    def ranking(self) -> list[HeadId]:
        """The heads chosen at least once, most often first (ties: in the order they were first chosen)."""
        return list(self.counts)

    def summary(self, heads: Sequence[HeadId]) -> str:
        """One sentence on how stable ``heads`` (the chosen set) is, naming the one-off choices."""
        if not self.resamples:
            return "The choice was not repeated on resamples of the labelled images."
        if not heads:
            return (f"No head was chosen; over {self.resamples} resamples of the labelled images the heads chosen "
                    f"most often were {_top(self)}.")
        per = ", ".join(f"{h} {self.count(h)}/{self.resamples}" for h in heads)
        odd = self.one_off(heads)
        text = f"Chosen in how many of {self.resamples} resamples of the labelled images: {per}."
        if odd:
            text += (f" One-off choice{'s' if len(odd) > 1 else ''} (under {ONE_OFF_BELOW:.0%} of resamples): "
                     f"{', '.join(map(str, odd))}.")
        missed = self.often_left_out(heads)
        if missed:
            text += (" Chosen in at least half of the resamples but not in this set: "
                     + ", ".join(f"{h} (in {self.count(h)} of {self.resamples})" for h in missed) + ".")
        return text

    def often_left_out(self, heads: Sequence[HeadId]) -> list[HeadId]:
        """Heads outside ``heads`` that at least :data:`ONE_OFF_BELOW` of the resamples chose, most often first."""
        return [h for h in self.counts if h not in heads and not self.is_one_off(h)]

    def rows(self, heads: Sequence[HeadId]) -> list[dict]:
        """The table the Heads page, the CLI and the run report show: one row per head of ``heads`` (the set
        in use, in its order), then each head outside it that at least half of the resamples chose. Each row: ``head``,
        ``in_set``, ``chosen_in`` (resamples that chose it), ``resamples`` and ``note`` ("one-off choice",
        "chosen in n of R resamples, not in this set" or "")."""
        out = []
        for h in heads:
            out.append({"head": str(h), "in_set": True, "chosen_in": self.count(h), "resamples": self.resamples,
                        "note": "one-off choice" if self.is_one_off(h) else ""})
        for h in self.often_left_out(heads):
            out.append({"head": str(h), "in_set": False, "chosen_in": self.count(h), "resamples": self.resamples,
                        "note": f"chosen in {self.count(h)} of {self.resamples} resamples, not in this set"})
        return out

    def to_dict(self) -> dict:
        return {"resamples": self.resamples, "seed": self.seed, "one_off_below": ONE_OFF_BELOW,
                "counts": [[h.layer, h.head, n] for h, n in self.counts.items()]}


def _top(s: HeadStability, k: int = 3) -> str:
    top = s.ranking()[:k]
    return ", ".join(f"{h} ({s.count(h)}/{s.resamples})" for h in top) if top else "none"


def bootstrap_rows(rows: np.ndarray, labels: np.ndarray, resamples: int, seed: int) -> list[np.ndarray]:
    """``resamples`` bootstrap resamples of ``rows`` stratified by class: each class's rows are drawn with
    replacement to that class's own count, so every resample keeps the draw's class sizes. Sorted rows
    (repeats kept: a row drawn twice counts twice)."""
    rows = np.asarray(rows, dtype=np.int64)
    if resamples < 0:
        raise RefineClipError(f"The number of resamples must be 0 or more, got {resamples}.")
    y = np.asarray(labels)[rows]
    members = [rows[y == c] for c in np.unique(y)]
    rng = np.random.default_rng([seed, 23_006])
    return [np.sort(np.concatenate([m[rng.integers(0, len(m), len(m))] for m in members]))
            if members else rows[:0] for _ in range(resamples)]


def head_stability(choose: Callable[[np.ndarray], Sequence[HeadId]], rows: np.ndarray, labels: np.ndarray,
                   resamples: int = RESAMPLES, seed: int = 0) -> HeadStability:
    """Run ``choose`` (labelled rows -> chosen heads) on each of :func:`bootstrap_rows`' resamples and count,
    per head, the resamples that chose it; heads ordered by count, ties by first appearance."""
    counts: dict[HeadId, int] = {}
    for sample in bootstrap_rows(rows, labels, resamples, seed):
        for h in dict.fromkeys(choose(sample)):
            counts[h] = counts.get(h, 0) + 1
    order = sorted(counts, key=lambda h: -counts[h])       # stable: ties keep first appearance
    return HeadStability(resamples, {h: counts[h] for h in order}, seed)

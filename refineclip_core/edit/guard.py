"""The guard: is an edit verified better than zero-shot on held-out images, or harmful, or can we not tell?

The edit's predictions (``after``) and zero-shot's (``before``) are compared on the *same* held-out
images, never used to choose heads or fit the edit. Every group of the edited classes, every other
group, every class and the other classes together are one *unit*; each unit gets

* its accuracy before and after (exact Clopper–Pearson intervals),
* its paired change ``after − before`` with Newcombe's paired 95% interval
  (:func:`~refineclip_core.method.intervals.paired_change_interval`): **the** interval of that number,
  shown in its row, the headline and every report alike,
* the exact McNemar p-value (:func:`~refineclip_core.method.intervals.mcnemar_p`) of the images it fixed
  against those it broke, and
* its **drop bound** (:func:`~refineclip_core.edit.bounds.drop_bound`): how much it can have lost at most,
  one of the cautious simultaneous bounds the verdict rests on (labelled as such wherever shown).

**The trade in two numbers** (:mod:`~refineclip_core.edit.bounds`): the group that was worst before the
edit gained *at least* ``gain_bound``, and no unit lost more than ``drop_bound`` (the largest of the
units' drop bounds); the ``m`` drop bounds and the gain bound hold together at 95% (Bonferroni over the
``m + 1`` one-sided statements).

The verdict has one of three statuses (:data:`STATUSES`):

``harmful``
    some unit is significantly worse: its McNemar test rejects "no change" after **Holm's
    correction** over all the units tested (step-down: the ``i``-th smallest p-value is compared with
    ``α / (m − i)``), and its change is negative. This comes first: a few images can still show harm.
``verified``
    not harmful, every group of the edited classes that has held-out images holds at least
    ``min_per_group``, the gain bound is above zero and the drop bound is within ``max_drop`` (the
    user's acceptable drop, 5 points by default).
``not-verified``
    anything else: too few held-out images in a group, an edited class absent from the held-out images,
    a gain not clearly above zero, or a drop that cannot be bounded within ``max_drop``. The verdict then
    says how many held-out images per group would bound the drop at the rates measured
    (:func:`~refineclip_core.edit.bounds.images_to_bound`).

Groups of the edited classes that have images but none held out (e.g. groups that exist only in a
training split) are **not checked**: listed beside the verdict, they do not block it, and the verdict
says on how many groups and classes it rests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, Sequence

import numpy as np

from ..errors import RefineClipError
from ..features.cache import FeatureCache
from ..method.intervals import LEVEL, Estimate, accuracy_estimate, mcnemar_p, paired_change_interval, paired_counts
from ..reporting.tables import shown_points, verdict_rows
from .bounds import drop_bound, gain_bound, images_to_bound, statement_significance

Status = Literal["verified", "not-verified", "harmful"]
VERIFIED: Status = "verified"
NOT_VERIFIED: Status = "not-verified"
HARMFUL: Status = "harmful"
STATUSES: tuple[Status, ...] = (VERIFIED, NOT_VERIFIED, HARMFUL)

MIN_PER_GROUP = 10
"""Fewest held-out images per group of the edited classes before the guard can verify an edit."""

MAX_DROP = 0.05
"""The acceptable drop by default (5 points): ``verified`` needs every unit's drop bounded within it."""


@dataclass(frozen=True)
class GuardConfig:
    """How strict the guard is (module docstring): ``max_drop`` is the acceptable drop of any group or
    class (a share: 0.05 is 5 points; ``refineclip refine --max-drop`` and the Refine page's slider set it)."""

    min_per_group: int = MIN_PER_GROUP
    max_drop: float = MAX_DROP
    level: float = LEVEL

    def __post_init__(self) -> None:
        if self.min_per_group < 1:
            raise RefineClipError(f"min_per_group must be at least 1, got {self.min_per_group}.")
        if not 0.0 < self.max_drop < 1.0:
            raise RefineClipError(f"The acceptable drop must lie between 0 and 100 points, got "
                                  f"{self.max_drop * 100:g}.")
        if not 0.5 < self.level < 1.0:
            raise RefineClipError("The guard's level must lie in (0.5, 1).")

    def to_dict(self) -> dict:
        return {"min_per_group": self.min_per_group, "max_drop": self.max_drop, "level": self.level}


pts = shown_points
"""The change in points as shown (:func:`~refineclip_core.reporting.tables.shown_points`)."""


@dataclass
class Unit:
    """One group or class: accuracy before and after the edit on its held-out images, and the change."""

    name: str
    kind: Literal["group", "class", "classes"]   # "classes": the other classes together
    edited: bool                                 # a group or class of the edited classes
    before: Estimate
    after: Estimate
    change: Estimate                             # after − before, Newcombe's paired 95% interval
    fixed: int                                   # wrong before, right after
    broken: int                                  # right before, wrong after
    p: float                                     # exact McNemar, two-sided
    p_holm: float = 1.0                          # Holm-adjusted over every unit tested
    worse: bool = False                          # significantly worse after Holm's correction
    class_name: str | None = None                # a group's class
    drop_bound: float | None = None              # the most it can have lost (simultaneous bound; share)

    @property
    def n(self) -> int:
        return self.change.n

    @property
    def unchanged(self) -> bool:
        """No held-out image went from right to wrong or back."""
        return self.fixed == 0 and self.broken == 0

    def change_text(self) -> str:
        """``"+3.2 pts [-0.4, 19.9]"``: the shown change (:func:`pts`) with its row's 95% interval."""
        return (f"{pts(self.before.value, self.after.value):+.1f} pts "
                f"[{self.change.low * 100:.1f}, {self.change.high * 100:.1f}]")

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "edited": self.edited, "class": self.class_name,
                "n": self.n, "before": self.before.to_dict(), "after": self.after.to_dict(),
                "change": self.change.to_dict(), "fixed": self.fixed, "broken": self.broken, "p": self.p,
                "p_holm": self.p_holm, "worse": self.worse, "drop_bound": self.drop_bound}


@dataclass
class WorstGroup:
    """The group of the edited classes that was worst before the edit, and the one worst after: each a
    :class:`Unit` with its own change and that change's one 95% interval (the same as in its row)."""

    before: Unit            # the group worst before the edit
    after: Unit             # the group worst after it (may be the same)
    gain_bound: float       # the worst-before group gained at least this (simultaneous bound; share)

    @property
    def change(self) -> Estimate:
        """The worst-before group's own change (its row's interval)."""
        return self.before.change

    def to_dict(self) -> dict:
        b, a = self.before, self.after
        return {"before_name": b.name, "after_name": a.name, "before": b.before.to_dict(),
                "after": b.after.to_dict(), "change": b.change.to_dict(), "n": b.n,
                "after_group": {"before": a.before.to_dict(), "after": a.after.to_dict(), "change": a.change.to_dict(),
                                "n": a.n},
                "gain_bound": self.gain_bound}


@dataclass
class EditVerdict:
    """The guard's verdict on one edit (module docstring): a status, the trade in bounds, every unit."""

    method: str
    status: Status
    groups: list[Unit]                   # one per group of the edited classes (their classes without groups)
    classes: list[Unit]                  # every class in the held-out images, edited first
    others: Unit | None                  # the other classes together
    worst: WorstGroup | None
    strata: Literal["group", "class"] = "group"
    other_groups: list[Unit] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)     # why not verified (empty when verified)
    harmed: list[str] = field(default_factory=list)      # one sentence per significantly worse unit
    cautions: list[str] = field(default_factory=list)    # worse by the point estimate but not significantly
    images_needed: int | None = None     # held-out images per group that would bound the drop (not verified)
    tests: int = 0                       # units tested (Holm's m; the drop bounds)
    config: GuardConfig = GuardConfig()
    not_checked: list[str] = field(default_factory=list)   # groups with images but none held out
    drop_bound: float | None = None      # no unit lost more than this (simultaneous with the gain bound)
    drop_name: str | None = None         # the unit whose drop bound that is

    @property
    def ok(self) -> bool:
        """Not harmful (``verified`` or ``not-verified``)."""
        return self.status != HARMFUL

    @property
    def worst_group(self) -> Estimate | None:
        """The change of the group worst before the edit (``None`` without held-out images of the edited classes)."""
        return None if self.worst is None else self.worst.change

    @property
    def gain_bound(self) -> float | None:
        return None if self.worst is None else self.worst.gain_bound

    @property
    def unrelated(self) -> Estimate | None:
        """The change on the other classes together."""
        return None if self.others is None else self.others.change

    def units(self) -> list[Unit]:
        """Every unit the guard tested: groups of the edited classes, other groups, classes, the rest."""
        return [*self.groups, *self.other_groups, *self.classes, *([self.others] if self.others else [])]

    def largest_estimated_drop(self) -> Unit | None:
        """The unit whose measured change is the most negative (``None`` when none dropped)."""
        dropped = [u for u in self.units() if pts(u.before.value, u.after.value) < 0]
        return min(dropped, key=lambda u: (pts(u.before.value, u.after.value), u.change.value), default=None)

    def sentence(self) -> str:
        """The verdict in one short sentence (what leads every banner, report and the CLI)."""
        from .verdict_text import verdict_sentence
        return verdict_sentence(self)

    def details(self) -> list[str]:
        """The details behind :meth:`sentence`, one short paragraph each (the banner's expander)."""
        from .verdict_text import verdict_details
        return verdict_details(self)

    def summary(self) -> str:
        """The sentence and its details as one paragraph (the JSON record's ``summary``)."""
        return " ".join([self.sentence(), *self.details()])

    def rows(self) -> list[dict[str, str]]:
        """Every unit as a row of plain strings (:func:`verdict_rows`)."""
        return verdict_rows(self.to_dict())

    def to_dict(self) -> dict:
        return {"method": self.method, "status": self.status, "ok": self.ok, "strata": self.strata,
                "groups": [u.to_dict() for u in self.groups], "classes": [u.to_dict() for u in self.classes],
                "other_groups": [u.to_dict() for u in self.other_groups],
                "others": None if self.others is None else self.others.to_dict(),
                "worst": None if self.worst is None else self.worst.to_dict(),
                "worst_group": None if self.worst is None else self.worst.change.to_dict(),
                "unrelated": None if self.others is None else self.others.change.to_dict(),
                "gain_bound": self.gain_bound, "drop_bound": self.drop_bound, "drop_name": self.drop_name,
                "bounds": f"one-sided, {self.tests + 1} holding together at {self.config.level:.0%} (Bonferroni)",
                "not_checked": self.not_checked,
                "reasons": self.reasons, "harmed": self.harmed, "cautions": self.cautions,
                "images_needed": self.images_needed, "tests": self.tests,
                "correction": "Holm", "test": "exact McNemar (two-sided)", "interval": "Newcombe paired score",
                "config": self.config.to_dict(), "sentence": self.sentence(), "details": self.details(),
                "summary": self.summary()}


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm-adjusted p-values: the ``i``-th smallest of ``m`` becomes ``max_{j ≤ i} min(1, (m − j + 1) p_(j))``
    (1-based), so a hypothesis is rejected at family-wise level ``α`` exactly when its adjusted value is
    ``≤ α`` (the step-down procedure)."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.empty(len(p))
    running = 0.0
    for i, j in enumerate(np.argsort(p, kind="stable")):
        running = max(running, min(1.0, (len(p) - i) * p[j]))
        out[j] = running
    return out


def _unit(name: str, kind, edited: bool, b: np.ndarray, a: np.ndarray, level: float,
          class_name: str | None = None) -> Unit:
    both, fixed, broken, neither = paired_counts(b, a)
    low, high = paired_change_interval(both, fixed, broken, neither, level)
    n = len(b)
    return Unit(name, kind, edited, accuracy_estimate(b, level), accuracy_estimate(a, level),
                Estimate((fixed - broken) / n, low, high, n), fixed, broken, mcnemar_p(fixed, broken),
                class_name=class_name)


def judge_edit(labels: np.ndarray, before: np.ndarray, after: np.ndarray, eval_rows: np.ndarray,
               edited_classes: Sequence[int], classes: Sequence[str], groups: np.ndarray | None = None,
               group_names: Sequence[str] = (), method: str = "edit", config: GuardConfig = GuardConfig()
               ) -> EditVerdict:
    """The verdict on predictions ``after`` against ``before`` (class indices of every row) on
    ``eval_rows`` (module docstring). ``groups``: group index per row (``-1`` for none)."""
    labels, before, after = np.asarray(labels), np.asarray(before), np.asarray(after)
    if not (labels.shape == before.shape == after.shape):
        raise RefineClipError("The predictions before and after the edit must cover the same images.")
    rows = np.asarray(eval_rows, dtype=np.int64)
    lab, ok_b, ok_a = labels[rows], before[rows] == labels[rows], after[rows] == labels[rows]
    grp = np.full(len(rows), -1, dtype=np.int64) if groups is None else np.asarray(groups)[rows]
    edited = sorted(set(int(c) for c in edited_classes))
    in_edit = np.isin(lab, edited)
    level = config.level
    use_groups = bool(in_edit.any()) and bool(np.all(grp[in_edit] >= 0))
    strata = "group" if use_groups else "class"

    group_units, other_groups, masks = [], [], {}
    if groups is not None:
        for g in np.unique(grp[grp >= 0]):
            m = grp == g
            cls = np.unique(lab[m])
            is_edit = bool(np.isin(cls, edited).all())
            unit = _unit(str(group_names[g]), "group", is_edit, ok_b[m], ok_a[m], level,
                         class_name=", ".join(str(classes[c]) for c in cls))
            (group_units if is_edit and use_groups else other_groups).append(unit)
            masks[id(unit)] = m
    class_ids = sorted(np.unique(lab).tolist(), key=lambda c: (c not in edited, c))
    class_units = []
    for c in class_ids:
        class_units.append(_unit(str(classes[c]), "class", c in edited, ok_b[lab == c], ok_a[lab == c], level))
        masks[id(class_units[-1])] = lab == c
    if not use_groups:       # the edited classes are the strata
        group_units = [u for u in class_units if u.edited]
    rest = ~in_edit
    others = _unit("other classes", "classes", False, ok_b[rest], ok_a[rest], level) if rest.any() else None
    if others is not None:
        masks[id(others)] = rest

    # every distinct set of images once: a class that is a single group, or "other classes" that are one
    # class, is the same test (without groups, the edited classes' units are the strata themselves)
    candidates = [*(group_units if use_groups else []), *other_groups, *class_units, *([others] if others else [])]
    tested, twins = [], []
    for u in candidates:
        same = next((t for t in tested if np.array_equal(masks[id(u)], masks[id(t)])), None)
        (tested.append(u) if same is None else twins.append((u, same)))
    significance = 1.0 - level
    each = statement_significance(len(tested), significance)
    for u, p_adj in zip(tested, holm([u.p for u in tested])):
        u.p_holm = float(p_adj)
        u.worse = bool(p_adj <= significance and u.change.value < 0)
        u.drop_bound = drop_bound(*paired_counts(ok_b[masks[id(u)]], ok_a[masks[id(u)]]), each)
    for u, same in twins:        # the same images: the same test and bound
        u.p_holm, u.worse, u.drop_bound = same.p_holm, same.worse, same.drop_bound
    harmed = [f"{u.name} ({u.kind}, n={u.n}) got worse: {u.before.value * 100:.1f}% → {u.after.value * 100:.1f}%, "
              f"{u.change_text()}, {u.broken} images broken and {u.fixed} fixed (McNemar p = {u.p:.2g}, "
              f"significant after Holm's correction over {len(tested)} tests)." for u in tested if u.worse]
    cautions = [f"{u.name} may be worse ({u.change_text()}), not significantly after Holm's correction."
                for u in tested if not u.worse and u.change.high < 0]
    worst = None
    if group_units:
        acc_b = [u.before.value for u in group_units]
        acc_a = [u.after.value for u in group_units]
        wb, wa = group_units[int(np.argmin(acc_b))], group_units[int(np.argmin(acc_a))]
        worst = WorstGroup(wb, wa, gain_bound(*paired_counts(ok_b[masks[id(wb)]], ok_a[masks[id(wb)]]), each))
    loser = max(tested, key=lambda u: u.drop_bound, default=None)

    reasons = []
    if not in_edit.any():
        reasons.append("no held-out images of the edited classes, so the edit was never evaluated where it acts.")
    missing = [str(classes[c]) for c in edited if not (lab == c).any()]
    if missing and in_edit.any():
        reasons.append(f"no held-out images of {', '.join(missing)}.")
    not_checked = []
    if groups is not None and len(group_names):   # groups with images but none held out: listed, not blocking
        everywhere = np.asarray(groups)
        not_checked = [str(group_names[g]) for g in np.unique(everywhere[everywhere >= 0]) if not (grp == g).any()]
    small = [u for u in group_units if u.n < config.min_per_group]
    if small:
        reasons.append("too few held-out images: " + ", ".join(f"{u.name} has {u.n}" for u in small)
                       + f" (the guard needs at least {config.min_per_group} per {strata}).")
    if loser is not None and loser.drop_bound > config.max_drop:
        reasons.append("drop")
    if worst is not None and worst.gain_bound <= 0:
        reasons.append("gain")
    status: Status = HARMFUL if harmed else (NOT_VERIFIED if reasons else VERIFIED)
    needed = None
    if status == NOT_VERIFIED and tested:
        counts = [paired_counts(ok_b[masks[id(u)]], ok_a[masks[id(u)]]) for u in tested
                  if u.drop_bound > config.max_drop]
        sizes = [images_to_bound(c, config.max_drop, each) for c in counts]
        needed = None if None in sizes else max(sizes, default=None)   # None: some drop is already too large
    verdict = EditVerdict(method, status, group_units, class_units, others, worst, strata, other_groups,
                          [], harmed, cautions, needed, len(tested), config, not_checked,
                          None if loser is None else loser.drop_bound, None if loser is None else loser.name)
    if status != VERIFIED:
        from .verdict_text import reason_text
        verdict.reasons = [reason_text(verdict, r) for r in reasons]
    return verdict


class _Rows(Protocol):
    """What the guard needs of an identification: the held-out rows and the edited classes."""

    eval_rows: np.ndarray

    @property
    def target_classes(self) -> list[int]: ...


def assess_edit(cache: FeatureCache, ident: _Rows, before: np.ndarray, after: np.ndarray, method: str,
                config: GuardConfig | None = None) -> EditVerdict:
    """:func:`judge_edit` on a feature cache's labels and groups, over an identification's held-out rows
    (with the protocol's ``min_heldout`` as the fewest images per group; ``config`` sets the rest, e.g.
    the acceptable drop)."""
    if config is None:
        config = GuardConfig()
    minimum = getattr(getattr(ident, "config", None), "min_heldout", None)
    if minimum is not None and minimum != config.min_per_group:   # the protocol's min_heldout
        from dataclasses import replace
        config = replace(config, min_per_group=int(minimum))
    return judge_edit(cache.labels, before, after, ident.eval_rows, ident.target_classes, cache.classes,
                      cache.groups if cache.group_names else None, cache.group_names, method, config)

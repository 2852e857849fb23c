"""The guard: is an edit verified better than zero-shot on held-out images, or harmful, or can we not tell?

The edit's predictions (``after``) and zero-shot's (``before``) are compared on the *same* held-out
images, never used to choose heads or fit the edit. Every group of the edited classes, every class
(edited or not) and the other classes together are one *unit*; each unit gets

* its accuracy before and after (exact Clopper–Pearson intervals), and
* its paired change ``after − before`` with Newcombe's paired 95% interval
  (:func:`~refineclip_core.method.intervals.paired_change_interval`) and the exact McNemar p-value
  (:func:`~refineclip_core.method.intervals.mcnemar_p`) of the images it fixed against those it broke.

The verdict has one of three statuses (:data:`STATUSES`):

``harmful``
    some unit is significantly worse: its McNemar test rejects "no change" after **Holm's
    correction** over all the units tested (step-down: the ``i``-th smallest p-value is compared with
    ``α / (m − i)``), and its change is negative. This comes first: a few images can still show harm.
``verified``
    not harmful, every group of the edited classes holds at least ``min_per_group`` held-out images,
    the **worst-group improvement** has its whole 95% interval above zero, and **no group or class can
    have dropped by more than** ``drop`` (5 points): every unit's paired interval at the simultaneous
    level ``1 − α/m`` (Bonferroni over the ``m`` units tested) lies above ``−drop``. "Not significantly
    worse" alone is not enough: on a few dozen images an edit that costs a group 10 points is rarely
    significant, and ``benchmarks/guard.py`` measured such edits called verified in a quarter of the
    held-out sets of 40 images per group before this rule.
``not-verified``
    anything else: too few held-out images in a group, the edited classes absent from the held-out
    images, an interval that includes zero, or a group or class whose drop cannot be bounded. The verdict then says how many held-out images per
    group would detect a drop of ``drop`` (5 points) (:func:`images_to_detect_drop`).

**The worst-group improvement** is ``Δ = min_g after_g − min_g before_g`` over the groups ``g`` of the
edited classes (their classes when the images carry no groups). Its interval is a union bound,
valid whichever groups happen to be worst: for every pair of groups ``(g, h)`` the difference
``after_g − before_h`` gets a Newcombe interval at level ``1 − α/G²`` (paired when ``g = h``,
independent samples otherwise), so all ``G²`` hold together with probability ≥ 95%; then, since
``min_h before_h ≤ before_h`` and ``min_g after_g ≤ after_g`` for every group,

    Δ ≥ max_h min_g low(after_g − before_h)        Δ ≤ min_g max_h high(after_g − before_h).

The ``n`` shown with it is the image count of the group that was worst before the edit.

**Images needed to detect a drop** (paired McNemar test, Connor 1987, *Biometrics* 43:207): with
``ψ`` the share of images whose correctness the edit changes, a drop ``δ``, the test level
``α' = α / m`` (Holm's first, strictest step over ``m`` tests) and power ``1 − β``::

    n = ⌈ (z_{1−α'/2} √ψ + z_{1−β} √(ψ − δ²))² / δ² ⌉,   ψ = max(measured share, δ)

(tests/test_guard.py checks it against a brute-force simulation of the exact test.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, Sequence

import numpy as np

from ..errors import RefineClipError
from ..features.cache import FeatureCache
from ..method.intervals import (
    LEVEL,
    Estimate,
    accuracy_estimate,
    difference_interval,
    mcnemar_p,
    paired_change_interval,
    paired_counts,
)
from ..reporting.tables import verdict_rows

Status = Literal["verified", "not-verified", "harmful"]
VERIFIED: Status = "verified"
NOT_VERIFIED: Status = "not-verified"
HARMFUL: Status = "harmful"
STATUSES: tuple[Status, ...] = (VERIFIED, NOT_VERIFIED, HARMFUL)

MIN_PER_GROUP = 10
"""Fewest held-out images per group of the edited classes before the guard can verify an edit."""

DETECT_DROP = 0.05
"""The drop (5 points) the guard sizes its 'how many images would tell' sentence for."""

POWER = 0.8
"""The power that sentence asks for."""


@dataclass(frozen=True)
class GuardConfig:
    """How strict the guard is (module docstring); the defaults are what every entry point uses."""

    min_per_group: int = MIN_PER_GROUP
    drop: float = DETECT_DROP
    power: float = POWER
    level: float = LEVEL

    def __post_init__(self) -> None:
        if self.min_per_group < 1:
            raise RefineClipError(f"min_per_group must be at least 1, got {self.min_per_group}.")
        if not 0.0 < self.drop < 1.0 or not 0.0 < self.power < 1.0 or not 0.5 < self.level < 1.0:
            raise RefineClipError("The guard's drop and power must lie in (0, 1) and its level in (0.5, 1).")


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

    @property
    def n(self) -> int:
        return self.change.n

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "edited": self.edited, "class": self.class_name,
                "n": self.n, "before": self.before.to_dict(), "after": self.after.to_dict(),
                "change": self.change.to_dict(), "fixed": self.fixed, "broken": self.broken, "p": self.p,
                "p_holm": self.p_holm, "worse": self.worse}


@dataclass
class WorstGroup:
    """The worst-group accuracy of the edited classes before and after, and its change (union bound)."""

    before_name: str
    after_name: str
    before: Estimate        # the group worst before the edit (n: its images)
    after: Estimate         # the group worst after the edit
    change: Estimate        # min after − min before; n: the images of the group worst before

    def to_dict(self) -> dict:
        return {"before_name": self.before_name, "after_name": self.after_name, "before": self.before.to_dict(),
                "after": self.after.to_dict(), "change": self.change.to_dict(), "n": self.change.n}


@dataclass
class EditVerdict:
    """The guard's verdict on one edit (module docstring): a status, the reasons, every unit."""

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
    images_needed: int | None = None     # held-out images per group to detect a `drop` (not verified only)
    tests: int = 0                       # units tested (Holm's m)
    config: GuardConfig = GuardConfig()

    @property
    def ok(self) -> bool:
        """Not harmful (``verified`` or ``not-verified``)."""
        return self.status != HARMFUL

    @property
    def verified(self) -> bool:
        return self.status == VERIFIED

    @property
    def worst_group(self) -> Estimate | None:
        """The worst-group change (``None`` without held-out images of the edited classes)."""
        return None if self.worst is None else self.worst.change

    @property
    def unrelated(self) -> Estimate | None:
        """The change on the other classes together."""
        return None if self.others is None else self.others.change

    def units(self) -> list[Unit]:
        """Every unit the guard tested: groups of the edited classes, other groups, classes, the rest."""
        return [*self.groups, *self.other_groups, *self.classes, *([self.others] if self.others else [])]

    def headline(self) -> str:
        """The status in words, as the first sentence of :meth:`summary`."""
        holm = f"exact McNemar tests with Holm's correction over {self.tests} groups and classes"
        if self.status == HARMFUL:
            return f"Harmful: this edit made the model significantly worse on held-out images ({holm})."
        if self.status == VERIFIED:
            return (f"Verified: the worst group improved on held-out images and no group or class got "
                    f"significantly worse ({holm}).")
        return "Not verified: " + " ".join(r if i == 0 else r[:1].upper() + r[1:] for i, r in enumerate(self.reasons))

    def summary(self) -> str:
        """One paragraph in plain words (what the CLI prints and the pages show at the top)."""
        parts = [self.headline(), *self.harmed]
        if self.worst is not None:
            w = self.worst
            now = "" if w.after_name == w.before_name else f"; worst after the edit: {w.after_name}"
            parts.append(f"Worst {self.strata} ({w.before_name}{now}): "
                         f"{w.before.value * 100:.1f}% → {w.after.value * 100:.1f}%, change "
                         f"{w.change.format(unit=' pts', signed=True)}.")
        if self.others is not None:
            parts.append(f"Other classes: {self.others.change.format(unit=' pts', signed=True)}.")
        if self.images_needed is not None:
            parts.append(f"About {self.images_needed} held-out images per {self.strata} would detect a "
                         f"{self.config.drop * 100:.0f}-point drop ({self.config.power:.0%} power, paired McNemar test "
                         f"at Holm's strictest level).")
        parts.extend(self.cautions)
        return " ".join(parts)

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
                "reasons": self.reasons, "harmed": self.harmed, "cautions": self.cautions,
                "images_needed": self.images_needed, "tests": self.tests,
                "correction": "Holm", "test": "exact McNemar (two-sided)", "interval": "Newcombe paired score",
                "config": {"min_per_group": self.config.min_per_group, "drop": self.config.drop,
                           "power": self.config.power, "level": self.config.level},
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


def images_to_detect_drop(drop: float, changed_share: float, alpha: float, power: float = POWER) -> int:
    """Images (per group) a paired McNemar test at level ``alpha`` needs to detect an accuracy drop of
    ``drop`` with probability ``power``, when a share ``changed_share`` of the images changes
    correctness (module docstring; the share is raised to ``drop`` when lower)."""
    from scipy.stats import norm

    psi = max(float(changed_share), drop)
    za, zb = norm.ppf(1 - alpha / 2), norm.ppf(power)
    return int(np.ceil((za * np.sqrt(psi) + zb * np.sqrt(max(psi - drop * drop, 0.0))) ** 2 / drop ** 2))


def _unit(name: str, kind, edited: bool, b: np.ndarray, a: np.ndarray, level: float,
          class_name: str | None = None) -> Unit:
    both, fixed, broken, neither = paired_counts(b, a)
    low, high = paired_change_interval(both, fixed, broken, neither, level)
    n = len(b)
    return Unit(name, kind, edited, accuracy_estimate(b, level), accuracy_estimate(a, level),
                Estimate((fixed - broken) / n, low, high, n), fixed, broken, mcnemar_p(fixed, broken),
                class_name=class_name)


def worst_group_change(before: Sequence[np.ndarray], after: Sequence[np.ndarray], names: Sequence[str],
                       level: float = LEVEL) -> WorstGroup:
    """``min_g after_g − min_g before_g`` with its union-bound interval (module docstring); ``before``
    and ``after`` hold each group's correctness on the same images."""
    G = len(before)
    kb = np.array([int(np.sum(b)) for b in before])
    ka = np.array([int(np.sum(a)) for a in after])
    n = np.array([len(b) for b in before])
    acc_b, acc_a = kb / n, ka / n
    each = 1.0 - (1.0 - level) / (G * G)
    low = np.empty((G, G))
    high = np.empty((G, G))
    for g in range(G):          # after_g − before_h
        for h in range(G):
            if g == h:
                low[g, h], high[g, h] = paired_change_interval(*paired_counts(before[g], after[g]), level=each)
            else:
                low[g, h], high[g, h] = difference_interval(ka[g], n[g], kb[h], n[h], 0.0, each)
    wb, wa = int(np.argmin(acc_b)), int(np.argmin(acc_a))
    change = Estimate(float(acc_a.min() - acc_b.min()), float(low.min(axis=0).max()), float(high.max(axis=1).min()),
                      int(n[wb]))
    return WorstGroup(names[wb], names[wa], accuracy_estimate(before[wb], level), accuracy_estimate(after[wa], level),
                      change)


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

    group_units, group_masks, other_groups, other_masks = [], [], [], []
    if groups is not None:
        for g in np.unique(grp[grp >= 0]):
            m = grp == g
            cls = np.unique(lab[m])
            is_edit = bool(np.isin(cls, edited).all())
            unit = _unit(str(group_names[g]), "group", is_edit, ok_b[m], ok_a[m], level,
                         class_name=", ".join(str(classes[c]) for c in cls))
            if is_edit and use_groups:
                group_units.append(unit)
                group_masks.append(m)
            else:
                other_groups.append(unit)
                other_masks.append(m)
    class_ids = sorted(np.unique(lab).tolist(), key=lambda c: (c not in edited, c))
    class_units = [_unit(str(classes[c]), "class", c in edited, ok_b[lab == c], ok_a[lab == c], level)
                   for c in class_ids]
    if not use_groups:       # the edited classes are the strata
        group_units = [u for u in class_units if u.edited]
        group_masks = [lab == c for c in class_ids if c in edited]
    rest = ~in_edit
    others = _unit("other classes", "classes", False, ok_b[rest], ok_a[rest], level) if rest.any() else None

    # every distinct set of images once: a class that is a single group, or "other classes" that are one
    # class, is the same test (without groups, the edited classes' units are the strata themselves)
    candidates = [*((u, m) for u, m in zip(group_units, group_masks) if use_groups),
                  *zip(other_groups, other_masks),
                  *((u, lab == c) for u, c in zip(class_units, class_ids)),
                  *([(others, rest)] if others else [])]
    tested, seen, twins = [], [], []
    for u, m in candidates:
        same = next((t for t, s in zip(tested, seen) if np.array_equal(m, s)), None)
        if same is None:
            tested.append(u)
            seen.append(m)
        else:
            twins.append((u, same))
    alpha = 1.0 - level
    for u, p_adj in zip(tested, holm([u.p for u in tested])):
        u.p_holm = float(p_adj)
        u.worse = bool(p_adj <= alpha and u.change.value < 0)
    for u, same in twins:        # the same images: the same test
        u.p_holm, u.worse = same.p_holm, same.worse
    harmed = [f"{u.name} ({u.kind}, n={u.n}) got worse: {u.before.value * 100:.1f}% → {u.after.value * 100:.1f}%, "
              f"{u.change.format(unit=' pts', signed=True, count=False)}, {u.broken} images broken and {u.fixed} "
              f"fixed (McNemar p = {u.p:.2g}, significant after Holm's correction over {len(tested)} tests)."
              for u in tested if u.worse]
    cautions = [f"{u.name} may be worse ({u.change.format(unit=' pts', signed=True)}), not significantly after "
                f"Holm's correction." for u in tested if not u.worse and u.change.high < 0]
    worst = None
    if group_units:
        worst = worst_group_change([ok_b[m] for m in group_masks], [ok_a[m] for m in group_masks],
                                   [u.name for u in group_units], level)

    reasons = []
    if not in_edit.any():
        reasons.append("no held-out images of the edited classes, so the edit was never evaluated where it acts.")
    missing = [str(classes[c]) for c in edited if not (lab == c).any()]
    if use_groups:      # groups of the edited classes that have images, but none held out
        everywhere = np.asarray(groups)[np.isin(labels, edited)]
        missing += [str(group_names[g]) for g in np.unique(everywhere[everywhere >= 0]) if not (grp == g).any()]
    if missing and in_edit.any():
        reasons.append(f"no held-out images of {', '.join(missing)}.")
    small = [u for u in group_units if u.n < config.min_per_group]
    if small:
        reasons.append("too few held-out images: " + ", ".join(f"{u.name} has {u.n}" for u in small)
                       + f" (the guard needs at least {config.min_per_group} per {strata}).")
    # verified also needs every group and class to rule out a drop of more than `drop` (5 points), all at
    # once: not "no significant harm" (which a handful of images always passes) but "harm bounded"
    simultaneous = 1.0 - alpha / max(len(tested), 1)
    unbounded = []
    for u, m in zip(tested, seen):
        low = paired_change_interval(*paired_counts(ok_b[m], ok_a[m]), simultaneous)[0]
        if low < -config.drop:
            unbounded.append(f"{u.name} (as low as {low * 100:+.1f} pts)")
    if unbounded:
        reasons.append(f"the held-out images cannot rule out a drop of more than {config.drop * 100:.0f} points in "
                       + ", ".join(unbounded[:6]) + (f" and {len(unbounded) - 6} more" if len(unbounded) > 6 else "")
                       + f" (intervals holding together over the {len(tested)} groups and classes tested).")
    if worst is not None and worst.change.low <= 0:
        reasons.append(f"the worst {strata}'s change {worst.change.format(unit=' pts', signed=True)} has an "
                       f"interval that includes zero (or lies below it).")
    status: Status = HARMFUL if harmed else (NOT_VERIFIED if reasons else VERIFIED)
    needed = None
    if status == NOT_VERIFIED:
        pool = in_edit if in_edit.any() else np.ones(len(rows), dtype=bool)
        share = float(np.mean(ok_b[pool] != ok_a[pool])) if pool.any() else 0.0
        needed = images_to_detect_drop(config.drop, share, alpha / max(len(tested), 1), config.power)
    return EditVerdict(method, status, group_units, class_units, others, worst, strata, other_groups,
                       reasons if status != VERIFIED else [], harmed, cautions, needed, len(tested), config)


class _Rows(Protocol):
    """What the guard needs of an identification: the held-out rows and the edited classes."""

    eval_rows: np.ndarray

    @property
    def target_classes(self) -> list[int]: ...


def assess_edit(cache: FeatureCache, ident: _Rows, before: np.ndarray, after: np.ndarray, method: str,
                config: GuardConfig | None = None) -> EditVerdict:
    """:func:`judge_edit` on a feature cache's labels and groups, over an identification's held-out rows
    (by default with the protocol's ``min_heldout`` as the fewest images per group)."""
    if config is None:
        config = GuardConfig(min_per_group=getattr(getattr(ident, "config", None), "min_heldout", MIN_PER_GROUP))
    return judge_edit(cache.labels, before, after, ident.eval_rows, ident.target_classes, cache.classes,
                      cache.groups if cache.group_names else None, cache.group_names, method, config)

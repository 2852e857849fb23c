"""The guard's verdict in words: one short sentence that leads, then the details (the banner's expander,
the CLI's lines under the sentence, the run report's paragraph).

Every change is named and carries one interval, the same as in its row of the guard's table
(:class:`~refineclip_core.edit.guard.Unit.change_text`). The bounds the verdict rests on
(:mod:`~refineclip_core.edit.bounds`) are cautious simultaneous bounds: they are always labelled as
such ("at least", "no more than", "holding together at 95%") and never shown as a change's interval.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .guard import EditVerdict, Unit

SHOWN = 6
"""Names listed in a sentence before "and N more"."""


def _p(share: float) -> str:
    return f"{share * 100:.1f}"


def _names(units: list[str]) -> str:
    more = len(units) - SHOWN
    return ", ".join(units[:SHOWN]) + (f" and {more} more" if more > 0 else "")


def _allowed(v: "EditVerdict") -> str:
    return f"{v.config.max_drop * 100:g}"


def reason_text(v: "EditVerdict", reason: str) -> str:
    """A reason code of :func:`~refineclip_core.edit.guard.judge_edit` (``"drop"``, ``"gain"``) as words;
    other reasons are already words."""
    if reason == "drop":
        over, seen = [], set()
        for u in sorted(v.units(), key=lambda u: -(u.drop_bound or 0.0)):
            if u.drop_bound is not None and u.drop_bound > v.config.max_drop and u.name not in seen:
                seen.add(u.name)
                over.append(u)
        changed = [f"{u.name} (up to {_p(u.drop_bound)})" for u in over if not u.unchanged]
        same = [f"{u.name} (all {u.n})" for u in over if u.unchanged]
        parts = []
        if changed:
            parts.append(f"the held-out images cannot rule out a drop of more than {_allowed(v)} points (the acceptable "
                         f"drop) in {_names(changed)}")
        if same:
            parts.append(f"{'' if changed else 'the held-out images cannot rule out a drop of more than ' + _allowed(v) + ' points where '}"
                         f"{'and ' if changed else ''}the edit left {_names(same)} unchanged: too few images to bound a "
                         f"drop there within {_allowed(v)} points (up to {_p(max(u.drop_bound for u in over if u.unchanged))})")
        return "; ".join(parts) + "."
    if reason == "gain":
        w = v.worst
        return (f"the gain of {w.before.name} is not clearly above zero ({w.before.change_text()}; at least "
                f"{w.gain_bound * 100:+.1f} points with the bounds holding together).")
    return reason


def verdict_sentence(v: "EditVerdict") -> str:
    """One short sentence: the word, then the trade in two numbers (or the harm)."""
    if v.status == "harmful":
        bad = [u for u in v.units() if u.worse]
        u = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        return (f"Harmful: {u.name} got significantly worse, {u.before.value * 100:.1f}% → "
                f"{u.after.value * 100:.1f}% ({u.change_text()}){more}.")
    w = v.worst
    if w is None:
        return "Not verified: " + (v.reasons[0] if v.reasons else "nothing to judge.")
    gain = f"{w.before.name}, {_verb(w.before)}" + (f" (at least {w.gain_bound * 100:+.1f})" if w.gain_bound > 0
                                                    else f" (possibly as little as {w.gain_bound * 100:+.1f})")
    drop = v.drop_bound if v.drop_bound is not None else 0.0
    if v.status == "verified":
        return (f"Verified: the worst group, {gain}; no group or class lost more than {max(drop, 0) * 100:.1f} "
                f"points (acceptable: {_allowed(v)}).")
    loser = next((u for u in v.units() if u.name == v.drop_name), None)
    basic = [r for r in v.reasons if r.startswith(("too few", "no held-out"))]
    if basic:          # too few images, or an edited class never held out, comes first
        tail = basic[0].rstrip(".")
    elif drop > v.config.max_drop and loser is not None and loser.unchanged:
        tail = (f"{loser.name} is unchanged on all {loser.n} held-out images, too few to rule out a drop of more than "
                f"{_allowed(v)} points (the acceptable drop)")
    elif drop > v.config.max_drop:
        tail = f"a drop of up to {drop * 100:.1f} points in {v.drop_name} cannot be ruled out (acceptable: {_allowed(v)})"
    elif w.gain_bound <= 0:
        tail = "its gain is not clearly above zero"
    else:
        tail = v.reasons[0].rstrip(".") if v.reasons else "see the details"
    return f"Not verified: the worst group, {gain}, but {tail}."


def _verb(u: "Unit") -> str:
    """``"gained 10.0 points"`` (the shown change, :func:`~refineclip_core.edit.guard.pts`)."""
    from .guard import pts

    d = pts(u.before.value, u.after.value)
    if d == 0:
        return f"stayed at {u.before.value * 100:.1f}%"
    return f"{'gained' if d > 0 else 'lost'} {abs(d):.1f} points"


def verdict_details(v: "EditVerdict") -> list[str]:
    """The details behind the sentence, one short paragraph each."""
    out = []
    groups = [u for u in [*v.groups, *v.other_groups] if u.kind == "group"]
    n_images = sum(u.n for u in v.classes)
    out.append(f"Checked on {len(groups)} groups and {len(v.classes)} classes ({n_images} held-out images)"
               + (f"; not checked (no held-out images): {_names(v.not_checked)}." if v.not_checked else "."))
    w = v.worst
    if w is not None:
        b = w.before
        out.append(f"Worst {v.strata} before the edit: {b.name}, {b.before.value * 100:.1f}% → "
                   f"{b.after.value * 100:.1f}%, change {b.change_text()} (95%, n={b.n}).")
        a = w.after
        out.append(f"Worst {v.strata} after the edit: " + (
            "the same." if a is b else f"{a.name}, {a.before.value * 100:.1f}% → {a.after.value * 100:.1f}%, "
                                       f"change {a.change_text()} (95%, n={a.n})."))
    if v.others is not None:
        out.append(f"Other classes together: {v.others.before.value * 100:.1f}% → {v.others.after.value * 100:.1f}%, "
                   f"change {v.others.change_text()} (95%, n={v.others.n}).")
    if w is not None and v.drop_bound is not None:
        out.append(f"The verdict's bounds (cautious: one-sided, all {v.tests + 1} holding together at "
                   f"{v.config.level:.0%}, Bonferroni; not the 95% intervals above): {w.before.name} gained at least "
                   f"{w.gain_bound * 100:+.1f} points; no group or class lost more than "
                   f"{max(v.drop_bound, 0) * 100:.1f} points (the most: {v.drop_name}); acceptable drop "
                   f"{_allowed(v)} points.")
    unchanged = []
    for u in v.units():
        if u.unchanged and u.kind != "classes" and u.name not in unchanged:
            unchanged.append(u.name)
    if unchanged:
        out.append(f"Unchanged (no held-out image went from right to wrong or back): {_names(unchanged)}.")
    out += v.harmed
    if v.status != "verified":   # every reason (the sentence names the main one)
        out += [f"Why not verified: {r}" for r in v.reasons[0 if v.worst is not None else 1:]]
    if v.images_needed is not None:
        out.append(f"About {v.images_needed} held-out images per {v.strata} would bound every drop within "
                   f"{_allowed(v)} points at the rates measured here.")
    out += v.cautions
    return out

"""The guard's bounds: how much the worst group gained at least, and how much any group or class can
have lost at most, all holding together at 95%.

The guard (:mod:`~refineclip_core.edit.guard`) states an edit's trade in two numbers. Both come from
one family of one-sided bounds, one per *statement*: a drop bound for each of the ``m`` units tested
(every group and class, each distinct set of images once) and one gain bound for the group that was
worst before the edit. **Bonferroni** over the ``m + 1`` statements: each is made at error
``α' = α / (m + 1)`` (``α = 5%``, the significance: ``significance`` in the code), so all of them hold
together with probability ≥ 95%, whichever group turns out to be worst (the selection is covered
because every group's bound is in the family).

* **Drop bound** of a unit with paired counts (both right, fixed, broken, both wrong) on ``n`` images:
  an upper bound ``D`` on ``p_broken − p_fixed`` (the accuracy it lost)::

      D = min( −low_Newcombe(level 1 − α'),  CP_upper(broken, n; one-sided α'/2) )

  the smaller of Newcombe's paired score bound (one-sided ``α'/2``: the lower end of its two-sided
  ``1 − α'`` interval) and the exact Clopper–Pearson bound of the broken share alone
  (``p_broken − p_fixed ≤ p_broken``; for ``broken = 0`` it is ``1 − (α'/2)^{1/n}``). Each fails with
  probability ≤ ``α'/2``, so their minimum fails with probability ≤ ``α'``. The exact half keeps the
  bound honest and tight for a unit the edit left unchanged, where Newcombe's interval is needlessly
  wide (its φ is undefined with no image changed).
* **Gain bound** of the group worst before the edit: the lower end of Newcombe's paired interval at
  two-sided level ``1 − 2α'`` (one-sided ``α'``).

:func:`images_to_bound` answers "how many held-out images per group would tell": the fewest ``n``
at which a unit with the same shares of fixed and broken images would have its drop bounded within
the allowed drop (``None`` when its measured drop already exceeds it: no number of images would).
``tests/test_guard.py`` checks the bounds' joint coverage by simulation and the exact half against
its closed form.
"""

from __future__ import annotations

from ..method.intervals import paired_change_interval


def exact_broken_bound(broken: int, n: int, significance: float) -> float:
    """One-sided Clopper–Pearson upper bound (error ``significance``) of the broken share ``broken / n``."""
    from scipy.special import betaincinv   # the beta quantile (scipy.stats.beta.ppf, without its overhead)

    if n <= 0 or broken >= n:
        return 1.0
    return float(betaincinv(broken + 1, n - broken, 1.0 - significance))


def drop_bound(both: int, fixed: int, broken: int, neither: int, significance: float) -> float:
    """Upper bound (error ``significance``) of the accuracy a unit lost, ``p_broken − p_fixed`` (module docstring):
    the smaller of Newcombe's and the exact broken-share bound, each at ``significance / 2``. Negative when the
    unit surely gained."""
    n = both + fixed + broken + neither
    newcombe = -paired_change_interval(both, fixed, broken, neither, 1.0 - significance)[0]
    return float(min(newcombe, exact_broken_bound(broken, n, significance / 2.0)))


def gain_bound(both: int, fixed: int, broken: int, neither: int, significance: float) -> float:
    """Lower bound (one-sided error ``significance``) of the accuracy a unit gained, ``p_fixed − p_broken``."""
    return float(paired_change_interval(both, fixed, broken, neither, 1.0 - 2.0 * significance)[0])


def statement_significance(units: int, significance: float = 0.05) -> float:
    """Each statement's error when ``units`` drop bounds and one gain bound hold together at ``1 − significance``."""
    return significance / (max(units, 0) + 1)


def images_to_bound(counts: tuple[int, int, int, int], max_drop: float, significance: float,
                    limit: int = 100_000) -> int | None:
    """The fewest images at which a unit with the same shares of the four paired ``counts`` (both right,
    fixed, broken, both wrong) would have its drop bound (error ``significance``) within ``max_drop``; ``None``
    when its measured drop is already at least ``max_drop`` (or ``limit`` images would not do)."""
    n = sum(counts)
    if n <= 0:
        return None
    shares = [c / n for c in counts]
    if shares[2] - shares[1] >= max_drop:
        return None

    def ok(m: int) -> bool:
        f, b, w = (round(s * m) for s in shares[1:])
        return drop_bound(max(m - f - b - w, 0), f, b, w, significance) <= max_drop

    hi = max(n, 2)
    while not ok(hi):
        hi *= 2
        if hi > limit:
            return None
    lo = max(hi // 2, 1)
    while lo < hi:                    # the smallest m that works (monotone up to rounding of the counts)
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
    return int(hi)

"""How sure a measured accuracy is: 95% intervals for accuracies and for changes of accuracy.

Every accuracy shown to a person comes with its interval and the number of images behind it.

* :func:`binomial_interval` — the exact (Clopper–Pearson) interval of a proportion ``k / n``:
  the set of ``p`` for which observing ``k`` (or something more extreme) has probability at
  least ``(1 − level) / 2`` on each side. It never has less than the nominal coverage.
* :func:`wilson_interval` — the Wilson score interval of a proportion (the building block below).
* :func:`difference_interval` — Newcombe's hybrid score interval of a difference of two
  proportions (Newcombe 1998, *Stat. Med.* 17:873 method 10 for independent samples; 17:2635
  method 10 for paired samples): with Wilson intervals ``(l1, u1)`` of ``p1`` and ``(l2, u2)``
  of ``p2``, the change ``θ = p1 − p2`` has the interval::

      [θ − √((p1−l1)² − 2φ(p1−l1)(u2−p2) + (u2−p2)²),  θ + √((u1−p1)² − 2φ(u1−p1)(p2−l2) + (p2−l2)²)]

  where ``φ`` is the correlation of the two outcomes on the same images (paired data: the phi
  coefficient of the 2×2 table before × after, ``(AD − BC)/√(margins)``, with Newcombe's correction
  ``AD − BC`` → ``AD − BC − n/2`` when it exceeds ``n/2``, → 0 between 0 and ``n/2``; ``0`` when a
  margin is empty), and ``φ = 0`` for independent samples. It keeps close to the nominal coverage at small ``n`` and near 0 or
  1, where the Wald interval fails (tests/test_guard.py checks coverage by simulation).
* :func:`paired_change_interval` — that interval for the same images scored before and after
  an edit, from the four counts (right/wrong before × right/wrong after).
* :func:`mcnemar_p` — the exact McNemar test: two-sided p-value that the images an edit fixed and
  the images it broke are equally likely (a binomial test on the discordant images).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

LEVEL = 0.95
"""Confidence level of every interval the project reports."""

Statistic = Literal["accuracy", "worst", "average"]


@dataclass(frozen=True)
class Estimate:
    """A measured value with its 95% interval and the number of images behind it."""

    value: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self, scale: float = 100.0, digits: int = 1, unit: str = "%", signed: bool = False,
               count: bool = True) -> str:
        """``"62.0% [55.1, 68.4] (n=200)"`` (``signed``: ``"+4.0 pts [...]"`` for changes; ``count=False``
        leaves out ``(n=...)`` where a table names the image count once, in its header)."""
        f = f"{{:{'+' if signed else ''}.{digits}f}}"
        return (f"{f.format(scale * self.value)}{unit} [{scale * self.low:.{digits}f}, "
                f"{scale * self.high:.{digits}f}]" + (f" (n={self.n})" if count else ""))


def binomial_intervals(k: np.ndarray, n: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Clopper–Pearson intervals for arrays of ``k`` successes in ``n`` trials (vectorised;
    ``(0, 1)`` where ``n == 0``)."""
    from scipy.stats import beta

    k, n = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    if np.any(n < 0) or np.any(k < 0) or np.any(k > n):
        raise ValueError("need 0 <= k <= n")
    a = (1.0 - level) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        low = np.where(k == 0, 0.0, beta.ppf(a, np.maximum(k, 1), n - k + 1))
        high = np.where(k == n, 1.0, beta.ppf(1.0 - a, k + 1, np.maximum(n - k, 1)))
    return low.astype(np.float64), high.astype(np.float64)


def binomial_interval(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Clopper–Pearson interval for ``k`` successes in ``n`` trials (``(0, 1)`` when ``n == 0``)."""
    low, high = binomial_intervals(np.array([k]), np.array([n]), level)
    return float(low[0]), float(high[0])


def accuracy_estimate(correct: np.ndarray, level: float = LEVEL) -> Estimate:
    """Accuracy of a boolean vector with its exact binomial interval."""
    correct = np.asarray(correct, dtype=bool)
    n, k = int(correct.size), int(correct.sum())
    low, high = binomial_interval(k, n, level)
    return Estimate(k / n if n else float("nan"), low, high, n)


def _stat(per_stratum_acc: np.ndarray, sizes: np.ndarray, statistic: Statistic) -> np.ndarray:
    """``(..., S)`` per-stratum accuracies -> the statistic over strata ``(...)``: the lowest
    (``worst``), the unweighted mean (``average``, e.g. average-group accuracy) or the
    image-weighted mean (``accuracy``)."""
    if statistic == "worst":
        return per_stratum_acc.min(-1)
    if statistic == "average":
        return per_stratum_acc.mean(-1)
    return (per_stratum_acc * sizes).sum(-1) / sizes.sum()


def stratified_estimate(correct: np.ndarray, strata: np.ndarray, statistic: Statistic = "average",
                        n_boot: int = 2000, seed: int = 0, level: float = LEVEL) -> Estimate:
    """A statistic of one model's per-stratum accuracies (e.g. average-group accuracy) with a
    percentile interval from a stratified bootstrap (a resampled stratum's accuracy is
    Binomial(n_s, acc_s) / n_s)."""
    correct, strata = np.asarray(correct, dtype=bool), np.asarray(strata)
    if correct.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    members = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    sizes = np.array([len(m) for m in members], dtype=np.float64)
    acc = np.array([correct[m].mean() for m in members])
    rng = np.random.default_rng(seed)
    boot = rng.binomial(sizes.astype(np.int64)[None, :], acc[None, :], size=(n_boot, len(members))) / sizes
    stats = _stat(boot, sizes, statistic)
    a = (1.0 - level) / 2.0
    low, high = np.quantile(stats, [a, 1.0 - a])
    return Estimate(float(_stat(acc, sizes, statistic)), float(low), float(high), int(correct.size))


def wilson_interval(k: float, n: float, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of ``k`` successes in ``n`` trials (``(0, 1)`` when ``n == 0``)."""
    from scipy.special import ndtri   # the normal quantile (scipy.stats.norm.ppf, without its overhead)

    if n <= 0:
        return 0.0, 1.0
    z = float(ndtri(0.5 + level / 2.0))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (0.0 if k <= 0 else float(max(0.0, centre - half))), (1.0 if k >= n else float(min(1.0, centre + half)))


def difference_interval(k1: int, n1: int, k2: int, n2: int, phi: float = 0.0,
                        level: float = LEVEL) -> tuple[float, float]:
    """Newcombe's interval of ``k1/n1 − k2/n2`` (module docstring; ``phi``: correlation of the two
    outcomes when they are measured on the same images, 0 for independent samples)."""
    if n1 <= 0 or n2 <= 0:
        return float("nan"), float("nan")
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1, level)
    l2, u2 = wilson_interval(k2, n2, level)
    theta = p1 - p2
    down = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    up = (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    return float(max(-1.0, theta - np.sqrt(max(down, 0.0)))), float(min(1.0, theta + np.sqrt(max(up, 0.0))))


def paired_counts(before: np.ndarray, after: np.ndarray) -> tuple[int, int, int, int]:
    """``(both right, fixed, broken, both wrong)`` of two correctness vectors on the same images."""
    before, after = np.asarray(before, dtype=bool), np.asarray(after, dtype=bool)
    if before.shape != after.shape:
        raise ValueError("before and after must describe the same images")
    return (int((before & after).sum()), int((~before & after).sum()), int((before & ~after).sum()),
            int((~before & ~after).sum()))


def paired_change_interval(both: int, fixed: int, broken: int, neither: int,
                           level: float = LEVEL) -> tuple[float, float]:
    """Newcombe's paired interval of ``accuracy after − accuracy before`` on the same ``n`` images,
    from the counts of :func:`paired_counts` (``fixed``: wrong before, right after)."""
    n = both + fixed + broken + neither
    k_after, k_before = both + fixed, both + broken
    # the phi coefficient of the 2×2 table (after right?, before right?), as Newcombe corrects it: a
    # positive association is reduced by n/2 (never below 0), so a table with no discordant image
    # does not get a zero-width interval
    denom = float(k_after) * (n - k_after) * k_before * (n - k_before)
    assoc = both * neither - fixed * broken
    assoc = assoc - n / 2 if assoc > n / 2 else (assoc if assoc < 0 else 0.0)
    phi = assoc / np.sqrt(denom) if denom > 0 else 0.0
    return difference_interval(k_after, n, k_before, n, phi, level)


def mcnemar_p(fixed: int, broken: int) -> float:
    """Exact two-sided McNemar p-value: ``fixed`` and ``broken`` images are equally likely."""
    from scipy.stats import binom

    m = fixed + broken
    if m == 0:
        return 1.0
    return float(min(1.0, 2.0 * binom.cdf(min(fixed, broken), m, 0.5)))

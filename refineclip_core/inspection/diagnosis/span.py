"""The greedy span over concepts (TextSpan with concepts), exact head shares and the statistics it reports."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..textspan import MIN_RESIDUAL, ZERO_VARIANCE_RTOL

TAU = 0.9
"""Concepts whose activations over the images correlate at least this much with an earlier pick's
(and point its way, :data:`NAME_MIN`) are near-duplicates: they join the pick instead of being picked."""

NAME_MIN = 0.5
"""A concept joins a pick (and names it) only when its direction's cosine with the pick's is at least this."""

N_RANDOM_SETS = 2000
"""Random head sets drawn (with a fixed seed) to estimate that share."""

ROW_BLOCK = 512
"""Images per block when contributions are projected in float64 (the float64 copy stays small)."""


# -- the greedy span over concepts ----------------------------------------------------------------

@dataclass
class SpanPick:
    """One step of :func:`concept_span`: a direction of the removed part, named by concepts.

    ``members`` lists ``(concept, +1)``: the pick itself first, then the near-duplicates that joined
    it (their activations correlate with the pick's by at least ``tau`` and their directions point
    its way, cosine at least :data:`NAME_MIN`)."""

    concept: int
    share: float
    direction: np.ndarray          # (d,) unit, orthogonal to the earlier picks' directions
    members: list[tuple[int, int]]
    target_share: float | None = None                            # (u·g)² / ||g||² when spanning a target g


def concept_span(removed: np.ndarray, directions: np.ndarray, k: int = 8, tau: float = TAU,
                 target: np.ndarray | None = None) -> tuple[list[SpanPick], float]:
    """TextSpan over concept directions on the centred ``removed`` ``(N, d)`` (module docstring).

    Without ``target`` a pick is the concept carrying the most (coherence-weighted) variance, as in
    TextSpan. With ``target`` ``g`` (a ``(d,)`` covariance vector, e.g. the removed part's covariance
    with its push toward the wrong class) it is the concept carrying the most of ``g``:
    ``coherence² · (û·g)²`` on the residuals, and :attr:`SpanPick.target_share` is ``(u·g)² / ||g||²``
    (additive over picks). Returns the picks and the removed part's total variance
    (``Σ ||r_i − r̄||² / N``)."""
    X = np.asarray(removed, dtype=np.float64)
    X = X - X.mean(0, keepdims=True)
    total = float((X * X).sum())
    D = np.asarray(directions, dtype=np.float64)
    coh2 = (D * D).sum(1)
    U = np.divide(D, np.sqrt(coh2)[:, None], out=np.zeros_like(D), where=coh2[:, None] > 0)
    units = U.copy()
    alive = coh2 > 0
    picks: list[SpanPick] = []
    explained = 0.0
    g = None if target is None else np.asarray(target, dtype=np.float64).copy()
    g_total = 0.0 if g is None else float(g @ g)
    if total <= 0 or not len(D) or (g is not None and g_total <= 0):
        return picks, 0.0 if total <= 0 else total / len(X)
    for _ in range(k):
        if total - explained <= 1e-9 * total or (g is not None and g @ g <= 1e-12 * g_total):
            break
        n2 = (U * U).sum(1)
        alive &= n2 > MIN_RESIDUAL ** 2
        if not alive.any():
            break
        P = X @ U.T                                    # (N, K): residual data on residual directions
        var = np.where(alive, (P * P).sum(0) / np.maximum(n2, 1e-300), 0.0)
        if g is not None:
            var = np.where(alive, (U @ g) ** 2 / np.maximum(n2, 1e-300), 0.0)
        score = np.where(alive, coh2 * var, -np.inf)
        p = int(np.argmax(score))
        u = U[p] / np.sqrt(n2[p])
        a = X @ u
        share = float(a @ a) / total
        explained += float(a @ a)
        pn = np.sqrt((P * P).sum(0))
        corr = np.divide(P.T @ a, pn * np.sqrt(a @ a), out=np.zeros(len(D)), where=pn > 0)
        align = units @ u
        joined = np.flatnonzero(alive & (corr >= tau) & (align >= NAME_MIN) & (np.arange(len(D)) != p))
        joined = joined[np.argsort(-score[joined], kind="stable")]
        members = [(p, 1)] + [(int(j), 1) for j in joined]
        along = None if g is None else float(g @ u)
        picks.append(SpanPick(p, share, u, members, None if g is None else along ** 2 / g_total))
        alive[p] = False
        alive[joined] = False
        X -= np.outer(a, u)
        U -= np.outer(U @ u, u)
        if g is not None:
            g -= along * u
    return picks, total / len(X)


def head_shares(contributions: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """The split of the variance along ``direction`` of ``Σ_h contributions[:, h]`` over the heads:
    ``Cov(c_h·u, r·u) / Var(r·u)`` for each head (sums to 1; 0 everywhere when nothing varies)."""
    return head_shares_along(contributions, np.asarray(direction)[None])[0]


def head_shares_along(contributions: np.ndarray, directions: np.ndarray) -> list[np.ndarray]:
    """:func:`head_shares` for each of ``directions`` ``(k, d)``, in one pass over ``contributions``."""
    along = project_along(contributions, directions)
    return [variance_split(along[:, :, j]) for j in range(along.shape[2])]


def project_along(contributions: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """``contributions`` ``(N, S, d)`` projected on ``directions`` ``(k, d)``: ``(N, S, k)`` float64,
    converted a block of images at a time."""
    U = np.asarray(directions, dtype=np.float64).T                                            # (d, k)
    if not len(contributions):
        return np.zeros((0, contributions.shape[1], U.shape[1]))
    return np.concatenate([np.asarray(contributions[i:i + ROW_BLOCK], dtype=np.float64) @ U
                           for i in range(0, len(contributions), ROW_BLOCK)])


def variance_split(c: np.ndarray) -> np.ndarray:
    """:func:`head_shares` from the heads' projections ``c`` ``(N, S)`` (``c[:, h] = c_h·u``)."""
    c = np.asarray(c, dtype=np.float64)
    scale = float((c.sum(1) ** 2).sum())
    c = c - c.mean(0, keepdims=True)
    a = c.sum(1)
    var = float(a @ a)
    return (c.T @ a) / var if var > ZERO_VARIANCE_RTOL * scale else np.zeros(c.shape[1])


def random_set_p(shares: np.ndarray, k: int, observed: float, n: int = N_RANDOM_SETS, seed: int = 0) -> float:
    """The share of ``n`` random sets of ``k`` of the heads (``shares``: every head's split of a concept)
    whose summed share is at least ``observed``."""
    rng = np.random.default_rng(seed)
    draws = np.argsort(rng.random((n, len(shares))), axis=1)[:, :k]     # k distinct heads per draw
    return float((np.asarray(shares)[draws].sum(1) >= observed - 1e-12).mean())


def standardised_difference(values: np.ndarray, first: np.ndarray, second: np.ndarray) -> float | None:
    """``(mean(values[first]) − mean(values[second])) / std(values)``; None when a set is empty."""
    if not len(first) or not len(second):
        return None
    sd = float(np.std(values))
    return 0.0 if sd == 0 else float((values[first].mean() - values[second].mean()) / sd)


def correlation(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    d = float(np.sqrt((x @ x) * (y @ y)))
    return float(x @ y) / d if d > 0 else 0.0

"""Utility-driven choice of the heads to ablate (paper Algorithm 1, Eq. 10).

For every available score, the top-``T`` heads form a candidate list; for ``t = 1..T`` the
first ``t`` heads ``S_t`` are zero-ablated and scored by the utility

    U(S_t) = mean_x [ sim(E_abl(x, S_t), t_{y_x}) − mean_{y ≠ y_x} sim(E_abl(x, S_t), t_y) ]   (Eq. 10)

over the labelled images ``x`` (the sampled W ∪ C ∪ A). The set with the largest utility over
all lists wins. The whole curves are returned: users trust what they can see.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..features.decomposition import HeadId
from .ablation import AblationEngine
from .scores import HeadScores


@dataclass
class Selection:
    """Alg. 1's outcome: every curve, and the winning (score, t, heads, utility)."""

    curves: dict[str, list[float]]           # score -> [U(S_1), ..., U(S_T)]
    candidates: dict[str, list[HeadId]]      # score -> its top-T list
    baseline_utility: float                  # U(∅): no head removed
    score: str | None
    t: int
    heads: list[HeadId]
    utility: float
    unavailable: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "curves": self.curves,
            "candidates": {k: [h.as_list() for h in v] for k, v in self.candidates.items()},
            "baseline_utility": self.baseline_utility,
            "selected": {"score": self.score, "t": self.t, "heads": [h.as_list() for h in self.heads],
                         "utility": self.utility},
            "unavailable": self.unavailable,
        }


def utility(engine: AblationEngine, heads: list[HeadId], rows: np.ndarray, labels: np.ndarray) -> float:
    """U(S) of Eq. (10) over ``rows`` (zero ablation, cosine similarity)."""
    if len(rows) == 0:
        return float("nan")
    cos = engine.cosines(heads, "zero", rows)
    y = labels[rows]
    n_classes = cos.shape[1]
    own = cos[np.arange(len(rows)), y]
    others = (cos.sum(1) - own) / max(n_classes - 1, 1)
    return float((own - others).mean())


def select_heads(engine: AblationEngine, scores: dict[str, HeadScores], rows: np.ndarray, labels: np.ndarray,
                 top_t: int = 15) -> Selection:
    """Algorithm 1: best prefix of the top-``top_t`` lists by utility over ``rows``."""
    rows = np.asarray(rows, dtype=np.int64)
    engine, labels, rows = engine.subset(rows), np.asarray(labels)[rows], np.arange(len(rows))
    n_heads = len(engine.head_ids())
    T = max(1, min(top_t, n_heads))
    curves: dict[str, list[float]] = {}
    candidates: dict[str, list[HeadId]] = {}
    unavailable = {name: s.reason for name, s in scores.items() if not s.available}
    best = (float("-inf"), None, 0, [])
    for name, s in scores.items():
        if not s.available:
            continue
        lst = s.top(T)
        candidates[name] = lst
        curve = [utility(engine, lst[:t], rows, labels) for t in range(1, len(lst) + 1)]
        curves[name] = curve
        for t, u in enumerate(curve, start=1):
            if np.isfinite(u) and u > best[0]:
                best = (u, name, t, lst[:t])
    base = utility(engine, [], rows, labels)
    u, name, t, heads = best
    if name is None:
        return Selection(curves, candidates, base, None, 0, [], base, unavailable)
    return Selection(curves, candidates, base, name, t, list(heads), float(u), unavailable)

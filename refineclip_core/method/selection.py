"""Utility-driven choice of the heads to ablate (paper Algorithm 1, Eq. 10).

For every available score, the top-``T`` heads form a candidate list; for ``t = 1..T`` the
first ``t`` heads ``S_t`` are zero-ablated and scored by the utility

    U(S_t) = mean_x [ sim(E_abl(x, S_t), t_{y_x}) − mean_{y ≠ y_x} sim(E_abl(x, S_t), t_y) ]   (Eq. 10)

over the labelled images ``x`` (the sampled W ∪ C ∪ A). The set with the largest utility over
all lists wins. The whole curves are returned: users trust what they can see.

:func:`select_consensus` is a variance-reduced variant of Alg. 1. With
~20 labelled images each score's ranking is noisy, and taking the best of 4 × T prefixes picks
whichever list the noise favoured (measured on the demo world: the chosen set ranged from 1 to
15 heads and sometimes made the worst group worse). The consensus ranks heads once, by the sum
over every available score (all four, for each error pair) of its standardised value, signed so
that larger means more suspicious::

    z(h) = Σ_scores ± (DE(h) − mean_h' DE(h')) / std_h' DE(h')      (+ for DE_A/DE_C, − for DE_B/DE_D)

then takes the prefix of that one list with the largest utility U (Eq. 10), or no head at all
when no prefix beats U(∅).

The utility is measured with the ablation that will be applied (``mode``): the paper's zero ablation
by default, and mean ablation (``E − Σ_S (c_h − m_h)``, the protocol's default) when the protocol
ablates that way: on the development seeds of ``benchmarks/edit_variants.py`` choosing the prefix by
the zero-ablation utility and then mean-ablating it picked 1-head sets where 11 heads were better
(worst-group gain +32.0 ± 5.2, worst draw +20.8), by the mean-ablation utility +33.6 ± 4.9 (+23.2).

:func:`select_stable` is the project's default (issue 23, item 6). One draw of 20 labelled images can
still rank a head low that every other draw ranks first (W often holds 2 images). The consensus is
therefore repeated on bootstrap resamples of the labelled images
(:mod:`~refineclip_core.method.stability`); heads are ranked by how many resamples chose them (ties in
the consensus order), and the ranking is cut at the prefix whose utility, averaged with its two
neighbours, is the largest (:func:`smoothed_prefix`): a prefix that beats its neighbours by a hair on 20
images no longer decides. On development worlds (7001-7004, 7011-7021; 75 draws, ablation) the worst-group
gain went from +32.6 ± 6.1 (worst draw +17.2) for the consensus to +34.7 ± 5.4 (+21.6); docs/edit.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..features.decomposition import HeadId
from .ablation import AblationEngine, Mode
from .scores import HeadScores, ScoreKey
from .stability import HeadStability


Ranking = ScoreKey | str
"""A ranking Alg. 1 or a rule cut: one score of one pair, or :data:`CONSENSUS` / :data:`STABLE`."""


@dataclass
class Selection:
    """Alg. 1's outcome: every curve, and the winning (score, t, heads, utility)."""

    curves: dict[Ranking, list[float]]       # ranking -> [U(S_1), ..., U(S_T)]
    candidates: dict[Ranking, list[HeadId]]  # ranking -> its top-T list
    baseline_utility: float                  # U(∅): no head removed
    score: Ranking | None
    t: int
    heads: list[HeadId]
    utility: float
    unavailable: dict[ScoreKey, str] = field(default_factory=dict)
    stability: HeadStability | None = None   # the same rule on resamples of the labelled images (protocol.identify)

    @property
    def score_name(self) -> str | None:
        """The chosen ranking as records and tables write it (``"consensus"``, ``"DE_A[a→b]"``, ...)."""
        return None if self.score is None else str(self.score)

    def to_dict(self) -> dict:
        return {
            "curves": {str(k): v for k, v in self.curves.items()},
            "candidates": {str(k): [h.as_list() for h in v] for k, v in self.candidates.items()},
            "baseline_utility": self.baseline_utility,
            "selected": {"score": self.score_name, "t": self.t, "heads": [h.as_list() for h in self.heads],
                         "utility": self.utility},
            "unavailable": {str(k): v for k, v in self.unavailable.items()},
            "stability": None if self.stability is None else self.stability.to_dict(),
        }


def utility(engine: AblationEngine, heads: list[HeadId], rows: np.ndarray, labels: np.ndarray,
            mode: Mode = "zero") -> float:
    """U(S) of Eq. (10) over ``rows`` (cosine similarity), with ``S`` zero-ablated (the paper) or
    mean-ablated with the engine's means (``mode="mean"``)."""
    if len(rows) == 0:
        return float("nan")
    cos = engine.cosines(heads, mode, rows)
    y = labels[rows]
    n_classes = cos.shape[1]
    own = cos[np.arange(len(rows)), y]
    others = (cos.sum(1) - own) / max(n_classes - 1, 1)
    return float((own - others).mean())


def select_heads(engine: AblationEngine, scores: dict[ScoreKey, HeadScores], rows: np.ndarray, labels: np.ndarray,
                 top_t: int = 15, mode: Mode = "zero") -> Selection:
    """Algorithm 1: best prefix of the top-``top_t`` lists by utility over ``rows`` (``mode``: the
    ablation the utility measures, the paper's zero by default)."""
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
        curve = [utility(engine, lst[:t], rows, labels, mode) for t in range(1, len(lst) + 1)]
        curves[name] = curve
        for t, u in enumerate(curve, start=1):
            if np.isfinite(u) and u > best[0]:
                best = (u, name, t, lst[:t])
    base = utility(engine, [], rows, labels, mode)
    u, name, t, heads = best
    if name is None:
        return Selection(curves, candidates, base, None, 0, [], base, unavailable)
    return Selection(curves, candidates, base, name, t, list(heads), float(u), unavailable)


def best_prefix(engine: AblationEngine, ranked: list[HeadId], rows: np.ndarray, labels: np.ndarray,
                mode: Mode = "zero") -> tuple[int, float, list[float], float]:
    """The prefix of ``ranked`` with the largest utility U (Eq. 10, ``mode`` ablation) over ``rows``:
    ``(t, U(S_t), [U(S_1), ..., U(S_T)], U(∅))``; ``t = 0`` when no prefix beats removing nothing."""
    rows = np.asarray(rows, dtype=np.int64)
    engine, labels, rows = engine.subset(rows), np.asarray(labels)[rows], np.arange(len(rows))
    base = utility(engine, [], rows, labels, mode)
    curve = [utility(engine, ranked[:t], rows, labels, mode) for t in range(1, len(ranked) + 1)]
    best_t, best_u = 0, base
    for t, u in enumerate(curve, start=1):
        if np.isfinite(u) and u > best_u:
            best_t, best_u = t, u
    return best_t, best_u, curve, base


CONSENSUS = "consensus"
"""Name of the consensus ranking in :class:`Selection` curves and candidates."""


def consensus_ranking(scores: dict[ScoreKey, HeadScores]) -> list[HeadId]:
    """Every head, ranked by the summed standardised scores (most suspicious first); see the module
    docstring. Scores that are unavailable or constant over heads do not vote."""
    total, ids = None, None
    for s in scores.values():
        if not s.available:
            continue
        v = s.values.reshape(-1).astype(np.float64)
        sd = v.std()
        if not np.isfinite(sd) or sd == 0:
            continue
        z = (v - v.mean()) / sd
        total = (0.0 if total is None else total) + (z if s.descending else -z)
        if ids is None:
            H = s.values.shape[1]
            ids = [HeadId(s.layers[i // H], int(i % H)) for i in range(v.size)]
    if total is None:
        return []
    return [ids[i] for i in np.argsort(-total, kind="stable")]


def select_consensus(engine: AblationEngine, scores: dict[ScoreKey, HeadScores], rows: np.ndarray, labels: np.ndarray,
                     top_t: int = 15, mode: Mode = "zero") -> Selection:
    """The consensus ranking's best prefix (up to ``top_t`` heads) by utility over ``rows``; no head
    when no prefix has a larger utility than removing nothing. The returned curves and candidate
    lists hold every score's own (as Alg. 1 would see them) besides the consensus one."""
    per_score = select_heads(engine, scores, rows, labels, top_t, mode)
    ranked = consensus_ranking(scores)[: max(1, top_t)]
    best_t, best_u, curve, base = best_prefix(engine, ranked, rows, labels, mode)
    curves, candidates = dict(per_score.curves), dict(per_score.candidates)
    if ranked:
        curves, candidates = {CONSENSUS: curve, **curves}, {CONSENSUS: ranked, **candidates}
    if best_t == 0:
        return Selection(curves, candidates, base, None, 0, [], base, per_score.unavailable)
    return Selection(curves, candidates, base, CONSENSUS, best_t, ranked[:best_t], float(best_u),
                     per_score.unavailable)


def choose_heads(rule: str, engine: AblationEngine, scores: dict[ScoreKey, HeadScores], rows: np.ndarray,
                 labels: np.ndarray, top_t: int = 15, mode: Mode = "zero") -> list[HeadId]:
    """Only the heads ``rule`` ("consensus" or "alg1") chooses, without the curves of the other lists:
    what :func:`select_consensus` / :func:`select_heads` return as ``.heads``, at the cost of one curve
    for the consensus (used on every resample of the labelled images)."""
    if rule == "alg1":
        return select_heads(engine, scores, rows, labels, top_t, mode).heads
    ranked = consensus_ranking(scores)[: max(1, top_t)]
    return ranked[: best_prefix(engine, ranked, rows, labels, mode)[0]]


STABLE = "stable"
"""Name of the resampling-stable ranking in :class:`Selection` curves and candidates."""


def stable_ranking(scores: dict[ScoreKey, HeadScores], stability: HeadStability) -> list[HeadId]:
    """Every head, ranked by how many resamples of the labelled images chose it (most first); heads chosen
    equally often keep their order in the consensus ranking of all the labelled images."""
    return sorted(consensus_ranking(scores), key=lambda h: -stability.count(h))


def smoothed_prefix(curve: list[float], base: float) -> int:
    """The prefix length ``t`` whose utility, averaged with its neighbours ``t − 1`` and ``t + 1`` (the ends
    repeated), is the largest; ``0`` when no such average beats removing nothing (``base`` = U(∅)). A single
    prefix that beats its neighbours by a hair no longer decides: with ~20 labelled images the utility
    curve of a ranking is often flat over several prefixes."""
    gains = np.asarray(curve, dtype=np.float64) - base
    if not len(gains) or not np.isfinite(gains).all():
        return 0
    padded = np.concatenate([gains[:1], gains, gains[-1:]])
    smooth = (padded[:-2] + padded[1:-1] + padded[2:]) / 3
    return int(np.argmax(smooth)) + 1 if smooth.max() > 0 else 0


def select_stable(engine: AblationEngine, scores: dict[ScoreKey, HeadScores], rows: np.ndarray, labels: np.ndarray,
                  stability: HeadStability, top_t: int = 15, mode: Mode = "zero") -> Selection:
    """The project's default: the heads ranked by how often the consensus chose them on resamples of the
    labelled images (:func:`stable_ranking`), cut at the prefix (up to ``top_t`` heads) whose utility over
    ``rows``, averaged with its two neighbours, is the largest (:func:`smoothed_prefix`); no head when none
    beats removing nothing. ``utility`` is the chosen prefix's own U. The curves and candidate lists also
    hold the consensus ranking's and every score's own."""
    consensus = select_consensus(engine, scores, rows, labels, top_t, mode)
    ranked = stable_ranking(scores, stability)[: max(1, top_t)]
    _, _, curve, base = best_prefix(engine, ranked, rows, labels, mode)
    best_t = smoothed_prefix(curve, base)
    curves, candidates = dict(consensus.curves), dict(consensus.candidates)
    if ranked:
        curves, candidates = {STABLE: curve, **curves}, {STABLE: ranked, **candidates}
    if best_t == 0:
        return Selection(curves, candidates, base, None, 0, [], base, consensus.unavailable, stability)
    return Selection(curves, candidates, base, STABLE, best_t, ranked[:best_t], float(curve[best_t - 1]),
                     consensus.unavailable, stability)

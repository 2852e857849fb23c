"""Evidence for a head and for a known truth: a head's part along the diagnosed concepts, per group; AUCs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ...features.decomposition import HeadId
from ...method.ablation import AblationEngine
from .pairs import Concept, Diagnosis, project_rows

# -- evidence for a head and for a known truth ----------------------------------------------------

@dataclass
class HeadEvidence:
    """What one head has to do with a diagnosis: its share of each diagnosed concept among every
    head in scope (``shares``, the first pair's concepts in order), the concept it writes most of
    (``concept``), and its contribution along that concept per image group (``profile``:
    ``{group: (mean, sd, n)}`` over every cached image of the pair's classes)."""

    head: HeadId
    in_set: bool
    shares: list[float]
    concept: Concept | None
    share: float
    profile: dict[str, tuple[float, float, int]]


def head_evidence(cache: Any, diagnosis: Diagnosis, engine: AblationEngine, head: HeadId,
                  classes: Sequence[int]) -> HeadEvidence:
    """:class:`HeadEvidence` of ``head`` for ``diagnosis`` (its shares are the concepts' splits over
    every head in scope, kept by :func:`diagnose`; the profile on every image of ``classes``)."""
    concepts = diagnosis.concepts
    k = int(engine.flat_index([head])[0])
    shares = [float(c.scope_split[k]) for c in concepts if c.scope_split is not None]
    if not shares or len(shares) < len(concepts):
        return HeadEvidence(head, head in diagnosis.heads, [], None, 0.0, {})
    best = int(np.argmax(np.asarray(shares) * np.asarray([c.share for c in concepts])))
    rows = np.flatnonzero(np.isin(cache.labels, list(classes)))
    values = project_rows(engine, rows, concepts[best].direction, [head])[:, 0]
    groups = [cache.records[r].group or cache.classes[cache.labels[r]] for r in rows]
    return HeadEvidence(head, head in diagnosis.heads, shares, concepts[best], shares[best],
                        group_profile(values, groups))


def group_profile(values: np.ndarray, groups: Sequence[str]) -> dict[str, tuple[float, float, int]]:
    """``{group: (mean, standard deviation, count)}`` of ``values`` (groups in first-seen order)."""
    values = np.asarray(values, dtype=np.float64)
    out: dict[str, tuple[float, float, int]] = {}
    for g in dict.fromkeys(groups):
        v = values[[i for i, x in enumerate(groups) if x == g]]
        out[g] = (float(v.mean()), float(v.std()), int(len(v)))
    return out


def separation_auc(values: np.ndarray, positive: np.ndarray) -> float:
    """How well ``values`` separate two kinds of images, direction-free: max(AUC, 1 − AUC) of
    the Mann-Whitney statistic (0.5 = no separation, 1 = perfect); NaN without both kinds."""
    values, positive = np.asarray(values, dtype=np.float64), np.asarray(positive, dtype=bool)
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if not n1 or not n0:
        return float("nan")
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    sorted_v = values[order]
    i = 0
    while i < len(values):                               # average ranks over ties
        j = i
        while j + 1 < len(values) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    auc = (ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)
    return float(max(auc, 1 - auc))

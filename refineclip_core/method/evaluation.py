"""Accuracy reports: overall, per class, per group, average-group and worst-group (paper Tables 1-3).

All accuracies are fractions in [0, 1]. A class or group with no images is absent from the
report rather than reported as 0 or NaN. Every accuracy carries its exact 95% interval
(Clopper–Pearson, :mod:`~refineclip_core.method.intervals`) and its number of images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from ..features.zeroshot import predict
from .intervals import Estimate, binomial_intervals, stratified_estimate

if TYPE_CHECKING:
    from ..features.cache import FeatureCache


@dataclass
class AccuracyReport:
    """Accuracy of a set of predictions, broken down like the paper's tables."""

    n_images: int
    accuracy: float | None
    per_class: dict[str, float]
    per_group: dict[str, float]
    average_group: float | None
    worst_group: float | None
    worst_group_name: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    #: 95% interval of each per-class / per-group accuracy, keyed like ``counts``
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    accuracy_interval: tuple[float, float] | None = None
    average_group_interval: tuple[float, float] | None = None   # stratified bootstrap over groups

    def to_dict(self) -> dict:
        return asdict(self)

    def overall(self) -> Estimate | None:
        """Overall accuracy with its interval and image count."""
        if self.accuracy is None or self.accuracy_interval is None:
            return None
        return Estimate(self.accuracy, *self.accuracy_interval, self.n_images)

    def of_class(self, name: str) -> Estimate | None:
        return self._estimate(self.per_class.get(name), name)

    def of_group(self, name: str) -> Estimate | None:
        return self._estimate(self.per_group.get(name), f"group:{name}")

    def average(self) -> Estimate | None:
        """Average-group accuracy (unweighted mean over groups) with its bootstrap interval."""
        if self.average_group is None or self.average_group_interval is None:
            return None
        n = sum(v for k, v in self.counts.items() if k.startswith("group:"))
        return Estimate(self.average_group, *self.average_group_interval, n)

    def worst(self) -> Estimate | None:
        """The worst group's accuracy (the interval is that group's own)."""
        return self.of_group(self.worst_group_name) if self.worst_group_name else None

    def _estimate(self, value: float | None, key: str) -> Estimate | None:
        if value is None or key not in self.intervals:
            return None
        return Estimate(value, *self.intervals[key], self.counts[key])


PREDICT_BLOCK = 4096
"""Images per block when predictions are made from scores: 4,096 × 1,000 classes is 32 MB in float64."""


def block_argmax(scores: Callable[[np.ndarray], np.ndarray], X: np.ndarray, block: int = PREDICT_BLOCK) -> np.ndarray:
    """``scores(X).argmax(1)`` computed a block of rows at a time (``scores`` maps rows of ``X`` to
    their class scores): a 50,000-image, 1,000-class run never holds the whole score matrix."""
    out = np.empty(len(X), dtype=np.int64)
    for start in range(0, len(X), block):
        out[start:start + block] = np.asarray(scores(X[start:start + block])).argmax(1)
    return out


def rows_mask(n: int, rows: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
    """The boolean mask of length ``n`` that selects ``rows`` (every row when ``rows`` is None):
    the one way to turn a row list (e.g. an identification's evaluation rows) into a ``mask``."""
    mask = np.zeros(n, dtype=bool) if rows is not None else np.ones(n, dtype=bool)
    if rows is not None:
        mask[np.asarray(rows, dtype=np.int64)] = True
    return mask


def accuracy_report(
    predictions: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    groups: np.ndarray | None = None,
    group_names: Sequence[str] = (),
    mask: np.ndarray | None = None,
) -> AccuracyReport:
    """Accuracies of ``predictions`` against ``labels`` over the rows selected by ``mask``.

    ``groups`` holds a group id per row (``-1`` for none); average-group accuracy is the
    unweighted mean over groups present, worst-group the minimum.
    """
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if mask is None:
        mask = rows_mask(len(labels))
    correct = (predictions == labels) & mask
    n = int(mask.sum())
    per_class: dict[str, float] = {}
    counts: dict[str, int] = {}
    hits: dict[str, int] = {}

    def tally(ids: np.ndarray, names: Sequence[str], prefix: str, into: dict[str, float]) -> None:
        """Images and correct ones per id (one pass over the rows, not one per class: 1000 classes)."""
        valid = mask & (ids >= 0) & (ids < len(names))
        n_of = np.bincount(ids[valid], minlength=len(names))
        k_of = np.bincount(ids[valid & correct], minlength=len(names))
        for i in np.flatnonzero(n_of).tolist():
            into[names[i]] = float(k_of[i] / n_of[i])
            counts[prefix + names[i]], hits[prefix + names[i]] = int(n_of[i]), int(k_of[i])

    tally(labels, list(classes), "", per_class)
    per_group: dict[str, float] = {}
    average_interval = None
    if groups is not None:
        groups = np.asarray(groups)
        tally(groups, list(group_names), "group:", per_group)
        in_group = mask & (groups >= 0)
        if per_group:
            avg = stratified_estimate(correct[in_group], groups[in_group], "average")
            average_interval = (avg.low, avg.high)
    worst_name = min(per_group, key=per_group.get) if per_group else None
    keys = list(hits)   # one vectorised call: every class, every group, then the overall accuracy
    low, high = binomial_intervals(np.array([hits[k] for k in keys] + [int(correct.sum())]),
                                   np.array([counts[k] for k in keys] + [n]))
    intervals = {k: (float(lo), float(hi)) for k, lo, hi in zip(keys, low, high)}
    return AccuracyReport(
        n_images=n,
        accuracy=float(correct.sum() / n) if n else None,
        per_class=per_class,
        per_group=per_group,
        average_group=float(np.mean(list(per_group.values()))) if per_group else None,
        worst_group=per_group[worst_name] if worst_name else None,
        worst_group_name=worst_name,
        counts=counts,
        intervals=intervals,
        accuracy_interval=(float(low[-1]), float(high[-1])) if n else None,
        average_group_interval=average_interval,
    )


def cache_report(cache: "FeatureCache", predictions: np.ndarray | None = None,
                 mask: np.ndarray | None = None) -> AccuracyReport:
    """The :func:`accuracy_report` of a feature cache's images: of ``predictions`` (one class per
    cached row; by default the zero-shot ones, cosine similarity to the class prompts, paper Eq. 2)
    over the rows in ``mask`` (e.g. ``Identification.eval_mask``; every row by default)."""
    if predictions is None:
        predictions, _ = predict(cache.embeddings, cache.text, cache.scoring)
    return accuracy_report(predictions, cache.labels, cache.classes, cache.groups, cache.group_names, mask)


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray, n_classes: int, mask: np.ndarray | None = None,
                     classes: np.ndarray | None = None) -> np.ndarray:
    """``M[true, predicted]`` counts; with ``classes`` (indices) only among those classes, in that order
    (a ``k × k`` matrix: with 10,000 classes the whole one would hold 10^8 counts)."""
    if mask is not None:
        predictions, labels = predictions[mask], labels[mask]
    if classes is None:
        m = np.zeros((n_classes, n_classes), dtype=np.int64)
        np.add.at(m, (labels, predictions), 1)
        return m
    classes = np.asarray(classes, dtype=np.int64)
    where = np.full(n_classes, -1, dtype=np.int64)
    where[classes] = np.arange(len(classes))
    keep = (where[labels] >= 0) & (where[predictions] >= 0)
    m = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(m, (where[labels[keep]], where[predictions[keep]]), 1)
    return m


def most_confused_classes(predictions: np.ndarray, labels: np.ndarray, n_classes: int, k: int,
                          mask: np.ndarray | None = None) -> np.ndarray:
    """The (at most) ``k`` classes involved in the most errors, as true or as predicted class, in
    index order (ties: the lower index): what a confusion matrix of many classes shows."""
    if mask is not None:
        predictions, labels = predictions[mask], labels[mask]
    wrong = predictions != labels
    errors = np.bincount(labels[wrong], minlength=n_classes) + np.bincount(predictions[wrong], minlength=n_classes)
    if n_classes <= k:
        return np.arange(n_classes)
    order = np.lexsort((np.arange(n_classes), -errors))[:k]
    return np.sort(order)

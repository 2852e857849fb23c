"""Every compared method's accuracies on the identification's evaluation rows (with 95% intervals), and the
labels each used (:class:`~refineclip_core.edit.methods.LabelsUsed`, as data): the comparison's table,
:class:`MethodReport`. The rows are fitted by :mod:`refineclip_core.edit.compare` (which only fits; this module
only tabulates predictions).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..features.cache import FeatureCache
from ..method.evaluation import AccuracyReport, accuracy_report
from ..method.intervals import Estimate, accuracy_estimate
from .protocol import Identification


@dataclass
class MethodReport:
    """Accuracies on the evaluation rows for every method compared (paper Tables 1-3, Fig. 2)."""

    reports: dict[str, AccuracyReport]        # all evaluation rows
    target_reports: dict[str, AccuracyReport]  # only images of the edited classes (their groups: Tables 1-3)
    locality: dict[str, Estimate | None]      # accuracy on classes outside the edited pair(s) (Fig. 2)
    target_accuracy: dict[str, Estimate | None]
    predictions: dict[str, np.ndarray] = field(default_factory=dict)
    labels_used: dict[str, dict[str, Any]] = field(default_factory=dict)   # method -> LabelsUsed.to_dict()
    about: dict[str, dict[str, Any]] = field(default_factory=dict)   # method -> label, colour, what it is, needs

    def add(self, cache: FeatureCache, ident: Identification, name: str, pred: np.ndarray,
            used: dict[str, Any] | None = None, about: dict[str, Any] | None = None) -> None:
        """One more method's row (its accuracies computed as :func:`evaluate_methods` does); ``used``: the labels
        it used, ``about``: its registry entry as data (so a report rendered from JSON names and colours it)."""
        labels = cache.labels
        mask = ident.eval_mask
        target_mask = mask & np.isin(labels, ident.target_classes)
        other_mask = mask & ~np.isin(labels, ident.target_classes)
        correct = pred == labels
        self.reports[name] = accuracy_report(pred, labels, cache.classes, cache.groups, cache.group_names, mask)
        self.target_reports[name] = accuracy_report(pred, labels, cache.classes, cache.groups, cache.group_names,
                                                    target_mask)
        self.locality[name] = accuracy_estimate(correct[other_mask]) if other_mask.any() else None
        self.target_accuracy[name] = accuracy_estimate(correct[target_mask]) if target_mask.any() else None
        self.predictions[name] = pred
        if used is not None:
            self.labels_used[name] = dict(used)
        if about is not None:
            self.about[name] = dict(about)

    def copy(self) -> "MethodReport":
        """A copy whose tables a reader may hold while rows are added to this one (the rows themselves shared)."""
        return MethodReport(dict(self.reports), dict(self.target_reports), dict(self.locality),
                            dict(self.target_accuracy), dict(self.predictions), dict(self.labels_used), dict(self.about))

    def to_dict(self) -> dict:
        def est(e: Estimate | None) -> dict | None:
            return None if e is None else e.to_dict()

        return {"reports": {k: v.to_dict() for k, v in self.reports.items()},
                "target_reports": {k: v.to_dict() for k, v in self.target_reports.items()},
                "locality": {k: est(v) for k, v in self.locality.items()},
                "target_accuracy": {k: est(v) for k, v in self.target_accuracy.items()},
                "labels_used": {k: dict(v) for k, v in self.labels_used.items()},
                "about": {k: dict(v) for k, v in self.about.items()}}


def evaluate_methods(cache: FeatureCache, ident: Identification, predictions: dict[str, np.ndarray],
                     labels_used: dict[str, dict[str, Any]] | None = None) -> MethodReport:
    """Accuracy reports of several prediction vectors over ``ident.eval_rows``."""
    out = MethodReport({}, {}, {}, {})
    for name, pred in predictions.items():
        out.add(cache, ident, name, pred, (labels_used or {}).get(name))
    return out

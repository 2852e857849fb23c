"""Every compared method's accuracies on the identification's evaluation rows (with 95% intervals).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

    def to_dict(self) -> dict:
        def est(e: Estimate | None) -> dict | None:
            return None if e is None else e.to_dict()

        return {"reports": {k: v.to_dict() for k, v in self.reports.items()},
                "target_reports": {k: v.to_dict() for k, v in self.target_reports.items()},
                "locality": {k: est(v) for k, v in self.locality.items()},
                "target_accuracy": {k: est(v) for k, v in self.target_accuracy.items()}}


def evaluate_methods(cache: FeatureCache, ident: Identification, predictions: dict[str, np.ndarray]) -> MethodReport:
    """Accuracy reports of several prediction vectors over ``ident.eval_rows``."""
    labels = cache.labels
    mask = ident.eval_mask
    target_mask = mask & np.isin(labels, ident.target_classes)
    other_mask = mask & ~np.isin(labels, ident.target_classes)
    reports, target_reports, locality, target_acc = {}, {}, {}, {}
    for name, pred in predictions.items():
        correct = pred == labels
        reports[name] = accuracy_report(pred, labels, cache.classes, cache.groups, cache.group_names, mask)
        target_reports[name] = accuracy_report(pred, labels, cache.classes, cache.groups, cache.group_names,
                                               target_mask)
        locality[name] = accuracy_estimate(correct[other_mask]) if other_mask.any() else None
        target_acc[name] = accuracy_estimate(correct[target_mask]) if target_mask.any() else None
    return MethodReport(reports, target_reports, locality, target_acc, predictions)

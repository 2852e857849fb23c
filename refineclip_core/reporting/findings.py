"""Findings: a session's headline numbers, and method comparisons as tables (paper Tables 1-3).

:func:`findings` condenses a cache and an identification (paper §3.2, Alg. 1) into the few
numbers a stakeholder wants first: zero-shot accuracy and worst group, the largest error pair,
the heads Alg. 1 picks and what removing them (Eq. 5) does on held-out images.
:func:`method_summary` and :func:`per_key_table` turn a
:class:`~refineclip_core.method.protocol.MethodReport` into ``{method: {column: accuracy}}`` rows
for the dashboard's tables, the figures and the HTML report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..features.cache import FeatureCache
from ..features.decomposition import HeadId
from ..method.ablation import AblationEngine
from ..method.errorsets import error_pairs
from ..method.protocol import Identification, evaluate_methods


def json_safe(obj: Any) -> Any:
    """Numbers, arrays, head ids and dataclass-like objects as plain JSON (NaN/inf -> None)."""
    if isinstance(obj, HeadId):
        return obj.as_list()
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return json_safe(obj.to_dict())
    return obj


#: Method names in the order tables and charts show them.
METHOD_ORDER = ("zero-shot", "ablated", "refineclip-diag", "refineclip-full", "refineclip-lora",
                "standard-finetune", "tip-adapter")


@dataclass

class Findings:
    """The headline of a session (all accuracies are fractions, over ``n_eval`` held-out images)."""

    n_images: int
    n_eval: int
    accuracy: float | None
    worst_group: float | None
    worst_group_name: str | None
    average_group: float | None
    pair: str | None
    pair_count: int
    heads: list[str]
    score: str | None
    ablated_accuracy: float | None
    ablated_worst_group: float | None
    ablated_worst_group_name: str | None
    ablated_target_accuracy: float | None = None
    target_accuracy: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return json_safe(self.__dict__)


def findings(cache: FeatureCache, ident: Identification, engine: AblationEngine) -> Findings:
    """Zero-shot vs. ablating Alg. 1's heads (Eq. 5) on the identification's evaluation rows."""
    labels, base = cache.labels, engine.base_predictions
    methods = evaluate_methods(cache, ident, {"zero-shot": base, "ablated": engine.predict(ident.heads, "zero")})
    zs, ab = methods.reports["zero-shot"], methods.reports["ablated"]
    a, b = ident.pairs[0]
    count = next((p.count for p in error_pairs(base, labels, ident.eval_rows) if (p.true, p.pred) == (a, b)), 0)
    notes = [f"{k}: {v}" for k, v in ident.selection.unavailable.items()]
    return Findings(
        n_images=len(labels), n_eval=zs.n_images, accuracy=zs.accuracy, worst_group=zs.worst_group,
        worst_group_name=zs.worst_group_name, average_group=zs.average_group,
        pair=f"{cache.classes[a]} → {cache.classes[b]}", pair_count=count,
        heads=[str(h) for h in ident.heads], score=ident.selection.score,
        ablated_accuracy=ab.accuracy, ablated_worst_group=ab.worst_group, ablated_worst_group_name=ab.worst_group_name,
        ablated_target_accuracy=methods.target_accuracy["ablated"], target_accuracy=methods.target_accuracy["zero-shot"],
        notes=notes,
    )


def method_summary(methods: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """``{method: {overall, average group, worst group, error-pair classes, worst group of the pair's
    classes, other classes}}`` from a :class:`~refineclip_core.method.protocol.MethodReport`'s ``to_dict()``."""
    reports, locality, target = methods["reports"], methods.get("locality", {}), methods.get("target_accuracy", {})
    targets = methods.get("target_reports") or {}
    out = {}
    for name in sorted(reports, key=lambda n: (METHOD_ORDER.index(n) if n in METHOD_ORDER else 99, n)):
        r = reports[name]
        row = {"overall": r.get("accuracy"), "average group": r.get("average_group"),
               "worst group": r.get("worst_group"), "error-pair classes": target.get(name)}
        if name in targets:
            row["worst group (pair classes)"] = targets[name].get("worst_group")
        row["other classes (locality)"] = locality.get(name)
        out[name] = row
    return out


def per_key_table(methods: Mapping[str, Any], key: str) -> dict[str, dict[str, float]]:
    """``{method: {class or group: accuracy}}`` (``key`` = ``per_class`` or ``per_group``)."""
    reports = methods["reports"]
    order = sorted(reports, key=lambda n: (METHOD_ORDER.index(n) if n in METHOD_ORDER else 99, n))
    return {name: dict(reports[name].get(key) or {}) for name in order}

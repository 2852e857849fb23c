"""Findings: a session's headline numbers, and method comparisons as tables (paper Tables 1-3).

:func:`findings` condenses a cache and an identification (paper §3.2, Alg. 1) into the few
numbers a stakeholder wants first: zero-shot accuracy and worst group, the largest error pair,
the heads the protocol picks and what removing them (Eq. 5) does on held-out images, every
accuracy with its 95% interval and image count.
:func:`method_summary` and :func:`per_key_table` turn a
:class:`~refineclip_core.method.method_table.MethodReport` into ``{method: {column: accuracy}}`` rows
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
from ..method.evaluation import AccuracyReport
from ..method.intervals import Estimate
from ..method.protocol import Identification
from ..method.method_table import MethodReport, evaluate_methods
from ..names import decodable


def json_safe(obj: Any) -> Any:
    """Numbers, arrays, head ids and dataclass-like objects as plain JSON (NaN/inf -> None); text as
    :func:`~refineclip_core.names.decodable` writes it (a file name's undecodable bytes marked)."""
    if isinstance(obj, str):
        return decodable(obj)
    if isinstance(obj, HeadId):
        return obj.as_list()
    if isinstance(obj, Mapping):
        return {decodable(k): json_safe(v) for k, v in obj.items()}
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
        return decodable(obj)
    if hasattr(obj, "to_dict"):
        return json_safe(obj.to_dict())
    return obj


@dataclass
class Findings:
    """The headline of a session: accuracies (with their 95% intervals and image counts) over the
    ``n_eval`` held-out images, zero-shot and with the chosen heads removed."""

    n_images: int
    n_eval: int
    accuracy: Estimate | None
    worst_group: Estimate | None
    worst_group_name: str | None
    average_group: Estimate | None
    pair: str | None
    pair_count: int
    heads: list[str]
    score: str | None
    ablation: str
    ablated_accuracy: Estimate | None
    ablated_worst_group: Estimate | None
    ablated_worst_group_name: str | None
    ablated_target_accuracy: Estimate | None = None
    target_accuracy: Estimate | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return json_safe(self.__dict__)


def findings(cache: FeatureCache, ident: Identification, engine: AblationEngine) -> Findings:
    """Zero-shot vs. removing the chosen heads (the protocol's ablation, Eq. 5) on the
    identification's evaluation rows: the same rows and ablation the Refine page reports."""
    labels, base = cache.labels, engine.base_predictions
    ablated = ident.ablation_engine(engine).predict(ident.heads, ident.config.ablation)
    methods = evaluate_methods(cache, ident, {"zero-shot": base, "ablated": ablated})
    zs, ab = methods.reports["zero-shot"], methods.reports["ablated"]
    a, b = ident.pairs[0]
    count = next((p.count for p in error_pairs(base, labels, ident.eval_rows) if (p.true, p.pred) == (a, b)), 0)
    notes = [f"{k}: {v}" for k, v in ident.selection.unavailable.items()]
    return Findings(
        n_images=len(labels), n_eval=zs.n_images, accuracy=zs.overall(), worst_group=zs.worst(),
        worst_group_name=zs.worst_group_name, average_group=zs.average(),
        pair=f"{cache.classes[a]} → {cache.classes[b]}", pair_count=count,
        heads=[str(h) for h in ident.heads], score=ident.selection.score_name, ablation=ident.config.ablation,
        ablated_accuracy=ab.overall(), ablated_worst_group=ab.worst(), ablated_worst_group_name=ab.worst_group_name,
        ablated_target_accuracy=methods.target_accuracy["ablated"], target_accuracy=methods.target_accuracy["zero-shot"],
        notes=notes,
    )


Cell = Mapping[str, Any]
"""An accuracy as JSON-safe data: ``{"value", "low", "high", "n"}`` (an Estimate's ``to_dict``)."""


def _cell(est: Estimate | None) -> dict | None:
    return None if est is None or not est.n else est.to_dict()


def _report_cells(r: AccuracyReport) -> dict[str, dict | None]:
    """Overall, average-group and worst-group cells of an AccuracyReport."""
    return {"overall": _cell(r.overall()), "average group": _cell(r.average()), "worst group": _cell(r.worst())}


def method_summary(methods: MethodReport) -> dict[str, dict[str, dict | None]]:
    """``{method: {overall, average group, worst group, error-pair classes, worst group of the pair's
    classes, other classes}}`` — each cell an accuracy with its interval and image count
    (:data:`Cell`) — from a :class:`~refineclip_core.method.method_table.MethodReport` (a live one, or a run
    report's ``methods``)."""
    out = {}
    for name, report in methods.reports.items():  # the order the rows were fitted in: the registry's (edit/methods.py)
        row = {**_report_cells(report), "error-pair classes": _cell(methods.target_accuracy.get(name))}
        if name in methods.target_reports:
            row["worst group (pair classes)"] = _cell(methods.target_reports[name].worst())
        row["other classes (locality)"] = _cell(methods.locality.get(name))
        out[name] = row
    return out


def labels_used_column(methods: MethodReport) -> dict[str, str]:
    """``{method: sentence}``: the labels each row used (class labels, group labels and which groups, typed
    text, unlabelled images; :class:`~refineclip_core.edit.methods.LabelsUsed`), the "labels used" column
    of every comparison table; empty for a row that recorded none."""
    return {name: str(methods.labels_used.get(name, {}).get("sentence", "")) for name in methods.reports}


def per_key_table(methods: MethodReport, key: str) -> dict[str, dict[str, dict | None]]:
    """``{method: {class or group: cell}}`` (``key`` = ``per_class`` or ``per_group``)."""
    out = {}
    for name, r in methods.reports.items():
        of = r.of_group if key == "per_group" else r.of_class
        out[name] = {k: _cell(of(k)) for k in (r.per_group if key == "per_group" else r.per_class)}
    return out


def accuracy_rows(report: AccuracyReport, by: str) -> list[dict]:
    """One row per class (``by="class"``) or group (``"group"``) of a report: ``{name, value, low,
    high, n}`` — the accuracy with its 95% interval and image count."""
    names = report.per_class if by == "class" else report.per_group
    out = []
    for name in names:
        est = report.of_class(name) if by == "class" else report.of_group(name)
        if est is not None:
            out.append({"name": name, **est.to_dict()})
    return out


def cell_estimate(cell: Cell | None) -> Estimate | None:
    """A cell back as an :class:`~refineclip_core.method.intervals.Estimate` (None when missing)."""
    if cell is None or cell.get("value") is None:
        return None
    return Estimate(**{k: cell[k] for k in ("value", "low", "high", "n")})


def format_cell(cell: Cell | None, digits: int = 1) -> str:
    """``"67.2% [61.0, 73.0] (n=250)"``, or ``"–"`` for a missing accuracy."""
    est = cell_estimate(cell)
    return "–" if est is None else est.format(digits=digits)

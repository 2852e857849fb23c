"""Findings, charts and the run report (JSON + self-contained HTML) of a RefineCLIP session.

Three layers, none of which imports Streamlit:

* :func:`findings` condenses a cache and an identification (paper §3.2, Alg. 1) into the few
  numbers a stakeholder wants first: zero-shot accuracy and worst group, the largest error
  pair, the heads Alg. 1 picks and what removing them (Eq. 5) does on held-out images.
* ``*_figure`` functions build the Plotly charts the dashboard shows and the report embeds:
  per-head score maps (DE_A..DE_D as a layer × head grid of square markers, one point per
  head so that clicking a head can be read back), Alg. 1 utility curves (Eq. 10), the
  confusion matrix, method comparisons and refinement loss curves (Eq. 11-13). They take
  plain numbers (lists, dicts, arrays), so the HTML report can be rebuilt from its JSON.
* :func:`build_run_report` gathers one run (model, data, protocol, scores, selection,
  refinement config and history, every method's accuracies) into a JSON-safe dict;
  :func:`render_html` turns it into one HTML file with the Plotly library inlined
  (``to_html(include_plotlyjs=True)`` for the first chart), readable offline.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from ..features.cache import FeatureCache, atomic_write_bytes
from ..features.decomposition import HeadId
from ..method.ablation import AblationEngine
from ..method.evaluation import accuracy_report
from ..method.scores import HeadScores

#: Method names in the order tables and charts show them.
METHOD_ORDER = ("zero-shot", "ablated", "refineclip-diag", "refineclip-full", "refineclip-lora",
                "standard-finetune", "tip-adapter")
METHOD_COLORS = {
    "zero-shot": "#7f7f7f", "ablated": "#ff7f0e", "refineclip-diag": "#2ca02c", "refineclip-full": "#2ca02c",
    "refineclip-lora": "#2ca02c", "standard-finetune": "#1f77b4", "tip-adapter": "#9467bd",
}
#: Diverging colour scale of the score maps: blue (negative) – white (0) – red (positive).
DIVERGING = "RdBu_r"


# ------------------------------------------------------------------------------------------------
# JSON helpers

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


def _head(h: HeadId | Sequence[int]) -> tuple[int, int]:
    return (h.layer, h.head) if isinstance(h, HeadId) else (int(h[0]), int(h[1]))


def _fmt(x: float | None, pct: bool = True) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{100 * x:.1f}%" if pct else f"{x:.4g}"


# ------------------------------------------------------------------------------------------------
# Findings

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


def findings(cache: FeatureCache, ident, engine: AblationEngine | None = None) -> Findings:
    """Zero-shot vs. ablating Alg. 1's heads on the identification's evaluation rows."""
    from ..method.errorsets import error_pairs

    engine = engine or AblationEngine(cache.embeddings, cache.heads, cache.text, cache.manifest.layers)
    labels = cache.labels
    mask = np.zeros(len(labels), dtype=bool)
    mask[ident.eval_rows] = True
    base = engine.base_predictions
    zs = accuracy_report(base, labels, cache.classes, cache.groups, cache.group_names, mask)
    abl_pred = engine.predict(ident.heads, "zero")
    ab = accuracy_report(abl_pred, labels, cache.classes, cache.groups, cache.group_names, mask)
    pairs = error_pairs(base, labels, ident.eval_rows)
    a, b = ident.pairs[0]
    count = next((p.count for p in pairs if (p.true, p.pred) == (a, b)), 0)
    targets = np.isin(labels, sorted({c for p in ident.pairs for c in p})) & mask
    tgt = float((base[targets] == labels[targets]).mean()) if targets.any() else None
    tgt_ab = float((abl_pred[targets] == labels[targets]).mean()) if targets.any() else None
    notes = [f"{k}: {v}" for k, v in ident.selection.unavailable.items()]
    return Findings(
        n_images=len(labels), n_eval=int(mask.sum()), accuracy=zs.accuracy, worst_group=zs.worst_group,
        worst_group_name=zs.worst_group_name, average_group=zs.average_group,
        pair=f"{cache.classes[a]} → {cache.classes[b]}", pair_count=count,
        heads=[str(h) for h in ident.heads], score=ident.selection.score,
        ablated_accuracy=ab.accuracy, ablated_worst_group=ab.worst_group, ablated_worst_group_name=ab.worst_group_name,
        ablated_target_accuracy=tgt_ab, target_accuracy=tgt, notes=notes,
    )


# ------------------------------------------------------------------------------------------------
# Figures

def _base_layout(fig: go.Figure, title: str | None = None, **kw) -> go.Figure:
    fig.update_layout(template="plotly_white", title=title, margin=dict(l=50, r=20, t=50 if title else 20, b=40), **kw)
    return fig


def grid_cell_size(n_heads: int, max_width: int = 560) -> int:
    """Side in pixels of one head's square in :func:`score_grid_figure`."""
    return int(max(14, min(44, (max_width - 140) / max(n_heads, 1))))


def score_grid_figure(values: np.ndarray | Sequence[Sequence[float]] | None, layers: Sequence[int], name: str,
                      descending: bool = True, chosen: Iterable = (), selected=None, n_heads: int | None = None,
                      max_width: int = 560) -> go.Figure:
    """A layer × head map of one score drawn as a scatter grid of square markers.

    One point per head (x = head, y = layer, colour = score on a diverging scale centred at
    0), so a click selects a point whose ``customdata`` is ``[layer, head]``. Heads in
    ``chosen`` get a thick black outline, ``selected`` a gold one. ``values`` ``(L_s, H)``.
    """
    layers = [int(l) for l in layers]
    if values is None:
        raise ValueError("score_grid_figure needs values; show the reason the score is unavailable instead")
    v = np.asarray(values, dtype=np.float64)
    L, H = v.shape
    cell = grid_cell_size(H if n_heads is None else n_heads, max_width)
    flat = v.reshape(-1)
    order = np.argsort(-flat if descending else flat, kind="stable")
    rank = np.empty(len(flat), dtype=np.int64)
    rank[order] = np.arange(1, len(flat) + 1)
    xs, ys, custom = [], [], []
    for i, l in enumerate(layers):
        for h in range(H):
            xs.append(h)
            ys.append(l)
            custom.append([l, h, int(rank[i * H + h])])
    chosen_set = {_head(h) for h in chosen}
    sel = _head(selected) if selected is not None else None
    line_w = [4 if (c[0], c[1]) == sel else 0.5 for c in custom]
    line_c = ["#e6a800" if (c[0], c[1]) == sel else "#dddddd" for c in custom]
    lim = float(np.nanmax(np.abs(flat))) if np.isfinite(flat).any() else 1.0
    lim = lim if lim > 0 else 1.0
    fig = go.Figure(go.Scatter(
        x=xs, y=ys, mode="markers", customdata=custom,
        marker=dict(symbol="square", size=cell - 3, color=flat, colorscale=DIVERGING, cmin=-lim, cmax=lim, cmid=0,
                    line=dict(width=line_w, color=line_c),
                    colorbar=dict(title=dict(text=name, side="right"), thickness=12, len=0.9)),
        hovertemplate=(f"<b>L%{{customdata[0]}}.H%{{customdata[1]}}</b><br>{name} = %{{marker.color:.4g}}"
                       f"<br>rank %{{customdata[2]}} of {len(flat)} ({'highest' if descending else 'lowest'} first)"
                       "<extra></extra>"),
    ))
    marked = [c for c in custom if (c[0], c[1]) in chosen_set]
    if marked:  # a white dot with a black ring on the chosen heads, visible on any colour
        fig.add_trace(go.Scatter(
            x=[c[1] for c in marked], y=[c[0] for c in marked], mode="markers", customdata=marked,
            marker=dict(symbol="circle", size=max(6, cell // 4), color="white", line=dict(width=2, color="black")),
            hovertemplate="<b>L%{customdata[0]}.H%{customdata[1]}</b> (chosen by Alg. 1)<extra></extra>"))
    width = 120 + cell * H
    height = 70 + cell * L
    fig.update_layout(
        template="plotly_white", width=width, height=max(height, 160), margin=dict(l=60, r=20, t=30, b=40),
        title=dict(text=f"{name} ({'highest' if descending else 'lowest'} = most suspicious)", font=dict(size=13)),
        xaxis=dict(title="head", tickmode="array", tickvals=list(range(H)), range=[-0.5, H - 0.5], showgrid=False,
                   zeroline=False, fixedrange=True),
        yaxis=dict(title="layer", tickmode="array", tickvals=layers, ticktext=[str(l) for l in layers],
                   range=[layers[0] - 0.5, layers[-1] + 0.5] if layers == list(range(layers[0], layers[-1] + 1))
                   else None, showgrid=False, zeroline=False, fixedrange=True),
        clickmode="event+select", dragmode=False, showlegend=False,
    )
    return fig


def utility_figure(curves: Mapping[str, Sequence[float]], baseline: float | None = None, chosen_score: str | None = None,
                   chosen_t: int = 0, candidates: Mapping[str, Sequence] | None = None) -> go.Figure:
    """Alg. 1's utility U(S_t) (Eq. 10) against t for every score's top-T list."""
    fig = go.Figure()
    palette = {"DE_A": "#d62728", "DE_B": "#1f77b4", "DE_C": "#ff7f0e", "DE_D": "#2ca02c"}
    for name, curve in curves.items():
        t = list(range(1, len(curve) + 1))
        heads = [str(HeadId(*_head(h))) for h in (candidates or {}).get(name, [])]
        text = [", ".join(heads[:k]) if heads else "" for k in t]
        base = name.split("[")[0]
        fig.add_trace(go.Scatter(x=t, y=list(curve), mode="lines+markers", name=name, text=text,
                                 line=dict(color=palette.get(base)),
                                 hovertemplate=f"{name}: t=%{{x}}, U=%{{y:.4f}}<br>%{{text}}<extra></extra>"))
    if chosen_score and chosen_score in curves and 0 < chosen_t <= len(curves[chosen_score]):
        fig.add_trace(go.Scatter(x=[chosen_t], y=[curves[chosen_score][chosen_t - 1]], mode="markers",
                                 name="chosen set", marker=dict(symbol="star", size=18, color="gold",
                                                                line=dict(color="black", width=1)),
                                 hovertemplate="chosen: %{x} heads of " + chosen_score + "<extra></extra>"))
    if baseline is not None and math.isfinite(baseline):
        fig.add_hline(y=baseline, line_dash="dash", line_color="#888",
                      annotation_text="no head removed", annotation_position="bottom right")
    _base_layout(fig, "Alg. 1 utility of removing the top-t heads", height=360,
                 xaxis_title="t (heads removed, in ranking order)", yaxis_title="utility U(S_t)  (Eq. 10)")
    return fig


def confusion_figure(matrix: np.ndarray, classes: Sequence[str]) -> go.Figure:
    """Counts ``M[true, predicted]`` as an annotated heatmap (diagonal = correct)."""
    m = np.asarray(matrix)
    row = m.sum(1, keepdims=True)
    frac = np.divide(m, np.maximum(row, 1))
    fig = go.Figure(go.Heatmap(
        z=frac, x=list(classes), y=list(classes), text=m, texttemplate="%{text}", colorscale="Blues", zmin=0, zmax=1,
        colorbar=dict(title="row share"),
        hovertemplate="true %{y} → predicted %{x}<br>%{text} images (%{z:.0%} of the class)<extra></extra>"))
    n = len(classes)
    _base_layout(fig, "Confusion matrix (zero-shot)", height=max(320, 60 + 34 * n),
                 xaxis_title="predicted", yaxis_title="true")
    fig.update_yaxes(autorange="reversed")
    return fig


def accuracy_bars_figure(rows: Mapping[str, Mapping[str, float | None]], title: str, y_title: str = "accuracy"
                         ) -> go.Figure:
    """Grouped bars: ``rows[method][category] = accuracy`` (categories share the x axis)."""
    fig = go.Figure()
    n_bars = sum(len(v) for v in rows.values())
    for method, values in rows.items():
        cats = list(values)
        ys = [None if values[c] is None else 100 * values[c] for c in cats]
        fig.add_trace(go.Bar(name=method, x=cats, y=ys, marker_color=METHOD_COLORS.get(method),
                             text=[("–" if y is None else f"{y:.0f}") for y in ys] if n_bars <= 36 else None,
                             textposition="outside",
                             hovertemplate=f"{method}<br>%{{x}}: %{{y:.1f}}%<extra></extra>"))
    n_cats = max((len(v) for v in rows.values()), default=0)
    _base_layout(fig, title, barmode="group", height=400, yaxis=dict(title=y_title + " (%)", range=[0, 109]),
                 legend=dict(orientation="h", yanchor="top", y=-0.25 if n_cats > 6 else -0.15))
    fig.update_xaxes(automargin=True, tickangle=-30 if n_cats > 6 else 0)
    return fig


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


def loss_figure(history: Mapping[str, Sequence[float]], weights: Mapping[str, float] | None = None) -> go.Figure:
    """Refinement losses per step (log scale): L_success (Eq. 11), L_locality (Eq. 12), L_CE."""
    fig = go.Figure()
    names = {"success": "L_success (Eq. 11)", "locality": "L_locality (Eq. 12)", "ce": "L_CE", "total": "total (Eq. 13)"}
    colors = {"success": "#d62728", "locality": "#1f77b4", "ce": "#2ca02c", "total": "#555"}
    for key in ("success", "locality", "ce", "total"):
        ys = list(history.get(key, []))
        if not ys:
            continue
        ys = [y if (y is not None and y > 0) else None for y in ys]
        fig.add_trace(go.Scatter(x=list(range(1, len(ys) + 1)), y=ys, mode="lines", name=names[key],
                                 line=dict(color=colors[key], dash="dot" if key == "total" else None)))
    _base_layout(fig, "Refinement losses", height=340, xaxis_title="step", yaxis=dict(title="loss", type="log"),
                 legend=dict(orientation="h", y=-0.25))
    return fig


# ------------------------------------------------------------------------------------------------
# Run report

def scores_to_dict(scores: Mapping[str, HeadScores]) -> dict[str, dict]:
    return {name: {"values": None if s.values is None else np.asarray(s.values).tolist(), "layers": list(s.layers),
                   "descending": bool(s.descending), "available": s.available, "reason": s.reason}
            for name, s in scores.items()}


def build_run_report(cache: FeatureCache, ident, outcome=None, *, model: Mapping[str, Any] | None = None,
                     data_root: str | None = None, refine_config=None, heads: Sequence[HeadId] | None = None,
                     checkpoint: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> dict:
    """Everything about one run, JSON-safe: what was loaded, which rows, which heads, the
    scores and curves behind the choice, the refinement and every method's accuracies."""
    import torch

    from .. import __version__

    try:
        import open_clip
        oc_version = getattr(open_clip, "__version__", "?")
    except Exception:  # pragma: no cover - open_clip is a dependency
        oc_version = "?"
    man = cache.manifest
    heads = list(outcome.heads if (heads is None and outcome is not None) else (heads or ident.heads))
    report: dict[str, Any] = {
        "title": "RefineCLIP run report",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"refineclip_core": __version__, "torch": torch.__version__, "open_clip": oc_version},
        "model": dict(model) if model is not None else dict(man.model),
        "model_name": man.model_name,
        "data": {"root": data_root or man.data_root, "cache": str(cache.root), "n_images": len(cache),
                 "classes": list(cache.classes), "groups": list(cache.group_names), "templates": list(man.templates),
                 "layers": list(man.layers), "n_heads": man.n_heads, "n_skipped": len(cache.skipped)},
        "protocol": ident.config.to_dict(),
        "pairs": [[cache.classes[a], cache.classes[b]] for a, b in ident.pairs],
        "sets": {k: s.sizes() for k, s in ident.sets.items()},
        "n_samples": int(len(ident.sample_rows)),
        "n_eval": int(len(ident.eval_rows)),
        "sample_rows": ident.sample_rows.tolist(),
        "scores": scores_to_dict(ident.scores),
        "selection": ident.selection.to_dict(),
        "heads": [h.as_list() for h in heads],
        "findings": findings(cache, ident).to_dict(),
    }
    if outcome is not None:
        cfg = refine_config if refine_config is not None else outcome.refinement.config
        report["refine_config"] = cfg.to_dict()
        report["history"] = outcome.refinement.history
        report["methods"] = outcome.report.to_dict()
    if checkpoint:
        report["checkpoint"] = dict(checkpoint)
    if extra:
        report["extra"] = dict(extra)
    return json_safe(report)


def report_json(report: Mapping[str, Any]) -> str:
    return json.dumps(json_safe(report), indent=1, sort_keys=False, allow_nan=False)


_CSS = """
body{font-family:-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1100px;
color:#222;padding:0 1rem}
h1{margin-bottom:.2rem} h2{margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.3rem}
table{border-collapse:collapse;margin:.6rem 0 1rem} td,th{border:1px solid #ddd;padding:.3rem .6rem;text-align:right}
th{background:#f5f5f5} td:first-child,th:first-child{text-align:left}
.muted{color:#666;font-size:.9rem} .grid{display:flex;flex-wrap:wrap;gap:1rem}
.card{border:1px solid #e3e3e3;border-radius:8px;padding:.6rem 1rem;min-width:150px}
.card b{display:block;font-size:1.4rem} pre{background:#f7f7f7;padding:.8rem;overflow:auto;font-size:.8rem}
"""


def _table(rows: Mapping[str, Mapping[str, Any]], first: str = "method", pct: bool = True) -> str:
    cols: list[str] = []
    for r in rows.values():
        for c in r:
            if c not in cols:
                cols.append(c)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in [first, *cols])
    body = "".join(
        "<tr><td>" + html.escape(str(name)) + "</td>" +
        "".join(f"<td>{html.escape(_fmt(r.get(c), pct) if isinstance(r.get(c), (int, float)) or r.get(c) is None else str(r.get(c)))}</td>"
                for c in cols) + "</tr>"
        for name, r in rows.items())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _transpose(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for method, values in rows.items():
        for key, v in values.items():
            out.setdefault(key, {})[method] = v
    return out


def render_html(report: Mapping[str, Any]) -> str:
    """One self-contained HTML page for a :func:`build_run_report` dict (Plotly inlined once)."""
    figs: list[tuple[str, go.Figure]] = []
    methods = report.get("methods")
    if methods:
        summary = method_summary(methods)
        figs.append(("Methods compared on held-out images",
                     accuracy_bars_figure(summary, "Accuracy by method (held-out images)")))
        groups = per_key_table(methods, "per_group")
        if any(groups.values()):
            figs.append(("Per group", accuracy_bars_figure(groups, "Accuracy per group")))
        figs.append(("Per class", accuracy_bars_figure(per_key_table(methods, "per_class"), "Accuracy per class")))
    if report.get("history"):
        figs.append(("Refinement", loss_figure(report["history"])))
    sel = report.get("selection", {})
    if sel.get("curves"):
        figs.append(("Head selection (Alg. 1)", utility_figure(
            sel["curves"], sel.get("baseline_utility"), sel.get("selected", {}).get("score"),
            sel.get("selected", {}).get("t", 0), sel.get("candidates"))))
    heads = report.get("heads", [])
    for name, s in (report.get("scores") or {}).items():
        if s.get("available") and s.get("values") is not None:
            figs.append((f"Score map {name}", score_grid_figure(s["values"], s["layers"], name, s["descending"],
                                                                chosen=heads)))

    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(report.get('title', 'Report'))}"
             f"</title><style>{_CSS}</style></head><body>"]
    parts.append(f"<h1>{html.escape(report.get('title', 'RefineCLIP run report'))}</h1>")
    parts.append(f"<p class='muted'>Created {html.escape(str(report.get('created', '')))} · model "
                 f"{html.escape(str(report.get('model_name', '')))} · "
                 + html.escape(", ".join(f"{k} {v}" for k, v in (report.get("versions") or {}).items())) + "</p>")
    f = report.get("findings") or {}
    pairs = ", ".join(f"{a} → {b}" for a, b in report.get("pairs", []))
    head_list = ", ".join(str(HeadId(*h)) for h in heads) or "none"
    cards = [("Error pair", pairs or "–"), ("Heads removed", head_list),
             ("Zero-shot worst group", f"{_fmt(f.get('worst_group'))} ({f.get('worst_group_name') or '–'})"),
             ("Ablated worst group", _fmt(f.get("ablated_worst_group")))]
    if methods:
        summary = method_summary(methods)
        refined = next((k for k in summary if k.startswith("refineclip")), None)
        if refined:
            cards.append(("Refined worst group", _fmt(summary[refined]["worst group"])))
            cards.append(("Refined other classes", _fmt(summary[refined]["other classes (locality)"])))
    parts.append("<div class='grid'>" + "".join(
        f"<div class='card'><span class='muted'>{html.escape(k)}</span><b>{html.escape(v)}</b></div>"
        for k, v in cards) + "</div>")
    data = report.get("data", {})
    sets_text = "; ".join(f"{k}: " + ", ".join(f"{n} = {v}" for n, v in sizes.items())
                          for k, sizes in (report.get("sets") or {}).items())
    parts.append(f"<p>{data.get('n_images', '?')} images, {len(data.get('classes', []))} classes, "
                 f"{len(data.get('groups', []))} groups; heads of layers {data.get('layers')} "
                 f"({data.get('n_heads')} per layer). Heads chosen on {report.get('n_samples', '?')} labelled samples "
                 f"({html.escape(sets_text)}); accuracies on {report.get('n_eval', '?')} held-out images.</p>")
    if methods:
        parts.append("<h2>Results</h2>" + _table(method_summary(methods)))
        groups = per_key_table(methods, "per_group")
        if any(groups.values()):
            parts.append("<h3>Per group</h3>" + _table(_transpose(groups), first="group"))
        parts.append("<h3>Per class</h3>" + _table(_transpose(per_key_table(methods, "per_class")), first="class"))
    first = True
    in_maps = False
    for title, fig in figs:
        is_map = title.startswith("Score map")
        if is_map and not in_maps:
            parts.append("<h2>Per-head scores (paper Eq. 6-9)</h2><p class='muted'>White dot: heads removed.</p>"
                         "<div class='grid'>")
            in_maps = True
        if not is_map:
            parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=True if first else False,
                                 config={"displaylogo": False}))
        first = False
    if in_maps:
        parts.append("</div>")
    config = {k: report.get(k) for k in ("model", "data", "protocol", "refine_config", "checkpoint", "versions")
              if report.get(k) is not None}
    parts.append("<h2>Configuration</h2><pre>" + html.escape(json.dumps(config, indent=1, ensure_ascii=False)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(report: Mapping[str, Any], out_dir: str | Path, stem: str = "refineclip-report") -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.html`` atomically into ``out_dir``."""
    out = Path(out_dir)
    json_path, html_path = out / f"{stem}.json", out / f"{stem}.html"
    atomic_write_bytes(json_path, report_json(report).encode())
    atomic_write_bytes(html_path, render_html(report).encode())
    return json_path, html_path

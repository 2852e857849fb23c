"""Plotly figures of a RefineCLIP session, shared by the dashboard and the HTML run report.

Per-head score maps (DE_A..DE_D, paper Eq. 6-9, as a layer × head grid of square markers,
one point per head so that clicking a head can be read back), Alg. 1 utility curves (Eq. 10),
the confusion matrix, method comparisons (Tables 1-3) and refinement loss curves (Eq. 11-13).
They take plain numbers (lists, dicts, arrays), so the HTML report can be rebuilt from its JSON.
Names from users (classes, groups) go through :func:`plot_text`: Plotly renders a subset of HTML,
``$…$`` and ``%{…}`` in its labels, and a name must show as written.
"""

from __future__ import annotations

import html
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from ..features.decomposition import HeadId
from ..method.selection import CONSENSUS, STABLE
from ..names import visible

#: Diverging colour scale of the score maps: blue (negative) – white (0) – red (positive).
DIVERGING = "RdBu_r"


def plot_text(name: object) -> str:
    """``name`` as Plotly shows it literally: hidden characters marked (:func:`refineclip_core.names.visible`),
    HTML escaped (``<b>``, ``<a href>`` stay text), ``$`` (LaTeX) and ``%`` (hover-template fields) as
    character references."""
    return html.escape(visible(name), quote=False).replace("$", "&#36;").replace("%", "&#37;")


def _base_layout(fig: go.Figure, title: str | None = None, **kw) -> go.Figure:
    fig.update_layout(template="plotly_white", title=title, margin=dict(l=50, r=20, t=50 if title else 20, b=40), **kw)
    return fig


def grid_cell_size(n_heads: int, max_width: int = 560) -> int:
    """Side in pixels of one head's square in :func:`score_grid_figure`."""
    return int(max(14, min(44, (max_width - 140) / max(n_heads, 1))))


def selection_name(score: str | None) -> str:
    """How a head set was chosen, in words: the stable or consensus ranking, or Alg. 1 (with the score's name)."""
    if score == STABLE:
        return "the stable ranking (how often the consensus chose each head on resamples of the labelled images)"
    return "the consensus ranking" if score in (None, CONSENSUS) else f"Alg. 1 ({score})"


def score_grid_figure(values: np.ndarray | Sequence[Sequence[float]] | None, layers: Sequence[int], name: str,
                      descending: bool = True, chosen: Iterable = (), selected=None, n_heads: int | None = None,
                      max_width: int = 560, chosen_by: str = "the consensus ranking") -> go.Figure:
    """A layer × head map of one score drawn as a scatter grid of square markers.

    One point per head (x = head, y = layer, colour = score on a diverging scale centred at
    0), so a click selects a point whose ``customdata`` is ``[layer, head, rank, value]``. Heads in
    ``chosen`` get a white dot (its hover: the score, the rank and ``chosen_by``), ``selected`` a gold
    outline. ``values`` ``(L_s, H)``.
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
            custom.append([l, h, int(rank[i * H + h]), float(v[i, h])])
    chosen_set = {HeadId.of(h) for h in chosen}
    sel = HeadId.of(selected) if selected is not None else None
    line_w = [4 if HeadId.of(c[:2]) == sel else 0.5 for c in custom]
    line_c = ["#e6a800" if HeadId.of(c[:2]) == sel else "#dddddd" for c in custom]
    lim = float(np.nanmax(np.abs(flat))) if np.isfinite(flat).any() else 1.0
    lim = lim if lim > 0 else 1.0
    name = plot_text(name)  # a score's name carries the pair's class names
    fig = go.Figure(go.Scatter(
        x=xs, y=ys, mode="markers", customdata=custom,
        marker=dict(symbol="square", size=cell - 3, color=flat, colorscale=DIVERGING, cmin=-lim, cmax=lim, cmid=0,
                    line=dict(width=line_w, color=line_c),
                    colorbar=dict(title=dict(text=name, side="right"), thickness=12, len=0.9)),
        hovertemplate=(f"<b>L%{{customdata[0]}}.H%{{customdata[1]}}</b><br>{name} = %{{marker.color:.4g}}"
                       f"<br>rank %{{customdata[2]}} of {len(flat)} ({'highest' if descending else 'lowest'} first)"
                       "<extra></extra>"),
    ))
    marked = [c for c in custom if HeadId.of(c[:2]) in chosen_set]
    if marked:  # a white dot with a black ring on the chosen heads, visible on any colour
        fig.add_trace(go.Scatter(
            x=[c[1] for c in marked], y=[c[0] for c in marked], mode="markers", customdata=marked,
            marker=dict(symbol="circle", size=max(6, cell // 4), color="white", line=dict(width=2, color="black")),
            hovertemplate=(f"<b>L%{{customdata[0]}}.H%{{customdata[1]}}</b><br>{name} = %{{customdata[3]:.4g}}"
                           f"<br>rank %{{customdata[2]}} of {len(flat)} ({'highest' if descending else 'lowest'} "
                           f"first)<br>in the set chosen by {plot_text(chosen_by)}<extra></extra>")))
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
    colours = curve_colours(curves)
    for name, curve in curves.items():
        t = list(range(1, len(curve) + 1))
        heads = [str(HeadId.of(h)) for h in (candidates or {}).get(name, [])]
        text = [", ".join(heads[:k]) if heads else "" for k in t]
        shown = plot_text(name)
        fig.add_trace(go.Scatter(x=t, y=list(curve), mode="lines+markers", name=shown, text=text,
                                 line=dict(color=colours[name]),
                                 hovertemplate=f"{shown}: t=%{{x}}, U=%{{y:.4f}}<br>%{{text}}<extra></extra>"))
    if chosen_score and chosen_score in curves and 0 < chosen_t <= len(curves[chosen_score]):
        fig.add_trace(go.Scatter(x=[chosen_t], y=[curves[chosen_score][chosen_t - 1]], mode="markers",
                                 name="chosen set", marker=dict(symbol="star", size=18, color="gold",
                                                                line=dict(color=colours[chosen_score], width=2)),
                                 hovertemplate=("chosen: the first %{x} heads of " + plot_text(chosen_score)
                                                + ", U=%{y:.4f}<extra></extra>")))
    if baseline is not None and math.isfinite(baseline):
        fig.add_hline(y=baseline, line_dash="dash", line_color="#888",
                      annotation_text="no head removed", annotation_position="bottom right")
    _base_layout(fig, "Utility (Eq. 10) of removing the first t heads of each ranking", height=360,
                 xaxis_title="t (heads removed, in ranking order)", yaxis_title="utility U(S_t)  (Eq. 10)")
    return fig


#: One colour per utility curve (10 are distinct; a score's two directions each get their own).
CURVE_PALETTE = ("#000000", "#d62728", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2",
                 "#17becf", "#bcbd22", "#7f7f7f")


def curve_colours(curves: Iterable[str]) -> dict[str, str]:
    """A distinct colour for every curve name, in order (the consensus, listed first, in black)."""
    return {name: CURVE_PALETTE[i % len(CURVE_PALETTE)] for i, name in enumerate(curves)}


def confusion_figure(matrix: np.ndarray, classes: Sequence[str]) -> go.Figure:
    """Counts ``M[true, predicted]`` as an annotated heatmap (diagonal = correct)."""
    m = np.asarray(matrix)
    row = m.sum(1, keepdims=True)
    frac = np.divide(m, np.maximum(row, 1))
    labels = [plot_text(c) for c in classes]
    fig = go.Figure(go.Heatmap(
        z=frac, x=labels, y=labels, text=m, texttemplate="%{text}", colorscale="Blues", zmin=0, zmax=1,
        colorbar=dict(title="row share"),
        hovertemplate="true %{y} → predicted %{x}<br>%{text} images (%{z:.0%} of the class)<extra></extra>"))
    n = len(classes)
    _base_layout(fig, "Confusion matrix (zero-shot)", height=max(320, 60 + 34 * n),
                 xaxis_title="predicted", yaxis_title="true")
    fig.update_yaxes(autorange="reversed")
    return fig


MAX_BOX_POINTS = 5000
"""Above this many images a box plot shows its outliers only (every point of 50,000 images would take
the browser seconds to draw)."""


def push_figure(push: Sequence[float], groups: Sequence[str], wrong_class: str) -> go.Figure:
    """One head's push toward ``wrong_class`` per image (:func:`~refineclip_core.method.scores.head_push`),
    a box per group with every image as a point (the outliers only beyond :data:`MAX_BOX_POINTS` images)."""
    push = np.asarray(push, dtype=np.float64)
    labels = np.asarray(list(groups), dtype=object)
    points = "all" if len(push) <= MAX_BOX_POINTS else "outliers"
    fig = go.Figure()
    for g in sorted(set(groups)):
        sel = labels == g
        fig.add_trace(go.Box(y=push[sel], name=plot_text(g), boxpoints=points, jitter=0.4, pointpos=0, marker_size=4,
                             hovertemplate=f"{plot_text(g)}<br>push %{{y:.4f}}<extra></extra>"))
    fig.add_hline(y=0, line_color="#999")
    fig.update_layout(template="plotly_white", height=320, showlegend=False, margin=dict(l=50, r=20, t=20, b=40),
                      yaxis_title=f"push toward {plot_text(wrong_class)}")
    return fig


def group_profile_figure(profile: Mapping[str, Sequence[float]], concept: str) -> go.Figure:
    """A head's contribution along a diagnosed concept per image group: mean ± standard deviation
    (``profile``: ``{group: (mean, sd, n)}``, :func:`~refineclip_core.inspection.diagnosis.group_profile`)."""
    names = list(profile)
    mean = [float(profile[g][0]) for g in names]
    labels = [plot_text(g) for g in names]               # group names are data: never markup
    sd = [float(profile[g][1]) for g in names]
    n = [int(profile[g][2]) for g in names]
    fig = go.Figure(go.Bar(x=labels, y=mean, error_y=dict(type="data", array=sd, visible=True), marker_color="#3b6fb6",
                           customdata=n, hovertemplate="%{x}<br>mean %{y:.4f} (n=%{customdata})<extra></extra>"))
    fig.add_hline(y=0, line_color="#999")
    fig.update_layout(template="plotly_white", height=260, showlegend=False, margin=dict(l=50, r=20, t=10, b=40),
                      yaxis_title=plot_text(f"along {concept}"[:60]))
    return fig


def accuracy_bars_figure(rows: Mapping[str, Mapping[str, Any]], title: str, y_title: str = "accuracy",
                         colours: Mapping[str, Any] | None = None) -> go.Figure:
    """Grouped bars: ``rows[method][category]`` is an accuracy cell ``{value, low, high, n}`` (drawn
    with its 95% interval as an error bar) or a plain fraction; categories share the x axis. ``colours``: a
    method's colour, or its ``about`` entry of a method report (``{"colour": ...}``,
    :func:`~refineclip_core.edit.methods.about`); Plotly's own colours otherwise."""
    fig = go.Figure()
    n_bars = sum(len(v) for v in rows.values())
    for method, values in rows.items():
        cats = list(values)
        cells = [values[c] if isinstance(values[c], Mapping) else None for c in cats]
        ys = [None if values[c] is None else 100 * (cell["value"] if cell else values[c])
              for c, cell in zip(cats, cells)]
        up = [None if cell is None else 100 * (cell["high"] - cell["value"]) for cell in cells]
        down = [None if cell is None else 100 * (cell["value"] - cell["low"]) for cell in cells]
        ns = [cell["n"] if cell else None for cell in cells]
        fig.add_trace(go.Bar(
            name=method, x=[plot_text(c) for c in cats], y=ys, marker_color=_colour((colours or {}).get(method)),
            error_y=dict(type="data", array=up, arrayminus=down, visible=any(u is not None for u in up),
                         thickness=1.2, width=3),
            customdata=[[100 * c["low"], 100 * c["high"], c["n"]] if c else [None, None, None] for c in cells],
            text=[("–" if y is None else f"{y:.0f}") for y in ys] if n_bars <= 36 else None,
            textposition="outside",
            hovertemplate=(f"{method}<br>%{{x}}: %{{y:.1f}}%"
                           + ("<br>95% CI %{customdata[0]:.1f}–%{customdata[1]:.1f}%, n=%{customdata[2]}"
                              if any(n is not None for n in ns) else "") + "<extra></extra>")))
    n_cats = max((len(v) for v in rows.values()), default=0)
    _base_layout(fig, title, barmode="group", height=400, yaxis=dict(title=y_title + " (%, 95% interval)",
                                                                    range=[0, 112]),
                 legend=dict(orientation="h", yanchor="top", y=-0.25 if n_cats > 6 else -0.15))
    fig.update_xaxes(automargin=True, tickangle=-30 if n_cats > 6 else 0)
    return fig


def _colour(entry: Any) -> str | None:
    return entry.get("colour") if isinstance(entry, Mapping) else entry


def loss_figure(history: Mapping[str, Sequence[float]], steps: Sequence[int] | None = None) -> go.Figure:
    """Refinement losses per step (log scale): L_success (Eq. 11), L_locality (Eq. 12), L_CE.

    ``steps`` are the steps the values were taken at (a live run reports every 10th); every
    step from 1 by default."""
    fig = go.Figure()
    names = {"success": "L_success (Eq. 11)", "locality": "L_locality (Eq. 12)", "ce": "L_CE", "total": "total (Eq. 13)"}
    colors = {"success": "#d62728", "locality": "#1f77b4", "ce": "#2ca02c", "total": "#555"}
    for key in ("success", "locality", "ce", "total"):
        ys = list(history.get(key, []))
        if not ys:
            continue
        ys = [y if (y is not None and y > 0) else None for y in ys]
        fig.add_trace(go.Scatter(x=list(steps) if steps is not None else list(range(1, len(ys) + 1)), y=ys,
                                 mode="lines", name=names[key],
                                 line=dict(color=colors[key], dash="dot" if key == "total" else None)))
    _base_layout(fig, "Refinement losses", height=340, xaxis_title="step", yaxis=dict(title="loss", type="log"),
                 legend=dict(orientation="h", y=-0.25))
    return fig

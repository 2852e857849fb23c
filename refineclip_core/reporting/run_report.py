"""The run report's writers: JSON, a self-contained HTML page and the per-image CSV.

The run is gathered into the typed :class:`~refineclip_core.reporting.report_schema.RunReport` by
:func:`~refineclip_core.edit.record.build_run_report` (model, data, protocol, scores, selection,
refinement config and history, every method's accuracies) or read back from its JSON by
:func:`~refineclip_core.edit.record.read_run_report`; :func:`report_json` writes its JSON,
:func:`render_html` one HTML file with the Plotly library inlined (``to_html(include_plotlyjs=True)``
for the first chart), readable offline, :func:`per_image_csv` the per-image predictions;
:func:`write_report` writes the JSON and the HTML atomically.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import quote

import plotly.graph_objects as go

from ..files import atomic_write_bytes
from ..features.decomposition import HeadId
from .figures import accuracy_bars_figure, loss_figure, score_grid_figure, selection_name, utility_figure
from ..method.intervals import Estimate
from .findings import cell_estimate, format_cell, labels_used_column, method_summary, per_key_table
from .report_schema import RunReport
from .report_sections import DiagnosisRecord
from .tables import csv_text


def per_image_csv(report: RunReport) -> str | None:
    """The run's per-image predictions (file, true class, group, zero-shot and edited prediction,
    held out or not) as safe CSV text; None for a report without a refinement."""
    table = report.per_image
    return None if table is None else csv_text(table.rows, table.columns)


def report_json(report: RunReport) -> str:
    """The run report as JSON text (:meth:`~refineclip_core.reporting.report_schema.RunReport.to_dict`)."""
    return json.dumps(report.to_dict(), indent=1, sort_keys=False, allow_nan=False)


#: The verdict's banner colours: only ``verified`` is green.
STATUS_COLOURS = {"verified": "#e8f5e9;border:1px solid #81c784", "not-verified": "#fff8e1;border:1px solid #ffb74d",
                  "harmful": "#fdecea;border:1px solid #e57373"}

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


def _table(rows: Mapping[str, Mapping[str, Any]], first: str = "method") -> str:
    """An HTML table of accuracy cells (value, 95% interval, image count), every string escaped."""
    cols: list[str] = []
    for r in rows.values():
        for c in r:
            if c not in cols:
                cols.append(c)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in [first, *cols])
    body = "".join(
        "<tr><td>" + html.escape(str(name)) + "</td>" +
        "".join(f"<td>{html.escape(format_cell(r.get(c)) if isinstance(r.get(c), Mapping) or r.get(c) is None else str(r.get(c)))}</td>"
                for c in cols) + "</tr>"
        for name, r in rows.items())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def diagnosis_rows(diagnosis: DiagnosisRecord) -> list[dict[str, str]]:
    """The diagnosed concepts of every error pair (a pair column first) as table rows of plain strings."""
    rows = []
    for c in diagnosis.concepts:
        shares = c.head_shares
        rows.append({"pair (true → predicted)": f"{c.true} → {c.wrong}", "concept": c.text,
                     "heads": ", ".join(f"{h} ({shares[h]:.0%})" if h in shares else h for h in c.heads),
                     "push toward predicted": f"{c.push_share:.0%}", "share": f"{c.share:.0%}",
                     "errors carry": "more" if c.side == "errors" else "less",
                     "contrast": "–" if c.contrast is None else f"{c.contrast:+.2f}",
                     "coverage": "–" if c.coverage is None else f"{c.coverage:.0%}",
                     "random sets holding as much": "–" if c.p_random is None else f"{c.p_random:.1%}",
                     "examples": "; ".join(c.descriptions)})
    return rows


def _text_table(rows: Sequence[Mapping[str, str]]) -> str:
    """An HTML table of plain strings, every one escaped."""
    if not rows:
        return ""
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _transpose(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for method, values in rows.items():
        for key, v in values.items():
            out.setdefault(key, {})[method] = v
    return out


def render_html(report: RunReport) -> str:
    """One self-contained HTML page for a run report (Plotly inlined once)."""
    figs: list[tuple[str, go.Figure]] = []
    methods = report.methods
    if methods is not None:
        summary = method_summary(methods)
        figs.append(("Methods compared on held-out images",
                     accuracy_bars_figure(summary, "Accuracy by method (held-out images)", colours=methods.about)))
        groups = per_key_table(methods, "per_group")
        if any(groups.values()):
            figs.append(("Per group", accuracy_bars_figure(groups, "Accuracy per group", colours=methods.about)))
        figs.append(("Per class", accuracy_bars_figure(per_key_table(methods, "per_class"), "Accuracy per class",
                                                       colours=methods.about)))
    if report.history:
        figs.append(("Refinement", loss_figure(report.history)))
    sel = report.selection
    if sel is not None and sel.curves:
        figs.append(("Head selection (Alg. 1)", utility_figure(sel.curves, sel.baseline_utility, sel.score, sel.t,
                                                               sel.candidates)))
    heads = list(report.heads)
    chosen_by = selection_name(None if sel is None else sel.score)
    for name, s in (report.scores or {}).items():
        if s.available and s.values is not None:
            figs.append((f"Score map {name}", score_grid_figure(s.values, s.layers, name, s.descending,
                                                                chosen=heads, chosen_by=chosen_by)))

    title = html.escape(report.title)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{_CSS}</style>"
             f"</head><body><h1>{title}</h1>"]
    diagnosis = report.diagnosis
    if diagnosis is not None and diagnosis.sentence:
        parts.append("<p style='font-size:1.15rem;background:#f3f6fb;border-left:4px solid #3b6fb6;padding:.6rem 1rem'>"
                     f"<b>Why:</b> {html.escape(diagnosis.sentence)}</p>")
    parts.append(f"<p class='muted'>Created {html.escape(str(report.created or ''))} · model "
                 f"{html.escape(str(report.model_name or ''))} · "
                 + ("" if report.scoring is None else html.escape("scored with " + report.scoring.describe()) + " · ")
                 + html.escape(", ".join(f"{k} {v}" for k, v in (report.versions or {}).items())) + "</p>")
    f = report.findings
    pairs = ", ".join(f"{a} → {b}" for a, b in report.pairs)
    head_list = ", ".join(str(HeadId.of(h)) for h in heads) or "none"
    verdict = report.verdict
    if verdict is not None:
        colour = STATUS_COLOURS.get(verdict.status, STATUS_COLOURS["harmful"])
        details = verdict.details      # records before the one-sentence verdict hold only its summary
        parts.append(f"<div style='background:{colour};padding:.6rem 1rem;border-radius:6px'>"
                     f"<p><b>{html.escape(verdict.status)} · "
                     f"{html.escape(str(report.exported or ''))}:</b> {html.escape(verdict.lead)}</p>"
                     + ("<details><summary>Details</summary><ul>"
                        + "".join(f"<li>{html.escape(d)}</li>" for d in details) + "</ul></details>"
                        if details else "") + "</div>")
    for w in report.warnings:
        parts.append("<p style='background:#fff8e1;border-left:4px solid #ffb74d;padding:.4rem 1rem'>"
                     f"<b>Warning ({html.escape(str(w.kind))}):</b> {html.escape(w.text)}</p>")
    removal = report.concept_removal
    if removal is not None:
        parts.append(f"<p><b>{html.escape(removal.sentence)}</b> The results table compares the "
                     "exported edit with the same fit that keeps the concept (“concept kept”).</p>")

    def acc(est: Estimate | None, note: str = "") -> tuple[str, str]:
        """An accuracy card: the value large, its interval, image count and ``note`` small."""
        big, _, rest = format_cell(None if est is None else est.to_dict()).partition(" ")
        return big, " ".join(x for x in (rest, note) if x)

    cards = [("Error pair", pairs or "–", ""), ("Heads removed", head_list, (f.score if f else None) or "")]
    if f is not None:
        cards += [("Zero-shot worst group", *acc(f.worst_group, f.worst_group_name or "")),
                  (f"Ablated worst group ({f.ablation})", *acc(f.ablated_worst_group, f.ablated_worst_group_name or ""))]
    if methods is not None:
        summary = method_summary(methods)
        refined = report.exported
        if refined in summary:
            cards.append((f"Edited worst group ({refined})", *acc(cell_estimate(summary[refined]["worst group"]))))
            cards.append(("Edited: other classes", *acc(cell_estimate(summary[refined]["other classes (locality)"]))))

    def card(label: str, big: str, small: str) -> str:
        return (f"<div class='card'><span class='muted'>{html.escape(label)}</span><b>{html.escape(big)}</b>"
                f"<span class='muted'>{html.escape(small)}</span></div>")

    parts.append("<div class='grid'>" + "".join(card(*c) for c in cards) + "</div>")
    data = report.data
    sets_text = "; ".join(f"{k}: " + ", ".join(f"{n} = {v}" for n, v in sizes.items())
                          for k, sizes in (report.sets or {}).items())

    def known(value: Any) -> str:
        return "?" if value is None else str(value)

    parts.append(f"<p>{data.n_images} images, {len(data.classes)} classes, "
                 f"{len(data.groups)} groups; heads of layers {list(data.layers)} "
                 f"({data.n_heads} per layer). Heads chosen on {known(report.n_samples)} labelled samples "
                 f"({html.escape(sets_text)}); the edit adapted on {known(report.n_adapt)} unlabelled images; "
                 f"accuracies on {known(report.n_eval)} held-out images, each with its 95% interval "
                 f"[low, high] and image count n.</p>")
    if report.checkpoint is not None:
        ck = report.checkpoint
        parts.append(f"<p>Exported: {html.escape(ck.file)} ({html.escape(ck.format)}, {ck.bytes / 1e6:,.1f} MB), "
                     f"the edit merged into {html.escape(ck.merged_into)}.</p>")
    stability = report.head_stability
    if stability is not None:
        parts.append("<h2>How stable is the choice of heads</h2><p class='muted'>The same choice repeated on "
                     f"{stability.resamples} bootstrap resamples of the labelled images (each class "
                     "resampled with replacement): how many chose each head. A head chosen in fewer than half is a "
                     "one-off choice of this draw.</p>"
                     f"<p>{html.escape(stability.summary)}</p>"
                     + _text_table([{"head": r.head, "in the removed set": "yes" if r.in_set else "no",
                                     "chosen in": f"{r.chosen_in}/{r.resamples} resamples", "note": r.note}
                                    for r in stability.rows]))
    if diagnosis is not None and diagnosis.concepts:
        parts.append("<h2>What the removed heads carry</h2><p class='muted'>Concepts of the text pool, ranked by their "
                     "share of the variance of what removing the heads takes out of the embedding; contrast: how much "
                     "more the misclassified images carry it than the correct ones (standard deviations); coverage: "
                     "the removed heads' part of that concept among all heads in scope, and how often random sets of as many "
                     "heads hold as much.</p>"
                     + _text_table(diagnosis_rows(diagnosis)))
    if verdict is not None and verdict.has_units:
        parts.append("<h2>The guard: every group and class on held-out images</h2><p class='muted'>Zero-shot "
                     "(before) and the exported edit (after) on the same held-out images; change with Newcombe's "
                     "paired 95% interval (the one interval of that number, here and in the verdict); worse (Holm): "
                     "significantly worse by an exact McNemar test after Holm's correction over all the groups and "
                     "classes tested; can have lost: the verdict's cautious bound on the drop (all bounds holding "
                     "together at 95%), not an interval of the change.</p>" + _text_table(verdict.rows()))
    if methods is not None:
        used = labels_used_column(methods)
        parts.append("<h2>Results</h2>" + _table({name: {**row, "labels used": used.get(name, "")}
                                                  for name, row in method_summary(methods).items()}))
        for name, why in (report.left_out or {}).items():
            parts.append(f"<p class='muted'>{html.escape(str(name))}: {html.escape(str(why))}</p>")
        groups = per_key_table(methods, "per_group")
        if any(groups.values()):
            parts.append("<h3>Per group</h3>" + _table(_transpose(groups), first="group"))
        parts.append("<h3>Per class</h3>" + _table(_transpose(per_key_table(methods, "per_class")), first="class"))
    csv_data = per_image_csv(report)
    if csv_data is not None:
        n = len(report.per_image.rows)
        parts.append("<h3>Per image</h3><p>"
                     f"<a download='refineclip-per-image.csv' href='data:text/csv;charset=utf-8,{quote(csv_data)}'>"
                     f"Download the per-image predictions (CSV, {n:,} images)</a>: file, true class, group, zero-shot "
                     "prediction, edited prediction, whether each is correct, and whether the image was held out "
                     "(the rows every accuracy above is computed on).</p>")
    first = True
    in_maps = False
    for title, fig in figs:
        is_map = title.startswith("Score map")
        if is_map and not in_maps:
            parts.append("<h2>Per-head scores (paper Eq. 6-9)</h2><p class='muted'>White dot: heads removed (hover a square for its score and rank).</p>"
                         "<div class='grid'>")
            in_maps = True
        if not is_map:
            parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=True if first else False,
                                 config={"displaylogo": False}))
        first = False
    if in_maps:
        parts.append("</div>")
    written = report.to_dict()
    config = {k: written[k] for k in ("model", "data", "protocol", "refine_config", "checkpoint", "versions")
              if written.get(k) is not None}
    parts.append("<h2>Configuration</h2><pre>" + html.escape(json.dumps(config, indent=1, ensure_ascii=False)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(report: RunReport, out_dir: str | Path, stem: str = "refineclip-report") -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.html`` atomically into ``out_dir``."""
    out = Path(out_dir)
    json_path, html_path = out / f"{stem}.json", out / f"{stem}.html"
    atomic_write_bytes(json_path, report_json(report).encode())
    atomic_write_bytes(html_path, render_html(report).encode())
    return json_path, html_path

"""The Refine page's parts, the fix first: the exported edit runs as one background job (seconds on
the demo, live loss curves) and its verdict, tables and downloads appear as soon as it ends; the
compared methods then run as a second job (:func:`refineclip_core.edit.run.compare_run`) whose rows
fill the comparison table in as each finishes, cancellable, never in the way of the downloads."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from refineclip_core.edit.export import export_path
from refineclip_core.edit.run import EditRun, compare_run, run_edit
from refineclip_core.home import DEMO_BENCHMARK
from refineclip_core.reporting.figures import accuracy_bars_figure, loss_figure
from refineclip_core.reporting.findings import (cell_estimate, format_cell, labels_used_column, method_summary,
                                                per_key_table)
from refineclip_core.reporting.run_report import per_image_csv, render_html, report_json
from refineclip_core.session.recent import save_run

from .jobs import Job, job_panel, start_job
from .panels import checkpoint_download, on_demo, outcome_notes
from .state import Key, ablate_heads, drop, get, made_here, put, session_dir, set_refine, ticked_heads
from .widgets import Ready, guard, metric_ci, plain, show_exception, table

#: Where the Refine page's heads come from (the URL's ``from``), in the order offered.
HEAD_SOURCES = {"protocol": "The protocol's choice", "heads": "Set from the Heads page",
                "ticked": "Ticked on the Ablate page"}
#: The demo benchmark's machine-readable summary (written by ``benchmarks/demo_world.py``; shipped in the wheel).
BENCHMARK_SUMMARY = DEMO_BENCHMARK


def choose_heads(ident) -> list:
    """The radio of head sets; its choice is kept (and in the URL) when it is not the default."""
    options = {"protocol": list(ident.heads), "heads": ablate_heads(), "ticked": ticked_heads()}
    options = {k: v for k, v in options.items() if v is not None}
    default = "heads" if "heads" in options else "protocol"
    wanted = get(Key.REFINE_FROM)
    choice = st.radio("Heads removed in the teacher E_abl", list(options), key="ref_heads",
                      index=list(options).index(wanted if wanted in options else default),
                      format_func=lambda k: f"{HEAD_SOURCES[k]}: {', '.join(map(str, options[k])) or 'none'}")
    if choice == default:
        drop(Key.REFINE_FROM)
    else:
        put(Key.REFINE_FROM, choice)
    return options[choice]


def start_edit(ready: Ready, ident, cfg, heads, baselines: bool, diagnosis, guard_cfg=None) -> None:
    """Start the exported edit's job (the verdict and checkpoint; the comparison follows it when asked)."""
    src, cache = ready.source, ready.cache
    loaded, out = ready.loaded(), export_path(session_dir(), src.spec, cfg.exported)
    drop(Key.COMPARE_JOB, Key.COMPARE_ERROR)
    put(Key.REFINE_JOB, start_job(f"Fitting {cfg.exported}", lambda progress, cancelled: run_edit(
        cache, ident, ready.engine, cfg, heads, spec=src.spec, export_to=out, loaded=loaded, data_root=src.data_root,
        baselines=False, progress=progress, cancel=cancelled, diagnosis=diagnosis, demo_data=on_demo(ready),
        guard=guard_cfg),
        baselines=baselines))


def _live_losses(job: Job):
    series = next(iter(job.series.values()), None)
    return None if series is None else loss_figure(series, steps=series["done"])


def _keep(run: EditRun) -> None:
    """The run in the home folder's runs (listed under Recent, reopened from there); a run updated with
    its compared rows replaces its earlier record."""
    with guard("Keeping the run in the home folder"):
        path = save_run(report_json(run.report), run.outcome.exported, replace=get(Key.REFINE_SAVED))
        put(Key.REFINE_SAVED, str(path))
        made_here(path)


def follow_edit(ready: Ready, ident) -> None:
    """The exported edit's job: followed with live losses; when it ends, the run is kept and shown, and
    the compared methods start in the background when they were asked for."""
    def done(job: Job) -> None:
        run = job.result
        set_refine(run)
        drop(Key.REFINE_SAVED)
        _keep(run)
        if job.meta.get("baselines"):
            rows: dict = {}      # the run with the rows so far, replaced after each compared method
            loaded = ready.loaded()
            put(Key.COMPARE_JOB, start_job("Comparing methods", lambda progress, cancelled: compare_run(
                run, ready.cache, ident, ready.engine, loaded=loaded, progress=progress, cancel=cancelled,
                on_row=lambda key, partial: rows.update(latest=partial)), rows=rows))
        st.rerun()  # draw the new verdict at the top of the page

    job_panel(get(Key.REFINE_JOB), "Refining on the cached embeddings", cancel_key="ref_cancel", what="Refinement",
              on_done=done, cancelled_note="Nothing was exported; run it again when ready.", live=_live_losses,
              done="Exported edit fitted in {elapsed}")


def _compare_state(run: EditRun) -> tuple[EditRun, Job | None]:
    """The run to show (with the compared rows so far) and the comparison job while it runs; when the job
    has just ended, its run is kept (or why it stopped) and the whole page is drawn again (the downloads'
    report then holds every row)."""
    job = get(Key.COMPARE_JOB)
    if job is None or job.handled:
        return run, None
    if job.finished:
        job.handled = True
        if job.error is None:
            set_refine(job.result, keep_confirm=True)
            _keep(job.result)
        else:
            put(Key.COMPARE_ERROR, job.error)
        st.rerun()
    partial = job.meta["rows"].get("latest")
    return (partial if partial is not None else run), job


def comparison(run: EditRun, ready: Ready) -> None:
    """Every compared method beside the exported edit, one draw, with the benchmark's multi-draw figures;
    redrawn each second while the comparison job runs (a fragment: the rest of the page stays)."""
    job = get(Key.COMPARE_JOB)
    running = job is not None and not job.handled

    @st.fragment(run_every=1.0 if running else None)
    def section() -> None:
        try:
            _section(run, ready)
        except Exception as exc:   # a fragment reruns outside the page's error handler
            show_exception(exc, "The comparison")

    section()


def _section(run: EditRun, ready: Ready) -> None:
    shown, job = _compare_state(run)
    st.subheader("Results on held-out images")
    if job is not None:
        c = st.columns([4, 1.4])
        fitted = len(shown.outcome.report.reports) - len(run.outcome.report.reports)
        c[0].caption(f"Comparing, {fitted} compared method{'s' if fitted != 1 else ''} fitted so far; now "
                     f"{plain(job.stage)} (step {job.done} of {job.total}). The exported edit above is final; its "
                     "downloads do not wait for this.")
        if c[1].button("Cancel the comparison", key="ref_compare_cancel", icon=":material/close:"):
            job.cancel()
    error = get(Key.COMPARE_ERROR)
    if error is not None:
        st.info(f"The comparison stopped: {plain(error)} The exported edit and its downloads are unaffected.",
                icon=":material/pause_circle:")
    outcome_notes(shown.outcome)
    methods = shown.outcome.report             # the rows so far (a MethodReport), the run report's when done
    summary = method_summary(methods)
    r, z = summary.get(shown.outcome.exported, {}), summary.get("zero-shot", {})
    m = st.columns(4)
    for col, (label, column) in zip(m, [("Worst group", "worst group"), ("Error-pair classes", "error-pair classes"),
                                        ("Other classes (locality)", "other classes (locality)"), ("Overall", "overall")]):
        metric_ci(col, label, cell_estimate(r.get(column)), cell_estimate(z.get(column)))
    st.markdown("**This run** (one draw of labelled samples; 95% intervals over the held-out images)")
    used = labels_used_column(methods)          # what each row used: class/group labels, typed text, images
    table("methods", pd.DataFrame({k: {**{c: format_cell(v) for c, v in row.items()}, "labels used": used.get(k, "")}
                                   for k, row in summary.items()}).T.rename_axis("method").reset_index(),
          hide_index=True)
    if not shown.compared and job is None:
        st.caption("Only the exported edit was fitted (baselines off).")
    bench = benchmark_figures(list(summary)) if on_demo(ready) else None
    if bench is not None:
        st.markdown(f"**The demo benchmark, same methods over {bench[1]}** (benchmarks/RESULTS.md; not this run)")
        table("methods-benchmark", bench[0], hide_index=True)
    st.plotly_chart(accuracy_bars_figure(summary, "Methods compared", colours=methods.about),
                    key="ref_summary_fig")
    groups = per_key_table(methods, "per_group")
    tab_g, tab_c = st.tabs(["Per group", "Per class"])
    for tab, key, rows in ((tab_g, "group", groups), (tab_c, "class", per_key_table(methods, "per_class"))):
        with tab:
            if any(rows.values()):
                df = pd.DataFrame({k: {c: format_cell(v) for c, v in row.items()} for k, row in rows.items()})
                table(f"accuracy-per-{key}", df.rename_axis(key).reset_index(), hide_index=True)
            else:
                st.caption(f"No {key} labels in these images.")


def benchmark_figures(methods: list[str]) -> tuple[pd.DataFrame, str] | None:
    """The demo benchmark's multi-draw figures for ``methods`` (as ``benchmarks/demo_world.py`` wrote them),
    or None when there is no such file or it names none of them."""
    try:
        data = json.loads(BENCHMARK_SUMMARY.read_text())
        rows = [{"method": k, "worst-group change (pts): mean ± sd": f"{v['worst_gain_mean']:+.1f} ± "
                                                                       f"{v['worst_gain_std']:.1f}",
                 "other classes change (pts)": f"{v['other_change_mean']:+.1f}",
                 "draws worse than zero-shot": f"{100 * v['draws_worse']:.0f}%"}
                for k in methods if isinstance(v := data.get("methods", {}).get(k), dict)]
        scope = f"{int(data['draws'])} draws (world seeds {', '.join(map(str, data.get('world_seeds', [])))})"
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (pd.DataFrame(rows), scope) if rows else None


def loss_curves(run: EditRun) -> None:
    st.plotly_chart(loss_figure(run.outcome.refinement.history), key="ref_loss_fig")


def downloads(run: EditRun) -> None:
    """The merged checkpoint (one confirmation when the guard did not verify it), the run report and the
    per-image predictions: there as soon as the exported edit is."""
    st.subheader("Downloads")
    d = st.columns([1.9, 1.1, 1.1, 1.5])    # every label reads whole at 1400 px
    checkpoint_download(d[0], run.checkpoint, run.outcome.exported, run.verdict)
    d[1].download_button("Run report (JSON)", data=report_json(run.report), file_name="refineclip-report.json",
                         mime="application/json", key="ref_dl_json", icon=":material/data_object:", on_click="ignore")
    d[2].download_button("Run report (HTML)", data=lambda rep=run.report: render_html(rep),
                         file_name="refineclip-report.html", mime="text/html", key="ref_dl_html",
                         icon=":material/bar_chart:", on_click="ignore")
    d[3].download_button("Per-image predictions (CSV)", data=lambda rep=run.report: per_image_csv(rep),
                         file_name="refineclip-per-image.csv", mime="text/csv", key="ref_dl_csv",
                         icon=":material/table:", on_click="ignore",
                         help="One row per image: file, true class, group, zero-shot prediction, edited prediction, "
                              "whether each is correct, and whether the image was held out.")

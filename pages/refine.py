"""Refine: turn the head removal into an ordinary checkpoint, checked on held-out images (paper §3.3)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from refineclip_core.errors import Cancelled
from refineclip_core.reporting.figures import accuracy_bars_figure, loss_figure
from refineclip_core.reporting.findings import cell_estimate, format_cell, method_summary, per_key_table
from refineclip_core.reporting.run_report import per_image_csv, render_html, report_json
from refineclip_core.edit.export import export_path
from refineclip_core.edit.run import EditRun, run_edit
from refineclip_core.session.recent import save_run
from dashboard.forms import edit_form
from dashboard.jobs import Job, start_job
from dashboard.panels import (checkpoint_download, diagnosis_of, on_demo, outcome_notes, sanity_panel, verdict_banner,
                              verdict_table)
from dashboard.registry import page
from dashboard.state import Key, ablate_heads, get, made_here, protocol, put, session_dir, set_refine, ticked_heads
from dashboard.widgets import follow_job, guard, link, metric_ci, plain, require_ready, show_exception, table

st.title(page("refine").heading)
running_area = st.container()   # a running refinement is followed here, at the top of the page (drawn last)


def live_losses(job: Job):
    """The first stage that reports losses is the exported edit's own run (the baselines come after)."""
    series = next(iter(job.series.values()), None)
    return None if series is None else loss_figure(series, steps=series["done"])


st.caption("Phase 2 learns a linear map of the image embedding that behaves like the model with the heads removed "
           "on images of the edited classes (L_success, Eq. 11) and like the original everywhere else "
           "(L_locality, Eq. 12), and merges it into the projection: the edited model is an ordinary checkpoint. "
           "RefineCLIP-fit (default) learns it from every unlabelled adaptation image; the paper's phase 2 learns "
           "diag(θ) from the labelled samples with a cross-entropy term (Eq. 13). Before you download anything, "
           "the edit is checked against zero-shot on held-out images.")
ready = require_ready()
src, cache, eng = ready.source, ready.cache, ready.engine
ident, classes = ready.ident(), cache.classes
last: EditRun | None = get(Key.REFINE)
if last is not None:  # the guard first: is the last edit verified better than zero-shot on held-out images?
    verdict_banner(last.verdict, last.outcome.exported)
sanity_panel(ready, ident)

# --- which heads -----------------------------------------------------------------------------------
options = {"The protocol's choice": list(ident.heads), "Set from the Heads page": ablate_heads(),
           "Ticked on the Ablate page": ticked_heads()}
options = {k: v for k, v in options.items() if v is not None}
choice = st.radio("Heads removed in the teacher E_abl", list(options), key="ref_heads",
                  format_func=lambda k: f"{k}: {', '.join(map(str, options[k])) or 'none'}",
                  index=list(options).index("Set from the Heads page") if "Set from the Heads page" in options else 0)
heads = options[choice]
set_sizes = "; ".join(f"{k}: " + ", ".join(f"{n}={v}" for n, v in s.sizes().items()) for k, s in ident.sets.items())
st.caption(f"Error pair {', '.join(f'{plain(classes[a])} → {plain(classes[b])}' for a, b in ident.pairs)} · "
           f"{len(ident.sample_rows)} labelled samples ({plain(set_sizes)}) · {len(ident.adapt_rows)} unlabelled adaptation "
           f"images · accuracies on {len(ident.eval_rows)} held-out images · heads removed by "
           f"{ident.config.ablation} ablation.")
if not heads:
    st.warning("No heads chosen: the success loss would copy the unedited model. Pick heads on the Heads or "
               "Ablate page.")

# --- settings and the run (a background job: live loss curves, cancellable) ------------------------
diag = diagnosis_of(ready, ident, heads)          # leads the run report; its concepts prefill the concept to remove
submitted = edit_form(seed=protocol().seed, disabled=not heads, diagnosis=diag)
if submitted is not None:
    cfg, baselines = submitted
    loaded, out = ready.loaded(), export_path(session_dir(), src.spec, cfg.exported)
    put(Key.REFINE_JOB, start_job(f"Fitting {cfg.exported}", lambda progress, cancelled: run_edit(
        cache, ident, eng, cfg, heads, spec=src.spec, export_to=out, loaded=loaded, data_root=src.data_root,
        baselines=baselines, progress=progress, cancel=cancelled, diagnosis=diag, demo_data=on_demo(ready))))


job = get(Key.REFINE_JOB)
if job is not None and not job.handled:
    with running_area:   # the code runs here, after the form; its progress and live curves show at the top
        follow_job(job, "Refining on the cached embeddings", cancel_key="ref_cancel", live=live_losses,
                   done="Refined in {elapsed}")
        job.handled = True
        if isinstance(job.error, Cancelled):
            st.info(f"{job.error} Nothing was exported; run it again when ready.")
        elif job.error is not None:
            show_exception(job.error, "Refinement")
    if job.error is None:
        set_refine(job.result)
        if not Path(job.result.report["data"]["root"]).resolve().is_relative_to(session_dir().resolve()):
            with guard("Keeping the run in the home folder"):   # listed on the Load page (recent runs)
                made_here(save_run(report_json(job.result.report), job.result.outcome.exported))
        st.rerun()  # draw the new verdict at the top of the page

res: EditRun | None = get(Key.REFINE)
if res is None:
    st.info("Click 'Run phase 2'. The defaults are the multi-draw benchmark's winner (RefineCLIP-fit; "
            "benchmarks/RESULTS.md); the paper's phase 2 keeps its published settings (α = 1e4, β = 1e2, 500 steps).")
    st.stop()
if res.outcome.identification.config != ident.config or res.outcome.heads != heads:
    st.warning("These results were computed for another pair, sample or head set; run the refinement again to "
               "update them.")

# --- results: the guard's table, then every compared method with its 95% interval ------------------
verdict = res.verdict
st.subheader("The guard: every group and class on held-out images")
verdict_table(verdict)
methods = res.outcome.report.to_dict()
summary = method_summary(methods)
st.subheader("Results on held-out images")
outcome_notes(res.outcome)
r, z = summary.get(res.outcome.exported, {}), summary.get("zero-shot", {})
m = st.columns(4)
for col, (label, column) in zip(m, [("Worst group", "worst group"), ("Error-pair classes", "error-pair classes"),
                                    ("Other classes (locality)", "other classes (locality)"), ("Overall", "overall")]):
    metric_ci(col, label, cell_estimate(r.get(column)), cell_estimate(z.get(column)))
table("methods", pd.DataFrame({k: {c: format_cell(v) for c, v in row.items()} for k, row in summary.items()}).T
      .rename_axis("method").reset_index(), hide_index=True)
st.plotly_chart(accuracy_bars_figure(summary, "Methods compared"), key="ref_summary_fig")
groups = per_key_table(methods, "per_group")
tab_g, tab_c = st.tabs(["Per group", "Per class"])
for tab, key, rows in ((tab_g, "group", groups), (tab_c, "class", per_key_table(methods, "per_class"))):
    with tab:
        if any(rows.values()):
            df = pd.DataFrame({k: {c: format_cell(v) for c, v in row.items()} for k, row in rows.items()})
            table(f"accuracy-per-{key}", df.rename_axis(key).reset_index(), hide_index=True)
        else:
            st.caption(f"No {key} labels in these images.")
if any(groups.values()):
    st.plotly_chart(accuracy_bars_figure(groups, "Accuracy per group"), key="ref_groups_fig")
st.plotly_chart(loss_figure(res.outcome.refinement.history), key="ref_loss_fig")

st.subheader("Downloads")
d = st.columns(4)
checkpoint_download(d[0], res.checkpoint, res.outcome.exported, verdict)
d[1].download_button("Run report (JSON)", data=report_json(res.report), file_name="refineclip-report.json",
                     mime="application/json", key="ref_dl_json", icon=":material/data_object:", on_click="ignore")
d[2].download_button("Run report (HTML)", data=lambda rep=res.report: render_html(rep),
                     file_name="refineclip-report.html", mime="text/html", key="ref_dl_html",
                     icon=":material/bar_chart:", on_click="ignore")
d[3].download_button("Per-image predictions (CSV)", data=lambda rep=res.report: per_image_csv(rep),
                     file_name="refineclip-per-image.csv", mime="text/csv", key="ref_dl_csv",
                     icon=":material/table:", on_click="ignore",
                     help="One row per image: file, true class, group, zero-shot prediction, edited prediction, "
                          "whether each is correct, and whether the image was held out.")
st.caption(f"The checkpoint has `visual.proj` (a Hugging Face folder's `visual_projection.weight`, transposed) "
           f"replaced by P·B (RefineCLIP-fit) or P·diag(θ) (paper); everything "
           f"else is the original "
           f"model. Load it with the same architecture ({cache.manifest.model_name}). The same run from the command "
           "line: `refineclip refine --cache … --out … --json … --html … --csv …`.")
link("errors", "Back to the errors")

"""Refine: learn diag(θ) (or full / LoRA) on the image embedding so the fix lasts (paper §3.3, Eq. 11-13)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from refineclip_core.errors import Cancelled
from refineclip_core.method.refinement import RefineConfig
from refineclip_core.reporting.figures import accuracy_bars_figure, loss_figure
from refineclip_core.reporting.findings import method_summary, per_key_table
from refineclip_core.reporting.run_report import EditRun, render_html, report_json, run_edit
from studio_ui.jobs import Job, start_job
from studio_ui.registry import page
from studio_ui.state import Key, ablate_heads, get, protocol, put, session_dir, ticked_heads
from studio_ui.widgets import delta_pts, follow_job, link, pct, plain, require_ready, show_exception

st.title(page("refine").heading)
st.caption("RefineCLIP learns a map of the image embedding — diag(θ) by default — so that images the model got "
           "wrong behave as if the heads were removed (L_success, Eq. 11) while everything else stays as it was "
           "(L_locality, Eq. 12), with a cross-entropy term on the labelled samples (Eq. 13). It trains on cached "
           "embeddings in seconds and merges into the projection, so the edited model is an ordinary checkpoint.")
ready = require_ready()
src, cache, eng = ready.source, ready.cache, ready.engine
ident = ready.ident()
classes = cache.classes

# --- which heads -----------------------------------------------------------------------------------
options = {"Alg. 1's choice": list(ident.heads), "Set from the Heads page": ablate_heads(),
           "Ticked on the Ablate page": ticked_heads()}
options = {k: v for k, v in options.items() if v is not None}
choice = st.radio("Heads removed in the teacher E_abl", list(options), key="ref_heads",
                  format_func=lambda k: f"{k}: {', '.join(map(str, options[k])) or 'none'}",
                  index=list(options).index("Set from the Heads page") if "Set from the Heads page" in options else 0)
heads = options[choice]
set_sizes = "; ".join(f"{k}: " + ", ".join(f"{n}={v}" for n, v in s.sizes().items()) for k, s in ident.sets.items())
st.caption(f"Error pair {', '.join(f'{plain(classes[a])} → {plain(classes[b])}' for a, b in ident.pairs)} · "
           f"{len(ident.sample_rows)} labelled samples ({plain(set_sizes)}) · accuracies on {len(ident.eval_rows)} held-out "
           "images.")
if not heads:
    st.warning("No heads chosen: the success loss would copy the unedited model. Pick heads on the Heads or "
               "Ablate page.")

# --- settings and the run (a background job: live loss curves, cancellable) ------------------------
with st.form("ref_form"):
    c = st.columns(4)
    strategy = c[0].radio("Strategy", ["diag", "full", "lora"], key="ref_strategy", horizontal=True,
                          help="diag: θ ∈ R^d (the paper); full: a d×d matrix; lora: identity + rank-r update.")
    rank = c[0].number_input("LoRA rank", 1, 256, 4, key="ref_rank")
    alpha = c[1].number_input("α (success weight)", 0.0, 1e7, 1e4, step=1000.0, format="%g", key="ref_alpha")
    beta = c[1].number_input("β (locality weight)", 0.0, 1e7, 1e2, step=10.0, format="%g", key="ref_beta")
    steps = c[2].number_input("Steps", 1, 20_000, 500, step=100, key="ref_steps")
    lr = c[2].number_input("Learning rate", 1e-6, 10.0, 1e-2, format="%g", key="ref_lr")
    seed = c[3].number_input("Seed", 0, 1_000_000, protocol().seed, key="ref_seed")
    baselines = c[3].checkbox("Baselines", True, key="ref_baselines",
                              help="Also run standard fine-tuning (same θ and samples, cross-entropy only) and a "
                                   "Tip-Adapter cache, for comparison.")
    run = st.form_submit_button("Run refinement", type="primary", disabled=not heads)

if run:
    cfg = RefineConfig(strategy=strategy, alpha=float(alpha), beta=float(beta), steps=int(steps), lr=float(lr),
                       seed=int(seed), rank=int(rank))
    loaded, out = ready.loaded(), session_dir() / f"refineclip-{cfg.strategy}.safetensors"
    put(Key.REFINE_JOB, start_job(f"Refining ({cfg.strategy}, {cfg.steps} steps)", lambda progress, cancelled: run_edit(
        cache, ident, eng, cfg, heads, spec=src.spec, export_to=out, loaded=loaded, data_root=src.data_root,
        baselines=baselines, progress=progress, cancel=cancelled)))


def live_losses(job: Job):
    """The first stage that reports losses is RefineCLIP's own run (the baselines come after)."""
    series = next(iter(job.series.values()), None)
    return None if series is None else loss_figure(series, steps=series["done"])


job = get(Key.REFINE_JOB)
if job is not None and not job.handled:
    follow_job(job, "Refining on the cached embeddings", cancel_key="ref_cancel", live=live_losses,
               done="Refined in {elapsed}")
    job.handled = True
    if isinstance(job.error, Cancelled):
        st.info(f"{job.error} Nothing was exported; run it again when ready.")
    elif job.error is not None:
        show_exception(job.error, "Refinement")
    else:
        put(Key.REFINE, job.result)

res: EditRun | None = get(Key.REFINE)
if res is None:
    st.info("Set the hyper-parameters and click 'Run refinement'. Defaults follow the paper (α = 1e4, β = 1e2, "
            "500 Adam steps).")
    st.stop()
if res.outcome.identification.config != ident.config or res.outcome.heads != heads:
    st.warning("These results were computed for another pair, sample or head set; run the refinement again to "
               "update them.")

# --- results: every compared method, the exported one first in the headline --------------------------
methods = res.outcome.report.to_dict()
summary = method_summary(methods)
st.subheader("Results on held-out images")
r, z = summary.get(res.outcome.exported, {}), summary.get("zero-shot", {})
m = st.columns(4)
for col, (label, column) in zip(m, [("Worst group", "worst group"), ("Error-pair classes", "error-pair classes"),
                                    ("Other classes (locality)", "other classes (locality)"), ("Overall", "overall")]):
    d = delta_pts(r.get(column), z.get(column))
    col.metric(label, pct(r.get(column)), None if d is None else f"{d} vs zero-shot")
pct_col = st.column_config.NumberColumn(format="percent")
sdf = pd.DataFrame(summary).T.rename_axis("method").reset_index()
st.dataframe(sdf, hide_index=True, column_config={c: pct_col for c in sdf.columns if c != "method"})
st.plotly_chart(accuracy_bars_figure(summary, "Methods compared"), key="ref_summary_fig")
groups = per_key_table(methods, "per_group")
tab_g, tab_c = st.tabs(["Per group", "Per class"])
for tab, key, table in ((tab_g, "group", groups), (tab_c, "class", per_key_table(methods, "per_class"))):
    with tab:
        if any(table.values()):
            df = pd.DataFrame(table).rename_axis(key).reset_index()
            st.dataframe(df, hide_index=True, column_config={c: pct_col for c in df.columns if c != key})
        else:
            st.caption(f"No {key} labels in these images.")
if any(groups.values()):
    st.plotly_chart(accuracy_bars_figure(groups, "Accuracy per group"), key="ref_groups_fig")
st.plotly_chart(loss_figure(res.outcome.refinement.history), key="ref_loss_fig")

st.subheader("Downloads")
d = st.columns(3)
ckpt = res.checkpoint
if ckpt is not None and ckpt.is_file():
    d[0].download_button(f"Merged checkpoint of {res.outcome.exported} (.safetensors)",
                         data=lambda p=ckpt: p.read_bytes(), file_name=ckpt.name, mime="application/octet-stream",
                         key="ref_dl_ckpt", icon=":material/download:",
                         on_click="ignore",  # a download needs no rerun (and a rerun can race the deferred data)
                         help="open_clip.create_model(name, pretrained=<this file>) loads the edited model.")
else:
    d[0].caption("The exported checkpoint is gone (temporary files were cleaned); run the refinement again.")
d[1].download_button("Run report (JSON)", data=report_json(res.report), file_name="refineclip-report.json",
                     mime="application/json", key="ref_dl_json", icon=":material/data_object:", on_click="ignore")
d[2].download_button("Run report (HTML)", data=lambda rep=res.report: render_html(rep),
                     file_name="refineclip-report.html", mime="text/html", key="ref_dl_html",
                     icon=":material/bar_chart:", on_click="ignore")
st.caption(f"The checkpoint has `visual.proj` replaced by P·diag(θ) (or P·Mᵀ); everything else is the original "
           f"model. Load it with the same architecture ({cache.manifest.model_name}). The same run from the command "
           "line: `refineclip refine --cache … --out … --json … --html …`.")
link("errors", "Back to the errors")

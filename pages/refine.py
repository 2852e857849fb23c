"""Refine: learn diag(θ) (or full / LoRA) on the image embedding so the fix lasts (paper §3.3, Eq. 11-13)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import streamlit as st

from refineclip_core.features.decomposition import HeadId, parse_heads
from refineclip_core.method.protocol import run_refinement
from refineclip_core.method.refinement import RefineConfig, export_checkpoint
from refineclip_core.reporting.figures import accuracy_bars_figure, loss_figure
from refineclip_core.reporting.findings import method_summary, per_key_table
from refineclip_core.reporting.run_report import build_run_report, render_html, report_json
from studio_ui.state import ablate_heads, protocol, session_dir
from studio_ui.widgets import PAGES, pct, require_ready, show_exception

st.title("Refine the model")
st.caption("RefineCLIP learns a map of the image embedding — diag(θ) by default — so that images the model got "
           "wrong behave as if the heads were removed (L_success, Eq. 11) while everything else stays as it was "
           "(L_locality, Eq. 12), with a cross-entropy term on the labelled samples (Eq. 13). It trains on cached "
           "embeddings in seconds and merges into the projection, so the edited model is an ordinary checkpoint.")
ready = require_ready()
src, cache, eng = ready.source, ready.cache, ready.engine
ident = ready.ident()
classes = cache.classes
pair_text = ", ".join(f"{classes[a]} → {classes[b]}" for a, b in ident.pairs)

# --- which heads -----------------------------------------------------------------------------------
options: dict[str, list[HeadId]] = {"Alg. 1's choice": list(ident.heads)}
if ablate_heads() is not None:
    options["Set from the Heads page"] = ablate_heads()
if st.session_state.get("abl_current") is not None:
    options["Ticked on the Ablate page"] = parse_heads(st.session_state["abl_current"])
labels = {k: f"{k}: {', '.join(map(str, v)) or 'none'}" for k, v in options.items()}
choice = st.radio("Heads removed in the teacher E_abl", list(options), format_func=labels.get, key="ref_heads",
                  index=len(options) - 1 if "Set from the Heads page" in options else 0)
heads = options[choice]
set_sizes = "; ".join(f"{k}: " + ", ".join(f"{n}={v}" for n, v in s.sizes().items()) for k, s in ident.sets.items())
st.caption(f"Error pair {pair_text} · {len(ident.sample_rows)} labelled samples ({set_sizes}) · accuracies on "
           f"{len(ident.eval_rows)} held-out images.")
if not heads:
    st.warning("No heads chosen: the success loss would copy the unedited model. Pick heads on the Heads or "
               "Ablate page.")

# --- settings -------------------------------------------------------------------------------------
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

result_key = json.dumps([src.key, ident.config.to_dict(), [h.as_list() for h in heads]])


if run:
    cfg = RefineConfig(strategy=strategy, alpha=float(alpha), beta=float(beta), steps=int(steps), lr=float(lr),
                       seed=int(seed), rank=int(rank))
    with st.status(f"Refining ({cfg.strategy}, {cfg.steps} steps)…", expanded=True) as status:
        line, bar, chart = st.empty(), st.progress(0.0), st.empty()
        live: dict[str, list[float]] = {"success": [], "locality": [], "ce": [], "total": []}
        t0 = time.monotonic()

        def progress(stage: str, step: int, total: int, losses: dict | None = None) -> None:
            if not stage.startswith("RefineCLIP"):
                return
            for k in live:
                live[k].append(losses.get(k))
            bar.progress(step / total)
            eta = (time.monotonic() - t0) / step * (total - step)
            line.markdown(f"step {step}/{total} · L_success {losses['success']:.3g} · L_locality "
                          f"{losses['locality']:.3g} · L_CE {losses['ce']:.3g} · about {eta:.0f} s left")
            if step == total or len(live["total"]) % 5 == 1:
                fig = loss_figure(live)
                fig.update_xaxes(title="step / 10")
                chart.plotly_chart(fig, key=f"ref_live_{len(live['total'])}")

        try:
            outcome = run_refinement(cache, ident, cfg, heads, eng, baselines=baselines, progress=progress)
            status.update(label="Exporting the merged checkpoint…")
            loaded = ready.loaded()
            out = session_dir() / f"refineclip-{cfg.strategy}.safetensors"
            export_checkpoint(src.spec.resolved().checkpoint, loaded.model, outcome.refinement.refined, out)
            report = build_run_report(cache, ident, eng, outcome, model=src.spec.to_dict(), data_root=src.data_root,
                                      refine_config=cfg, heads=heads,
                                      checkpoint={"file": out.name, "bytes": out.stat().st_size,
                                                  "merged_into": "visual.proj"})
        except Exception as exc:
            status.update(label="Refinement failed", state="error")
            show_exception(exc, "Refinement")
            st.stop()
        status.update(label=f"Refined in {time.monotonic() - t0:.1f} s", state="complete", expanded=False)
    st.session_state["refine"] = {"key": result_key, "outcome": outcome, "cfg": cfg, "checkpoint": str(out),
                                  "report": report}

res = st.session_state.get("refine")
if not res:
    st.info("Set the hyper-parameters and click 'Run refinement'. Defaults follow the paper (α = 1e4, β = 1e2, "
            "500 Adam steps).")
    st.stop()
if res["key"] != result_key:
    st.warning("These results were computed for another pair, sample or head set; run the refinement again to "
               "update them.")
outcome, cfg = res["outcome"], res["cfg"]
methods = outcome.report.to_dict()
summary = method_summary(methods)
refined_name = f"refineclip-{cfg.strategy}"

st.subheader("Results on held-out images")
r, z = summary.get(refined_name, {}), summary.get("zero-shot", {})
m = st.columns(4)
m[0].metric("Worst group", pct(r.get("worst group")),
            None if r.get("worst group") is None or z.get("worst group") is None
            else f"{100 * (r['worst group'] - z['worst group']):+.1f} pts vs zero-shot")
m[1].metric("Error-pair classes", pct(r.get("error-pair classes")),
            None if r.get("error-pair classes") is None or z.get("error-pair classes") is None
            else f"{100 * (r['error-pair classes'] - z['error-pair classes']):+.1f} pts")
m[2].metric("Other classes (locality)", pct(r.get("other classes (locality)")),
            None if r.get("other classes (locality)") is None or z.get("other classes (locality)") is None
            else f"{100 * (r['other classes (locality)'] - z['other classes (locality)']):+.1f} pts")
m[3].metric("Overall", pct(r.get("overall")),
            None if r.get("overall") is None else f"{100 * (r['overall'] - z['overall']):+.1f} pts")

pct_col = st.column_config.NumberColumn(format="percent")
sdf = pd.DataFrame(summary).T.rename_axis("method").reset_index()
st.dataframe(sdf, hide_index=True, column_config={c: pct_col for c in sdf.columns if c != "method"})
st.plotly_chart(accuracy_bars_figure(summary, "Methods compared"), key="ref_summary_fig")
groups = per_key_table(methods, "per_group")
tab_g, tab_c = st.tabs(["Per group", "Per class"])
with tab_g:
    if any(groups.values()):
        gdf = pd.DataFrame(groups).rename_axis("group").reset_index()
        st.dataframe(gdf, hide_index=True, column_config={c: pct_col for c in gdf.columns if c != "group"})
    else:
        st.caption("No group labels in these images.")
with tab_c:
    cdf = pd.DataFrame(per_key_table(methods, "per_class")).rename_axis("class").reset_index()
    st.dataframe(cdf, hide_index=True, column_config={c: pct_col for c in cdf.columns if c != "class"})
if any(groups.values()):
    st.plotly_chart(accuracy_bars_figure(groups, "Accuracy per group"), key="ref_groups_fig")
st.plotly_chart(loss_figure(outcome.refinement.history), key="ref_loss_fig")

st.subheader("Downloads")
ckpt = Path(res["checkpoint"])
report = res["report"]
d = st.columns(3)
if ckpt.is_file():
    d[0].download_button("Merged checkpoint (.safetensors)", data=lambda p=ckpt: p.read_bytes(), file_name=ckpt.name,
                         mime="application/octet-stream", key="ref_dl_ckpt", icon=":material/download:",
                         on_click="ignore",  # a download needs no rerun (and a rerun can race the deferred data)
                         help="open_clip.create_model(name, pretrained=<this file>) loads the edited model.")
else:
    d[0].caption("The exported checkpoint is gone (temporary files were cleaned); run the refinement again.")
d[1].download_button("Run report (JSON)", data=report_json(report), file_name="refineclip-report.json",
                     mime="application/json", key="ref_dl_json", icon=":material/data_object:", on_click="ignore")
d[2].download_button("Run report (HTML)", data=lambda rep=report: render_html(rep), file_name="refineclip-report.html",
                     mime="text/html", key="ref_dl_html", icon=":material/bar_chart:", on_click="ignore")
st.caption(f"The checkpoint has `visual.proj` replaced by P·diag(θ) (or P·Mᵀ); everything else is the original "
           f"model. Load it with the same architecture ({cache.manifest.model_name}).")
st.page_link(PAGES["errors"], label="Back to the errors", icon=":material/error:")

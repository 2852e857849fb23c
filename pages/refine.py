"""Refine: turn the head removal into an ordinary checkpoint, checked on held-out images (paper §3.3).
The exported edit and its verdict come first (seconds); the compared methods follow in the background."""

from __future__ import annotations

import streamlit as st

from refineclip_core.edit.config import DEFAULT_EDIT
from refineclip_core.edit.run import EditRun
from dashboard.forms import RUN_LABELS, edit_form
from dashboard.panels import diagnosis_of, sanity_panel, verdict_banner, verdict_table
from dashboard.refine_view import choose_heads, comparison, downloads, follow_edit, loss_curves, start_edit
from dashboard.registry import page
from dashboard.state import Key, get, protocol
from dashboard.widgets import link, plain, require_ready

st.title(page("refine").heading)
running_area = st.container()   # a running refinement is followed here, at the top of the page (drawn last)
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
heads = choose_heads(ident)
set_sizes = "; ".join(f"{k}: " + ", ".join(f"{n}={v}" for n, v in s.sizes().items()) for k, s in ident.sets.items())
st.caption(f"Error pair {', '.join(f'{plain(classes[a])} → {plain(classes[b])}' for a, b in ident.pairs)} · "
           f"{len(ident.sample_rows)} labelled samples ({plain(set_sizes)}) · {len(ident.adapt_rows)} unlabelled adaptation "
           f"images · accuracies on {len(ident.eval_rows)} held-out images · heads removed by "
           f"{ident.config.ablation} ablation.")
if not heads:
    st.warning("No heads chosen: the success loss would copy the unedited model. Pick heads on the Heads or "
               "Ablate page.")

# --- settings and the run (background jobs: the exported edit first, then the compared methods) ------
diag = diagnosis_of(ready, ident, heads)          # leads the run report; its concepts prefill the concept to remove
submitted = edit_form(seed=protocol().seed, disabled=not heads, diagnosis=diag, groups=tuple(cache.group_names))
if submitted is not None:
    start_edit(ready, ident, submitted[0], heads, submitted[1], diag, submitted[2])
with running_area:   # the code runs here, after the form; its progress and live curves show at the top
    follow_edit(ready, ident)

res: EditRun | None = get(Key.REFINE)
PAPER = DEFAULT_EDIT.paper
if res is None:
    st.info(f"Click '{RUN_LABELS[get(Key.REFINE_METHOD) or 'fit']}'. The defaults are the multi-draw benchmark's winner (RefineCLIP-fit; "
            f"benchmarks/RESULTS.md); the paper's phase 2 keeps its published settings (success weight α = "
            f"{PAPER.success_weight:g}, locality weight β = {PAPER.locality_weight:g}, {PAPER.steps} steps).")
    st.stop()
if res.outcome.identification.config != ident.config or res.outcome.heads != heads:
    st.warning("These results were computed for another pair, sample or head set; run the refinement again to "
               "update them.")

# --- results: the guard's table, the downloads, then every compared method (filled in as each finishes) -----
st.subheader("The guard: every group and class on held-out images")
verdict_table(res.verdict)
downloads(res)
merged = res.report.checkpoint
st.caption(("The checkpoint has the edit (P·B for RefineCLIP-fit, P·diag(θ) for the paper's phase 2) merged into "
            f"{plain(merged.merged_into)}; everything else is the original model. " if merged is not None else "")
           + f"Load it with the same architecture ({plain(cache.manifest.model_name)}). The same run from the command "
           "line: `refineclip refine --cache … --out … --json … --html … --csv …`.")
comparison(res, ready)
loss_curves(res)
link("errors", "Back to the errors")

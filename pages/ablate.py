"""Ablate: switch any heads off and see accuracies change instantly (paper Eq. 5, no forward pass)."""

from __future__ import annotations

import streamlit as st

from refineclip_core.features.decomposition import HeadId
from refineclip_core.method.ablation import MODES
from refineclip_core.method.evaluation import accuracy_report, rows_mask
from dashboard.ablate_view import flipped_images, verify_panel
from dashboard.panels import sanity_panel
from dashboard.registry import page
from dashboard.urlstate import write_link
from dashboard.state import Key, ablate_heads, get, put, set_ticked_heads, ticked_heads
from dashboard.widgets import (comparison_table, link, metric_ci, plain, require_ready,
                               show_exception)

st.title(page("ablate").heading)
st.caption("Removing a head subtracts its direct contribution from the image embedding, E − Σ c_h (paper Eq. 5): "
           "new predictions are arithmetic on the cached features, so every toggle updates at once.")
ready = require_ready()
cache, eng = ready.cache, ready.engine
ident = ready.ident()
sanity_panel(ready, ident)   # below-chance accuracy, few errors, too few held-out images, untested data
classes, labels = cache.classes, cache.labels
all_heads = cache.head_ids()
suggested = ablate_heads() if ablate_heads() is not None else ident.heads


def _set(heads) -> None:
    chosen = set(heads)
    for h in all_heads:
        put(Key.toggle(h), h in chosen)


if get(Key.toggle(all_heads[0])) is None:  # first visit, or widgets dropped while on another page
    _set(ticked_heads() if ticked_heads() is not None else suggested)


@st.fragment
def panel() -> None:
    # a fragment reruns on its own, outside the app's page-level error handler
    try:
        _panel()
    except Exception as exc:
        show_exception(exc, "The ablation panel")


def _panel() -> None:
    c = st.columns([1.8, 2, 5])
    mode = c[0].radio("Replace a removed head by", MODES, horizontal=True, key="abl_mode",
                      index=MODES.index(ident.config.ablation),
                      format_func=lambda m: {"zero": "zero (Eq. 5)", "mean": "its mean"}[m],
                      help="mean: the head's average contribution over the unlabelled adaptation images (the "
                           "default, what the exported edit learns from); zero: the paper's zero ablation.")
    scope = c[1].radio("Measure on", ["held-out images", "all images"], horizontal=True, key="abl_scope",
                       help="Held-out: every image except the labelled samples used to choose the heads.")
    with c[2]:
        b = st.columns([2.6, 2.4, 1])     # 'The protocol's choice' reads whole at 1400 px
        b[0].button("Apply the selected set", key="abl_apply", on_click=_set, args=(suggested,),
                    help="The set from the Heads page, or the protocol's choice: " + ", ".join(map(str, suggested)))
        b[1].button("The protocol's choice", key="abl_alg1", on_click=_set, args=(ident.heads,),
                    help=f"Chosen by {ident.config.selection} on the labelled samples.")
        b[2].button("Clear", key="abl_clear", on_click=_set, args=([],))

    st.markdown("**Heads** (layer × head; ticked = removed)")
    for layer in cache.manifest.layers:
        cols = st.columns([1.2] + [1] * cache.manifest.n_heads)
        cols[0].markdown(f"**L{layer}**")
        for h in range(cache.manifest.n_heads):
            cols[h + 1].checkbox(f"H{h}", key=Key.toggle(HeadId(layer, h)))
    heads = [h for h in all_heads if get(Key.toggle(h))]
    set_ticked_heads(heads)
    write_link()   # a fragment's rerun skips the app's own: the ticks reach the URL at once (a reload keeps them)

    mask = ident.eval_mask if scope == "held-out images" else rows_mask(len(labels))
    base = accuracy_report(eng.base_predictions, labels, classes, cache.groups, cache.group_names, mask)
    res = ident.ablation_engine(eng).ablate(heads, labels, classes, cache.groups, cache.group_names, mode=mode,
                                           mask=mask, mask_only=True)
    rep = res.report

    st.markdown(f"Removed: **{', '.join(map(str, heads)) or 'nothing'}** · {rep.n_images} images")
    m = st.columns(4)
    metric_ci(m[0], "Accuracy", rep.overall(), base.overall())
    if rep.worst_group is not None:
        metric_ci(m[1], "Worst group", rep.worst(), base.worst(),
                  help=plain(f"now: {rep.worst_group_name}; zero-shot: {base.worst_group_name}"))
        m[1].caption(plain(rep.worst_group_name))
        metric_ci(m[2], "Average group", rep.average(), base.average())
    other = len(res.flipped) - len(res.fixed) - len(res.broken)
    m[3].metric("Predictions changed", f"{len(res.flipped)}",
                help="fixed = became correct; broken = was correct, became wrong; the rest were wrong before and "
                     "are wrong after, as another class")
    m[3].caption(f"{len(res.fixed)} fixed · {len(res.broken)} broken · {other} from one wrong class to another")

    t = st.columns(2)
    if rep.per_group:
        t[0].markdown("**Per group**")
        comparison_table(t[0], "group", base, rep)
    t[1].markdown("**Per class**")
    comparison_table(t[1], "class", base, rep)

    flipped_images(ready, res)
    verify_panel(ready, ident, res, mask, heads, mode)

panel()
link("refine", "Make the fix permanent with a refined model → Refine")

"""Head inspector: what one head encodes (TextSpan), where it pushes toward the wrong class,
and where it looks (Grad-CAM, whole model vs. this head)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from refineclip_core.features.decomposition import HeadId
from refineclip_core.reporting.figures import MAX_BOX_POINTS, push_figure
from dashboard import resources
from dashboard.registry import page
from dashboard.inspector_view import gradcam_panel
from dashboard.pairs import ALL, head_push_values
from dashboard.panels import head_concept_panel, sanity_panel
from dashboard.state import Key, get, inspect_head, put, set_inspect_head
from dashboard.widgets import image_grid, link, plain, require_ready, show_exception, table

st.title(page("inspector").heading)
ready = require_ready()
src, cache = ready.source, ready.cache
ident = ready.ident()
sanity_panel(ready, ident)   # the heads below were chosen from W and C: say when those are few
classes, layers, H = cache.classes, list(cache.manifest.layers), cache.manifest.n_heads

current = inspect_head()
if current is None or current.layer not in layers or current.head >= H:
    current = ident.heads[0] if ident.heads else HeadId(layers[-1], 0)
    set_inspect_head(current)
# keep the pickers in step with a head chosen elsewhere (the Heads page's click)
if get(Key.INSPECT_SYNCED) != current or get(Key.INSPECT_LAYER) is None or get(Key.INSPECT_PICK) is None:
    put(Key.INSPECT_LAYER, current.layer)
    put(Key.INSPECT_PICK, current.head)
    put(Key.INSPECT_SYNCED, current)


def _picked() -> HeadId:
    return HeadId(int(get(Key.INSPECT_LAYER)), int(get(Key.INSPECT_PICK)))


def _pick() -> None:
    set_inspect_head(_picked())
    put(Key.INSPECT_SYNCED, _picked())


c = st.columns([1, 1, 4])
c[0].selectbox("Layer", layers, key=Key.INSPECT_LAYER, on_change=_pick)
c[1].selectbox("Head", list(range(H)), key=Key.INSPECT_PICK, on_change=_pick)
head = _picked()
a, b = ident.pairs[0]
with c[2]:
    avail = {n: s for n, s in ident.scores.items() if s.available}
    if avail:
        st.markdown(f"**{head}** for {plain(classes[a])} → {plain(classes[b])}: " + " · ".join(
            f"{plain(n)} = {s.value(head):.4g} (rank {s.ranking().index(head) + 1}/{len(layers) * H})"
            for n, s in avail.items()))
    if head in ident.heads:
        st.caption("One of the heads the protocol chose (the set Ablate and Refine start from).")
    link("heads", "Back to the score maps")

# --- 1. TextSpan ----------------------------------------------------------------------------------
st.subheader("What it encodes")
st.caption("TextSpan (Gandelsman et al.): greedily picks the descriptions whose directions explain the most "
           "variance of this head's outputs over the images (paper Table 5).")
k = st.columns([1, 3])[0].slider("Descriptions", 3, 10, 5, key="insp_k")
try:
    desc = resources.head_description(src, cache, head, k)
except Exception as exc:
    show_exception(exc, "Describing the head")
    desc = None
if desc is not None and not desc.texts:
    st.info("This head's output does not vary over these images, so there is nothing to describe.")
elif desc is not None:
    table("textspan", pd.DataFrame({"description": desc.texts, "variance explained": desc.variance_explained,
                               "cumulative": desc.cumulative}), hide_index=True,
                 column_config={"variance explained": st.column_config.ProgressColumn(format="percent", min_value=0.0,
                                                                                     max_value=1.0),
                                "cumulative": st.column_config.NumberColumn(format="percent")})
    over = (f"a seeded random sample of {desc.n_images:,} of the {desc.sampled_from:,} images (the covariance of "
            "that many pins the top texts down)" if desc.sampled_from else f"all {desc.n_images:,} images")
    st.caption(f"Text pool: {len(resources.text_pool(src.spec_json)[0])} descriptions (assets/text_pool.txt); computed "
               f"over {over}; total variance of the head {desc.total_variance:.4g}.")

st.markdown("**Which diagnosed concept it carries**")
head_concept_panel(ready, ident, head)

# --- 2. Push toward the wrong class ---------------------------------------------------------------
name_a, name_b = plain(classes[a]), plain(classes[b])
st.subheader(f"Where it pushes toward “{name_b}”")
replacement = "its mean over the adaptation images" if ident.config.ablation == "mean" else "zero"
st.caption(f"For each {name_a} image ({ALL}): how much removing this head (Eq. 5) moves it toward {name_a} "
           f"rather than {name_b}, i.e. Δ(x, {name_a}) − Δ(x, {name_b}) of Eq. 6 with the replacement the scores "
           f"use ({replacement}, the protocol's ablation). Positive = the head pushes toward {name_b}.")
rows, push = head_push_values(ready, ident, head, a, b)
pred = ready.engine.base_predictions
groups = [cache.records[r].group or ("misclassified" if pred[r] != a else "correct") for r in rows]
st.plotly_chart(push_figure(push, groups, classes[b]), key="insp_push")
if len(push) > MAX_BOX_POINTS:
    st.caption(f"{len(push):,} images: the boxes show their outliers, not every image.")
order = np.argsort(-push, kind="stable")
wrong = [i for i in order if pred[rows[i]] == b]   # images of the true class the model calls the wrong class
st.markdown(f"**Misclassified images ({name_a} → {name_b}) this head pushes hardest toward {name_b}** "
            f"({len(wrong)} of the {len(rows)} {name_a} images, counted on {ALL}, are predicted {name_b}; highest "
            f"push first)")


if wrong:
    image_grid([(cache.records[rows[i]].path, f"true {classes[a]}" + (f" ({g})" if (g := cache.records[rows[i]].group)
                                                                    else "") + f" → predicted {classes[b]} · push "
                 f"{push[i]:+.3f}") for i in wrong[:12]])
else:
    st.caption(f"No {name_a} image is predicted {name_b} here.")

# --- 3. Grad-CAM -----------------------------------------------------------------------------------
gradcam_panel(ready, ident, head, [int(rows[i]) for i in order[:30]], a, b)

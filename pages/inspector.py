"""Head inspector: what one head encodes (TextSpan), where it pushes toward the wrong class,
and where it looks (Grad-CAM, whole model vs. this head)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from PIL import Image

from refineclip_core.features.decomposition import HeadId
from refineclip_core.method.scores import delta
from studio_ui import resources
from studio_ui.state import inspect_head, set_inspect_head
from studio_ui.widgets import PAGES, guard, image_grid, require_ready, show_exception

st.title("Head inspector")
ready = require_ready()
src, cache = ready.source, ready.cache
ident = ready.ident()
classes = cache.classes
layers = list(cache.manifest.layers)
H = cache.manifest.n_heads

current = inspect_head()
if current is None or current.layer not in layers or current.head >= H:
    current = ident.heads[0] if ident.heads else HeadId(layers[-1], 0)
    set_inspect_head(current)
# keep the pickers in step with a head chosen elsewhere (the Heads page's click)
if (st.session_state.get("insp_synced") != (current.layer, current.head) or "insp_layer" not in st.session_state
        or "insp_head" not in st.session_state):
    st.session_state["insp_layer"], st.session_state["insp_head"] = current.layer, current.head
    st.session_state["insp_synced"] = (current.layer, current.head)


def _pick() -> None:
    head = HeadId(int(st.session_state["insp_layer"]), int(st.session_state["insp_head"]))
    set_inspect_head(head)
    st.session_state["insp_synced"] = (head.layer, head.head)


c = st.columns([1, 1, 4])
c[0].selectbox("Layer", layers, key="insp_layer", on_change=_pick)
c[1].selectbox("Head", list(range(H)), key="insp_head", on_change=_pick)
head = HeadId(int(st.session_state["insp_layer"]), int(st.session_state["insp_head"]))
a, b = ident.pairs[0]
with c[2]:
    avail = {n: s for n, s in ident.scores.items() if s.available}
    if avail:
        st.markdown(f"**{head}** for {classes[a]} → {classes[b]}: " + " · ".join(
            f"{n} = {s.value(head):.4g} (rank {s.ranking().index(head) + 1}/{len(layers) * H})"
            for n, s in avail.items()))
    if head in ident.heads:
        st.caption("One of the heads Alg. 1 chose.")
    st.page_link(PAGES["heads"], label="Back to the score maps", icon=":material/psychology:")

# --- 1. TextSpan ----------------------------------------------------------------------------------
st.subheader("What it encodes")
st.caption("TextSpan (Gandelsman et al.): greedily picks the descriptions whose directions explain the most "
           "variance of this head's outputs over all images (paper Table 5).")


@st.cache_resource(show_spinner="Describing the head…", max_entries=256)
def _describe(key: str, layer: int, h: int, k: int, _cache, _texts, _emb):
    from refineclip_core.inspection.textspan import describe_heads

    return describe_heads(_cache, [HeadId(layer, h)], _texts, _emb, k=k)[0]


k = st.columns([1, 3])[0].slider("Descriptions", 3, 10, 5, key="insp_k")
try:
    texts, emb = resources.text_pool(src.spec_json)
    desc = _describe(src.key, head.layer, head.head, k, cache, texts, emb)
except Exception as exc:
    show_exception(exc, "Describing the head")
    desc = None
if desc is not None:
    if not desc.texts:
        st.info("This head's output does not vary over these images, so there is nothing to describe.")
    else:
        st.dataframe(pd.DataFrame({"description": desc.texts, "variance explained": desc.variance_explained,
                                   "cumulative": desc.cumulative}), hide_index=True,
                     column_config={
                         "variance explained": st.column_config.ProgressColumn(format="percent", min_value=0.0,
                                                                               max_value=1.0),
                         "cumulative": st.column_config.NumberColumn(format="percent")})
        st.caption(f"Text pool: {len(texts)} descriptions (assets/text_pool.txt); total variance of the head "
                   f"{desc.total_variance:.4g}.")

# --- 2. Push toward the wrong class ---------------------------------------------------------------
st.subheader(f"Where it pushes toward “{classes[b]}”")
st.caption(f"For each image of {classes[a]}: how much removing this head (Eq. 5) moves it toward {classes[a]} "
           f"rather than {classes[b]}, i.e. Δ(x, {classes[a]}) − Δ(x, {classes[b]}) of Eq. 6 with a zero "
           f"replacement. Positive = the head pushes toward {classes[b]}.")
rows = np.flatnonzero(cache.labels == a)
li = layers.index(head.layer)
c_h = np.asarray(cache.heads[:, li, head.head])[rows][:, None, :]  # one head first: never load all heads
E = np.asarray(cache.embeddings[rows])
zero = np.zeros((1, c_h.shape[-1]))
push = (delta(E, c_h, zero, np.repeat(cache.text[a][None], len(rows), 0).astype(np.float64))
        - delta(E, c_h, zero, np.repeat(cache.text[b][None], len(rows), 0).astype(np.float64)))[:, 0]
pred = ready.engine.base_predictions
groups = [cache.records[r].group or ("misclassified" if pred[r] != a else "correct") for r in rows]
fig = go.Figure()
for g in sorted(set(groups)):
    sel = [i for i, x in enumerate(groups) if x == g]
    fig.add_trace(go.Box(y=push[sel], name=g, boxpoints="all", jitter=0.4, pointpos=0, marker_size=4,
                         hovertemplate=f"{g}<br>push %{{y:.4f}}<extra></extra>"))
fig.add_hline(y=0, line_color="#999")
fig.update_layout(template="plotly_white", height=320, showlegend=False, margin=dict(l=50, r=20, t=20, b=40),
                  yaxis_title=f"push toward {classes[b]}")
st.plotly_chart(fig, key="insp_push")
order = np.argsort(-push, kind="stable")[:12]
st.markdown("**Images it pushes hardest toward the wrong class**")
image_grid([(cache.records[rows[i]].path,
             f"push {push[i]:+.3f} · predicted {classes[pred[rows[i]]]}") for i in order])

# --- 3. Grad-CAM -----------------------------------------------------------------------------------
st.subheader("Where it looks (Grad-CAM)")
options = [int(rows[i]) for i in np.argsort(-push, kind="stable")[:30]]
name_of = {r: f"#{r} {cache.records[r].path.rsplit('/', 1)[-1]} ({cache.records[r].group or classes[a]})"
           for r in options}
c = st.columns([3, 1])
chosen = c[0].multiselect("Images", options, default=options[:3], format_func=name_of.get, max_selections=6,
                          key="insp_cam_rows")
target = c[1].selectbox("Explain the logit of", list(range(len(classes))), index=b, format_func=lambda i: classes[i],
                        key="insp_cam_class")
cam_key = (src.key, head.layer, head.head, tuple(chosen), int(target))
if st.button("Compute Grad-CAM", type="primary", key="insp_cam_btn", disabled=not chosen):
    from refineclip_core.features.extraction import load_batch
    from refineclip_core.inspection.gradcam import gradcam_maps, model_input_image, overlay

    loaded = ready.loaded()
    with st.spinner("Running Grad-CAM (whole model, then this head only)…"), guard("Grad-CAM"):
        batch, keep, bad = load_batch(loaded, [cache.records[r] for r in chosen], 0)
        for s in bad:
            st.warning(f"{s.path}: {s.reason}")
        if batch is not None:
            whole = gradcam_maps(loaded, batch, int(target), cache.text)
            only = gradcam_maps(loaded, batch, int(target), cache.text, heads=[head])
            shown = []
            for i in range(batch.shape[0]):
                img = model_input_image(loaded, batch[i])
                big = img.resize((img.width * max(1, 192 // img.width), img.height * max(1, 192 // img.width)),
                                 Image.Resampling.BICUBIC)
                shown.append((chosen[keep[i]], big, overlay(big, whole[i]), overlay(big, only[i]),
                              float(whole[i].max()), float(only[i].max())))
            st.session_state["gradcam"] = {"key": cam_key, "images": shown}
cam = st.session_state.get("gradcam")
if cam and cam["key"] == cam_key:
    for row, img, whole_img, head_img, whole_max, head_max in cam["images"]:
        cols = st.columns([1, 1, 1, 2])
        cols[0].image(img, caption=f"{name_of.get(row, row)} (model input)")
        cols[1].image(whole_img, caption=f"whole model → {classes[target]}")
        cols[2].image(head_img, caption=f"{head} only → {classes[target]}")
        flat = [n for n, mx in (("whole model", whole_max), (str(head), head_max)) if mx <= 1e-6]
        if flat:
            cols[3].caption(f"{' and '.join(flat)}: the map is zero everywhere — no region of this image raises the "
                            f"'{classes[target]}' logit through that path (Grad-CAM keeps positive evidence only).")
elif chosen:
    st.caption("Pick images and click 'Compute Grad-CAM' to compare the whole model with this head alone.")

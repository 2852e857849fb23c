"""The Head inspector's Grad-CAM section: where the model, one head or the blamed set look on chosen
images, computed once per images, class and heads (:func:`dashboard.resources.gradcam`)."""

from __future__ import annotations

import streamlit as st

from refineclip_core.features.decomposition import HeadId
from refineclip_core.names import visible

from . import resources
from .state import Key, get, put
from .widgets import Ready, guard, plain


def gradcam_panel(ready: Ready, ident, head: HeadId, options: list[int], a: int, b: int) -> None:
    """Pick up to six of ``options`` (cache rows, highest push first) and a class; compare the whole model's
    Grad-CAM with this ``head``'s or the identification's blamed heads'."""
    src, cache = ready.source, ready.cache
    classes = cache.classes
    st.subheader("Where it looks (Grad-CAM)")
    name_of = {r: visible(f"#{r} {cache.records[r].path.rsplit('/', 1)[-1]} ({cache.records[r].group or classes[a]})")
               for r in options}
    c = st.columns([3, 1])
    chosen = c[0].multiselect("Images", options, default=options[:3], format_func=name_of.get, max_selections=6,
                              key="insp_cam_rows")
    target = c[1].selectbox("Explain the logit of", list(range(len(classes))), index=b, format_func=lambda i: visible(classes[i]),
                            key="insp_cam_class")
    c = st.columns([1, 1, 2])
    scopes = {"insp_cam_btn": ([head], f"{head} only"), "insp_cam_set": (ident.heads, f"the {len(ident.heads)} blamed heads")}
    clicked = [k for k, col in zip(scopes, c) if col.button(f"Grad-CAM: {scopes[k][1]}", key=k, type="primary",
                                                            disabled=not chosen or not scopes[k][0])]
    if clicked:
        cam_heads, cam_name = scopes[clicked[0]]
        with st.spinner(f"Running Grad-CAM (whole model, then {cam_name})…"), guard("Grad-CAM"):
            panels, skipped = resources.gradcam(src, cache, ready.loaded(), chosen, target, cam_heads)
            for s in skipped:
                st.warning(plain(f"{s.path}: {s.reason}"))
            put(Key.GRADCAM, ((src.resource_key(), head, tuple(chosen), int(target)), cam_name, panels))
    cam = get(Key.GRADCAM)
    if cam and cam[0] == (src.resource_key(), head, tuple(chosen), int(target)):
        cam_name = cam[1]
        for p in cam[2]:
            cols = st.columns([1, 1, 1, 2])
            cols[0].image(p.image, caption=f"{plain(name_of.get(p.row, p.row))} (model input)")
            cols[1].image(p.whole, caption=f"whole model → {plain(classes[target])}")
            cols[2].image(p.head, caption=f"{cam_name} → {plain(classes[target])}")
            flat = [n for n, mx in (("whole model", p.whole_max), (cam_name, p.head_max)) if mx <= 1e-6]
            if flat:
                cols[3].caption(f"{' and '.join(flat)}: the map is zero everywhere — no region of this image raises the "
                                f"'{plain(classes[target])}' logit through that path (Grad-CAM keeps positive evidence only).")
    elif chosen:
        st.caption(f"Pick images and click 'Grad-CAM: {scopes['insp_cam_btn'][1]}' or 'Grad-CAM: "
                   f"{scopes['insp_cam_set'][1]}' to compare the whole model with this head or the blamed set.")

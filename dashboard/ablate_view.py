"""The Ablate page's lower half: the images whose prediction the ablation flipped, and the check of the
cached arithmetic against the real model (a forward pass with the heads' direct paths removed)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from refineclip_core.method.verification import verify_on_images

from .state import Key, get, put
from .widgets import Ready, guard, image_grid, table


def flipped_images(ready: Ready, res) -> None:
    """The images whose prediction changed (an :class:`~refineclip_core.method.ablation.AblationResult`):
    fixed, broken or from one wrong class to another, as a table and the first fixed and broken thumbnails."""
    cache, eng = ready.cache, ready.engine
    classes, labels = cache.classes, cache.labels
    st.markdown(f"**Images whose prediction flipped** ({len(res.flipped)})")
    if len(res.flipped):
        base_pred, new_pred = eng.base_predictions, res.predictions
        effect = {**{i: "fixed" for i in res.fixed.tolist()}, **{i: "broken" for i in res.broken.tolist()}}
        wrong_to_wrong = "wrong before and after"
        recs = [cache.records[i] for i in res.flipped]
        table("changed-images", pd.DataFrame({
            "image": [r.path.rsplit("/", 1)[-1] for r in recs], "group": [r.group or "" for r in recs],
            "true class": [classes[labels[i]] for i in res.flipped],
            "prediction before": [classes[base_pred[i]] for i in res.flipped],
            "prediction after": [classes[new_pred[i]] for i in res.flipped],
            "effect": [effect.get(i, wrong_to_wrong) for i in res.flipped.tolist()]}),
            hide_index=True, height=min(38 * (len(res.flipped) + 1), 280))
        image_grid([(cache.records[i].path, f"{effect[i]} (true {classes[labels[i]]}): before {classes[base_pred[i]]} "
                                             f"→ after {classes[new_pred[i]]}")
                    for i in list(res.fixed[:6]) + list(res.broken[:6])])
    else:
        st.caption("No prediction changed.")


def verify_panel(ready: Ready, ident, res, mask: np.ndarray, heads, mode: str) -> None:
    """Run the model itself with ``heads`` removed on a few images (the changed ones first) and compare."""
    cache, eng = ready.cache, ready.engine
    st.markdown("**Check against the real model**")
    st.caption("Runs the model itself with these heads' direct paths removed (hooks, no cached numbers) on a few "
               "images and compares with the arithmetic above, in the ablation chosen above"
               + (" (mean: the real pass plus each removed head's mean contribution, one vector per head)."
                  if mode == "mean" else " (zero)."))
    if st.button("Verify with a real forward pass", key="abl_verify"):
        with st.spinner("Running the model on 8 images…"), guard("The verification"):
            pool = np.concatenate([res.flipped, np.flatnonzero(mask)])  # changed images first
            v = verify_on_images(ready.loaded(), cache.records, ident.ablation_engine(eng), pool, heads,
                                 min_side=cache.manifest.decode_min_side, mode=mode)
            if v is None:
                st.error("None of the images could be read again; they may have moved since extraction.")
            put(Key.VERIFIED, None if v is None else ((heads, mode), v))
    checked = get(Key.VERIFIED)
    if checked and checked[0] == (heads, mode):
        v = checked[1]
        ok = v.predictions_agree and v.max_rel_error < 1e-3
        msg = (f"Real forward pass ({mode} ablation) on {v.n_images} images: largest relative difference from the "
               f"cached arithmetic "
               f"{v.max_rel_error:.1e}; predictions {'agree on every image' if v.predictions_agree else 'DIFFER'}.")
        (st.success if ok else st.error)(msg, icon=":material/check_circle:" if ok else ":material/dangerous:")

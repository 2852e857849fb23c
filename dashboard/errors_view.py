"""The Errors page's gallery: the misclassified images of the chosen scope, most confident first."""

from __future__ import annotations

import numpy as np
import streamlit as st

from .widgets import Ready, image_grid, plain


def misclassified_images(ready: Ready, rows: np.ndarray, pred: np.ndarray, confidence: np.ndarray, chosen) -> None:
    """Thumbnails of the mistakes among ``rows`` (only the ``chosen`` pair's by default), most confident first."""
    cache = ready.cache
    labels, classes = cache.labels, cache.classes
    st.subheader("Misclassified images")
    c = st.columns([2, 1])
    only_pair = c[0].checkbox(f"Only {plain(chosen.label(classes))}", value=True, key="err_only_pair")
    limit = c[1].slider("Show at most", 6, 96, 24, step=6, key="err_limit")
    wrong = rows[pred[rows] != labels[rows]]
    if only_pair:
        wrong = wrong[(labels[wrong] == chosen.true) & (pred[wrong] == chosen.pred)]
    conf = confidence[wrong]
    order = wrong[np.argsort(-conf, kind="stable")][:limit]
    st.caption(f"{len(wrong)} images, most confident mistakes first (confidence: the model's "
               f"{cache.scoring.describe()}).")
    image_grid([(cache.records[i].path,
                 f"true {classes[labels[i]]} → predicted {classes[pred[i]]} ({confidence[i]:.0%})"
                 + (f" · {cache.records[i].group}" if cache.records[i].group else "")) for i in order])

"""Errors: zero-shot accuracy overall, per class and per group, the confusions, and the images."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from refineclip_core.errors import RefineClipError
from refineclip_core.method.errorsets import error_pairs
from refineclip_core.method.evaluation import (accuracy_report, confusion_matrix, most_confused_classes,
                                               rows_mask)
from refineclip_core.method.protocol import PairSpec, pair_spec, resolve_pairs
from refineclip_core.reporting.figures import confusion_figure
from refineclip_core.reporting.findings import accuracy_rows
from refineclip_core.names import visible
from dashboard import resources
from dashboard.errors_view import misclassified_images
from dashboard.pairs import ALL, HELD_OUT, LABELLED, labelled_rows
from dashboard.panels import heldout_rows, sanity_panel
from dashboard.registry import page
from dashboard.state import Key, drop, get, protocol, set_protocol
from dashboard.widgets import accuracy_frame, link, metric_ci, plain, require_ready, table

#: Most classes the confusion matrix shows (a heatmap of 10,000 classes would be 10^8 cells, over 1 GB).
MAX_CONFUSION_CLASSES = 30

st.title(page("errors").heading)
ready = require_ready()
src, cache = ready.source, ready.cache
pred, confidence = resources.zero_shot(src, cache, ready.engine)
labels, classes = cache.labels, cache.classes

splits = sorted(set(cache.splits.tolist()) - {""})
held = heldout_rows(ready)
if held is not None:   # the same warnings as the Load page (below-chance accuracy, few errors or held-out images)
    sanity_panel(ready, ready.ident())
HELD = f"{HELD_OUT} (the Load, Ablate and Refine pages' accuracies)"
LAB = f"{LABELLED} (where the error pair is chosen)"
options = [LAB, ALL] + ([HELD] if held is not None else []) + [f"{s} split" for s in splits]
scope = st.selectbox("Images to analyse", options, index=0, key="err_scope",
                     help="Labelled images: those whose labels the protocol may read; the largest error pair "
                          "(auto) is counted on them, on every page. Zero-shot predictions need no training, so "
                          "every image can be analysed.")
mask = (rows_mask(len(labels), labelled_rows(cache, protocol())) if scope == LAB else rows_mask(len(labels))
        if scope == ALL else rows_mask(len(labels), held) if scope == HELD
        else cache.splits == scope.removesuffix(" split"))
scope_words = scope.split(" (")[0]
rows = np.flatnonzero(mask)
st.caption(f"This page shows {plain(scope)}: {len(rows)} images."
           + (f" The Load page's findings and the Ablate and Refine pages measure on the {len(held)} held-out "
              "images." if held is not None else ""))
rep = accuracy_report(pred, labels, classes, cache.groups, cache.group_names, mask)

c = st.columns(4)
c[0].metric("Images", f"{rep.n_images}")
metric_ci(c[1], "Zero-shot accuracy", rep.overall())
if rep.worst_group is not None:
    metric_ci(c[2], "Average-group accuracy", rep.average())
    metric_ci(c[3], "Worst group", rep.worst(), help=plain(rep.worst_group_name))
    c[3].caption(plain(rep.worst_group_name))
else:
    c[2].metric("Classes", f"{len(rep.per_class)}")
    c[3].caption("No group labels: add a 'group' column to metadata.csv for per-group accuracy.")

left, right = st.columns(2)
acc_col = st.column_config.ProgressColumn("accuracy", format="percent", min_value=0.0, max_value=1.0)
with left:
    st.markdown("**Per class**")
    table("accuracy-per-class", accuracy_frame(accuracy_rows(rep, "class"), "class"), hide_index=True,
          column_config={"accuracy": acc_col})
with right:
    if rep.per_group:
        st.markdown("**Per group**")
        gdf = accuracy_frame(accuracy_rows(rep, "group"), "group")
        table("accuracy-per-group", gdf.sort_values("accuracy"), hide_index=True, column_config={"accuracy": acc_col})

shown = most_confused_classes(pred, labels, len(classes), MAX_CONFUSION_CLASSES, mask)
if len(shown) < len(classes):
    st.caption(f"The confusion matrix of the {len(shown)} classes with the most errors (as true or predicted class), "
               f"of {len(classes):,}; the error pairs below list every pair.")
st.plotly_chart(confusion_figure(confusion_matrix(pred, labels, len(classes), mask, classes=shown),
                                 [classes[i] for i in shown]), key="err_confusion")

st.subheader("Error pairs")
pairs = error_pairs(pred, labels, rows)
if not pairs:
    st.success("No misclassified images here: there is no error to explain.")
    st.stop()
class_counts = np.bincount(labels[rows], minlength=len(classes))
table("error-pairs", pd.DataFrame({
    "true class": [classes[p.true] for p in pairs], "predicted as": [classes[p.pred] for p in pairs],
    f"images ({scope_words})": [p.count for p in pairs],
    "share of the class": [p.count / max(class_counts[p.true], 1) for p in pairs]}),
    hide_index=True, height=min(38 * (len(pairs) + 1), 300),
    column_config={"share of the class": st.column_config.NumberColumn(format="percent")})

keys = [f"{p.true}:{p.pred}" for p in pairs]     # stable options (the counts are in the table above, per scope)
label_of = {k: p.label(classes) for k, p in zip(keys, pairs)}
current = None
spec = PairSpec.parse(protocol().pair)
try:
    current = None if spec.automatic else resolve_pairs(protocol().pair, pairs, classes)[0]
except RefineClipError:
    current = None
if current is None and spec.automatic:
    try:
        current = resources.identification(src, cache, ready.engine, protocol()).pairs[0]
    except RefineClipError:
        current = None
index = next((i for i, p in enumerate(pairs) if (p.true, p.pred) == current), 0)


def _choose_pair() -> None:
    """Explain the chosen pair; in both directions while the protocol uses both (its default)."""
    i = keys.index(get(Key.ERROR_PAIR))
    a, b = pairs[i].true, pairs[i].pred
    both = PairSpec.parse(protocol().pair).both_directions
    set_protocol(pair=pair_spec(a, b, classes) + (f",{pair_spec(b, a, classes)}" if both else ""))


if get(Key.ERROR_PAIR) not in (None, *keys):   # a pair this scope does not have: start from the protocol's
    drop(Key.ERROR_PAIR)
choice = st.selectbox("Error pair to explain on the next pages", keys, index=index, key=Key.ERROR_PAIR,
             on_change=_choose_pair, format_func=lambda k: visible(label_of[k]),
             help="The Heads, Head inspector, Ablate and Refine pages work on this pair (true → predicted).")
chosen = pairs[keys.index(choice)]
if spec.automatic and st.button("Use this pair", key="err_use_pair"):
    _choose_pair()
    st.rerun()
link("heads", f"Which heads cause {plain(chosen.label(classes))}? → Heads")

misclassified_images(ready, rows, pred, confidence, chosen)

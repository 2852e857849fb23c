"""Read-outs: the Load page's findings at a glance and what the loaded data holds; the Refine page's checkpoint download."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from refineclip_core.errors import RefineClipError
from refineclip_core.features.cache import FeatureCache
from refineclip_core.loading.data import ImageDataset
from refineclip_core.loading.hf_clip import zip_folder
from refineclip_core.studio.source import Source

from . import resources
from .registry import PAGES
from .state import Key, get, protocol, put
from .widgets import Ready, link, metric_ci, plain


def findings_panel(ready: Ready) -> None:
    """The loaded source, and :func:`~refineclip_core.reporting.findings.findings` on it."""
    src, cache = ready.source, ready.cache
    st.success(plain(src.label), icon=":material/check_circle:")
    try:
        ident = resources.identification(src, cache, ready.engine, protocol())
    except RefineClipError as exc:
        st.info(f"No findings to show: {plain(exc)}")
        return
    f = resources.findings(src, cache, ready.engine, ident)
    st.subheader("Findings at a glance")
    st.caption(f"Measured on {f.n_eval} held-out images (the {len(ident.sample_rows)} labelled samples used to "
               f"choose the heads are excluded) — the same images and numbers as the Ablate and Refine pages. "
               f"Each accuracy comes with its 95% interval and the number of images behind it.")
    rule = "the consensus of DE_A..DE_D" if f.score == "consensus" else (f"Alg. 1 ({f.score})" if f.score else None)
    removal = "replacing them by their mean" if f.ablation == "mean" else "zeroing them"
    blame = (f"The heads to blame, by {rule}, are **{', '.join(f.heads)}**; {removal} needs no retraining (Eq. 5):"
             if f.heads else "No set of heads beats removing nothing on the labelled samples (pick heads on the "
                             "Heads page, or draw more samples):")
    st.markdown(f"The model confuses **{plain(f.pair)}** most often ({f.pair_count} held-out images). {blame}")
    c = st.columns(4)
    metric_ci(c[0], "Zero-shot accuracy", f.accuracy)
    metric_ci(c[1], "… with those heads removed", f.ablated_accuracy, f.accuracy)
    if f.worst_group is not None:
        metric_ci(c[2], "Zero-shot worst group", f.worst_group)
        c[2].caption(plain(f.worst_group_name))
        metric_ci(c[3], "… with those heads removed", f.ablated_worst_group, f.worst_group)
        c[3].caption(plain(f.ablated_worst_group_name))
    elif f.target_accuracy is not None:
        metric_ci(c[2], "Error-pair classes", f.target_accuracy)
        metric_ci(c[3], "… with those heads removed", f.ablated_target_accuracy, f.target_accuracy)
    run = get(Key.REFINE)
    if run is not None and run.outcome.identification.config == ident.config:
        verdict = run.outcome.verdict
        (st.warning if not verdict.ok else st.info)(
            f"The last edit ({run.outcome.exported}): {verdict.summary()}",
            icon=":material/warning:" if not verdict.ok else ":material/build:")
    for note in f.notes:
        st.caption(f"Unavailable score — {plain(note)}")
    others = [p.name for p in PAGES[1:]]
    for col, name in zip(st.columns(len(others)), others):
        link(name, where=col)
    data_summary(src, cache)


def data_summary(src: Source, cache: FeatureCache) -> None:
    """Images per class, group and split, the model's scope and every skipped file (opened once
    after an extraction)."""
    fresh = bool(get(Key.LOAD_FRESH))
    put(Key.LOAD_FRESH, False)
    with st.expander(f"Data: {len(cache)} images, {len(cache.classes)} classes, {len(cache.group_names)} groups, "
                     f"{len(cache.skipped) + len(src.skipped_extra)} files skipped", expanded=fresh):
        recs = cache.records
        df = pd.DataFrame({"class": [cache.classes[r.label] for r in recs], "group": [r.group or "–" for r in recs],
                           "split": [r.split or "–" for r in recs]})
        c1, c2 = st.columns(2)
        with c1:
            st.markdown("**Images per class and split**")
            st.dataframe(pd.crosstab(df["class"], df["split"], margins=True, margins_name="total"))
        with c2:
            if cache.group_names:
                st.markdown("**Images per group and split**")
                st.dataframe(pd.crosstab(df["group"], df["split"], margins=True, margins_name="total"))
            else:
                st.caption("No group labels (add a 'group' column to metadata.csv to get per-group accuracies).")
        man = cache.manifest
        st.caption(f"Model {plain(man.model_name)} · heads of layers {man.layers} ({man.n_heads} per layer) · "
                   f"embedding dim {man.embed_dim} · prompts: " + " | ".join(map(plain, list(man.templates)[:6])))
        skipped = [(s.path, s.reason) for s in cache.skipped] + list(src.skipped_extra)
        if skipped:
            st.markdown("**Skipped files**")
            st.dataframe(pd.DataFrame(skipped, columns=["file", "reason"]), hide_index=True)


def scan_summary(dataset: ImageDataset) -> None:
    """What a scan found, before extraction."""
    df = pd.DataFrame({"class": [dataset.classes[r.label] for r in dataset.records],
                       "split": [r.split or "–" for r in dataset.records]})
    st.markdown(f"**{len(dataset)} images**, {len(dataset.classes)} classes ({dataset.layout} layout), "
                f"{len(dataset.groups)} groups, splits: {plain(', '.join(dataset.splits) or 'none')}; "
                f"{len(dataset.skipped)} files skipped.")
    st.dataframe(pd.crosstab(df["class"], df["split"]), height=min(36 * (len(dataset.classes) + 1) + 4, 300))
    if dataset.skipped:
        with st.expander(f"Skipped files ({len(dataset.skipped)})"):
            st.dataframe(pd.DataFrame([(s.path, s.reason) for s in dataset.skipped], columns=["file", "reason"]),
                         hide_index=True)


def checkpoint_download(col, checkpoint: Path | None, exported: str, ok: bool) -> None:
    """The merged checkpoint's download button: the open_clip file, or the transformers folder zipped."""
    worse = "" if ok else " — it made the model worse"
    if checkpoint is not None and checkpoint.is_dir():
        col.download_button(f"Merged checkpoint of {exported} (Hugging Face folder, .zip){worse}",
                            data=lambda p=checkpoint: zip_folder(p), file_name=f"{checkpoint.name}.zip",
                            mime="application/zip", key="ref_dl_ckpt", icon=":material/download:", on_click="ignore",
                            help="Unzip it: transformers' CLIPModel.from_pretrained(<folder>) loads the edited model, "
                                 "and so does this dashboard's 'Local checkpoint'.")
    elif checkpoint is not None and checkpoint.is_file():
        col.download_button(f"Merged checkpoint of {exported} (.safetensors){worse}",
                            data=lambda p=checkpoint: p.read_bytes(), file_name=checkpoint.name,
                            mime="application/octet-stream", key="ref_dl_ckpt", icon=":material/download:",
                            on_click="ignore",  # a download needs no rerun (and a rerun can race the deferred data)
                            help="open_clip.create_model(name, pretrained=<this file>) loads the edited model.")
    else:
        col.caption("The exported checkpoint is gone (temporary files were cleaned); run the refinement again.")

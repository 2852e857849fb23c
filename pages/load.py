"""Load: what is loaded and what it shows at a glance; choose another model and images."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from refineclip_core.features.zeroshot import DEFAULT_TEMPLATES
from refineclip_core.loading.models import DEMO_MODEL, DEMO_MODELS
from refineclip_core.session.caches import cache_source
from refineclip_core.session.images import ScannedImages, plan_source, scan_images
from refineclip_core.session.locking import extract_locked
from dashboard import resources
from dashboard.forms import cache_form, extraction_options, images_form, model_form
from dashboard.jobs import job_panel, start_job
from dashboard.panels import findings_panel, scan_summary
from dashboard.recent_view import recent_panel
from dashboard.registry import page
from dashboard.shell import start_demo_job
from dashboard.state import Key, drop, get, get_source, made_here, put, session_dir, set_source
from dashboard.widgets import guard, require_ready, show_exception

st.title(page("load").heading)
st.caption("Find the attention heads behind CLIP's mistakes, switch them off, and refine the model so the fix "
           "sticks — RefineCLIP, on your model and images.")


def load_panel() -> None:
    spec = layers = images = None
    with guard("Reading the model choice"):
        spec, layers = model_form()
    st.divider()
    with guard("Reading the image choice"):
        images = images_form()
    if (spec is not None and spec.name in DEMO_MODELS and images is not None and images.kind == "demo"
            and images.metadata is None and layers == 4 and spec.precision == "fp32" and spec.device == "cpu"):
        src = get_source()
        same = src is not None and src.is_demo and src.spec.name == spec.name
        label = "Reload the embedded demo" if same else "Use the embedded demo"
        if st.button(label, type="primary", key="load_demo_btn"):
            drop(Key.SOURCE, Key.DEMO_JOB, Key.LOAD_SCAN)
            if spec.name != DEMO_MODEL:       # the default demo starts itself (dashboard.shell.ensure_source)
                start_demo_job(spec)
            st.rerun()
        return
    if spec is None or images is None:
        return
    if st.button("Scan images", key="load_scan_btn", type="primary"):
        drop(Key.LOAD_SCAN)
        with st.spinner("Listing images…"):
            try:
                put(Key.LOAD_SCAN, scan_images(images.kind, folder=images.folder, zip_data=images.zip_data,
                                               zip_name=images.zip_name, metadata=images.metadata,
                                               upload_dir=session_dir()))
            except Exception as exc:
                show_exception(exc, "Scanning the images")
                return
    scanned: ScannedImages | None = get(Key.LOAD_SCAN)
    if scanned is None:
        return
    classes = scanned.dataset.classes
    scan_summary(scanned.dataset)
    st.markdown("**Class names and prompts** (the names go into the templates; edit them to say what the "
                "classes are, e.g. `001.Black_footed_Albatross` → `black-footed albatross`)")
    names = st.data_editor(pd.DataFrame({"folder / CSV label": classes, "class name": classes}),
                           disabled=["folder / CSV label"], hide_index=True, key="load_names",
                           height=min(36 * (len(classes) + 1) + 4, 320))
    templates = st.text_area("Prompt templates (one per line, '{}' is the class name)", "\n".join(DEFAULT_TEMPLATES),
                             key="load_templates", height=140)
    exact, store = extraction_options()
    if st.button("Extract features", type="primary", key="load_extract_btn"):
        try:
            loaded = resources.model(spec.key())
            source, cfg = plan_source(scanned, spec, loaded.model_name, layers, names["class name"].tolist(),
                                      templates.splitlines(), exact, store, private_dir=session_dir())
        except Exception as exc:
            show_exception(exc, "Preparing the extraction")
            return
        put(Key.LOAD_JOB, start_job("Extracting features", lambda progress, cancelled: extract_locked(
            loaded, scanned.dataset, source.cache_dir, cfg, progress, cancelled), source=source))
        st.rerun()  # follow the job at the top of the page, with progress and Cancel


def _extracted(job) -> None:
    set_source(job.meta["source"])
    made_here(job.meta["source"].cache_dir)
    drop(Key.LOAD_SCAN)
    put(Key.LOAD_FRESH, True)
    st.rerun()


demo_job = get(Key.DEMO_JOB)
if get_source() is None and demo_job is not None and demo_job.handled:
    if st.button("Prepare the embedded demo again", key="load_demo_retry"):
        drop(Key.DEMO_JOB)
        st.rerun()
if get_source() is not None:
    findings_panel(require_ready())
st.divider()
st.subheader("Load another model or images" if get_source() is not None else "Load a model and images")
job_panel(get(Key.LOAD_JOB), "Extracting per-head features (one forward pass per image)", cancel_key="load_cancel",
          what="Extraction", on_done=_extracted, cancelled_note="Click 'Extract features' again to resume.")
load_panel()
recent_panel()
with st.expander("…or open a feature cache extracted before (`refineclip extract`, a shared folder)"):
    folder = None
    with guard("Reading the cache folder"):
        folder = cache_form()
    if folder is not None and st.button("Open the cache", key="load_cache_btn"):
        with guard("Opening the feature cache"):
            set_source(cache_source(folder))
            st.rerun()

"""Load: what is loaded and what it shows at a glance; choose another model and images."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import streamlit as st

from refineclip_core.errors import Cancelled, DataError, RefineClipError
from refineclip_core.features.extraction import ExtractionConfig
from refineclip_core.features.zeroshot import DEFAULT_TEMPLATES, validate_templates
from refineclip_core.loading.data import load_dataset, parse_metadata
from refineclip_core.loading.models import ModelSpec
from refineclip_core.loading.uploads import allowed_path, default_allowed_roots, extract_zip
from refineclip_core.studio.caches import cache_dir_for
from refineclip_core.studio.demo import demo_data_dir, write_demo_data
from refineclip_core.studio.locking import extract_locked
from refineclip_core.studio.source import Source
from studio_ui import resources
from studio_ui.jobs import start_job
from studio_ui.state import get_source, protocol, session_dir, set_source
from studio_ui.widgets import PAGES, delta_pts, follow_job, guard, pct, require_ready, show_exception

MODEL_KINDS = ("Embedded demo model", "open_clip architecture + pretrained tag", "Local checkpoint")
DATA_KINDS = ("Held-out demo images", "Folder on the server", "Zip upload")
CUSTOM_CONFIG = "(custom config JSON)"

st.title("RefineCLIP Studio")
st.caption("Find the attention heads behind CLIP's mistakes, switch them off, and refine the model so the fix "
           "sticks — RefineCLIP, on your model and images.")


# ------------------------------------------------------------------------------------------------
# What is loaded, and the findings

def findings_panel() -> None:
    ready = require_ready()
    src, cache = ready.source, ready.cache
    st.success(src.label, icon=":material/check_circle:")
    try:
        ident = resources.identification(src, cache, ready.engine, protocol())
    except RefineClipError as exc:
        st.info(f"No findings to show: {exc}")
        return
    f = resources.findings(src, cache, ready.engine, ident)
    st.subheader("Findings at a glance")
    st.caption(f"Measured on {f.n_eval} held-out images (the {len(ident.sample_rows)} labelled samples used to "
               f"choose the heads are excluded).")
    st.markdown(f"The model confuses **{f.pair}** most often ({f.pair_count} held-out images). Alg. 1 blames "
                f"**{', '.join(f.heads) or 'no head'}**" + (f" (ranked by {f.score})" if f.score else "") +
                "; switching them off needs no retraining (Eq. 5):")
    c = st.columns(4)
    c[0].metric("Zero-shot accuracy", pct(f.accuracy))
    c[1].metric("… with those heads off", pct(f.ablated_accuracy), delta_pts(f.ablated_accuracy, f.accuracy))
    if f.worst_group is not None:
        c[2].metric("Zero-shot worst group", pct(f.worst_group), help=f.worst_group_name)
        c[2].caption(f.worst_group_name)
        c[3].metric("… with those heads off", pct(f.ablated_worst_group),
                    delta_pts(f.ablated_worst_group, f.worst_group), help=f.ablated_worst_group_name)
        c[3].caption(f.ablated_worst_group_name)
    elif f.target_accuracy is not None:
        c[2].metric("Error-pair classes", pct(f.target_accuracy))
        c[3].metric("… with those heads off", pct(f.ablated_target_accuracy),
                    delta_pts(f.ablated_target_accuracy, f.target_accuracy))
    for note in f.notes:
        st.caption(f"Unavailable score — {note}")
    links = st.columns(5)
    links[0].page_link(PAGES["errors"], label="Errors", icon=":material/error:")
    links[1].page_link(PAGES["heads"], label="Heads", icon=":material/psychology:")
    links[2].page_link(PAGES["inspector"], label="Head inspector", icon=":material/search:")
    links[3].page_link(PAGES["ablate"], label="Ablate", icon=":material/content_cut:")
    links[4].page_link(PAGES["refine"], label="Refine", icon=":material/build:")
    dataset_summary(src, cache)


def dataset_summary(src: Source, cache) -> None:
    fresh = st.session_state.pop("load_just_extracted", False)
    with st.expander(f"Data: {len(cache)} images, {len(cache.classes)} classes, {len(cache.group_names)} groups, "
                     f"{len(cache.skipped) + len(src.skipped_extra)} files skipped", expanded=fresh):
        recs = cache.records
        df = pd.DataFrame({"class": [cache.classes[r.label] for r in recs],
                           "group": [r.group or "–" for r in recs],
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
        st.caption(f"Model {man.model_name} · heads of layers {man.layers} ({man.n_heads} per layer) · embedding "
                   f"dim {man.embed_dim} · prompts: " + " | ".join(list(cache.manifest.templates)[:6]))
        skipped = [(s.path, s.reason) for s in cache.skipped] + list(src.skipped_extra)
        if skipped:
            st.markdown("**Skipped files**")
            st.dataframe(pd.DataFrame(skipped, columns=["file", "reason"]), hide_index=True)


# ------------------------------------------------------------------------------------------------
# Choosing a model and images

def upload_dir() -> Path:
    return session_dir()


def save_upload(uploaded, prefix: str) -> Path:
    data = uploaded.getvalue()
    digest = hashlib.sha256(data).hexdigest()[:12]
    name = Path(uploaded.name).name.replace(" ", "_") or "upload"
    path = upload_dir() / f"{prefix}-{digest}-{name}"
    if not path.exists():
        tmp = path.with_suffix(path.suffix + ".part")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path


def server_path(text: str) -> Path:
    return allowed_path(text)


def model_form() -> tuple[ModelSpec | None, str | int]:
    kind = st.radio("Model", MODEL_KINDS, key="load_model_kind", horizontal=True)
    with st.expander("Precision, device and layers", expanded=False):
        c = st.columns(3)
        precision = c[0].selectbox("Precision", ["fp32", "fp64"], key="load_precision",
                                   help="fp32 keeps the decomposition exact to ~1e-6; fp64 to ~1e-12 (slower).")
        import torch

        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        device = c[1].selectbox("Device", devices, key="load_device")
        all_layers = c[2].checkbox("Score heads of all layers", key="load_all_layers",
                                   help="The paper scores the heads of the last 4 layers.")
        k = c[2].number_input("…or of the last K layers", 1, 64, 4, key="load_layers", disabled=all_layers)
    layers: str | int = "all" if all_layers else int(k)
    if kind == MODEL_KINDS[0]:
        return ModelSpec("demo", device=device, precision=precision), layers
    archs = resources.open_clip_models()
    if kind == MODEL_KINDS[1]:
        c = st.columns(2)
        name = c[0].selectbox("open_clip architecture", archs, key="load_arch",
                              index=archs.index("ViT-B-16") if "ViT-B-16" in archs else 0)
        tag = c[1].text_input("Pretrained tag", "openai", key="load_tag",
                              help="open_clip downloads these weights on first use (needs internet access).")
        return ModelSpec(name, pretrained=tag.strip() or None, device=device, precision=precision), layers
    c = st.columns(2)
    with c[0]:
        where = st.radio("Checkpoint", ["Upload", "Path on the server"], key="load_ckpt_where", horizontal=True)
        if where == "Upload":
            up = st.file_uploader("Checkpoint (.pt, .bin, .safetensors)", type=["pt", "pth", "bin", "safetensors"],
                                  key="load_ckpt_upload")
            ckpt = str(save_upload(up, "ckpt")) if up is not None else None
        else:
            text = st.text_input("Checkpoint path", key="load_ckpt_path")
            ckpt = str(server_path(text)) if text.strip() else None
    with c[1]:
        arch = st.selectbox("Architecture", [CUSTOM_CONFIG, *archs], key="load_ckpt_arch",
                            index=1 + archs.index("ViT-B-16") if "ViT-B-16" in archs else 0)
        config = None
        name = arch
        if arch == CUSTOM_CONFIG:
            cwhere = st.radio("Config JSON", ["Upload", "Path on the server"], key="load_cfg_where", horizontal=True)
            if cwhere == "Upload":
                up = st.file_uploader("open_clip model config (.json)", type=["json"], key="load_cfg_upload")
                config = str(save_upload(up, "config")) if up is not None else None
                name = Path(up.name).stem if up is not None else ""
            else:
                text = st.text_input("Config path", key="load_cfg_path")
                config = str(server_path(text)) if text.strip() else None
                name = Path(text).stem if text.strip() else ""
    if not ckpt:
        st.info("Give a checkpoint file to continue.")
        return None, layers
    if arch == CUSTOM_CONFIG and not config:
        st.info("Give the model's config JSON (or pick an open_clip architecture).")
        return None, layers
    return ModelSpec(name, checkpoint=ckpt, model_config=config, device=device, precision=precision), layers


def data_form() -> tuple[dict | None, object | None]:
    """Returns ``(where, metadata_upload)``; ``where`` describes the images folder."""
    kind = st.radio("Images", DATA_KINDS, key="load_data_kind", horizontal=True)
    where = None
    if kind == DATA_KINDS[0]:
        where = {"kind": "demo"}
    elif kind == DATA_KINDS[1]:
        roots = ", ".join(str(r) for r in default_allowed_roots())
        text = st.text_input("Folder with class sub-folders or a metadata.csv", key="load_folder",
                             help=f"Must lie below one of: {roots} (set REFINECLIP_ALLOWED_ROOTS to change).")
        if text.strip():
            where = {"kind": "folder", "path": text}
    else:
        up = st.file_uploader("Zip of class folders or of images + metadata.csv", type=["zip"], key="load_zip")
        if up is not None:
            where = {"kind": "zip", "upload": up}
    meta = None
    if kind != DATA_KINDS[0]:
        meta = st.file_uploader("Optional metadata CSV (path,label[,group,split] or WILDS img_filename,y,split,place; "
                                "paths relative to the folder)", type=["csv"], key="load_meta")
    return where, meta


def scan(where: dict, meta) -> dict:
    """List the images (no model needed yet); returns what extraction needs."""
    extra_skipped: list[tuple[str, str]] = []
    if where["kind"] == "demo":
        root = write_demo_data(demo_data_dir())
        label_data = "the held-out demo images"
    elif where["kind"] == "folder":
        root = server_path(where["path"])
        if not root.is_dir():
            raise DataError(f"'{where['path']}' is not a folder.")
        label_data = f"folder {root}"
    else:
        up = where["upload"]
        data = up.getvalue()
        digest = hashlib.sha256(data).hexdigest()[:16]
        known = st.session_state.setdefault("zip_roots", {})
        if digest not in known:
            res = extract_zip(data, upload_dir() / f"zip-{digest}")
            known[digest] = (str(res.root), [(s.path, s.reason) for s in res.skipped])
        root_s, extra_skipped = known[digest]
        root = Path(root_s)
        label_data = f"zip {up.name}"
    csv_hash = ""
    if meta is not None:
        text = meta.getvalue().decode("utf-8-sig", errors="replace")
        header = text.splitlines()[0] if text else ""
        waterbirds = {"img_filename", "y", "place"} <= {h.strip() for h in header.split(",")}
        dataset = parse_metadata(text, Path(root), waterbirds=waterbirds, source=meta.name)
        if not dataset.records:
            raise DataError(f"No usable rows in '{meta.name}'"
                            + (f" (e.g. {dataset.skipped[0].reason})." if dataset.skipped else "."))
        csv_hash = hashlib.sha256(text.encode()).hexdigest()[:16]
    else:
        dataset = load_dataset(root)
    return {"dataset": dataset, "data_key": f"{dataset.root}|{csv_hash}", "label_data": label_data,
            "extra_skipped": extra_skipped}


def scan_summary(dataset) -> None:
    df = pd.DataFrame({"class": [dataset.classes[r.label] for r in dataset.records],
                       "split": [r.split or "–" for r in dataset.records]})
    st.markdown(f"**{len(dataset)} images**, {len(dataset.classes)} classes ({dataset.layout} layout), "
                f"{len(dataset.groups)} groups, splits: {', '.join(dataset.splits) or 'none'}; "
                f"{len(dataset.skipped)} files skipped.")
    st.dataframe(pd.crosstab(df["class"], df["split"]), height=min(36 * (len(dataset.classes) + 1) + 4, 300))


def load_panel() -> None:
    spec = layers = None
    with guard("Reading the model choice"):
        spec, layers = model_form()
    st.divider()
    where, meta = None, None
    with guard("Reading the image choice"):
        where, meta = data_form()
    if spec is not None and spec.name == "demo" and where is not None and where["kind"] == "demo" and meta is None \
            and layers == 4 and spec.precision == "fp32" and spec.device == "cpu":
        src = get_source()
        label = "Reload the embedded demo" if src is not None and src.is_demo else "Use the embedded demo"
        if st.button(label, type="primary", key="load_demo_btn"):
            for k in ("source", "demo_job", "load_scan"):
                st.session_state.pop(k, None)
            st.rerun()
        return
    if spec is None or where is None:
        return
    if st.button("Scan images", key="load_scan_btn", type="primary"):
        st.session_state.pop("load_scan", None)
        with st.spinner("Listing images…"):
            try:
                scanned = scan(where, meta)
            except Exception as exc:
                show_exception(exc, "Scanning the images")
                return
        scanned["spec"], scanned["layers"] = spec, layers
        st.session_state["load_scan"] = scanned
    scanned = st.session_state.get("load_scan")
    if not scanned:
        return
    dataset = scanned["dataset"]
    scan_summary(dataset)
    st.markdown("**Class names and prompts** (the names go into the templates; edit them to say what the "
                "classes are, e.g. `001.Black_footed_Albatross` → `black-footed albatross`)")
    names_df = st.data_editor(pd.DataFrame({"folder / CSV label": dataset.classes, "class name": dataset.classes}),
                              disabled=["folder / CSV label"], hide_index=True, key="load_names",
                              height=min(36 * (len(dataset.classes) + 1) + 4, 320))
    templates_text = st.text_area("Prompt templates (one per line, '{}' is the class name)",
                                  "\n".join(DEFAULT_TEMPLATES), key="load_templates", height=140)
    if st.button("Extract features", type="primary", key="load_extract_btn"):
        try:
            names = [str(n).strip() for n in names_df["class name"].tolist()]
            templates = tuple(validate_templates([t.strip() for t in templates_text.splitlines() if t.strip()]))
            dataset.renamed(names)  # validates: count, non-empty, distinct
            spec_r: ModelSpec = scanned["spec"]
            spec_json = json.dumps(asdict(spec_r), sort_keys=True)
            loaded = resources.model(spec_json)
            cache_dir = cache_dir_for(spec_r, scanned["data_key"], scanned["layers"])
            cfg = ExtractionConfig(layers=scanned["layers"], templates=templates)
        except Exception as exc:
            show_exception(exc, "Preparing the extraction")
            return
        label = f"{loaded.model_name} on {scanned['label_data']} ({len(dataset)} images)"
        st.session_state["load_job"] = start_job(
            "Extracting features",
            lambda progress, cancelled: extract_locked(loaded, dataset, cache_dir, cfg, progress, cancelled),
            source=Source(spec=spec_r, data_root=str(dataset.root), cache_dir=str(cache_dir), label=label,
                          classes=tuple(names), templates=templates,
                          skipped_extra=tuple(tuple(s) for s in scanned["extra_skipped"])))
        st.rerun()  # follow the job at the top of the page, with progress and Cancel


def follow_load_job() -> None:
    job = st.session_state.get("load_job")
    if job is None or job.handled:
        return
    follow_job(job, "Extracting per-head features (one forward pass per image)", cancel_key="load_cancel")
    job.handled = True
    if job.error is not None:
        if isinstance(job.error, Cancelled):
            st.warning(f"{job.error} Click 'Extract features' again to resume.", icon=":material/pause_circle:")
        else:
            show_exception(job.error, "Extraction")
        return
    src: Source = job.meta["source"]
    set_source(src)
    st.session_state.pop("load_scan", None)
    st.session_state["load_just_extracted"] = True
    st.rerun()


# ------------------------------------------------------------------------------------------------

demo_job = st.session_state.get("demo_job")
if get_source() is None and demo_job is not None and demo_job.handled:
    if st.button("Prepare the embedded demo again", key="load_demo_retry"):
        st.session_state.pop("demo_job", None)
        st.rerun()

if get_source() is not None:
    findings_panel()

st.divider()
st.subheader("Load another model or images" if get_source() is not None else "Load a model and images")
follow_load_job()
load_panel()

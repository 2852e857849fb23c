"""Input forms: the Load page's (which model — a ModelSpec and a layer scope — and which images)
and the Refine page's (which edit: an EditConfig).

Widgets only: uploads are kept by :func:`refineclip_core.loading.uploads.save_upload` in the
session's private folder, typed paths are checked by :func:`~refineclip_core.loading.confine.allowed_path`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import streamlit as st

from refineclip_core.edit.concept import DIAGNOSED, ConceptConfig, diagnosed_concepts
from refineclip_core.loading.hf_clip import find_hf_checkpoint, hf_folder_in
from refineclip_core.loading.models import DEMO_MODEL, ModelSpec
from refineclip_core.edit.config import EXPORT_KINDS, STRATEGIES, FitConfig
from refineclip_core.edit.config import DEFAULT_EDIT, EditConfig
from refineclip_core.edit.config import PaperConfig
from refineclip_core.edit.guard import MAX_DROP, GuardConfig
from refineclip_core.errors import RefineClipError
from refineclip_core.method.ltc import PeersConfig, parse_accept_pairs
from refineclip_core.loading.confine import allowed_path, default_allowed_roots
from refineclip_core.loading.uploads import save_upload, unpack_upload
from refineclip_core.session.images import ImagesKind

from . import resources
from .state import confinement, model_confinement, session_dir

MODEL_KINDS = ("Embedded demo model", "open_clip architecture + pretrained tag", "Local checkpoint")
DATA_KINDS = ("Held-out demo images", "Folder on the server", "Zip upload")
CUSTOM_CONFIG = "(custom config JSON)"
#: The Refine form's button, named after what it runs (the exported edit's kind).
RUN_LABELS = {"fit": "Fit RefineCLIP-fit and check it", "paper": "Run the paper's phase 2 and check it"}


@dataclass(frozen=True)
class ImagesChoice:
    """What the images form asks :func:`refineclip_core.session.images.scan_images` for."""

    kind: ImagesKind
    folder: str | None = None
    zip_data: bytes | None = None
    zip_name: str = "upload.zip"
    metadata: tuple[str, bytes] | None = None


def _kept(upload, prefix: str) -> str | None:
    return None if upload is None else str(save_upload(upload.getvalue(), upload.name, prefix, session_dir()))


def model_form() -> tuple[ModelSpec | None, str | int]:
    """The chosen model (None until complete) and the layer scope of the scored heads."""
    kind = st.radio("Model", MODEL_KINDS, key="load_model_kind", horizontal=True)
    with st.expander("Precision, device and layers", expanded=False):
        c = st.columns(3)
        precision = c[0].selectbox("Precision", ["fp32", "fp64"], key="load_precision",
                                   help="fp32 keeps the decomposition exact to ~1e-6; fp64 to ~1e-12 (slower).")
        import torch

        device = c[1].selectbox("Device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []), key="load_device")
        all_layers = c[2].checkbox("Score heads of all layers", key="load_all_layers",
                                   help="The paper scores the heads of the last 4 layers.")
        k = c[2].number_input("…or of the last K layers", 1, 64, 4, key="load_layers", disabled=all_layers)
    layers: str | int = "all" if all_layers else int(k)
    if kind == MODEL_KINDS[0]:
        return demo_model_choice(device, precision), layers
    archs = resources.open_clip_models()
    default = archs.index("ViT-B-16") if "ViT-B-16" in archs else 0
    if kind == MODEL_KINDS[1]:
        c = st.columns(2)
        name = c[0].selectbox("open_clip architecture", archs, key="load_arch", index=default,
                              help="Decompose into heads: CLIP ViTs, SigLIP / SigLIP 2, EVA, PE-Core, CLIPA, CoCa, "
                                   "ViTamin, MobileCLIP-B; refused: ResNet, ConvNeXt, FastViT (docs/MODELS.md).")
        tag = c[1].text_input("Pretrained tag", "openai", key="load_tag",
                              help="open_clip downloads these weights on first use (needs internet access).")
        return ModelSpec(name, pretrained=tag.strip() or None, device=device, precision=precision,
                         roots=model_confinement(False).folders), layers
    c = st.columns(2)
    with c[0]:
        where = st.radio("Checkpoint", ["Upload", "Path on the server"], key="load_ckpt_where", horizontal=True)
        uploaded = where == "Upload"
        if uploaded:
            up = uploader("Checkpoint (.pt, .bin, .safetensors; a Hugging Face CLIP folder as .zip)",
                                  key="load_ckpt_upload", type=["pt", "pth", "bin", "safetensors", "zip"])
            if up is not None and up.name.lower().endswith(".zip"):  # a zipped save_pretrained folder
                ckpt = str(hf_folder_in(unpack_upload(up.getvalue(), session_dir()).dest))
            else:
                ckpt = _kept(up, "ckpt")
        else:
            text = st.text_input("Checkpoint path", key="load_ckpt_path",
                                 help="A weights file, or a Hugging Face transformers CLIP folder (what "
                                      "CLIPModel.save_pretrained writes: config.json + model.safetensors).")
            ckpt = str(allowed_path(text)) if text.strip() else None
    # the files are read only inside the allowed folders (plus this session's uploads), checked when opened
    pin = model_confinement(uploaded)
    with pin.active():
        hf = find_hf_checkpoint(ckpt) if ckpt else None
    if hf is not None:  # its config.json is the architecture
        c[1].caption("A Hugging Face transformers CLIP: its config.json gives the architecture, converted exactly "
                     "into open_clip's; the edit can be downloaded in the same format.")
        return ModelSpec(hf.label, checkpoint=ckpt, device=device, precision=precision, roots=pin.folders), layers
    with c[1]:
        arch = st.selectbox("Architecture", [CUSTOM_CONFIG, *archs], key="load_ckpt_arch",
                            index=1 + default if "ViT-B-16" in archs else 0)
        config, name = None, arch
        if arch == CUSTOM_CONFIG:
            where = st.radio("Config JSON", ["Upload", "Path on the server"], key="load_cfg_where", horizontal=True)
            uploaded = uploaded or where == "Upload"
            if where == "Upload":
                up = uploader("open_clip model config (.json)", type=["json"], key="load_cfg_upload")
                config, name = _kept(up, "config"), Path(up.name).stem if up is not None else ""
            else:
                text = st.text_input("Config path", key="load_cfg_path")
                config = str(allowed_path(text)) if text.strip() else None
                name = Path(text).stem if text.strip() else ""
    if not ckpt:
        st.info("Give a checkpoint file to continue.")
        return None, layers
    if arch == CUSTOM_CONFIG and not config:
        st.info("Give the model's config JSON (or pick an open_clip architecture).")
        return None, layers
    return ModelSpec(name, checkpoint=ckpt, model_config=config, device=device, precision=precision,
                     roots=model_confinement(uploaded).folders), layers  # the config may be an upload too


def demo_model_choice(device: str, precision: str) -> ModelSpec | None:
    """Which embedded demo model (the CLIP-shaped one by default; the SigLIP-shaped one sees the same world
    and images); None with a note when the chosen one is not installed."""
    from refineclip_core.session.demo import DEMO_CHOICES, demo_installed

    from .shell import demo_spec

    which = st.radio("Demo model", list(DEMO_CHOICES), format_func=DEMO_CHOICES.get, key="load_demo_model",
                     horizontal=True, help="Both are trained on the same bird world and shown the same held-out "
                                           "images; the SigLIP-shaped one pools all patch tokens with an attention "
                                           "pool, has no projection and was trained with the sigmoid loss.")
    if which == DEMO_MODEL:
        return ModelSpec(DEMO_MODEL, device=device, precision=precision)
    spec = demo_spec(which)
    if not demo_installed(spec):
        st.info(f"The {DEMO_CHOICES[which]} model is not installed here ('{spec.resolved().checkpoint}' is missing).")
        return None
    return replace(spec, device=device, precision=precision)


def images_form() -> ImagesChoice | None:
    """The chosen images (None until complete)."""
    kind = st.radio("Images", DATA_KINDS, key="load_data_kind", horizontal=True)
    if kind == DATA_KINDS[0]:
        return ImagesChoice("demo")
    if kind == DATA_KINDS[1]:
        roots = ", ".join(str(r) for r in default_allowed_roots())
        folder = st.text_input("Folder with class sub-folders or a metadata.csv", key="load_folder",
                               help=f"Must lie below one of: {roots} (REFINECLIP_ALLOWED_ROOTS, when set, replaces this list).")
        choice = ImagesChoice("folder", folder=folder) if folder.strip() else None
    else:
        up = uploader("Zip of class folders or of images + metadata.csv", type=["zip"], key="load_zip")
        choice = ImagesChoice("zip", zip_data=up.getvalue(), zip_name=up.name) if up is not None else None
    meta = uploader("Optional metadata CSV (path,label[,group,split] or WILDS img_filename,y,split,place; "
                            "paths relative to the folder)", type=["csv"], key="load_meta")
    if choice is not None and meta is not None:
        return ImagesChoice(choice.kind, choice.folder, choice.zip_data, choice.zip_name, (meta.name, meta.getvalue()))
    return choice


def extraction_options() -> tuple[bool, str]:
    """``(exact decoding, storage)`` of an extraction (``refineclip extract --exact-decode --store``)."""
    c = st.columns(2)
    exact = c[0].checkbox("Decode every JPEG pixel", key="load_exact_decode",
                          help="Off (default): camera-sized JPEGs decode at a reduced scale, still at least twice the "
                               "model's input size, before the model's own resize and crop; several times faster, "
                               "embeddings agree to a cosine of ~0.999 (benchmarks/RESULTS.md).")
    store = c[1].selectbox("Store head contributions as", ["auto", "fp16"], key="load_store",
                           format_func={"auto": "float32 (exact)", "fp16": "float16 (half the disk)"}.get,
                           help="float16 halves the cache; the decomposition then holds to ~1e-3 instead of ~1e-6.")
    return exact, store


def uploader(label: str, **kwargs):
    """``st.file_uploader`` whose label states the server's real per-file limit (``server.maxUploadSize``):
    Streamlit's own line rounds 512 MB up to "1GB" (its formatter moves to the next unit above half of
    it, with no decimals), so that line is hidden (app.py) and the label says it instead."""
    limit = int(st.get_option("server.maxUploadSize"))
    return st.file_uploader(f"{label} — at most {limit:,} MB per file", **kwargs)


def cache_form() -> str | None:
    """A feature cache folder on the server (checked to lie below an allowed root), or None."""
    roots = ", ".join(str(r) for r in default_allowed_roots())
    folder = st.text_input("Feature cache folder (it holds manifest.json; opened read-only)", key="load_cache_folder",
                           help=f"Must lie below one of: {roots} (REFINECLIP_ALLOWED_ROOTS, when set, replaces this list). Several "
                                f"servers can open the same folder at once; nothing is written into it.")
    return str(allowed_path(folder, confinement().folders)) if folder.strip() else None  # its own caches too


def edit_form(seed: int, disabled: bool, diagnosis=None,
              groups: tuple[str, ...] = ()) -> tuple[EditConfig, bool, GuardConfig] | None:
    """The Refine page's settings (defaults: :data:`DEFAULT_EDIT`, the guard's :data:`MAX_DROP`);
    ``(config, baselines, guard)`` once submitted.
    The concepts ``diagnosis`` names are prefilled as the concept to remove (off until confirmed); the typed
    text of the two LTC rows (:func:`peers_box`, over the data's ``groups``) is never prefilled.

    The exported edit is chosen outside the form so the settings follow it at once: the chosen kind's
    settings are shown, the other kind's sit in a closed expander (they only shape its baseline row)."""
    fit_d, paper_d, con_d = DEFAULT_EDIT.fit, DEFAULT_EDIT.paper, DEFAULT_EDIT.concept
    prefill = ", ".join(" / ".join(c) for c in diagnosed_concepts(diagnosis, con_d.words)) if diagnosis else ""
    concept_text, remove, versus = prefill, False, ""     # concept removal is part of RefineCLIP-fit only
    method = st.radio("Exported edit", EXPORT_KINDS, horizontal=True, key="ref_method",
                      index=EXPORT_KINDS.index(DEFAULT_EDIT.method),
                      format_func=lambda m: {"fit": "RefineCLIP-fit (default)", "paper": "the paper's phase 2"}[m])
    with st.form("ref_form"):
        c = st.columns([3, 1])
        other = c[0].expander("Settings of the paper's phase 2 (only its baseline row uses them)" if method == "fit"
                              else "Settings of RefineCLIP-fit (only its baseline row uses them)", expanded=False)
        fit_box, paper_box = (c[0], other) if method == "fit" else (other, c[0])
        with fit_box:
            f = st.columns(4)
            ridge = f[0].number_input("Ridge (fit)", 0.0, 10.0, fit_d.ridge, format="%g", key="ref_ridge")
            fit_steps = f[1].number_input("KL steps (fit)", 0, 20_000, fit_d.steps, step=50, key="ref_fit_steps")
            strength = f[2].number_input("Strength (fit)", 0.05, 1.0, fit_d.strength, step=0.05, format="%.2f",
                                         key="ref_strength",
                                         help="The share of the heads' removal the edit applies (1: all of it). Less "
                                              "spares the groups the shortcut helped; more fixes the worst group more.")
            if method == "fit":
                k = st.columns([2.6, 1.3, 1.3])
                concept_text = k[0].text_input(
                    "Concept to remove (comma-separated)", prefill, key="ref_concept",
                    help="Prefilled with what the diagnosis names; words joined by '/' are one concept. Its text "
                         "directions (through the class prompts' templates) are projected out of the ablated "
                         "embeddings the edit learns from; the results compare the edit with and without it.")
                remove = k[1].toggle("Remove it too", con_d.active, key="ref_concept_on",
                                     help="Confirm the concept (or type your own) and the exported edit also "
                                          "removes it. It raises the worst group further and moves more of the "
                                          "groups the concept helped (on the demo benchmark, not your data: "
                                          "landbirds on land −7.9 points against −3.8 without it); the guard "
                                          "below lists every group.")
                versus = k[2].text_input("versus (optional)", ", ".join(con_d.versus), key="ref_concept_versus",
                                         help="What the concept is taken against (e.g. 'land' for 'water'); empty: "
                                              "the concepts' own mean (a single word: the class texts').")
        with paper_box:
            p = st.columns(4)
            strategy = p[0].radio("Map (paper)", STRATEGIES, key="ref_strategy", horizontal=True,
                                  index=STRATEGIES.index(paper_d.strategy),
                                  help="diag: θ ∈ R^d (the paper); full: a d×d matrix; lora: identity + rank-r update.")
            rank = p[0].number_input("LoRA rank (lora only)", 1, 256, paper_d.rank, key="ref_rank")
            success_w = p[1].number_input("Success weight (paper)", 0.0, 1e7, paper_d.success_weight, step=1000.0,
                                          format="%g", key="ref_success_weight",
                                          help="The paper's α: weight of L_success (Eq. 11) in Eq. 13.")
            locality_w = p[1].number_input("Locality weight (paper)", 0.0, 1e7, paper_d.locality_weight, step=10.0,
                                           format="%g", key="ref_locality_weight",
                                           help="The paper's β: weight of L_locality (Eq. 12) in Eq. 13.")
            steps = p[2].number_input("Steps (paper)", 1, 20_000, paper_d.steps, step=100, key="ref_steps")
        with c[0]:
            typed = peers_box(groups)
        seed = c[1].number_input("Seed", 0, 1_000_000, seed, key="ref_seed")
        max_drop = c[1].slider("Acceptable drop (points)", 1, 20, round(100 * MAX_DROP), key="ref_max_drop",
                               help="The guard verifies the edit only when no group or class can have lost more "
                                    "than this (at 95%, all bounds together) and the worst group's gain is above "
                                    "zero (refineclip refine --max-drop).")
        baselines = c[1].checkbox("Then compare", True, key="ref_baselines",
                                  help="After the exported edit (its verdict and downloads come first), fit in the "
                                       "background the other kind of edit, standard fine-tuning (cross-entropy only), "
                                       "Tip-Adapter, CoOp prompt learning, the two LTC rows (with their typed text) and "
                                       "the concept row, for comparison; "
                                       "each fills its row in as it finishes, and can be cancelled.")
        if not st.form_submit_button(RUN_LABELS[method], type="primary", disabled=disabled):
            return None
    try:
        peers = PeersConfig(split_phrases(typed[0]), split_phrases(typed[1]), parse_accept_pairs(typed[2]),
                            tuple(typed[3]))
    except RefineClipError as exc:   # one sentence, the form's values kept for the user to correct
        st.error(str(exc))
        return None
    texts = split_phrases(concept_text) if remove and method == "fit" else ()
    if texts and concept_text.strip() == prefill:          # the diagnosis' own words: recorded as "diagnosed"
        texts = (DIAGNOSED,)
    concept = ConceptConfig(texts, split_phrases(versus), con_d.words, con_d.strength)
    cfg = EditConfig(method, FitConfig(ridge=float(ridge), steps=int(fit_steps), lr=fit_d.lr,
                                       max_rows=fit_d.max_rows, seed=int(seed), strength=float(strength)),
                     PaperConfig(strategy=strategy, success_weight=float(success_w), locality_weight=float(locality_w),
                                  steps=int(steps),
                                  lr=paper_d.lr, seed=int(seed), rank=int(rank), weight_ce=paper_d.weight_ce),
                     concept, peers=peers)
    return cfg, bool(baselines), GuardConfig(max_drop=int(max_drop) / 100)


def peers_box(groups: tuple[str, ...]) -> tuple[str, str, str, list[str]]:
    """The typed text of the LTC rows, as typed (``refineclip refine --cue --cue-versus --ltc-pair
    --ltc-minority``): cue, versus, attribute pair lines, minority groups. Nothing prefilled: the
    placeholders are the demo's examples, the user's words are never guessed."""
    with st.expander("Typed text for the LTC rows (optional)", expanded=False):
        st.caption("Empty: the rows 'head search + typed-cue projection' and 'LTC (as released)' are left out.")
        k = st.columns(2)
        cue = k[0].text_input("Cue (comma-separated)", key="ref_cue", placeholder="a water background, a water scene",
                              help="The spurious attribute the typed-cue projection projects off.")
        versus = k[1].text_input("versus (comma-separated)", key="ref_cue_versus",
                                 placeholder="a land background, a land scene",
                                 help="What the cue is taken against; both are needed for that row.")
        pairs = st.text_area("LTC attribute pairs (one per line: text for class A | text for class B)",
                             key="ref_ltc_pairs", height=90,
                             placeholder="a bird with webbed feet | a bird with thin toes\n"
                                         "a bird with short legs | a bird with long legs",
                             help="True differences between the two classes (the paper has a language model "
                                  "write them); LTC's accept step adds their directions to its salient heads.")
        minority = st.multiselect("Minority groups LTC locates on (optional)", list(groups), key="ref_ltc_minority",
                                  disabled=not groups,
                                  help="Empty: the groups of each class that zero-shot gets wrong more often "
                                       "among the labelled images.")
    return cue, versus, pairs, minority


def split_phrases(text: str) -> tuple[str, ...]:
    """Comma-separated phrases, stripped, empty ones dropped."""
    return tuple(p.strip() for p in text.split(",") if p.strip())

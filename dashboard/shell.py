"""What every page shares: the sidebar summary and the automatic demo on first visit."""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

from refineclip_core.loading.models import DEMO_MAP_MODEL, DEMO_MODEL, DEMO_MODELS, ModelSpec
from refineclip_core.method.protocol import PairSpec

from .jobs import job_panel, start_job
from .state import Key, ablate_heads, get, get_source, inspect_head, protocol, put, set_source
from .widgets import plain, show_exception


DEMO_DIR_ENV = "REFINECLIP_DEMO_MODEL_DIR"
#: ... and of the SigLIP-shaped demo model (``ModelSpec("demo-map")``), e.g. a retrained one.
DEMO_MAP_DIR_ENV = "REFINECLIP_DEMO_MAP_DIR"
#: Images per bird group (and per other class) in each split of the held-out demo sample.
DEMO_N_ENV = "REFINECLIP_DEMO_N"


def app_icon():
    """A small favicon drawn locally (a material-symbol icon would be fetched from the internet)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    d.rounded_rectangle((2, 2, 62, 62), radius=14, fill=(255, 75, 75, 255))
    for i, x in enumerate((14, 32, 50)):
        for j, y in enumerate((14, 32, 50)):
            d.rectangle((x - 7, y - 7, x + 7, y + 7), fill=(255, 255, 255, 255 if (i + j) % 2 else 150))
    return img


def demo_spec(which: str = DEMO_MODEL) -> ModelSpec:
    """The embedded demo model ``which`` (``demo``: ``assets/demo``; ``demo-map``, the SigLIP-shaped one:
    ``assets/demo_siglip``), or the folder named by ``$REFINECLIP_DEMO_MODEL_DIR`` (``$REFINECLIP_DEMO_MAP_DIR``)
    (a retrained demo, or a test's stand-in)."""
    folder = os.environ.get(DEMO_MAP_DIR_ENV if which == DEMO_MAP_MODEL else DEMO_DIR_ENV)
    if folder:
        name = DEMO_MODELS[which][1]
        return ModelSpec(which, checkpoint=str(Path(folder) / f"{name}.safetensors"),
                         model_config=str(Path(folder) / f"{name}.json"))
    return ModelSpec(which)


def demo_available(spec: ModelSpec) -> bool:
    from refineclip_core.session.demo import demo_installed

    return demo_installed(spec)


def start_demo_job(spec: ModelSpec | None = None) -> None:
    """Prepare the demo (images once, then extraction, resumable) in the background: the default demo
    model, or ``spec`` (the other embedded demo model)."""
    from refineclip_core.session.demo import DEMO_N_PER_GROUP, prepare_demo

    from . import resources

    spec = spec or demo_spec()
    loaded = resources.model(spec.key())
    text = os.environ.get(DEMO_N_ENV, "").strip()
    n = int(text) if text.isdigit() and 0 < int(text) <= DEMO_N_PER_GROUP else DEMO_N_PER_GROUP
    put(Key.DEMO_JOB, start_job(
        "Preparing the embedded demo",
        lambda progress, cancelled: prepare_demo(loaded=loaded, progress=progress, cancel=cancelled, spec=spec,
                                                 n_per_group=n)))


def ensure_source() -> None:
    """With nothing loaded, open on the embedded demo (prepared automatically, with progress)."""
    if get_source() is not None:
        return
    job = get(Key.DEMO_JOB)
    if job is None:
        spec = demo_spec()
        if not demo_available(spec):
            st.warning("The embedded demo model is not installed (assets/demo is missing), so nothing is loaded "
                       "yet. Choose a model and images on the Load page.", icon=":material/inventory_2:")
            return
        try:
            start_demo_job()
        except Exception as exc:
            show_exception(exc, "Loading the demo model")
            return
        job = get(Key.DEMO_JOB)
    if job.handled:
        return
    st.markdown("#### Welcome to RefineCLIP Studio")
    st.caption("First visit: drawing a held-out sample of the demo world and extracting every attention head's "
               "contribution (this happens once; later visits reuse the cache).")

    def done(finished) -> None:
        set_source(finished.result)
        st.rerun()

    job_panel(job, "Preparing the embedded demo model and its held-out images", cancel_key="demo_cancel",
              what="Preparing the demo", on_done=done,
              cancelled_note="Open the Load page to prepare the demo again or to choose other data.")


def sidebar() -> None:
    """The sidebar's summary of the session (it runs outside the page's error handling: a failure
    here is one line, never Streamlit's error screen on every page)."""
    with st.sidebar:
        try:
            _sidebar()
        except Exception as exc:
            show_exception(exc, "The sidebar")


def _sidebar() -> None:
    st.markdown("### RefineCLIP Studio")
    src = get_source()
    if src is None:
        st.caption("Nothing loaded yet.")
        return
    st.caption(plain(src.label))
    pair = PairSpec.parse(protocol().pair)
    if not pair.automatic:
        st.caption(f"Error pair: **{plain(pair.label())}**")
    head = inspect_head()
    if head is not None:
        st.caption(f"Inspecting head **{head}**")
    heads = ablate_heads()
    if heads:
        st.caption("Head set: " + ", ".join(map(str, heads)))

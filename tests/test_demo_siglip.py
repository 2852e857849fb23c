"""The SigLIP-shaped demo model (``assets/demo_siglip``, ``ModelSpec("demo-map")``; issue 34 item 4): it
loads, decomposes exactly, its exported edit is reproduced by plain open_clip, the dashboard's Load page
offers it beside the CLIP-shaped demo, and its model card is the one ``scripts/model_card.py`` renders.

The model tests run on the committed model; they are skipped, saying so, only while its files are not in
``assets/demo_siglip`` (``$REFINECLIP_DEMO_MAP_DIR`` names another folder, e.g. a retrained model).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from refineclip_core.loading.models import DEMO_MAP_DIR, DEMO_MAP_MODEL, DEMO_MAP_MODEL_NAME, ModelSpec

ROOT = Path(__file__).resolve().parent.parent
MAP_DIR = Path(os.environ.get("REFINECLIP_DEMO_MAP_DIR") or DEMO_MAP_DIR)
WEIGHTS, CONFIG = MAP_DIR / f"{DEMO_MAP_MODEL_NAME}.safetensors", MAP_DIR / f"{DEMO_MAP_MODEL_NAME}.json"
N_PER_GROUP = 12          # val and test images per bird group and per unrelated class (10 labelled per class fit)
needs_model = pytest.mark.skipif(not (WEIGHTS.is_file() and CONFIG.is_file()),
                                 reason=f"the SigLIP-shaped demo model is not in {MAP_DIR} yet ({WEIGHTS.name} "
                                        f"and {CONFIG.name}: python -m refineclip_core.demo.train --recipe siglip)")


def _spec() -> ModelSpec:
    if MAP_DIR.resolve() == DEMO_MAP_DIR.resolve():
        return ModelSpec(DEMO_MAP_MODEL)
    return ModelSpec(DEMO_MAP_MODEL, checkpoint=str(WEIGHTS), model_config=str(CONFIG))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The SigLIP-shaped demo on a small held-out sample of the demo world, extracted as the dashboard does."""
    from refineclip_core.loading.models import load_model
    from refineclip_core.session.demo import prepare_demo

    spec = _spec()
    loaded = load_model(spec)
    src = prepare_demo(tmp_path_factory.mktemp("home"), loaded=loaded, spec=spec, n_per_group=N_PER_GROUP)
    return spec, loaded, src


@needs_model
def test_the_siglip_shaped_demo_is_map_pooled_and_decomposes_exactly(prepared):
    from refineclip_core.features.backends import backend_for
    from refineclip_core.features.cache import FeatureCache
    from refineclip_core.features.extraction import check_decomposition

    spec, loaded, src = prepared
    info = backend_for(loaded.model.visual).info
    assert info.pool == "map" and type(loaded.model.visual).__name__ == "TimmModel"
    assert loaded.model.logit_bias is not None                       # trained with the sigmoid loss
    cache = FeatureCache(src.cache_dir)
    assert "Embedded SigLIP-shaped demo model" in src.label and src.is_demo
    assert "pool_mlp" in cache.manifest.remainder_names               # the pool's MLP branch: its own term
    # parts (every head of the scope + remainders) sum to a fresh encode_image, in float32
    assert check_decomposition(loaded, cache, max_images=40)["max_rel_error"] < 1e-5


@needs_model
def test_an_edit_of_the_siglip_shaped_demo_exports_a_checkpoint_plain_open_clip_reproduces(prepared, tmp_path):
    import open_clip

    from refineclip_core.edit.run import run_edit
    from refineclip_core.features.cache import FeatureCache
    from refineclip_core.features.extraction import load_batch, relative_error
    from refineclip_core.method.protocol import DEFAULT_PROTOCOL, identify, make_engine

    spec, loaded, src = prepared
    cache = FeatureCache(src.cache_dir)
    engine = make_engine(cache)
    ident = identify(cache, DEFAULT_PROTOCOL, engine)
    run = run_edit(cache, ident, engine, spec=spec, loaded=loaded, export_to=tmp_path / "edited.safetensors",
                   baselines=False)
    out = Path(run.checkpoint)
    config = json.loads(out.with_suffix(".json").read_text())      # a projection was added after the pool:
    assert config["vision_cfg"]["timm_proj"] is None and config["vision_cfg"]["timm_pool"] == "map"   # trunk.head
    open_clip.add_model_config(str(out.with_suffix(".json")))
    plain = open_clip.create_model(out.stem, pretrained=str(out)).eval()
    rows = ident.eval_rows[:24]
    batch, keep, bad = load_batch(loaded, [cache.records[int(r)] for r in rows], 0,
                                  min_side=cache.manifest.decode_min_side)
    assert not bad
    with torch.inference_mode():
        got = plain.encode_image(batch).double().numpy()
    edited = run.outcome.refinement.refined.apply(cache.embeddings[rows[keep]])
    assert relative_error(got, edited).max() < 1e-5
    assert not np.allclose(edited, cache.embeddings[rows[keep]], atol=1e-4)   # the edit changed something
    # the run report (JSON, HTML) and the CLI name the layers the edit went into, and only those changed
    from safetensors.torch import load_file

    from refineclip_core.reporting.run_report import render_html

    named = run.report.checkpoint.merged_into
    assert named == "visual.trunk.head.weight + visual.trunk.head.bias, added after the pool (every other weight unchanged)"
    assert named in render_html(run.report)
    source, edited_state = load_file(str(WEIGHTS)), load_file(str(out))
    assert set(edited_state) - set(source) == {"visual.trunk.head.weight", "visual.trunk.head.bias"}
    assert all(torch.equal(edited_state[k].to(source[k].dtype), source[k]) for k in source)


@needs_model
@pytest.mark.slow
def test_the_load_page_offers_the_siglip_shaped_demo_beside_the_default(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("REFINECLIP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("REFINECLIP_ALLOWED_ROOTS", str(tmp_path))
    monkeypatch.setenv("REFINECLIP_DEMO_N", "4")
    if MAP_DIR.resolve() != DEMO_MAP_DIR.resolve():    # another folder: copied inside the allowed folders
        import shutil

        shutil.copytree(MAP_DIR, tmp_path / "demo-map")
        monkeypatch.setenv("REFINECLIP_DEMO_MAP_DIR", str(tmp_path / "demo-map"))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.run()                                                          # the first visit opens on the default demo
    assert not at.exception, [e.value for e in at.exception]
    default = at.session_state["source"]
    assert default.spec.name == "demo"                                # the CLIP-shaped demo stays the default
    choice = at.radio(key="load_demo_model")                          # the Load page is the first page
    assert choice.value == "demo" and choice.options == ["demo (CLIP-shaped, class token)",
                                                         "demo (SigLIP-shaped, map pooling)"]
    choice.set_value("demo-map").run()
    assert not at.exception and not at.error, [e.value for e in (*at.exception, *at.error)]
    at.button(key="load_demo_btn").click().run()
    assert not at.exception and not at.error, [e.value for e in (*at.exception, *at.error)]
    job = at.session_state["demo_job"]                                # prepared in the background, as the first visit
    job._thread.join(timeout=600)
    assert job.finished and job.error is None, job.error
    src = job.result
    assert src.spec.name == "demo-map" and src.is_demo and src.cache_dir != default.cache_dir
    assert "SigLIP-shaped" in src.label and Path(src.data_root) == Path(default.data_root)   # same images


def test_the_model_card_is_rendered_from_the_files():
    """assets/demo_siglip/README.md is what scripts/model_card.py writes from metadata.json and RESULTS.md
    (no number typed by hand); run ``python scripts/model_card.py`` after retraining or re-benchmarking."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("model_card", ROOT / "scripts" / "model_card.py")
    card = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(card)
    written = (DEMO_MAP_DIR / "README.md").read_text(encoding="utf-8")
    assert written == card.render(DEMO_MAP_DIR), "assets/demo_siglip/README.md is out of date: python scripts/model_card.py"
    if (DEMO_MAP_DIR / "metadata.json").is_file():
        meta = json.loads((DEMO_MAP_DIR / "metadata.json").read_text())
        worst = meta["test"]["metrics"]["worst_group"]
        assert f"| average group / worst group | {100 * meta['test']['metrics']['avg_group']:.1f}% / " \
               f"{100 * worst:.1f}% |" in written

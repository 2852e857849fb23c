"""Shared, read-only resources behind ``st.cache_resource``: loaded models, opened feature
caches, ablation engines, identifications, findings, text-pool embeddings and head descriptions.

Everything is keyed by strings (a model spec's JSON, a cache folder and its fingerprint, a
:class:`~refineclip_core.session.source.Source` key), so reruns, page switches and other browser sessions
on the same data reuse the same objects. Arguments starting with ``_`` are not hashed.
Nothing returned here may be mutated by a page.
"""

from __future__ import annotations

import json

import numpy as np
import streamlit as st

from refineclip_core.features.cache import FeatureCache
from refineclip_core.features.decomposition import HeadId
from refineclip_core.features.zeroshot import prediction_confidence
from refineclip_core.inspection.diagnosis import (ConceptVocabulary, Diagnosis, HeadEvidence, concept_vocabulary,
                                                  diagnose, head_evidence)
from refineclip_core.inspection.textspan import DEFAULT_TEXT_POOL, HeadDescription, describe_heads, embedded_text_pool
from refineclip_core.loading.confine import current
from refineclip_core.loading.models import LoadedModel, ModelSpec, load_model
from refineclip_core.method.ablation import AblationEngine
from refineclip_core.method.protocol import Identification, ProtocolConfig, identify, make_engine
from refineclip_core.session.caches import with_prompts

from refineclip_core.session.source import Source

TEXT_POOL = DEFAULT_TEXT_POOL


def protocol_key(cfg: ProtocolConfig) -> str:
    """A protocol as a cache key (the same settings give the same key)."""
    return json.dumps(cfg.to_dict(), sort_keys=True)


@st.cache_resource(show_spinner="Loading the model…", max_entries=4)
def model(spec_json: str) -> LoadedModel:
    return load_model(ModelSpec.from_key(spec_json))


@st.cache_resource(show_spinner=False, max_entries=16)
def _feature_cache(key: str, cache_dir: str, _spec_json: str, classes: tuple | None,
                   templates: tuple | None) -> FeatureCache:
    cache = FeatureCache(cache_dir)
    needs_text = (classes is not None and list(classes) != cache.classes) or (
        templates is not None and list(templates) != list(cache.manifest.templates))
    loaded = model(_spec_json) if needs_text else None    # the first opener's model (its folders checked)
    return with_prompts(cache, loaded, classes, templates)


def feature_cache(source: Source) -> FeatureCache:
    """The source's cache with its prompts (re-opened when the folder is re-extracted; one per
    :meth:`~refineclip_core.session.source.Source.resource_key`, shared by the sessions on it)."""
    return _feature_cache(source.resource_key(), source.cache_dir, source.spec_json, source.classes, source.templates)


@st.cache_resource(show_spinner=False, max_entries=8)
def _engine(key: str, _cache: FeatureCache) -> AblationEngine:
    return make_engine(_cache)


def engine(source: Source, cache: FeatureCache) -> AblationEngine:
    """One :class:`AblationEngine` per cache and prompts (built once, shared read-only)."""
    return _engine(source.resource_key(), cache)


@st.cache_resource(show_spinner="Scoring every head (DE_A..DE_D) and running Alg. 1…", max_entries=64)
def _identification(key: str, protocol_json: str, _cache: FeatureCache, _engine: AblationEngine) -> Identification:
    return identify(_cache, ProtocolConfig(**json.loads(protocol_json)), _engine)


def identification(source: Source, cache: FeatureCache, eng: AblationEngine, cfg: ProtocolConfig) -> Identification:
    return _identification(source.resource_key(), protocol_key(cfg), cache, eng)


@st.cache_resource(show_spinner=False, max_entries=8)
def _zero_shot(key: str, _cache: FeatureCache, _engine: AblationEngine) -> tuple[np.ndarray, np.ndarray]:
    pred = _engine.base_predictions   # the predictions every page uses (Heads, Ablate, Refine: one way)
    return pred, prediction_confidence(_cache.embeddings, _cache.text, _cache.scoring, pred)


def zero_shot(source: Source, cache: FeatureCache, eng: AblationEngine) -> tuple[np.ndarray, np.ndarray]:
    """Zero-shot predictions (the engine's) and each image's confidence in its prediction (the model's own
    scoring: CLIP's softmax of logit_scale·cos, SigLIP's sigmoid with its bias), one number per image."""
    return _zero_shot(source.resource_key(), cache, eng)


@st.cache_resource(show_spinner="Embedding the description pool for TextSpan…", max_entries=4)
def text_pool(spec_json: str, pool_path: str = str(TEXT_POOL)) -> tuple[list[str], np.ndarray]:
    return embedded_text_pool(model(spec_json), pool_path)


@st.cache_resource(show_spinner="Grouping the description pool into concepts…", max_entries=4)
def vocabulary(spec_json: str) -> ConceptVocabulary:
    """The text pool's word concepts (:func:`~refineclip_core.inspection.diagnosis.concept_vocabulary`)."""
    texts, emb = text_pool(spec_json)
    return concept_vocabulary(texts, emb)


@st.cache_resource(show_spinner="Naming what the removed heads carry…", max_entries=64)
def _diagnosis(key: str, protocol_json: str, heads: tuple | None, spec_json: str, _cache: FeatureCache,
               _ident: Identification, _engine: AblationEngine) -> Diagnosis:
    return diagnose(_cache, _ident, vocabulary(spec_json), None if heads is None else [HeadId(*h) for h in heads],
                    _engine)


def diagnosis(source: Source, cache: FeatureCache, eng: AblationEngine, ident: Identification,
              heads: list[HeadId] | None = None) -> Diagnosis:
    """The diagnosis of ``heads`` (default: the identification's, or the ranking's top heads when it
    chose none, as ``refineclip explain`` does) for the identification's pairs."""
    hs = None if heads is None else tuple((h.layer, h.head) for h in heads)
    return _diagnosis(source.resource_key(), protocol_key(ident.config), hs,
                      source.spec_json, cache, ident, eng)


@st.cache_resource(show_spinner="Relating the head to the diagnosis…", max_entries=256)
def _head_evidence(key: str, protocol_json: str, layer: int, head: int, spec_json: str, _cache: FeatureCache,
                   _ident: Identification, _engine: AblationEngine) -> HeadEvidence:
    diag = _diagnosis(key, protocol_json, None, spec_json, _cache, _ident, _engine)
    return head_evidence(_cache, diag, _engine, HeadId(layer, head), _ident.target_classes)


def evidence(source: Source, cache: FeatureCache, eng: AblationEngine, ident: Identification,
             head: HeadId) -> HeadEvidence:
    """What ``head`` has to do with the identification's diagnosis (computed once per head)."""
    return _head_evidence(source.resource_key(), protocol_key(ident.config), head.layer,
                          head.head, source.spec_json, cache, ident, eng)


@st.cache_resource(show_spinner="Describing the head…", max_entries=256)
def _description(key: str, layer: int, head: int, k: int, spec_json: str, _cache: FeatureCache) -> HeadDescription:
    texts, emb = text_pool(spec_json)
    return describe_heads(_cache, [HeadId(layer, head)], texts, emb, k=k)[0]


def head_description(source: Source, cache: FeatureCache, head: HeadId, k: int) -> HeadDescription:
    """The TextSpan description of ``head`` over the cached images (a seeded sample of
    :data:`~refineclip_core.inspection.textspan.MAX_IMAGES` beyond that many; keyed by the cache's current
    fingerprint: re-extracting the folder in place never shows a stale description)."""
    return _description(source.resource_key(), head.layer, head.head, int(k), source.spec_json, cache)


@st.cache_resource(show_spinner=False, max_entries=1)
def open_clip_models() -> list[str]:
    import open_clip

    return sorted(open_clip.list_models())


def thumbnail(path: bytes, size: int = 144) -> bytes | None:
    """A PNG thumbnail (nearest-neighbour upscaled for tiny images), or None if unreadable (or if the
    file opened lies outside the confinement in force). ``path`` is the real file name as bytes
    (``os.fsencode``): a name that is not UTF-8 cannot be a cache key as text."""
    return _thumbnail(path, size, current().folders)


@st.cache_data(show_spinner=False, max_entries=2000)
def _thumbnail(path: bytes, size: int, confinement_key: tuple[str, ...] | None) -> bytes | None:
    """:func:`thumbnail`, kept per confinement (``confinement_key``: its folders): never served to a
    session whose folders differ."""
    import io
    import os

    from PIL import Image

    from refineclip_core.errors import ImageLoadError
    from refineclip_core.loading.decode import load_image

    def shrink(img: Image.Image) -> Image.Image:
        scale = size / max(img.size)
        resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS
        return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), resample)

    try:  # a camera JPEG decodes at a reduced scale; the resize runs inside the decoding budget
        img = load_image(os.fsdecode(path), min_side=size, transform=shrink)
    except (ImageLoadError, OSError):
        return None
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@st.cache_resource(show_spinner=False, max_entries=32)
def _findings(key: str, protocol_json: str, _cache: FeatureCache, _ident: Identification, _engine: AblationEngine):
    from refineclip_core.reporting.findings import findings

    return findings(_cache, _ident, _engine)


def findings(source: Source, cache: FeatureCache, eng: AblationEngine, ident: Identification):
    """The headline numbers of :func:`refineclip_core.reporting.findings.findings` (computed once)."""
    return _findings(source.resource_key(), protocol_key(ident.config), cache, ident, eng)


@st.cache_resource(show_spinner=False, max_entries=512)
def _score_map(values: tuple, layers: tuple, name: str, descending: bool, chosen: tuple, selected: tuple | None,
               n_heads: int, chosen_by: str):
    from refineclip_core.reporting.figures import score_grid_figure

    return score_grid_figure(np.asarray(values, dtype=np.float64), list(layers), name, descending,
                             chosen=[HeadId(*h) for h in chosen], selected=None if selected is None else HeadId(*selected),
                             n_heads=n_heads, chosen_by=chosen_by)


def score_map(values, layers, name: str, descending: bool, chosen, selected, n_heads: int, chosen_by: str):
    """:func:`~refineclip_core.reporting.figures.score_grid_figure`, built once per distinct input: Plotly's
    validation of a figure takes about 0.1 s, seven maps a page; a click on a square only changes the gold
    border of one map's figure. Read-only (``st.plotly_chart`` copies it)."""
    return _score_map(tuple(map(tuple, np.asarray(values, dtype=np.float64).tolist())), tuple(int(l) for l in layers),
                      name, bool(descending), tuple((h.layer, h.head) for h in chosen),
                      None if selected is None else (selected.layer, selected.head), int(n_heads), chosen_by)


@st.cache_resource(show_spinner=False, max_entries=64)
def _utility(curves: tuple, baseline, score, t: int, candidates: tuple):
    from refineclip_core.reporting.figures import utility_figure

    return utility_figure({k: list(v) for k, v in curves}, baseline, score, t,
                          {k: [HeadId(*h) for h in v] for k, v in candidates})


def utility_chart(curves, baseline, score, t: int, candidates):
    """:func:`~refineclip_core.reporting.figures.utility_figure`, built once per selection (read-only)."""
    return _utility(tuple((k, tuple(float(x) for x in v)) for k, v in curves.items()), baseline, score, int(t),
                    tuple((k, tuple((HeadId.of(h).layer, HeadId.of(h).head) for h in v))
                          for k, v in (candidates or {}).items()))


@st.cache_resource(show_spinner=False, max_entries=64)
def _gradcam(key: str, rows: tuple, target: int, heads: tuple, confinement_key: tuple | None, _loaded: LoadedModel,
             _cache: FeatureCache):
    from refineclip_core.inspection.gradcam import gradcam_panels

    return gradcam_panels(_loaded, _cache.records, list(rows), target, _cache.text, [HeadId(*h) for h in heads])


def gradcam(source: Source, cache: FeatureCache, loaded: LoadedModel, rows, target: int, heads):
    """Grad-CAM panels of ``heads`` (and the whole model) on cache ``rows`` (images read under the
    confinement in force), computed once per images, class, head set and confinement for every session on
    the same cache (a repeated click, a page revisit: no new passes)."""
    return _gradcam(source.resource_key(), tuple(int(r) for r in rows), int(target),
                    tuple((h.layer, h.head) for h in heads), current().folders, loaded, cache)

"""The caches of an interactive session: one folder per (model, data, layer scope), and prompt edits.

:func:`cache_dir_for` names the cache folder of a combination inside the home folder;
:func:`cache_source` opens a cache extracted elsewhere (``refineclip extract``, a shared folder;
read-only, so several servers can open the same folder at once); :func:`with_prompts` re-embeds the class texts of an opened cache for edited class names or
prompt templates without touching the image features (the expensive part, paper Eq. 4).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from ..errors import CacheError, DataError, RefineClipError
from ..features.cache import FeatureCache
from ..features.cache_format import CacheManifest, read_manifest
from ..home import home_dir
from ..loading.models import MODEL_FINGERPRINT, ModelSpec
from .source import Source

def _short_hash(*parts: object) -> str:
    h = hashlib.sha256(json.dumps([str(p) for p in parts]).encode())
    return h.hexdigest()[:16]


def cache_dir_for(spec: ModelSpec, data_key: str, layers: int | str | Sequence[int],
                  cache_root: str | os.PathLike | None = None) -> Path:
    """The cache folder for a model, a dataset (``data_key``: its root plus anything that
    changes its labels, e.g. a metadata CSV's hash) and a layer scope.

    The extraction itself also checks a fingerprint of model, files and scope and rebuilds a
    stale cache; this key only keeps different combinations in different folders.
    """
    key = _short_hash(spec.fingerprint(), data_key, layers if isinstance(layers, (int, str)) else list(layers))
    return home_dir(cache_root) / "caches" / key


def private_cache_root(spec: ModelSpec, data_root: str | os.PathLike, private_dir: str | os.PathLike | None) -> Path | None:
    """Where a session's cache of ``spec`` on ``data_root`` must go: ``private_dir`` (the session's own
    folder) when the model's files or the images lie in it (an upload), else None (the shared
    home folder: the cache holds nothing another session could not compute from the same folders)."""
    if private_dir is None:
        return None
    own = Path(private_dir).resolve()
    paths = [data_root, spec.checkpoint, spec.model_config, spec.pretrained]
    for path in filter(None, paths):
        try:
            real = Path(path).expanduser().resolve()
        except (OSError, RuntimeError, ValueError):
            continue
        if real == own or own in real.parents:
            return own
    return None


def cache_source(folder: str | os.PathLike) -> Source:
    """The :class:`Source` of a complete cache folder made by ``refineclip extract`` (its model from
    the manifest, loaded only when a page needs it). Nothing is written into the folder.

    Under a confinement (the opening session's, :func:`~refineclip_core.loading.confine.current`) the
    folder must lie inside it and the model is checked by :func:`cache_model` under *that* confinement."""
    from ..loading.confine import current

    if current().confined:
        folder = _inside(folder, "The feature cache folder")
    manifest = read_manifest(folder)
    if manifest is None or not manifest.complete:
        raise CacheError(f"'{folder}' is not a complete feature cache (no finished manifest.json); "
                         "run 'refineclip extract --out' on it first.")
    spec = cache_model(manifest, folder)
    return Source(spec=spec, data_root=manifest.data_root, cache_dir=str(Path(folder)),
                  label=f"{manifest.model_name} on the cache {Path(folder).name} ({manifest.n_records} images)")


def cache_model(manifest: CacheManifest, folder: str | os.PathLike) -> ModelSpec:
    """The model a cache was made with, as the opener may load it: the one way every cache is
    opened (the dashboard's :func:`cache_source`, the CLI's ``refine``/``explain``/``describe``).

    The roots recorded in the manifest (those of the session that made it) are dropped and the
    opener's confinement in force pinned instead (:func:`~refineclip_core.loading.confine.current`: a
    session's; the CLI's, confined when ``REFINECLIP_ALLOWED_ROOTS`` is set), so a manifest never widens
    what the opener may read. Every model source the manifest
    names (the model name, ``local-dir:``/``hf-hub:`` included, checkpoint, config, pretrained file)
    is checked before anything is read (:mod:`~refineclip_core.loading.sources`), then the
    model's fingerprint is compared with the one recorded at extraction: a cache is opened only
    with the model that made it. A confined opener refuses a cache that records none."""
    from ..loading.confine import current
    from ..loading.sources import check_spec_sources

    if not isinstance(manifest.model, dict):
        raise CacheError(f"The manifest of '{folder}' does not describe a model.")
    try:
        spec = ModelSpec(**{**manifest.model, "roots": None})
    except TypeError as exc:
        raise CacheError(f"The manifest of '{folder}' does not describe a model ({exc}).") from exc
    if not all(isinstance(getattr(spec, k), (str, type(None))) for k in ("name", "pretrained", "checkpoint",
                                                                           "model_config")) or not spec.name:
        raise CacheError(f"The manifest of '{folder}' does not describe a model (its fields must be text).")
    spec = replace(spec, roots=current().folders)
    confined = spec.confinement()
    resolved = spec.resolved()
    try:
        with confined.active():
            check_spec_sources(resolved.name, resolved.checkpoint, resolved.model_config, resolved.pretrained,
                               owner="The cache's")
    except RefineClipError as exc:
        raise CacheError(str(exc)) from exc
    recorded = (manifest.extra or {}).get(MODEL_FINGERPRINT) if isinstance(manifest.extra, dict) else None
    if recorded is None:
        if confined.confined:
            raise CacheError(f"The feature cache '{Path(folder).name}' records no fingerprint of the model that "
                             "made it (an older version wrote it), so it cannot be checked; extract it again.")
        return spec
    try:
        actual = spec.fingerprint()
    except OSError as exc:
        raise CacheError(f"The model of the feature cache '{Path(folder).name}' cannot be read "
                         f"({exc.strerror or exc}).") from exc
    if actual != recorded:
        raise CacheError(f"The feature cache '{Path(folder).name}' was made by another model than the one its "
                         "manifest names now (the model's fingerprint differs); it was refused: extract it again "
                         "with this model.")
    return spec


def _inside(path: str | os.PathLike, what: str) -> Path:
    """``path`` resolved, refused unless it lies inside the confinement in force."""
    from ..loading.confine import allowed_path, current

    try:
        return allowed_path(path, current().folders)
    except DataError as exc:
        raise CacheError(f"{what} '{path}' is not one this session may read: it was made by another session or "
                         "lies outside the allowed folders; extract the images again here.") from exc


def with_prompts(cache: FeatureCache, loaded, classes: Sequence[str] | None = None,
                 templates: Sequence[str] | None = None) -> FeatureCache:
    """``cache`` with its class texts ``t_y`` re-embedded for new class names and/or templates.

    The image features (E and every c[l, h]) do not depend on the prompts, so only the
    ``(C, d)`` text matrix changes. Returns ``cache`` itself when nothing changes, otherwise
    a separate :class:`FeatureCache` object over the same folder.
    """
    from ..features.zeroshot import class_text_embeddings, validate_templates
    from ..loading.data import validate_class_names

    new_classes = validate_class_names(classes, len(cache.classes)) if classes is not None else list(cache.classes)
    new_templates = validate_templates(templates) if templates is not None else list(cache.manifest.templates)
    if new_classes == list(cache.classes) and new_templates == list(cache.manifest.templates):
        return cache
    if loaded is None:
        raise RefineClipError("Changing class names or templates needs the model to embed the new prompts.")
    return cache.with_prompts(new_classes, new_templates, class_text_embeddings(loaded, new_classes, new_templates))

"""Data and caches for an interactive session: the embedded demo, user datasets, prompt edits.

The dashboard (and anything else that wants a ready-to-use feature cache without choosing
folders) calls :func:`prepare_demo`: it writes a *held-out*, group-balanced sample of the
procedural demo world (:mod:`refineclip_core.demo.world`, ``val`` and ``test`` splits drawn
with :data:`DEMO_SEED`, a seed the demo model never saw in training) into the studio home
folder once, and extracts its decomposed features (paper Eq. 4) into a cache next to it. Both
steps are resumable and idempotent: the second call costs a directory listing.

The studio home is ``$REFINECLIP_HOME`` or ``~/.cache/refineclip-studio``. Inside it::

    demo-data-s<seed>-n<n>/         images (class folders) + metadata.csv (path,label,group,split)
    caches/<key>/                   feature caches, one per (model, data, layer scope)
    text-pools/                     cached text-pool embeddings (TextSpan)

:func:`with_prompts` re-embeds the class texts of an opened cache for edited class names or
prompt templates without touching the image features (the expensive part).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..errors import DataError, RefineClipError
from ..features.cache import FeatureCache
from ..features.extraction import ExtractionCancelled, ExtractionConfig, extract
from ..loading.data import ImageDataset, load_dataset
from ..loading.models import ModelSpec

HOME_ENV = "REFINECLIP_HOME"
#: Seed of the held-out demo sample. Training used seed 0 (train and val) and 1000 (test).
DEMO_SEED = 2025
#: Images per bird group and per unrelated class in each of the val and test splits.
DEMO_N_PER_GROUP = 40
DEMO_SPLITS = ("val", "test")

#: ``progress(stage, done, total)``: a one-line stage description and a counter.
StageProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class PreparedData:
    """A model, an image folder and the feature cache extracted from them."""

    spec: ModelSpec
    data_dir: Path
    cache_dir: Path
    label: str = ""


def studio_home(cache_root: str | os.PathLike | None = None) -> Path:
    """The folder where the studio keeps generated data and caches (created on demand)."""
    root = Path(cache_root) if cache_root else Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "refineclip-studio")
    root = root.expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def demo_data_dir(cache_root: str | os.PathLike | None = None, seed: int = DEMO_SEED,
                  n_per_group: int = DEMO_N_PER_GROUP) -> Path:
    return studio_home(cache_root) / f"demo-data-s{seed}-n{n_per_group}"


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
    return studio_home(cache_root) / "caches" / key


@contextlib.contextmanager
def folder_lock(path: Path, cancel: Callable[[], bool] | None = None,
                waiting: Callable[[], None] | None = None) -> Iterator[None]:
    """An exclusive advisory lock on ``path/.lock`` (two sessions never extract into one folder
    at once). While another process holds it, ``waiting()`` is called and ``cancel()`` polled."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if cancel is not None and cancel():
                    raise ExtractionCancelled("Cancelled while another session was extracting the same data.")
                if waiting is not None:
                    waiting()
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_demo_data(out_dir: str | os.PathLike, seed: int = DEMO_SEED, n_per_group: int = DEMO_N_PER_GROUP,
                    progress: StageProgress | None = None) -> Path:
    """Write the balanced ``val`` and ``test`` splits of the demo world into one folder.

    Layout: ``<out>/<split>/<class>/<split>_<index>.png`` and one ``<out>/metadata.csv``
    (``path,label,group,split``). Written into a temporary sibling folder and renamed into
    place, so a half-written folder is never used; an existing complete folder is kept.
    """
    from ..demo.world import write_world

    out = Path(out_dir)
    if (out / "metadata.csv").is_file():
        return out
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        rows: list[dict[str, str]] = []
        for i, split in enumerate(DEMO_SPLITS):
            if progress is not None:
                progress(f"Drawing the held-out demo images ({split} split)", i, len(DEMO_SPLITS))
            sub = write_world(tmp / split, split, seed, n_per_group, layout="folder")
            with open(sub / "metadata.csv", newline="", encoding="utf-8") as fh:
                for row in csv.DictReader(fh):
                    rows.append({**row, "path": f"{split}/{row['path']}"})
            (sub / "metadata.csv").unlink()
        with open(tmp / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=["path", "label", "group", "split"])
            writer.writeheader()
            writer.writerows(rows)
        if progress is not None:
            progress("Drawing the held-out demo images", len(DEMO_SPLITS), len(DEMO_SPLITS))
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "metadata.csv").is_file():  # lost a race against a complete folder: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def extract_locked(loaded, dataset: ImageDataset, cache_dir: str | os.PathLike, cfg: ExtractionConfig,
                   progress: StageProgress | None = None, cancel: Callable[[], bool] | None = None) -> FeatureCache:
    """:func:`~refineclip_core.features.extraction.extract` under :func:`folder_lock`, with stage progress."""
    cache_dir = Path(cache_dir)
    total = len(dataset.records)

    def waiting() -> None:
        if progress is not None:
            progress("Waiting for another session that is extracting the same images", 0, total)

    def step(done: int, n: int) -> None:
        if progress is not None:
            progress("Extracting per-head features", done, n)

    with folder_lock(cache_dir, cancel, waiting):
        return extract(loaded, dataset, cache_dir, cfg, progress=step, cancel=cancel)


def prepare_demo(cache_root: str | os.PathLike | None = None, loaded=None, progress: StageProgress | None = None,
                 cancel: Callable[[], bool] | None = None, spec: ModelSpec | None = None, seed: int = DEMO_SEED,
                 n_per_group: int = DEMO_N_PER_GROUP, layers: int | str = 4) -> PreparedData:
    """The embedded demo model on a held-out sample of its world, extracted and ready.

    ``loaded`` may pass the already loaded demo model (the dashboard caches it); otherwise it
    is loaded here. ``spec`` replaces the demo model (tests use a tiny stand-in).
    """
    from ..loading.models import load_model

    spec = spec or ModelSpec("demo")
    data = write_demo_data(demo_data_dir(cache_root, seed, n_per_group), seed, n_per_group, progress)
    if loaded is None:
        if progress is not None:
            progress("Loading the demo model", 0, 1)
        loaded = load_model(spec)
    dataset = load_dataset(data)
    cache_dir = cache_dir_for(spec, str(data), layers, cache_root)
    extract_locked(loaded, dataset, cache_dir, ExtractionConfig(layers=layers), progress, cancel)
    label = f"Embedded demo model on {len(dataset)} held-out demo images (seed {seed})"
    return PreparedData(spec, data, cache_dir, label)


def with_prompts(cache: FeatureCache, loaded, classes: Sequence[str] | None = None,
                 templates: Sequence[str] | None = None) -> FeatureCache:
    """``cache`` with its class texts ``t_y`` re-embedded for new class names and/or templates.

    The image features (E and every c[l, h]) do not depend on the prompts, so only the
    ``(C, d)`` text matrix changes. Returns ``cache`` itself when nothing changes, otherwise
    a separate :class:`FeatureCache` object over the same folder.
    """
    from ..features.zeroshot import class_text_embeddings, validate_templates

    new_classes = [c.strip() for c in classes] if classes is not None else list(cache.classes)
    new_templates = validate_templates(templates) if templates is not None else list(cache.manifest.templates)
    if len(new_classes) != len(cache.classes):
        raise DataError(f"Give {len(cache.classes)} class names (one per class, in order), got {len(new_classes)}.")
    if any(not c for c in new_classes):
        raise DataError("Class names cannot be empty.")
    if len(set(new_classes)) != len(new_classes):
        raise DataError("Class names must be distinct (identical names get identical prompts).")
    if new_classes == list(cache.classes) and new_templates == list(cache.manifest.templates):
        return cache
    if loaded is None:
        raise RefineClipError("Changing class names or templates needs the model to embed the new prompts.")
    fresh = FeatureCache(cache.root)
    fresh.manifest = replace(fresh.manifest, classes=new_classes, templates=new_templates)
    fresh.__dict__["text"] = class_text_embeddings(loaded, new_classes, new_templates)
    return fresh

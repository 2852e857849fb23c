"""The images a session loads: list them (no model needed) and plan their extraction.

What the dashboard's Load page computes between its widgets and the extraction job, and what a
Python caller uses to turn "this folder / this zip / the demo sample, with these class names and
prompts" into a :class:`~refineclip_core.session.source.Source` whose cache is then extracted
(:func:`~refineclip_core.session.locking.extract_locked`; ``refineclip extract`` is the CLI's way).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from ..errors import DataError
from ..features.extraction import ExtractionConfig, Store
from ..features.zeroshot import validate_templates
from ..loading.batches import DecodeConfig
from ..loading.data import ImageDataset, load_dataset, parse_metadata
from ..loading.models import ModelSpec
from ..loading.confine import allowed_path
from ..loading.uploads import unpack_upload
from .caches import cache_dir_for, private_cache_root
from .demo import demo_data_dir, write_demo_data
from .source import Source

ImagesKind = Literal["demo", "folder", "zip"]


@dataclass(frozen=True)
class ScannedImages:
    """A listed dataset, before any model runs on it."""

    dataset: ImageDataset
    data_key: str                                  # root + metadata hash: names its cache folder
    label: str                                     # "folder …", "zip …", "the held-out demo images"
    extra_skipped: tuple[tuple[str, str], ...] = ()  # (path, reason) left out before listing (zip junk)


def scan_images(kind: ImagesKind, *, folder: str | None = None, zip_data: bytes | None = None,
                zip_name: str = "upload.zip", metadata: tuple[str, bytes] | None = None,
                upload_dir: str | os.PathLike | None = None) -> ScannedImages:
    """List the images of the held-out demo sample, a server ``folder`` (it must lie below an
    allowed root) or an uploaded zip (unpacked once into ``upload_dir``), optionally labelled by
    an uploaded ``metadata`` CSV ``(name, bytes)`` whose layout is read from its header.

    The confinement in force (:func:`~refineclip_core.loading.confine.current`, a session's) governs
    every file read, now and when the images are decoded: links leaving it are skipped with their reason."""
    extra: tuple[tuple[str, str], ...] = ()
    if kind == "demo":
        root, label = write_demo_data(demo_data_dir()), "the held-out demo images"
    elif kind == "folder":
        root = allowed_path(folder or "")
        if not root.is_dir():
            raise DataError(f"'{folder}' is not a folder.")
        label = f"folder {root}"
    else:
        if zip_data is None or upload_dir is None:
            raise DataError("Give the zip's bytes and a folder to unpack it into.")
        unpacked = unpack_upload(zip_data, upload_dir)
        root, label = unpacked.root, f"zip {zip_name}"
        extra = tuple((s.path, s.reason) for s in unpacked.skipped)
    csv_hash = ""
    if metadata is not None:
        name, data = metadata
        text = data.decode("utf-8-sig", errors="surrogateescape")  # paths name the real files; see parse_metadata
        dataset = parse_metadata(text, Path(root), source=name)
        if not dataset.records:
            raise DataError(f"No usable rows in '{name}'"
                            + (f" (e.g. {dataset.skipped[0].reason})." if dataset.skipped else "."))
        csv_hash = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    else:
        dataset = load_dataset(root)
    return ScannedImages(dataset, f"{dataset.root}|{csv_hash}", label, extra)


def plan_source(scanned: ScannedImages, spec: ModelSpec, model_name: str, layers: int | str,
                class_names: Sequence[str], templates: Sequence[str], exact_decode: bool = False,
                store: Store = "auto", private_dir: str | os.PathLike | None = None) -> tuple[Source, ExtractionConfig]:
    """The :class:`Source` the scanned images become under ``spec`` (its cache folder, the display
    class names and prompt templates, checked here) and the extraction configuration that fills the
    cache (``exact_decode``, ``store``: as ``refineclip extract``'s ``--exact-decode`` and ``--store``).

    The cache goes into the home folder, shared, unless the model or the images are the session's
    own uploads (in ``private_dir``, the session's folder): then it goes into ``private_dir/caches``,
    where no other session can list, open or rebuild from it (:func:`~refineclip_core.session.caches.private_cache_root`)."""
    names = [str(n).strip() for n in class_names]
    templates = tuple(validate_templates([t.strip() for t in templates if t.strip()]))
    scanned.dataset.renamed(names)  # validates: count, non-empty, distinct
    cache_dir = cache_dir_for(spec, scanned.data_key, layers,
                              private_cache_root(spec, scanned.dataset.root, private_dir))
    label = f"{model_name} on {scanned.label} ({len(scanned.dataset)} images)"
    source = Source(spec=spec, data_root=str(scanned.dataset.root), cache_dir=str(cache_dir), label=label,
                    classes=tuple(names), templates=templates, extra_skipped=scanned.extra_skipped)
    return source, ExtractionConfig(layers=layers, templates=templates, decode=DecodeConfig(exact=exact_decode),
                                    store=store)

"""The embedded demo, prepared for an interactive session on a held-out sample of its world.

The dashboard (and anything else that wants a ready-to-use feature cache without choosing
folders) calls :func:`prepare_demo`: it writes a *held-out*, group-balanced sample of the
procedural demo world (:mod:`refineclip_core.demo.world`, ``val`` and ``test`` splits drawn
with :data:`DEMO_SEED`, a seed the demo model never saw in training) into the home folder
folder once, and extracts its decomposed features (paper Eq. 4) into a cache next to it. Both
steps are resumable and idempotent: the second call costs a directory listing.

Two embedded models see the same world and the same held-out sample (:data:`DEMO_CHOICES`): the
CLIP-shaped demo model (``ModelSpec("demo")``, the default: class token, projection, contrastive
loss) and the SigLIP-shaped one (``ModelSpec("demo-map")``: timm ViT trunk, attention-map pooling over
the patch tokens, no projection, sigmoid loss; ``assets/demo_siglip``). Each gets its own cache.
"""

from __future__ import annotations

import csv
import os
import shutil
import uuid
from pathlib import Path

from ..features.extraction import ExtractionConfig
from ..home import home_dir
from ..loading.data import load_dataset
from ..loading.models import DEMO_MAP_MODEL, DEMO_MODEL, ModelSpec
from ..progress import CancelFn, Progress, silent
from .caches import cache_dir_for
from .locking import extract_locked
from .source import Source

#: Seed of the held-out demo sample. Training used seed 0 (train and val) and 1000 (test).
DEMO_SEED = 2025
#: Images per bird group and per unrelated class in the val split (labelled samples and adaptation images).
DEMO_N_PER_GROUP = 40
#: ... and in the test split: the held-out images the guard judges an edit on. Enough that a group or class
#: the edit leaves unchanged has its drop bounded within the default 5 points (at least 125 images are needed
#: with the demo's 13 groups and classes, :func:`refineclip_core.edit.bounds.images_to_bound`), so the
#: guard can say `verified` when the edit deserves it (benchmarks/guard.py measures how often it does).
DEMO_N_TEST = 150
DEMO_SPLITS = ("val", "test")
#: The embedded demo models a user can pick (``ModelSpec`` shorthand -> what to call it), the default first.
DEMO_CHOICES = {DEMO_MODEL: "demo (CLIP-shaped, class token)", DEMO_MAP_MODEL: "demo (SigLIP-shaped, map pooling)"}


def demo_installed(spec: ModelSpec) -> bool:
    """Whether ``spec``'s files (a demo shorthand's committed config and weights) are present."""
    r = spec.resolved()
    return bool(r.checkpoint and Path(r.checkpoint).is_file() and (not r.model_config or Path(r.model_config).is_file()))


def demo_data_dir(cache_root: str | os.PathLike | None = None, seed: int = DEMO_SEED,
                  n_per_group: int = DEMO_N_PER_GROUP, n_test: int | None = None) -> Path:
    n_test = heldout_size(n_per_group, n_test)
    return home_dir(cache_root) / (f"demo-data-s{seed}-n{n_per_group}" + ("" if n_test == n_per_group else f"-t{n_test}"))


def heldout_size(n_per_group: int, n_test: int | None = None) -> int:
    """Held-out (test) images per group: ``n_test``, or :data:`DEMO_N_TEST` for the default sample (a
    smaller ``n_per_group``, as tests ask for, keeps the test split that small too)."""
    if n_test is None:
        n_test = DEMO_N_TEST if n_per_group == DEMO_N_PER_GROUP else n_per_group
    return max(int(n_test), n_per_group)


def write_demo_data(out_dir: str | os.PathLike, seed: int = DEMO_SEED, n_per_group: int = DEMO_N_PER_GROUP,
                    progress: Progress | None = None, n_test: int | None = None) -> Path:
    """Write the balanced ``val`` (``n_per_group`` per group and unrelated class) and ``test`` (``n_test``,
    default :func:`heldout_size`) splits of the demo world into one folder.

    Layout: ``<out>/<split>/<class>/<split>_<index>.png`` and one ``<out>/metadata.csv``
    (``path,label,group,split``). Written into a temporary sibling folder and renamed into
    place, so a half-written folder is never used; an existing complete folder is kept.
    """
    from ..demo.world import write_world

    out, progress = Path(out_dir), progress or silent
    if (out / "metadata.csv").is_file():
        return out
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        rows: list[dict[str, str]] = []
        for i, split in enumerate(DEMO_SPLITS):
            progress(f"Drawing the held-out demo images ({split} split)", i, len(DEMO_SPLITS))
            size = n_per_group if split != "test" else heldout_size(n_per_group, n_test)
            sub = write_world(tmp / split, split, seed, size, layout="folder")
            with open(sub / "metadata.csv", newline="", encoding="utf-8") as fh:
                for row in csv.DictReader(fh):
                    rows.append({**row, "path": f"{split}/{row['path']}"})
            (sub / "metadata.csv").unlink()
        with open(tmp / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=["path", "label", "group", "split"])
            writer.writeheader()
            writer.writerows(rows)
        progress("Drawing the held-out demo images", len(DEMO_SPLITS), len(DEMO_SPLITS))
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "metadata.csv").is_file():  # lost a race against a complete folder: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def prepare_demo(cache_root: str | os.PathLike | None = None, loaded=None, progress: Progress | None = None,
                 cancel: CancelFn | None = None, spec: ModelSpec | None = None, seed: int = DEMO_SEED,
                 n_per_group: int = DEMO_N_PER_GROUP, layers: int | str = 4, n_test: int | None = None) -> Source:
    """The embedded demo model on a held-out sample of its world, extracted and ready.

    ``loaded`` may pass the already loaded demo model (the dashboard caches it); otherwise it
    is loaded here. ``spec`` replaces the demo model (tests use a tiny stand-in).
    """
    from ..loading.confine import Confinement
    from ..loading.models import load_model

    spec = spec or ModelSpec("demo")
    n_test = heldout_size(n_per_group, n_test)
    data = write_demo_data(demo_data_dir(cache_root, seed, n_per_group, n_test), seed, n_per_group, progress, n_test)
    if loaded is None:
        (progress or silent)("Loading the demo model", 0, 1)
        loaded = load_model(spec)
    with Confinement.of([data]).active():  # generated here: nothing may lead out of it
        dataset = load_dataset(data)
    cache_dir = cache_dir_for(spec, str(data), layers, cache_root)
    extract_locked(loaded, dataset, cache_dir, ExtractionConfig(layers=layers), progress, cancel)
    which = "SigLIP-shaped demo model (map pooling)" if spec.name == DEMO_MAP_MODEL else "demo model"
    label = f"Embedded {which} on {len(dataset)} held-out demo images (seed {seed})"
    return Source(spec=spec, data_root=str(data), cache_dir=str(cache_dir), label=label, is_demo=True)

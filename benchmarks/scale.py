"""Real folders at real scale: camera photos through the loader, and caches shaped like real runs.

    python benchmarks/scale.py                    # everything (~1 h on 2 busy cores), writes benchmarks/RESULTS.md
    python benchmarks/scale.py --quick            # small sizes (a few minutes), prints only
    python benchmarks/scale.py --only photos      # one part: photos, caches, browser, map (repeatable)

Four tables, each written to its own section of ``RESULTS.md`` (``scale-photos``, ``scale-caches``,
``scale-browser``, ``scale-map``; through ``benchmarks/results_md.py``, which keeps every other section):

* **photos** — a photo-like set (the demo world's pictures upscaled to camera size with texture,
  illumination, edges, sensor noise and EXIF orientation, JPEG q=90) extracted as it is, with
  reduced JPEG decoding (the default) and with ``exact`` decoding, and the same photos shrunk to
  512 px: times, the full-size/pre-shrunk ratio, and how far reduced decoding moves the embeddings
  (cosine to exact decoding, identical zero-shot top-1 with the demo model); worker counts and
  kinds (threads, processes) compared; ``refineclip extract`` end to end; fp16 storage's error.
* **caches** — synthetic caches shaped like real runs (ViT-B/16 and ViT-L/14 shapes, the last 4
  layers, 10k and 50k images, 2 to 1000 classes; random parts with a low-rank concept signal,
  labels = zero-shot prediction with a quarter swapped to the runner-up, so errors are
  confusions) measured in a fresh process each, like a dashboard server: bytes on disk, open,
  resident memory, Heads page scoring (``identify``: DE_A..DE_D and the consensus selection),
  the first ablation (head·text projections, means), head toggles, the Head inspector (TextSpan
  over every image, push statistics), refinement (``fit_edit`` with ``DEFAULT_EDIT`` and its
  baselines, as the Refine page runs it) and the HTML run report.
* **browser** — the 50k ViT-L/14 cache opened in a real dashboard (``streamlit run app.py`` and
  headless Chromium): server memory above an empty server, time to findings, page times, head
  toggles, and a toggle in a second session while the first one refines.

* **map** — a tower that pools over every token (attention-map pooling, ViT-B/16 SigLIP 2's shape) beside
  the class-token ViT-B/16 and the two demo models: the bytes per image the decomposition holds (against
  ``REFINECLIP_MEMORY_BUDGET``), and the scoring, toggle and inspector numbers on a cache of its shape
  (issue 34 item 8).

Timings are wall-clock on a shared 2-core machine (the load average is printed with each table);
the goals are the issue's (50k images, ViT-L/14 shapes): server memory ≤ 2 GB above an empty
server, toggle ≤ 50 ms in the core and ≤ 300 ms in the browser, scoring ≤ 5 s, inspector ≤ 3 s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.run import Ctx, Table, machine_info, run_info_line  # noqa: E402
from tests.support import browser as shots  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "RESULTS.md"
SHARD = 250                       # rows per synthetic shard (10k and 50k are whole numbers of shards)
GOALS = {"rss_mib": 2048, "toggle_ms": 50, "browser_toggle_ms": 300, "scoring_s": 5, "inspector_s": 3}


# ------------------------------------------------------------------------------------------------
# Synthetic caches shaped like real runs
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """An open_clip ViT's cache shape: heads of the last ``scope`` layers, ``R = 2L + 2`` remainders."""

    name: str
    n_layers: int
    n_heads: int
    embed_dim: int
    scope: int = 4
    remainder_names: tuple[str, ...] = ()   # a tower's own (the map pool's): from its decomposition; () = a CLS ViT's

    @property
    def layers(self) -> list[int]:
        return list(range(self.n_layers - self.scope, self.n_layers))

    @property
    def n_remainders(self) -> int:
        return len(self.remainder_names) or 2 * self.n_layers + 2

    def bytes_per_image(self, parts_itemsize: int = 4) -> int:
        d = self.embed_dim
        return 4 * d + parts_itemsize * d * (self.scope * self.n_heads + self.n_remainders) + 8


SHAPES = {"ViT-B/16": Shape("ViT-B/16", 12, 12, 512), "ViT-L/14": Shape("ViT-L/14", 24, 16, 768)}
CONCEPTS = 32                     # rank of the shared concept signal images and class texts are built from


def _prototypes(shape: Shape, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shared structure of a synthetic model: concept prototypes P (p, d), per-head means (K, d),
    per-head share of the concept signal (K,), constant remainders (R, d)."""
    rng = np.random.default_rng([seed, 1])
    d, K = shape.embed_dim, shape.scope * shape.n_heads
    P = rng.normal(size=(CONCEPTS, d)) / np.sqrt(d)
    P /= np.linalg.norm(P, axis=1, keepdims=True)
    means = rng.normal(size=(K, d)) * 0.6 / np.sqrt(d)
    share = rng.dirichlet(np.full(K, 0.3)) * 0.8
    rem = rng.normal(size=(shape.n_remainders, d)) * 0.8 / np.sqrt(d)
    return P.astype(np.float32), means.astype(np.float32), share.astype(np.float32), rem.astype(np.float32)


def synthetic_shard(shape: Shape, n: int, seed: int, shard: int, structure) -> dict[str, np.ndarray]:
    """Shard ``shard`` of a synthetic cache: c = m_h + share_h · z + noise, E = Σ c + Σ r exactly
    (in float32, as an extraction stores it)."""
    P, means, share, rem0 = structure
    rng = np.random.default_rng([seed, 2, shard])
    d, K, R = shape.embed_dim, shape.scope * shape.n_heads, shape.n_remainders
    z = rng.standard_normal((n, CONCEPTS), dtype=np.float32) @ P * 3.0
    heads = rng.standard_normal((n, K, d), dtype=np.float32)
    heads *= np.float32(0.5 / np.sqrt(d))
    heads += means[None]
    heads += share[None, :, None] * z[:, None, :]
    rems = rng.standard_normal((n, R, d), dtype=np.float32)
    rems *= np.float32(0.2 / np.sqrt(d))
    rems += rem0[None]
    E = heads.sum(1, dtype=np.float64) + rems.sum(1, dtype=np.float64)
    return {"embedding": E.astype(np.float32), "heads": heads.reshape(n, shape.scope, shape.n_heads, d),
            "remainders": rems, "index": np.arange(shard * SHARD, shard * SHARD + n, dtype=np.int64)}


def write_base(root: Path, shape: Shape, n: int, seed: int = 0, log: Callable[[str], None] = print) -> np.ndarray:
    """The shards of a synthetic ``n``-image cache in ``root/shards`` (the cache's own writer);
    returns E ``(n, d)`` for labelling."""
    from refineclip_core.features.cache_format import write_shard

    structure = _prototypes(shape, seed)
    E = np.empty((n, shape.embed_dim), dtype=np.float32)
    t0 = time.perf_counter()
    for i in range((n + SHARD - 1) // SHARD):
        rows = min(SHARD, n - i * SHARD)
        arrays = synthetic_shard(shape, rows, seed, i, structure)
        E[i * SHARD:i * SHARD + rows] = arrays["embedding"]
        write_shard(root, i, arrays, [])
        if i % 40 == 39:
            log(f"  wrote {(i + 1) * SHARD:,} of {n:,} images ({time.perf_counter() - t0:.0f} s)")
    return E


def convert_base(src: Path, dst: Path, n: int, dtype: str, log: Callable[[str], None] = print) -> None:
    """``src``'s shards with the head contributions and remainders stored as ``dtype`` (``--store``)."""
    from refineclip_core.features.cache_format import shard_dir, write_shard

    for i in range((n + SHARD - 1) // SHARD):
        d = shard_dir(src, i)
        arrays = {k: np.load(d / f"{k}.npy") for k in ("embedding", "heads", "remainders", "index")}
        for k in ("heads", "remainders"):
            arrays[k] = arrays[k].astype(dtype)
        write_shard(dst, i, arrays, [])
    log(f"  converted {n:,} images to {dtype}")


def standin_model(folder: Path, embed_dim: int) -> dict[str, Any]:
    """A tiny open_clip model with the cache's embedding width: the dashboard only needs a model to
    embed the TextSpan pool (and for Grad-CAM and exports, which this benchmark does not use)."""
    import open_clip
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    name = f"scale-standin-{embed_dim}"
    cfg = {"embed_dim": embed_dim, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1,
                                                 "head_width": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1}}
    (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder / f"{name}.json")
    torch.manual_seed(0)
    torch.save(open_clip.create_model(name).state_dict(), folder / f"{name}.pt")
    return {"name": name, "pretrained": None, "checkpoint": str(folder / f"{name}.pt"),
            "model_config": str(folder / f"{name}.json"), "device": "cpu", "precision": "fp32"}


def class_texts(shape: Shape, n_classes: int, seed: int) -> np.ndarray:
    """Normalised class texts in the concept space (plus a little off-concept noise)."""
    P = _prototypes(shape, seed)[0]
    rng = np.random.default_rng([seed, 3, n_classes])
    T = rng.normal(size=(n_classes, CONCEPTS)) @ P + rng.normal(size=(n_classes, shape.embed_dim)) * 0.3 / np.sqrt(
        shape.embed_dim)
    return (T / np.linalg.norm(T, axis=1, keepdims=True)).astype(np.float32)


def make_cache(folder: Path, base: Path, shape: Shape, E: np.ndarray, n: int, n_classes: int, model: dict,
               parts_dtype: str = "float32", seed: int = 0) -> Path:
    """A complete cache folder over the first ``n`` images of ``base``'s shards (linked, not copied):
    labels are the zero-shot prediction, a quarter swapped to the runner-up class; two classes get
    Waterbirds-like groups and train/val/test splits, more classes none (like ImageNet-A/R)."""
    from refineclip_core.features.cache_format import CacheManifest
    from refineclip_core.files import atomic_write_bytes, atomic_write_json, npy_bytes

    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "shards").exists():
        os.symlink(base / "shards", folder / "shards")
    text = class_texts(shape, n_classes, seed)
    logits = E[:n] @ text.T
    top2 = np.argsort(-logits, axis=1)[:, :2]
    rng = np.random.default_rng([seed, 4, n_classes])
    labels = np.where(rng.random(n) < 0.25, top2[:, 1], top2[:, 0])
    if n_classes == 2:
        classes = ["landbird", "waterbird"]
        place = np.where(rng.random(n) < 0.9, labels, 1 - labels)
        groups = [f"{classes[y]} on {('land', 'water')[p]}" for y, p in zip(labels, place)]
        splits = rng.choice(["train", "val", "test"], size=n, p=[0.6, 0.2, 0.2]).tolist()
    else:
        classes = [f"class {k:04d}" for k in range(n_classes)]
        groups, splits = [None] * n, [None] * n
    records = [{"path": f"/synthetic/{classes[y]}/{i:06d}.jpg", "label": int(y), "group": g, "split": s}
               for i, (y, g, s) in enumerate(zip(labels.tolist(), groups, splits))]
    atomic_write_json(folder / "records.json", {"records": records, "skipped": []})
    atomic_write_bytes(folder / "text.npy", npy_bytes(text))
    names = list(shape.remainder_names) or (
        ["embed"] + [x for l in range(shape.n_layers)
                     for x in ((f"attn_bias.{l}" if l in shape.layers else f"attn.{l}"), f"mlp.{l}")] + ["ln_post_bias"])
    manifest = CacheManifest(
        fingerprint=f"synthetic-{shape.name}-{n}-{n_classes}-{parts_dtype}", model=model,
        model_name=f"synthetic {shape.name}", layers=shape.layers, n_layers=shape.n_layers, n_heads=shape.n_heads,
        embed_dim=shape.embed_dim, remainder_names=names, classes=classes, templates=["a photo of a {}."],
        logit_scale=100.0, dtype="float32", data_root="/synthetic", layout="csv", n_records=n, shard_size=SHARD,
        complete=True, parts_dtype=parts_dtype)
    atomic_write_json(folder / "manifest.json", asdict(manifest))
    return folder


def cache_bytes(folder: Path) -> int:
    """Bytes of the cache's own files and of its shards (the first ``n_shards`` of the linked base)."""
    from refineclip_core.features.cache_format import read_manifest, shard_dir

    m = read_manifest(folder)
    own = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return own + sum(f.stat().st_size for i in range(m.n_shards) for f in shard_dir(folder, i).iterdir())


# ------------------------------------------------------------------------------------------------
# One cache, measured in a fresh process (what a dashboard server does with it)
# ------------------------------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _rss() -> dict[str, float]:
    return {"rss_mib": _status_kib("VmRSS") / 1024, "anon_mib": _status_kib("RssAnon") / 1024,
            "file_mib": _status_kib("RssFile") / 1024, "peak_mib": _status_kib("VmHWM") / 1024}


def measure_cache(folder: str, n_toggles: int = 30, pool_size: int = 4082, seed: int = 0, refine: bool = True
                  ) -> dict[str, Any]:
    """Open ``folder`` and run every page's computation on it (``refine``: the Refine page's run and the
    HTML report too); a row per step with its time and memory."""
    import importlib

    for module in ("torch", "plotly.graph_objects", "scipy.stats"):   # what a server has loaded before any cache
        importlib.import_module(module)

    from refineclip_core.features.cache import FeatureCache
    from refineclip_core.inspection.diagnosis import MAX_ROWS, concept_vocabulary, diagnose
    from refineclip_core.inspection.textspan import DEFAULT_TEXT_POOL, describe_heads, load_text_pool
    from refineclip_core.inspection.textspan import MAX_IMAGES as TEXTSPAN_MAX_IMAGES
    from refineclip_core.method.protocol import DEFAULT_PROTOCOL, identify, make_engine
    from refineclip_core.edit.compare import fit_edit
    from refineclip_core.edit.config import DEFAULT_EDIT
    from refineclip_core.method.scores import head_push
    from refineclip_core.reporting.findings import findings
    from refineclip_core.reporting.run_report import render_html
    from refineclip_core.edit.record import build_run_report

    steps: list[dict[str, Any]] = []
    base = _rss()

    def step(name: str, fn: Callable[[], Any], size: str = "") -> Any:
        t0 = time.perf_counter()
        out = fn()
        steps.append({"step": name, "size": size, "seconds": time.perf_counter() - t0, **_rss()})
        return out

    def open_cache():
        c = FeatureCache(folder)
        c.embeddings, c.labels, c.groups, c.splits, c.text  # noqa: B018  (what the first page reads)
        return c

    cache = step("open (manifest, records, E, texts)", open_cache)
    n, C = len(cache), len(cache.classes)
    engine = make_engine(cache)
    ident = step("Heads page scoring: DE_A..DE_D + consensus selection", lambda: identify(cache, DEFAULT_PROTOCOL, engine))
    steps[-1]["size"] = f"{len(engine.head_ids())} heads, {len(ident.sample_rows)} labelled samples"
    rng = np.random.default_rng(seed)
    ids = engine.head_ids()
    chosen = list(dict.fromkeys(list(ident.heads) + [ids[int(i)] for i in rng.permutation(len(ids))]))[:8]
    abl = ident.ablation_engine(engine)

    def first():
        findings(cache, ident, engine)
        return abl.predict(chosen[:1], ident.config.ablation)

    step("first ablation (Load page findings): head·text projections, adaptation means", first,
         "every head's projections in one pass" if engine.projected else
         f"projections per head on first use ({engine.store.capacity} of {len(ids)} heads fit the budget)")

    def toggle(current: list) -> float:
        t0 = time.perf_counter()
        abl.ablate(current, cache.labels, cache.classes, cache.groups, cache.group_names,
                   mode=ident.config.ablation, mask=ident.eval_mask, mask_only=True)
        return 1000 * (time.perf_counter() - t0)

    cold = [toggle(chosen[:i + 1]) for i in range(len(chosen))]   # each head's first use
    times, current = [], []
    for _ in range(n_toggles):           # a user ticking and unticking these heads: one head changes per toggle
        h = chosen[int(rng.integers(len(chosen)))]
        current = [x for x in current if x != h] if h in current else current + [h]
        times.append(toggle(current))
    if not engine.projected:
        steps.append({"step": "head toggle, a head's first use (its projections computed)", "size": "",
                      "seconds": statistics.median(cold) / 1000,
                      "toggle_ms": [statistics.median(cold), min(cold), max(cold)], **_rss()})
    steps.append({"step": "head toggle → new predictions and accuracies (core)", "size": f"{int(ident.eval_mask.sum()):,}"
                  f" held-out images, {len(chosen)} heads ticked and unticked", "seconds": statistics.median(times) / 1000,
                  "toggle_ms": [statistics.median(times), min(times), max(times)], **_rss()})
    pool = np.random.default_rng([seed, 9]).normal(size=(pool_size, cache.manifest.embed_dim)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    texts = [f"text {i}" for i in range(pool_size)]
    head = chosen[0]
    a, b = ident.pairs[0]

    def inspect():
        desc = describe_heads(cache, [head], texts, pool, k=5)[0]
        rows = np.flatnonzero(cache.labels == a)
        push = head_push(cache.embeddings[rows], cache.heads[rows, cache.manifest.layers.index(head.layer), head.head],
                         cache.text, a, b)
        return desc, push

    step("Head inspector: TextSpan (k=5) + push statistics", inspect,
         f"{min(n, TEXTSPAN_MAX_IMAGES):,} of {n:,} images × {pool_size:,} pool texts")
    words = load_text_pool(DEFAULT_TEXT_POOL)
    vocab = concept_vocabulary(words, np.resize(pool, (len(words), pool.shape[1])))   # the shipped pool's words
    diag = step("diagnosis (leads the findings panel and the run report): concepts, control", lambda: diagnose(
        cache, ident, vocab, None, engine))
    steps[-1]["size"] = f"{diag.n_images:,} images (at most {MAX_ROWS:,}), {len(diag.heads)} heads, {len(vocab):,} concepts"
    if not refine:
        return {"n": n, "classes": C, "baseline": base, "steps": steps, "projected": engine.projected,
                "heads_dtype": str(cache.heads.dtype), "peak_mib": _rss()["peak_mib"]}
    outcome = step("refinement: RefineCLIP-fit + paper phase 2 + baselines (the Refine page's run)",
                   lambda: fit_edit(cache, ident, DEFAULT_EDIT, engine=engine, baselines=True),
                   f"{len(ident.adapt_rows):,} adaptation images (KL steps on ≤ {DEFAULT_EDIT.fit.max_rows:,})")
    html = step("HTML run report", lambda: render_html(build_run_report(cache, ident, engine, outcome)))
    steps[-1]["size"] = f"{len(html) / 2**20:.1f} MiB"
    return {"n": n, "classes": C, "baseline": base, "steps": steps, "projected": engine.projected,
            "heads_dtype": str(cache.heads.dtype), "peak_mib": _rss()["peak_mib"]}


def run_child(folder: Path, timeout: float = 3600, **kwargs) -> dict[str, Any]:
    """:func:`measure_cache` in a fresh Python process (clean memory readings), as JSON."""
    args = json.dumps({"folder": str(folder), **kwargs})
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {folder} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def open_seconds(folder: Path, repeats: int = 3) -> float:
    """Median seconds for a fresh process to open the cache (manifest, records, E), imports excluded."""
    code = ("import sys,time; from refineclip_core.features.cache import FeatureCache; t=time.perf_counter(); "
            "c=FeatureCache(sys.argv[1]); c.embeddings; c.labels; c.text; print(time.perf_counter()-t)")
    out = []
    for _ in range(repeats):
        proc = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        out.append(float(proc.stdout.strip().splitlines()[-1]))
    return statistics.median(out)


# ------------------------------------------------------------------------------------------------
# Photos: camera-sized JPEGs through the loader
# ------------------------------------------------------------------------------------------------
CAMERA = (4000, 3000)
SHRUNK = 512


def photo_textures(rng: np.random.Generator, size: tuple[int, int] = CAMERA) -> list[np.ndarray]:
    """Full-size noise fields (texture at four scales, per-channel sensor noise), made once and
    shifted differently for every photo (making them per photo costs seconds each)."""
    from PIL import Image

    W, H = size
    fields = []
    for cells, amp in ((12, 10.0), (70, 6.0), (500, 4.0), (1600, 3.0)):
        noise = rng.standard_normal((cells * 3 // 4, cells), dtype=np.float32)
        fields.append(amp * np.asarray(Image.fromarray(noise).resize((W, H), Image.Resampling.BICUBIC))[..., None])
    fields.append(rng.normal(0, 2.0, size=(H, W, 3)).astype(np.float32))
    return fields


def photo_like(src, rng: np.random.Generator, textures: list[np.ndarray], size: tuple[int, int] = CAMERA):
    """A camera-sized, photo-like picture of a (small) demo-world image: upscaled, with texture at
    four scales, smooth illumination (vignette and a gradient), thin sharp edges and sensor noise."""
    from PIL import Image, ImageDraw

    W, H = size
    w, h = src.size
    base = src.convert("RGB").crop((0, (h - w * 3 // 4) // 2, w, (h + w * 3 // 4) // 2))
    arr = np.asarray(base.resize((W, H), Image.Resampling.BICUBIC), dtype=np.float32)
    for field in textures:
        tint = (1.0 + 0.2 * rng.standard_normal(3)).astype(np.float32) if field.shape[-1] == 1 else np.float32(1)
        arr += np.roll(field, (int(rng.integers(H)), int(rng.integers(W))), axis=(0, 1)) * tint
    y = np.linspace(-1, 1, H, dtype=np.float32)[:, None]
    x = np.linspace(-1, 1, W, dtype=np.float32)[None, :]
    arr *= (0.8 + 0.25 * (1 - 0.5 * (x * x + y * y)) + np.float32(0.08 * rng.uniform(-1, 1)) * x)[..., None]
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for _ in range(6):                                             # thin sharp edges (twigs, wires)
        pts = [(float(rng.uniform(0, W)), float(rng.uniform(0, H))) for _ in range(3)]
        shade = int(rng.integers(0, 80))
        draw.line(pts, fill=(shade, shade, shade), width=int(rng.integers(3, 9)))
    return out


def write_photos(world: Path, camera: Path, shrunk: Path, log: Callable[[str], None]) -> list[str]:
    """Camera JPEGs (every 4th stored rotated with EXIF orientation 6, as phones do) and the same
    photos shrunk to 512 px; returns the class folder names."""
    from PIL import Image

    rng = np.random.default_rng(2024)
    textures = photo_textures(rng)
    files = sorted(world.rglob("*.png"))
    t0 = time.perf_counter()
    for i, f in enumerate(files):
        photo = photo_like(Image.open(f), rng, textures)
        for folder in (camera, shrunk):
            (folder / f.parent.name).mkdir(parents=True, exist_ok=True)
        name = f"{f.parent.name}/{f.stem}.jpg"
        small = photo.copy()
        small.thumbnail((SHRUNK, SHRUNK), Image.Resampling.LANCZOS)
        small.save(shrunk / name, quality=95)
        if i % 4 == 3:
            exif = Image.Exif()
            exif[0x0112] = 6                                       # display rotated by 90° clockwise
            photo.transpose(Image.Transpose.ROTATE_90).save(camera / name, quality=95, exif=exif)
        else:
            photo.save(camera / name, quality=95)
        if i % 20 == 19:
            log(f"  photos: {i + 1} of {len(files)} ({time.perf_counter() - t0:.0f} s)")
    return sorted({f.parent.name for f in files})


def _subset_folder(src: Path, dst: Path, n: int) -> Path:
    """The first ``n`` images of ``src`` (class folders, sorted), hard-linked into ``dst``."""
    files = sorted(src.rglob("*.jpg"))
    picked = [files[i] for i in np.linspace(0, len(files) - 1, n).round().astype(int)]
    for f in picked:
        (dst / f.parent.name).mkdir(parents=True, exist_ok=True)
        os.link(f, dst / f.parent.name / f.name)
    return dst


def _extract(loaded, folder: Path, out: Path, **decode) -> Any:
    from refineclip_core.features.extraction import ExtractionConfig, extract
    from refineclip_core.loading.batches import DecodeConfig
    from refineclip_core.loading.data import load_dataset

    shutil.rmtree(out, ignore_errors=True)
    store = decode.pop("store", "auto")
    return extract(loaded, load_dataset(folder), out, ExtractionConfig(decode=DecodeConfig(**decode), store=store))


def _agreement(a, b) -> tuple[float, float, float]:
    """(min cosine, median cosine, share of identical zero-shot top-1) between two caches of the same images."""
    from refineclip_core.features.zeroshot import normalize

    Ea, Eb = normalize(np.asarray(a.embeddings, np.float64)), normalize(np.asarray(b.embeddings, np.float64))
    cos = np.einsum("nd,nd->n", Ea, Eb)
    same = (Ea @ a.text.T).argmax(1) == (Eb @ b.text.T).argmax(1)
    return float(cos.min()), float(np.median(cos)), float(same.mean())


def bench_photos(ctx: Ctx) -> Table:
    """Camera photos vs the same photos shrunk: reduced decoding, workers, and what it changes."""
    import torch

    from benchmarks.run import interleaved, paired_ratio
    from refineclip_core.demo.world import write_world
    from refineclip_core.features.extraction import check_decomposition
    from refineclip_core.loading.models import ModelSpec, load_model

    work = ctx.workdir / "photos"
    per_group, n_time, n_b16 = (2, 12, 6) if ctx.quick else (10, 48, 16)
    ctx.log(f"photos: drawing the demo world ({per_group} per group) and making camera-sized JPEGs")
    write_world(work / "world", "test", 2024, per_group)
    write_photos(work / "world", work / "camera", work / "shrunk", ctx.log)
    n_all = len(list((work / "camera").rglob("*.jpg")))
    cam_t, small_t = _subset_folder(work / "camera", work / "cam-t", n_time), _subset_folder(work / "shrunk", work / "small-t", n_time)
    mb = np.mean([f.stat().st_size for f in (work / "camera").rglob("*.jpg")]) / 1e6
    mb_small = np.mean([f.stat().st_size for f in (work / "shrunk").rglob("*.jpg")]) / 1e6
    demo = load_model(ModelSpec("demo"))
    out = work / "out"

    ctx.log(f"photos: agreement of reduced and exact decoding on {n_all} photos (demo model)")
    draft, exact = _extract(demo, work / "camera", out / "draft"), _extract(demo, work / "camera", out / "exact", exact=True)
    agree = _agreement(draft, exact)
    stored = {}
    for store in ("auto", "fp16"):
        c = _extract(demo, work / "camera", out / f"store-{store}", store=store)
        stored[store] = check_decomposition(demo, c, max_images=n_time)
        stored[store]["bytes"] = sum(p.stat().st_size for p in (out / f"store-{store}").rglob("*.npy"))
    torch.manual_seed(0)
    b16_loaded = load_model(ModelSpec("ViT-B-16"))          # random weights: nothing is downloaded
    b16_set = _subset_folder(work / "camera", work / "cam-b16", n_b16)
    b16_small = _subset_folder(work / "shrunk", work / "small-b16", n_b16)
    agree_b16 = _agreement(_extract(b16_loaded, b16_set, out / "b16-draft"),
                           _extract(b16_loaded, b16_set, out / "b16-exact", exact=True))

    ctx.log(f"photos: timing extraction of {n_time} photos, demo model, variants interleaved")
    variants = {
        "camera, exact decoding, no workers (before)": lambda: _extract(demo, cam_t, out / "t1", exact=True, workers=0),
        "camera, reduced decoding, no workers": lambda: _extract(demo, cam_t, out / "t2", workers=0),
        "camera, reduced decoding, 2 threads (default here)": lambda: _extract(demo, cam_t, out / "t3", workers=2),
        "camera, reduced decoding, 2 processes": lambda: _extract(demo, cam_t, out / "t4", workers=2, kind="process"),
        "camera, exact decoding, 2 threads (--exact-decode)": lambda: _extract(demo, cam_t, out / "t5", exact=True, workers=2),
        "shrunk to 512 px, 2 threads": lambda: _extract(demo, small_t, out / "t6", workers=2),
    }
    t = interleaved(variants, 1 if ctx.quick else 3)
    ref = "shrunk to 512 px, 2 threads"
    rows = []
    for name in variants:
        r = paired_ratio(t.wall[name], t.wall[ref])
        rows.append(["demo model (48 px input)", name, n_time, t.median(name), n_time / t.median(name),
                     f"{r[0]:.2f} ({r[1]:.2f}–{r[2]:.2f})"])
    ctx.log(f"photos: timing ViT-B-16 on {n_b16} photos")
    tb = interleaved({"camera, reduced decoding, 2 threads (default here)":
                      lambda: _extract(b16_loaded, b16_set, out / "b1", workers=2),
                      "camera, exact decoding, no workers (before)":
                      lambda: _extract(b16_loaded, b16_set, out / "b2", exact=True, workers=0),
                      "shrunk to 512 px, 2 threads": lambda: _extract(b16_loaded, b16_small, out / "b3", workers=2)}, 1)
    for name in tb.wall:
        r = paired_ratio(tb.wall[name], tb.wall[ref])
        rows.append(["ViT-B-16 (224 px input, random weights)", name, n_b16, tb.median(name), n_b16 / tb.median(name),
                     f"{r[0]:.2f}"])
    ctx.log("photos: refineclip extract end to end (CLI)")
    for name, folder, flags in (("camera", cam_t, []), ("camera --exact-decode", cam_t, ["--exact-decode"]),
                                ("shrunk to 512 px", small_t, [])):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "refineclip_core.cli", "extract", "--model", "demo", "--data", str(folder),
                        "--out", str(out / f"cli-{len(flags)}-{folder.name}"), *flags], check=True, cwd=ROOT,
                       capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        rows.append(["demo model, `refineclip extract` (process start, model, texts, images)", name, n_time,
                     time.perf_counter() - t0, n_time / (time.perf_counter() - t0), ""])
    cli = {r[1]: r[3] for r in rows if r[0].startswith("demo model, `refineclip")}
    rows[-3][5] = f"{cli['camera'] / cli['shrunk to 512 px']:.2f}"
    rows[-2][5] = f"{cli['camera --exact-decode'] / cli['shrunk to 512 px']:.2f}"
    rows[-1][5] = "1.00"
    main_ratio = paired_ratio(t.wall["camera, reduced decoding, 2 threads (default here)"], t.wall[ref])[0]
    table = Table(
        name="photos",
        title=f"Camera photos through the loader: {CAMERA[0]}×{CAMERA[1]} JPEGs vs the same photos at {SHRUNK} px",
        columns=["model", "images", "n", "extract s", "img/s", f"ratio to {SHRUNK} px (goal ≤ 1.3)"],
        rows=[[r[0], r[1], r[2], r[3], r[4], r[5]] for r in rows],
        notes=[
            f"The set: {n_all} pictures of the demo world (its test split, {per_group} per group and class, 8 classes) "
            f"upscaled to {CAMERA[0]}×{CAMERA[1]} with texture at four scales, smooth illumination (vignette, "
            f"gradient), thin sharp edges and sensor noise, saved as JPEG q=95 ({mb:.1f} MB each; every 4th stored "
            f"rotated with EXIF orientation 6, as phones do), and the same photos shrunk to {SHRUNK} px "
            f"({mb_small:.2f} MB). Timings use {n_time} of them; `extract()` with the model loaded (class texts "
            "included), medians of interleaved repetitions; ratios within a repetition.",
            f"Reduced decoding (the default): a JPEG decodes at 1/2, 1/4 or 1/8 scale in the DCT domain, the largest "
            f"whose sides stay ≥ 2× the model's input, then the model's exact resize/crop/normalise. Camera photos "
            f"with it and 2 decode threads: **{main_ratio:.2f}×** the time of the pre-shrunk photos with the demo "
            f"model ({'meets' if main_ratio <= 1.3 else 'misses'} the ≤ 1.3 goal).",
            f"What reduced decoding changes (demo model, all {n_all} photos vs `--exact-decode`): cosine of the "
            f"embeddings min {agree[0]:.5f}, median {agree[1]:.6f}; identical zero-shot top-1 on "
            f"**{100 * agree[2]:.1f}%** (goal ≥ 99%). ViT-B-16 (random weights, {n_b16} photos): cosine min "
            f"{agree_b16[0]:.5f}, median {agree_b16[1]:.6f}. The cache records the decode size, so checks that "
            "decode again (check-decomposition, the Ablate page's real forward pass) decode the same way.",
            "Threads or processes: see the rows; threads are the default (Pillow's decoder and resize and torch "
            "release the GIL; no process start-up, no copies between processes). CUDA: batches are pinned and "
            "copied with non_blocking=True while the next ones decode (not measured: no GPU here).",
            f"`--store fp16` (demo model, {n_all} photos): cache {stored['fp16']['bytes'] / 2**20:.1f} MiB vs "
            f"{stored['auto']['bytes'] / 2**20:.1f} MiB; Σ stored parts vs stored E (check-decomposition's "
            f"stored_max_rel_error) {stored['fp16']['stored_max_rel_error']:.1e} vs "
            f"{stored['auto']['stored_max_rel_error']:.1e} in float32; Σ parts vs a fresh encode_image "
            f"{stored['fp16']['max_rel_error']:.1e} vs {stored['auto']['max_rel_error']:.1e}. E itself is "
            "stored unrounded, so zero-shot predictions do not change.",
            f"torch threads: {torch.get_num_threads()} (the default), shared with the decode threads.",
        ],
    )
    shutil.rmtree(work, ignore_errors=True)
    return table


# ------------------------------------------------------------------------------------------------
# Caches at scale, measured like a server
# ------------------------------------------------------------------------------------------------
def cache_plan(quick: bool, only: Sequence[str] = ()) -> list[tuple[str, int, list[tuple[int, int, bool]], list[str]]]:
    """``(shape, images in the base, [(images, classes, with refinement), ...], storages)`` in the order
    they are built (refinement, minutes at 50k, is measured where the goals are and once for ViT-B/16).
    ``only``: keep just these caches, each ``SHAPE:IMAGES:CLASSES`` (e.g. ``ViT-B/16:50000:1000``), float32."""
    if quick:
        plan = [("ViT-B/16", 2000, [(1000, 2, True), (2000, 200, False)], ["float32"]),
                ("ViT-L/14", 1000, [(1000, 2, True)], ["float32", "float16"])]
    else:
        plan = [("ViT-B/16", 50_000, [(10_000, 2, True), (50_000, 1000, False)], ["float32"]),
                ("ViT-L/14", 50_000, [(10_000, 200, False), (50_000, 2, True), (50_000, 200, True), (50_000, 1000, True)],
                 ["float32", "float16"])]
    if not only:
        return plan
    wanted = {parse_cache(s) for s in only}
    kept = [(name, n_base, [c for c in caches if (name, c[0], c[1]) in wanted], ["float32"])
            for name, n_base, caches, _ in plan]
    return [(name, max(c[0] for c in caches), caches, stores) for name, _, caches, stores in kept if caches]


def _goal(step: str, value: float, n: int, shape: str) -> str:
    at_goal_size = shape == "ViT-L/14" and n >= 50_000
    for key, target, unit in (("scoring", GOALS["scoring_s"], "s"), ("inspector", GOALS["inspector_s"], "s")):
        if key in step.lower():
            return f"≤ {target} {unit}: {'yes' if value <= target else '**no**'}" if at_goal_size else f"≤ {target} {unit}"
    if "toggle" in step:
        ms = 1000 * value
        return f"≤ {GOALS['toggle_ms']} ms: {'yes' if ms <= GOALS['toggle_ms'] else '**no**'}" if at_goal_size else \
            f"≤ {GOALS['toggle_ms']} ms"
    return ""


#: The cache the browser part opens in the dashboard unless ``--browser-on`` names another: ``(shape,
#: images, classes)`` (``--quick``: the 2-class ViT-L/14 cache of its plan).
BROWSER_ON = ("ViT-L/14", 50_000, 2)


def parse_cache(spec: str) -> tuple[str, int, int]:
    """``SHAPE:IMAGES:CLASSES`` (e.g. ``ViT-B/16:50000:1000``) as ``(shape, images, classes)``."""
    shape, n, C = spec.rsplit(":", 2)
    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r} in {spec!r}: one of {', '.join(SHAPES)}")
    return shape, int(n), int(C)


def bench_caches(ctx: Ctx, keep: Path | None = None, browser: Callable[[Path, Shape], list] | None = None,
                 only: Sequence[str] = (), browser_on: tuple[str, int, int] | None = None) -> tuple[Table, list]:
    """Every planned cache: built, measured in a fresh process, deleted unless ``keep`` (the disk holds one
    shape at a time); ``browser`` runs on the cache ``browser_on`` (default: the plan's largest 2-class ViT-L/14).
    """
    rows, summary, browser_rows = [], [], []
    for shape_name, n_base, caches, stores in cache_plan(ctx.quick, only):
        shape = SHAPES[shape_name]
        base = ctx.workdir / f"base-{shape.embed_dim}-{n_base}"
        if keep is not None and (base / "E.npy").exists():      # written whole by an earlier run with --keep
            E = np.load(base / "E.npy")
            ctx.log(f"caches: reusing the {n_base:,} synthetic {shape_name} images in {base}")
        else:
            ctx.log(f"caches: writing {n_base:,} synthetic {shape_name} images "
                    f"({shape.bytes_per_image() * n_base / 2**30:.1f} GiB)")
            t0 = time.perf_counter()
            E = write_base(base, shape, n_base, log=ctx.log)
            np.save(base / "E.npy", E)
            ctx.log(f"caches: written in {time.perf_counter() - t0:.0f} s")
        model = standin_model(ctx.workdir / "model", shape.embed_dim)
        for store in stores:
            if store != "float32":
                conv = ctx.workdir / f"base-{shape.embed_dim}-{store}"
                convert_base(base, conv, n_base, store, ctx.log)
                plan, src = [(n, c, False) for n, c, _ in caches if n == n_base][:1], conv
            else:
                plan, src = caches, base
            for n, C, refine in plan:
                folder = make_cache(ctx.workdir / f"{shape.embed_dim}-{n}-{C}-{store}", src, shape, E, n, C, model, store)
                size = cache_bytes(folder)
                label = f"{shape_name}, {n:,} images, {C} classes, {store}"
                ctx.log(f"caches: measuring {label}")
                opened = open_seconds(folder)
                res = run_child(folder, refine=refine)
                rows.append([label, "cache on disk", f"{size / 2**30:.2f} GiB ({size / n / 1024:.0f} KiB/image)", "", "", ""])
                rows.append([label, "open in a fresh process (manifest, records, E, texts)", "", f"{opened:.2f} s", "", ""])
                for s in res["steps"]:
                    seconds = s["seconds"]
                    shown = (f"{s['toggle_ms'][0]:.1f} ms (min {s['toggle_ms'][1]:.1f}, max {s['toggle_ms'][2]:.1f})"
                             if "toggle_ms" in s else f"{seconds:.2f} s")
                    rows.append([label, s["step"], s["size"], shown,
                                 f"{s['rss_mib'] - res['baseline']['rss_mib']:+.0f} (anon {s['anon_mib'] - res['baseline']['anon_mib']:+.0f})",
                                 _goal(s["step"], seconds, n, shape_name)])
                rows.append([label, "peak resident memory of the process (VmHWM) above its start", "", "",
                             f"{res['peak_mib'] - res['baseline']['rss_mib']:+.0f}", f"≤ {GOALS['rss_mib']} MiB"
                             + (f": {'yes' if res['peak_mib'] - res['baseline']['rss_mib'] <= GOALS['rss_mib'] else '**no**'}"
                                if shape_name == "ViT-L/14" and n >= 50_000 else "")])
                summary.append((label, res))
                if browser is not None and store == "float32" and (
                        (shape_name, n, C) == browser_on
                        or browser_on is None and shape_name == BROWSER_ON[0] and n == n_base and C == BROWSER_ON[2]):
                    browser_rows = browser(folder, shape)
                if keep is None:
                    shutil.rmtree(folder, ignore_errors=True)
            if store != "float32":
                shutil.rmtree(src, ignore_errors=True)
        if keep is None:
            shutil.rmtree(base, ignore_errors=True)
    table = Table(
        name="caches",
        title="Caches shaped like real runs, opened and used like a dashboard server does",
        columns=["cache", "step", "size", "time", "RSS after, MiB above the process's start", "goal (50k ViT-L/14)"],
        rows=rows,
        notes=[
            "Synthetic caches written by the cache's own shard writer: heads of the last 4 layers (ViT-B/16: 4×12 "
            "heads, d=512, 26 remainders; ViT-L/14: 4×16 heads, d=768, 50 remainders), shards of 250 images; per "
            "image c_h = m_h + share_h·z + noise with z a rank-32 concept signal, E = Σ c + Σ r exactly; class texts "
            "in the concept space; labels = the zero-shot prediction with a quarter swapped to the runner-up class "
            "(errors are confusions). 2 classes: Waterbirds-like groups (place agrees with the class 90%) and "
            "train/val/test splits; 200 and 1000 classes: no groups, no splits (like ImageNet-A/R).",
            "Each cache is measured in a fresh Python process that first imports what a dashboard server has loaded "
            "(numpy, torch, plotly, the core); memory is VmRSS after each step minus VmRSS at that start (anon = "
            "RssAnon, the process's own memory; the rest is file pages of the cache still mapped). Head contributions "
            "stay on disk: each step reads only the shards and slabs it needs.",
            "Steps are the dashboard's: the Load page's findings need the Heads page scoring (identify with "
            "DEFAULT_PROTOCOL: both directions of the largest error pair, 10 samples per class, DE_A..DE_D, the "
            "consensus selection with the utility of Eq. 10) and the first ablation (head·text projections "
            "c_h·t_y of every head in one pass when N·K·C·4 bytes ≤ 768 MiB, with the mean of every head over the "
            "adaptation rows, once per row set); toggles are the Ablate page's (predictions and every accuracy "
            "with its interval, held-out rows, the protocol's mean ablation, one head ticked or unticked per "
            "toggle); the inspector's TextSpan runs over every image up to 10,000 and over a seeded sample of 10,000 beyond (textspan.MAX_IMAGES) with a pool of 4,082 texts, its push statistics over every image of the class; the diagnosis (the "
            "findings panel's lead) reads every head's contribution for at most 2,048 images of the pair's classes "
            "(the shipped pool's words as concepts, random text directions: the time and memory are a real pool's, "
            "the named concepts mean nothing here); refinement is "
            "the Refine page's run with its defaults (RefineCLIP-fit, the paper's phase 2, standard fine-tuning "
            "and Tip-Adapter), a background job in the dashboard.",
            "Over the projection budget (200 and 1000 classes at 50k images × 64 heads) a head's projections are "
            "computed for the held-out rows when it is first toggled (its contributions for those rows read from "
            "disk, n·d·C multiply-adds) and the most recently used are kept with the running score (the last head "
            "set's scores over those rows, 768 MiB in all: at 1000 classes 100 MB per head, 7 arrays); a toggle "
            "then adds or subtracts only the changed head's n·C projections and takes the argmax over n·C scores "
            "(float64 for the rows whose best two classes are within the float32 rounding bound). The max of the "
            "toggles is a toggled head whose projections were dropped from the budget and computed again.",
            "Memory at 1000 classes (50k images): the kept projections and running scores fill their 768 MiB budget (100 MB "
            "per head or running score over the 25,000 held-out rows) and stay resident while the refinement adds its own "
            "working set; predictions over every row (the findings, the refinement's comparison) stream a block of 4,096 rows "
            "at a time without touching the budget, RefineCLIP-fit's least squares and KL distillation (8,192 rows × 1,000 "
            "classes with autograd) go by blocks of 2,048 rows from the teachers of Ŵ only, and phase 2 and fine-tuning "
            "convert only the rows they train on, so the peak stays under 2 GB (it passed 2.5 GB before). Predictions "
            "of the fitted maps and Tip-Adapter are made a block of images at a time, so no step holds the whole N × C "
            "score matrix.",
        ],
    )
    return table, browser_rows


# ------------------------------------------------------------------------------------------------
# The same cache in a real dashboard
# ------------------------------------------------------------------------------------------------
def _server_kib(pid: int, key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))


def inspector_runs(page, timed_goto: Callable[[Any, str], float], n_heads: int, runs: int = 3) -> list[tuple[str, float]]:
    """The Head inspector ``runs`` times: opened from the sidebar, then other heads picked in its 'Head' box
    (each head's description and push computed afresh); ``(head, seconds)`` per run."""
    from urllib.parse import parse_qs, urlparse

    def shown() -> str:                       # the inspected head, as the page put it in the URL ("layer.head")
        return parse_qs(urlparse(page.url).query).get("head", ["?"])[0]

    t = timed_goto(page, "inspector")
    out = [(shown(), t)]
    layer, first = (int(x) for x in out[0][0].split("."))
    box = page.locator(".st-key-insp_head input")
    for k in range(1, runs):
        pick = (first + k) % n_heads
        box.click()
        option = page.get_by_role("option", name=str(pick), exact=True)
        t0 = time.perf_counter()
        option.click()
        shots.settle(page, timeout=900)
        seconds = time.perf_counter() - t0
        problems = shots.error_messages(page)
        if problems:
            raise RuntimeError(f"the inspector shows errors for head {pick}: {problems}")
        if shown() != f"{layer}.{pick}":
            raise RuntimeError(f"picked head {pick} of layer {layer}, the page shows {shown()}")
        out.append((shown(), seconds))
    return out


def bench_browser(ctx: Ctx, folder: Path, shape: Shape, n_toggles: int = 10) -> list[list[Any]]:
    """Open ``folder`` in a dashboard server and time its pages in Chromium; rows for the browser table."""
    from playwright.sync_api import sync_playwright

    from refineclip_core.features.cache import FeatureCache
    from refineclip_core.inspection.textspan import embedded_text_pool
    from refineclip_core.loading.models import ModelSpec, load_model
    from refineclip_core.method.protocol import DEFAULT_PROTOCOL, identify, make_engine

    home = ctx.workdir / "home"
    cache = FeatureCache(folder)
    ctx.log("browser: the expected toggle effects (core), and the TextSpan pool embedded once for the stand-in")
    engine = make_engine(cache)
    ident = identify(cache, DEFAULT_PROTOCOL, engine)
    abl = ident.ablation_engine(engine)
    candidates = ident.heads or engine.head_ids()[-4:]
    flips = {h: len(abl.ablate([h], cache.labels, cache.classes, cache.groups, cache.group_names,
                               mode=ident.config.ablation, mask=ident.eval_mask).flipped) for h in candidates}
    head = max(flips, key=flips.get)
    # heads no page has used before the toggles below: their projections are computed on the first click
    fresh = [h for h in engine.head_ids() if h not in candidates][:3]
    flips.update({h: len(abl.ablate([h], cache.labels, cache.classes, cache.groups, cache.group_names,
                                    mode=ident.config.ablation, mask=ident.eval_mask).flipped) for h in fresh})
    embedded_text_pool(load_model(ModelSpec(**cache.manifest.model)), cache_path=home / "text-pools")
    del engine, abl
    os.environ["REFINECLIP_ALLOWED_ROOTS"] = os.pathsep.join([str(folder.parent), str(home)])
    server = shots.start_app(home, None, 2, ctx.workdir / "streamlit.log")
    rows: list[list[Any]] = []
    pw = sync_playwright().start()
    try:
        browser = shots.launch_chromium(pw)

        def session():
            page = browser.new_context(viewport={"width": shots.WIDTH, "height": 1000}).new_page()
            shots.open_app(page, server.url)                    # the demo prepares itself on the first visit
            return page

        def open_cache(page) -> float:
            shots.goto(page, "load")
            page.get_by_text("…or open a feature cache").click()
            box = page.locator(".st-key-load_cache_folder input")
            box.fill(str(folder))
            box.press("Enter")
            shots.settle(page)
            t0 = time.perf_counter()
            page.locator(".st-key-load_cache_btn button").click()
            page.get_by_text(f"synthetic {shape.name}").first.wait_for(timeout=900_000)
            page.get_by_text(shots.DEMO_READY_TEXT).first.wait_for(timeout=900_000)
            shots.settle(page, timeout=900)
            return time.perf_counter() - t0

        def timed_goto(page, name: str) -> float:
            t0 = time.perf_counter()
            shots.goto(page, name, timeout=900)
            problems = shots.error_messages(page)
            if problems:
                raise RuntimeError(f"the {name} page shows errors: {problems}")
            return time.perf_counter() - t0

        def rss() -> float:
            return server.rss_kib() / 1024

        def toggles(page, count: int, heads: Sequence | None = None) -> list[float]:
            """``count`` clicks, alternately ticking and unticking ``head`` (or each of ``heads`` in turn)."""
            page.locator(".st-key-abl_clear button").click()
            page.locator('[data-testid="stMarkdownContainer"]', has_text="Removed: nothing ·").first.wait_for()
            shots.settle(page)
            out = []
            for i in range(count):
                h = head if heads is None else heads[i // 2]
                box = page.locator(f".st-key-abl_{h.layer}_{h.head} label")
                page.evaluate(shots.CLICK_WATCH)
                box.click()
                expected = str(flips[h]) if i % 2 == 0 else "0"
                page.wait_for_function(shots.SHOWN_WATCH, arg=["Predictions changed", expected],
                                       timeout=120_000, polling="raf")
                t = page.evaluate("window.__rcT")
                out.append(t["done"] - t["click"])
                shots.settle(page, pause_ms=50)
            return out

        a = session()
        shots.settle(a)
        empty = rss()
        rows.append(["empty server (the demo loaded, one session)", "", f"{empty:.0f}", "", ""])
        t = open_cache(a)
        rows.append(["Load: open the cache → findings on screen (scoring, first ablation, diagnosis)", f"{t:.1f} s",
                     f"{rss():.0f}", f"{rss() - empty:+.0f}", ""])
        for name, label, goal in (("errors", "Errors page", ""), ("heads", "Heads page (scores, selection)", "scoring ≤ 5 s")):
            t = timed_goto(a, name)
            ok = "" if not goal else ("yes" if t <= float(goal.split("≤ ")[1].split()[0]) else "**no**")
            rows.append([label, f"{t:.1f} s", f"{rss():.0f}", f"{rss() - empty:+.0f}", f"{goal}: {ok}" if goal else ""])
        runs = inspector_runs(a, timed_goto, shape.n_heads)
        rows.append(["Head inspector, 3 runs (TextSpan over ≤ 10,000 sampled images, push over all): "
                     + ", ".join(f"head L{h.replace('.', '.H')}" for h, _ in runs), " / ".join(f"{t:.1f} s" for _, t in runs),
                     f"{rss():.0f}", f"{rss() - empty:+.0f}",
                     f"≤ {GOALS['inspector_s']} s each: "
                     + ("yes" if max(t for _, t in runs) <= GOALS["inspector_s"] else "**no**")])
        timed_goto(a, "ablate")
        first = toggles(a, 2 * len(fresh), fresh)[::2]
        rows.append([f"Ablate: a head's first toggle (its projections computed; {len(fresh)} heads never used before: "
                     + ", ".join(str(h) for h in fresh) + ")",
                     " / ".join(f"{t:.0f} ms" for t in first), f"{rss():.0f}", f"{rss() - empty:+.0f}",
                     f"≤ {GOALS['browser_toggle_ms']} ms: " + ("yes" if max(first) <= GOALS["browser_toggle_ms"]
                                                              else "**no**")])
        lat = toggles(a, n_toggles)
        med = statistics.median(lat)
        rows.append([f"Ablate: head toggle → 'Predictions changed' on screen (browser clock, {n_toggles} toggles)",
                     f"{med:.0f} ms (min {min(lat):.0f}, max {max(lat):.0f})", f"{rss():.0f}", f"{rss() - empty:+.0f}",
                     f"≤ {GOALS['browser_toggle_ms']} ms: {'yes' if med <= GOALS['browser_toggle_ms'] else '**no**'}"])
        b = session()
        t = open_cache(b)
        rows.append(["a second session opens the same cache (shared resources)", f"{t:.1f} s", f"{rss():.0f}",
                     f"{rss() - empty:+.0f}", ""])
        timed_goto(b, "ablate")
        toggles(a, 1)                     # leave the toggled head ticked (the refinement's fallback head set)
        timed_goto(a, "refine")
        radio = a.locator(".st-key-ref_heads")
        used = ("The protocol's choice" if "The protocol's choice: none" not in radio.inner_text()
                else "Ticked on the Ablate page")
        radio.get_by_text(used, exact=False).click()
        shots.settle(a)
        t0 = time.perf_counter()
        a.get_by_role("button", name="Run phase 2").click()
        during = toggles(b, 6)
        a.get_by_text("Results on held-out images").wait_for(timeout=3_600_000)
        refine_s = time.perf_counter() - t0
        shots.settle(a, timeout=900)
        med_b = statistics.median(during)
        rows.append(["second session: toggles while the first one refines (no page blocks the others)",
                     f"{med_b:.0f} ms (min {min(during):.0f}, max {max(during):.0f})", f"{rss():.0f}",
                     f"{rss() - empty:+.0f}",
                     f"≤ {GOALS['browser_toggle_ms']} ms: {'yes' if med_b <= GOALS['browser_toggle_ms'] else '**no**'}"])
        rows.append([f"Refine: click → results on screen (background job, merged checkpoint exported; heads: {used.lower()})",
                     f"{refine_s:.0f} s", f"{rss():.0f}", f"{rss() - empty:+.0f}", ""])
        peak = _server_kib(server.pid, "VmHWM") / 1024
        rows.append(["peak resident memory of the server (VmHWM) over the whole run", "", f"{peak:.0f}",
                     f"{peak - empty:+.0f}", f"≤ {GOALS['rss_mib']} MiB above empty: "
                     + ("yes" if peak - empty <= GOALS["rss_mib"] else "**no**")])
        browser.close()
    finally:
        pw.stop()
        server.stop()
        log = (ctx.workdir / "streamlit.log").read_text(errors="replace")
        if "Traceback" in log:
            ctx.log("browser: the server log has a traceback:\n" + log[-3000:])
    return rows


# ------------------------------------------------------------------------------------------------
# A map-pooled tower (issue 34 item 8): what all-token pools read, and the pages on its cache
# ------------------------------------------------------------------------------------------------
#: ``(label, open_clip architecture or None, config or None)``: two towers at their real size (random weights,
#: built from open_clip's configs, nothing downloaded) and the two embedded demo models' towers.
MAP_TOWERS = (("ViT-B/16 (class token)", "ViT-B-16"), ("ViT-B/16 SigLIP 2 (attention-map pool)", "ViT-B-16-SigLIP2"),
              ("demo model (class token)", "demo"), ("SigLIP-shaped demo model (map pool)", "demo-map"))


def tower_facts(arch: str, scope_layers: int = 4) -> dict[str, Any]:
    """A vision tower built from its open_clip config with random weights: the decomposition's facts, the bytes
    per image it holds beyond the forward pass (the last ``scope_layers`` layers and every layer), and its
    remainder terms (from decomposing one blank image)."""
    import open_clip
    import torch

    from refineclip_core.demo.siglip import siglip_model_config
    from refineclip_core.features.backends import backend_for
    from refineclip_core.features.decomposition import decompose, resolve_layers
    from refineclip_core.loading.models import DEMO_DIR, DEMO_MODEL_NAME

    if arch == "demo-map":
        cfg = siglip_model_config()
    elif arch == "demo":
        cfg = json.loads((DEMO_DIR / f"{DEMO_MODEL_NAME}.json").read_text())
    else:
        cfg = open_clip.get_model_config(arch)
    torch.manual_seed(0)
    visual = open_clip.model._build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"]).eval()
    backend = backend_for(visual)
    info = backend.info
    scope = resolve_layers(info.n_layers, scope_layers)
    size = visual.image_size
    h, w = (size, size) if isinstance(size, int) else size
    with torch.inference_mode():
        names = decompose(visual, torch.zeros(1, 3, int(h), int(w)), scope).remainder_names
    return {"info": info, "scope": scope, "names": tuple(names), "bytes": backend.capture_bytes_per_image(scope, 4),
            "bytes_all": backend.capture_bytes_per_image(tuple(range(info.n_layers)), 4)}


def bench_map(ctx: Ctx) -> Table:
    """The decomposition's memory per image for class-token and all-token pools against the memory budget, and
    the Heads page scoring, head toggles and Head inspector measured on a cache shaped like the map-pooled
    ViT-B/16 SigLIP 2 tower next to one shaped like the class-token ViT-B/16 (same images, same classes)."""
    from refineclip_core.loading.budget import format_bytes, memory_budget

    budget, where = memory_budget()
    facts = {label: tower_facts(arch) for label, arch in MAP_TOWERS}
    rows: list[list[Any]] = [
        ["pool: rows of the last residual stream the readout reads",
         *(f"{f['info'].pool}: " + (f"{f['info'].n_tokens} tokens (all)" if f["info"].pool != "tok" else "the class token")
           for f in facts.values())],
        ["layers × heads, width, embedding", *(f"{f['info'].n_layers} × {f['info'].n_heads}, {f['info'].width}, "
                                              f"{f['info'].embed_dim}" for f in facts.values())],
        ["decomposition: bytes held per image beyond the forward pass (last 4 layers, float32)",
         *(format_bytes(f["bytes"]) for f in facts.values())],
        ["… with every layer in scope", *(format_bytes(f["bytes_all"]) for f in facts.values())],
        [f"largest batch `extract` accepts within the memory budget ({format_bytes(budget) if budget else 'unknown'}, "
         f"{where.split(';')[0]}), last 4 layers",
         *((f"{budget // f['bytes']:,} images" if budget else "no limit") for f in facts.values())],
    ]
    n = 2_000 if ctx.quick else 10_000
    measured: dict[str, dict] = {}
    for label, arch in MAP_TOWERS[:2]:
        f = facts[label]
        i = f["info"]
        shape = Shape(label, i.n_layers, i.n_heads, i.embed_dim, remainder_names=f["names"] if i.pool != "tok" else ())
        base = ctx.workdir / f"map-base-{arch}"
        ctx.log(f"map: writing {n:,} synthetic images shaped like {label}")
        E = write_base(base, shape, n, log=ctx.log)
        folder = make_cache(ctx.workdir / f"map-{arch}", base, shape, E, n, 2,
                            standin_model(ctx.workdir / "model", shape.embed_dim))
        ctx.log(f"map: measuring {label}")
        measured[label] = {"bytes": cache_bytes(folder) / n, "R": shape.n_remainders,
                           "res": run_child(folder, refine=False)}
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)

    def step(res: dict, word: str) -> dict:
        return next(s for s in res["steps"] if word in s["step"])

    pad = ["–", "–"]
    rows.append([f"cache on disk per image ({n:,} synthetic images, heads of the last 4 layers, float32)",
                 *(f"{format_bytes(m['bytes'])} ({m['R']} remainder terms)" for m in measured.values()), *pad])
    for word, what in (("scoring", "Heads page scoring (DE_A..DE_D + consensus selection)"),
                       ("first ablation", "first ablation (head·text projections, adaptation means)"),
                       ("inspector", "Head inspector (TextSpan k=5 over ≤ 10,000 images + push statistics)")):
        rows.append([what, *(f"{step(m['res'], word)['seconds']:.2f} s" for m in measured.values()), *pad])
    tog = [step(m["res"], "head toggle →")["toggle_ms"] for m in measured.values()]
    rows.append(["head toggle → new predictions and accuracies (core, median (min, max))",
                 *(f"{t[0]:.1f} ms ({t[1]:.1f}, {t[2]:.1f})" for t in tog), *pad])
    rows.append(["peak resident memory above the process's start",
                 *(f"{m['res']['peak_mib'] - m['res']['baseline']['rss_mib']:+.0f} MiB" for m in measured.values()), *pad])
    return Table(
        name="map",
        title="A map-pooled tower: what the decomposition reads per image, and the pages on its cache",
        columns=["measure", *(label for label, _ in MAP_TOWERS)],
        rows=rows,
        notes=[
            "Towers built from open_clip's configs with random weights (nothing downloaded; the demo models' own "
            "configs); the bytes are `VisionBackend.capture_bytes_per_image`, what `decompose` holds per image "
            "beyond a plain forward pass: a class-token readout keeps only the rows it reads (the class token of "
            "every captured term), a pool over every token keeps every token's terms of the layers from the scope's "
            "first on, plus one layer's attention matrix. `extract` checks it against `REFINECLIP_MEMORY_BUDGET` "
            "(else 75% of the memory available) before the first batch and refuses a batch over it in one sentence "
            "naming the bytes per image and what to lower (`features/extraction._check_capture_budget`; "
            "tests/test_backends.py sets a 100 kB budget and checks the refusal). The token counts are those of "
            "the tower's input size: the SigLIP-shaped demo's `test_vit` trunk is built for timm's default 160 px "
            "but resizes its position embeddings to the 96 px it is fed (6 × 6 patches and its class token).",
            "What a cache stores per image does not depend on the pool: one contribution per head of the scope and "
            "one per remainder term, each an embedding-wide vector (the map pool adds its own terms, e.g. the pool's "
            "MLP branch, `pool_mlp`), so the pages' work on a map-pooled cache is the class-token cache's at the same "
            "width, heads and images: the two caches here are synthetic, written by the cache's own writer with "
            "each tower's shape and remainder names (c_h = m_h + share_h·z + noise, E = Σ c + Σ r; see the caches "
            "table), 2 classes with Waterbirds-like groups, measured in a fresh process each.",
        ],
    )


# ------------------------------------------------------------------------------------------------
# Main: each table in its own marked block of RESULTS.md
# ------------------------------------------------------------------------------------------------
PARTS = ("photos", "caches", "browser", "map")


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(measure_cache(**json.loads(sys.argv[2]))))
        return 0
    from benchmarks.demo_world import replace_section, workdir

    logging.getLogger().setLevel(logging.ERROR)   # open_clip's random-weights warnings, for this run only
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes; prints only unless --out is given")
    ap.add_argument("--only", action="append", choices=PARTS, help="run only this part (repeatable; browser runs "
                                                                     "on the 50k ViT-L/14 cache, so it implies caches)")
    ap.add_argument("--out", type=Path, help=f"Markdown file to update (default in a full run: {DEFAULT_OUT})")
    ap.add_argument("--cache", action="append", default=[], metavar="SHAPE:IMAGES:CLASSES",
                    help="measure only this cache of the plan (repeatable, e.g. ViT-B/16:50000:1000; float32 "
                         "storage); a partial run: give --out another file")
    ap.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic images and caches in --workdir and reuse "
                                                        "them in a later run (tens of GiB at 50k images)")
    ap.add_argument("--browser-on", type=parse_cache, metavar="SHAPE:IMAGES:CLASSES",
                    help="the cache the browser part opens (default: the plan's 2-class ViT-L/14 cache, 50k images; "
                         "another gets its own table, e.g. ViT-L/14:50000:1000)")
    args = ap.parse_args(argv)
    if args.keep and args.workdir is None:
        ap.error("--keep needs --workdir (where the kept caches live)")
    parts = set(args.only or PARTS)
    out = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
    info = machine_info()
    tables: list[Table] = []
    with workdir(args.workdir, "refineclip-scale-") as work:   # a temporary one is removed at the end
        ctx = Ctx(args.quick, work, "scale")
        if "photos" in parts:
            t0 = time.perf_counter()
            table = bench_photos(ctx)
            table.run_info = run_info_line(info, args.quick, time.perf_counter() - t0)
            tables.append(table)
        if "map" in parts:
            t0 = time.perf_counter()
            table = bench_map(ctx)
            table.run_info = run_info_line(info, args.quick, time.perf_counter() - t0)
            tables.append(table)
        if parts & {"caches", "browser"}:
            t0 = time.perf_counter()
            browser_rows: list = []

            def browser(folder: Path, shape: Shape) -> list:
                return bench_browser(ctx, folder, shape)

            table, browser_rows = bench_caches(ctx, keep=work if args.keep else None,
                                               browser=browser if "browser" in parts else None,
                                               only=args.cache, browser_on=args.browser_on)
            table.run_info = run_info_line(info, args.quick, time.perf_counter() - t0) + (
                f" (partial: only {', '.join(args.cache)})" if args.cache else "")
            tables.append(table)
            if browser_rows:
                b_shape, b_n, b_C = args.browser_on or BROWSER_ON
                tables.append(Table(
                    name="browser" if args.browser_on in (None, BROWSER_ON) else f"browser-{b_C}-classes",
                    title=f"The {b_n // 1000}k-image {b_shape} cache ({b_C} classes) in the dashboard, in Chromium",
                    columns=["measure", "time", "server RSS MiB", "above the empty server MiB", "goal"],
                    rows=browser_rows, run_info=table.run_info,
                    notes=["One `streamlit run app.py` server and headless Chromium on this machine. The empty server "
                           "is one browser session with the embedded demo loaded (what a fresh server shows); the "
                           "cache is then opened on the Load page ('…or open a feature cache', read-only) and every "
                           "page visited; RSS is the server process's VmRSS after each step.",
                           "Toggles: a head checkbox on the Ablate page (held-out images, the protocol's mean "
                           "ablation), click to the first frame where 'Predictions changed' shows the count the "
                           "core computes for that head (browser clock), alternately on and off.",
                           "The second session opens the same cache (engine and identification are shared "
                           "resources) and toggles while the first session's refinement runs as a background job.",
                           "The Head inspector's time is the core's TextSpan (a seeded sample of 10,000 of the 50,000 "
                           "images) and push statistics (the caches table) plus the page's concept evidence, the push "
                           "chart (outliers only above 5,000 images) and the browser drawing it. Three runs: the page "
                           "opened from the sidebar (the protocol's first head), then two other heads picked in its "
                           "'Head' box, each computed afresh (nothing of a head is cached before it is first shown); "
                           "a run ends when the script is idle and nothing on the page is stale.",
                           "The model behind the synthetic cache is a tiny stand-in with the same embedding width "
                           "(768), used to embed the TextSpan pool once (cached in the home folder before the run) "
                           "and for the merged checkpoint; the pages' work does not depend on it."]))
    for table in tables:
        print(table.markdown() + "\n", flush=True)
        if out is not None:
            replace_section(out, f"scale-{table.name}", table.markdown())
    if out is not None:
        print(f"updated {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

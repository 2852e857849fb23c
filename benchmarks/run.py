"""Performance benchmarks of RefineCLIP Studio.

    python benchmarks/run.py                 # full run (~10 min on 2 CPU cores), writes benchmarks/RESULTS.md
    python benchmarks/run.py --quick         # small sizes (< 2 min), prints only
    python benchmarks/run.py --quick --out benchmarks/RESULTS.md
    python benchmarks/run.py --only extraction --only memory

Every benchmark is a function ``bench_<name>(ctx) -> Table`` listed in :data:`BENCHMARKS`;
append new ones there. Each table is written to ``RESULTS.md`` between the markers
``<!-- perf:<name>:start -->`` / ``<!-- perf:<name>:end -->`` inside the section
``<!-- perf:start -->`` ... ``<!-- perf:end -->``; everything else in the file (other
engineers' sections) is kept, and ``--only`` replaces only the tables it re-measured.

The machine may be shared and noisy: timed variants are interleaved within every repetition
(in a rotating order) and medians are reported, with ratios taken within a repetition.
Models have random weights (``open_clip.create_model(name)`` without a pretrained tag):
timings and memory do not depend on the weights, and nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import functools
import json
import logging
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # ``python benchmarks/run.py`` from a checkout without installing
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "RESULTS.md"
TARGET_RATIO = 1.15


# --------------------------------------------------------------------------------------------
# plumbing: context, tables, timing
# --------------------------------------------------------------------------------------------
@dataclass
class Ctx:
    """What a benchmark function gets: the mode, a scratch folder and a logger (``tag`` names the
    benchmark in its log lines)."""

    quick: bool
    workdir: Path
    tag: str = "bench"

    def log(self, msg: str) -> None:
        print(f"[{self.tag} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Table:
    """A benchmark's result: one Markdown table plus notes saying what was measured."""

    name: str
    title: str
    columns: list[str]
    rows: list[list[Any]]
    notes: list[str] = field(default_factory=list)
    run_info: str = ""
    more: list["Table"] = field(default_factory=list)  # further tables of the same benchmark

    def markdown(self, level: int = 3) -> str:
        out = [f"{'#' * level} {self.title}", ""]
        if self.run_info:
            out += [f"_{self.run_info}_", ""]
        out.append("| " + " | ".join(self.columns) + " |")
        out.append("|" + "|".join("---" for _ in self.columns) + "|")
        out += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in self.rows]
        if self.notes:
            out.append("")
            out += [f"- {n}" for n in self.notes]
        for sub in self.more:
            out += ["", sub.markdown(level + 1)]
        return "\n".join(out)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) < 1e-3 or abs(v) >= 1e6:
            return f"{v:.2e}"
        if abs(v) < 10:
            return f"{v:.3f}"
        return f"{v:,.1f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


@dataclass
class Timings:
    """Per-repetition wall-clock and process CPU seconds of each timed function."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]
    last: dict[str, Any]  # each function's result in the last repetition

    def median(self, name: str) -> float:
        return statistics.median(self.wall[name])


def interleaved(fns: dict[str, Callable[[], Any]], reps: int) -> Timings:
    """Time every function in every repetition, interleaved.

    Repetition ``r`` runs the functions in an order rotated by ``r``, so slow phases of a
    shared machine hit every variant alike and none always runs first.
    """
    names = list(fns)
    out = Timings({n: [] for n in names}, {n: [] for n in names}, {})
    for r in range(reps):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            w0, c0 = time.perf_counter(), time.process_time()
            out.last[n] = fns[n]()
            out.cpu[n].append(time.process_time() - c0)
            out.wall[n].append(time.perf_counter() - w0)
    return out


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> tuple[float, float, float]:
    """Median, min and max over repetitions of ``num[r] / den[r]``."""
    ratios = [a / b for a, b in zip(num, den)]
    return statistics.median(ratios), min(ratios), max(ratios)


def machine_info() -> dict[str, Any]:
    import open_clip

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu or "unknown CPU",
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": getattr(open_clip, "__version__", "?"),
        "numpy": np.__version__,
        "loadavg": " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a",
    }


def run_info_line(info: dict[str, Any], quick: bool, seconds: float) -> str:
    return (f"{info['date']}, {'quick' if quick else 'full'} run, {seconds:.0f} s; {info['cpu']}, "
            f"{info['usable_cpus']} usable of {info['cpu_count']} CPUs, torch threads: {info['torch_threads']}, "
            f"load average {info['loadavg']} at start; Python {info['python']}, torch {info['torch']}, "
            f"open_clip {info['open_clip']}, numpy {info['numpy']}")


@functools.lru_cache(maxsize=1)
def _random_clip(name: str) -> torch.nn.Module:
    """``open_clip.create_model(name)`` with seeded random weights, fp32, eval mode, no download
    (the last one is kept for the next benchmark; do not modify it in place)."""
    import open_clip

    torch.manual_seed(0)
    return open_clip.create_model(name).eval().requires_grad_(False)


def _rel_err(parts_sum: torch.Tensor, reference: torch.Tensor) -> float:
    a, b = parts_sum.double(), reference.double()
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())


# --------------------------------------------------------------------------------------------
# a. extraction overhead
# --------------------------------------------------------------------------------------------
def bench_extraction(ctx: Ctx) -> Table:
    """``decompose`` (hooks + per-head CLS rows + Eq. 3 linearisation) vs plain ``encode_image``."""
    from refineclip_core.features.decomposition import decompose

    # (model, batch, repetitions)
    configs = [("ViT-B-32", 16, 3)] if ctx.quick else [
        ("ViT-B-32", 16, 5), ("ViT-B-32", 64, 3), ("ViT-B-16", 16, 3), ("ViT-B-16", 64, 3)]
    rows = []
    warmed: set[str] = set()
    for name, batch, reps in configs:
        ctx.log(f"extraction: random {name}")
        model = _random_clip(name)
        if name not in warmed:
            warmed.add(name)
            warm = torch.randn(2, 3, *model.visual.image_size, generator=torch.Generator().manual_seed(0))
            with torch.inference_mode():  # first calls build kernels/primitives; keep them out of the timings
                model.encode_image(warm), decompose(model.visual, warm, 4), decompose(model.visual, warm, "all")
        images = torch.randn(batch, 3, *model.visual.image_size, generator=torch.Generator().manual_seed(1))
        ctx.log(f"extraction: {name} batch {batch}, {reps} interleaved repetitions")

        def encode():
            with torch.inference_mode():
                return model.encode_image(images)

        t = interleaved({
            "encode": encode,
            "last4": lambda: decompose(model.visual, images, 4),
            "all": lambda: decompose(model.visual, images, "all"),
        }, reps)
        r4, r4_lo, r4_hi = paired_ratio(t.wall["last4"], t.wall["encode"])
        ra, ra_lo, ra_hi = paired_ratio(t.wall["all"], t.wall["encode"])
        c4 = paired_ratio(t.cpu["last4"], t.cpu["encode"])[0]
        ca = paired_ratio(t.cpu["all"], t.cpu["encode"])[0]
        err = max(_rel_err(t.last["last4"].reconstruct(), t.last["encode"]),
                  _rel_err(t.last["all"].reconstruct(), t.last["encode"]))
        rows.append([name, batch, reps, t.median("encode"), t.median("last4"),
                     f"**{r4:.3f}** ({r4_lo:.2f}–{r4_hi:.2f})", f"{c4:.3f}", t.median("all"),
                     f"{ra:.3f} ({ra_lo:.2f}–{ra_hi:.2f})", f"{ca:.3f}", batch / t.median("last4"),
                     "yes" if max(r4, c4) <= TARGET_RATIO else "**no**", f"{err:.2e}"])
    return Table(
        name="extraction",
        title="Extraction overhead: decompose vs plain encode_image (fp32, CPU)",
        columns=["model", "batch", "reps", "encode_image s", "decompose(layers=4) s", "ratio layers=4",
                 "CPU-time ratio", "decompose(all) s", "ratio all", "CPU-time ratio all", "decompose img/s",
                 f"layers=4 ≤ {TARGET_RATIO}×", "max rel err"],
        rows=rows,
        notes=[
            "Times are wall-clock medians over repetitions; in each repetition the three calls run back to back "
            "in a rotating order. Ratios are medians of the per-repetition ratios (range in brackets); the "
            "CPU-time ratios use `time.process_time()` of the same calls.",
            "torch runs with the number of threads given by `--threads` (default 1; see the run line): on a "
            "shared machine one thread gives steady timings, while with several threads a busy neighbour that "
            "stalls one of them stalls the whole call.",
            "Both sides run under `torch.inference_mode()` on the same random input batch; `decompose` runs the "
            "real forward pass once with hooks and returns E, every head's c[l,h] and the remainders (Eq. 3-4).",
            "max rel err: max over images of ||sum of parts - encode_image|| / ||encode_image|| for both scopes.",
        ],
    )


# --------------------------------------------------------------------------------------------
# b. memory: cache bytes per image, and peak RSS of extraction at two dataset sizes
# --------------------------------------------------------------------------------------------
def _write_images(root: Path, n: int, size: int, classes: Sequence[str] = ("a", "b"), seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / classes[i % len(classes)] / f"{i:06d}.png")


def _cache_bytes_formula(embed_dim: int, n_layers: int, n_heads: int, n_scope: int, itemsize: int = 4) -> int:
    """Bytes per image of the four cache arrays: E (d), heads (L_s, H, d), remainders
    (2 L + 2, d) in the storage dtype, plus one int64 index."""
    return itemsize * embed_dim * (1 + n_scope * n_heads + 2 * n_layers + 2) + 8


def _dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 2, "head_width": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1},
}


def bench_memory(ctx: Ctx) -> Table:
    from refineclip_core.features.extraction import ExtractionConfig, extract
    from refineclip_core.loading.data import load_dataset
    from refineclip_core.loading.models import ModelSpec, load_model

    rows: list[list[Any]] = []
    # -- bytes per image: a real (small) ViT-B-16 extraction per scope, checked against the formula
    n_img = 4
    data = ctx.workdir / "b16-images"
    _write_images(data, n_img, 32)
    ctx.log("memory: ViT-B-16 cache bytes per image (real extraction of 4 images per scope)")
    loaded = load_model(ModelSpec("ViT-B-16"))
    ds = load_dataset(data)
    for scope, label in ((4, "last 4 layers"), ("all", "all layers")):
        cache = extract(loaded, ds, ctx.workdir / f"b16-cache-{scope}", ExtractionConfig(layers=scope, batch_size=n_img))
        m = cache.manifest
        arrays = (cache.embeddings, cache.heads, cache.remainders, cache.index)
        measured = sum(np.asarray(a).nbytes for a in arrays) / len(cache)
        formula = _cache_bytes_formula(m.embed_dim, m.n_layers, m.n_heads, len(m.layers))
        if measured != formula:
            raise AssertionError(f"cache bytes per image: formula {formula} != measured {measured}")
        rows.append([f"ViT-B-16, {label}", f"{len(m.layers)}×{m.n_heads} heads, R={cache.remainders.shape[1]}, d={m.embed_dim}",
                     int(measured), f"{measured / 1024:.1f} KiB",
                     f"{measured * 1e5 / 2**30:.2f} GiB", f"{measured * 1e6 / 2**30:.1f} GiB"])
    del loaded
    bytes_table_rows = rows

    # -- peak RSS during extraction of a small and a 10x larger dataset (tiny model, tiny images)
    sizes = (200, 2000) if ctx.quick else (1000, 10000)
    big = ctx.workdir / f"rss-images-{sizes[1]}"
    ctx.log(f"memory: writing {sizes[1]} tiny images")
    _write_images(big, sizes[1], 16)
    small = ctx.workdir / f"rss-images-{sizes[0]}"
    for c in ("a", "b"):  # the first images of the big set, as hard links
        (small / c).mkdir(parents=True, exist_ok=True)
    for i in range(sizes[0]):
        src = big / ("a", "b")[i % 2] / f"{i:06d}.png"
        os.link(src, small / src.parent.name / src.name)
    cfg_path = ctx.workdir / "bench-tiny-vit.json"
    cfg_path.write_text(json.dumps(TINY_CFG))
    rss_rows = []
    for n, folder in zip(sizes, (small, big)):
        ctx.log(f"memory: peak RSS of extracting {n} images (subprocess)")
        out = ctx.workdir / f"rss-cache-{n}"
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--rss-child",
             json.dumps({"config": str(cfg_path), "data": str(folder), "out": str(out)})],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"RSS child failed: {proc.stderr[-2000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        rss_rows.append([n, res["n_shards"], res["seconds"], n / res["seconds"], res["rss_before_mib"],
                         res["peak_rss_mib"], res["peak_rss_mib"] - res["rss_before_mib"], res["ru_maxrss_mib"],
                         _dir_bytes(out) / 2**20])
        hwm_reset = res["hwm_reset"]
    rss = Table(
        name="memory-rss",
        title=f"Peak RSS while extracting {sizes[0]:,} vs {sizes[1]:,} images",
        columns=["images", "shards", "extract s", "img/s", "RSS before extract MiB",
                 "peak RSS during extract MiB", "peak − before MiB", "ru_maxrss MiB", "cache on disk MiB"],
        rows=rss_rows,
        notes=[
            "Each row is a fresh process (1 torch thread) that loads a tiny random ViT (16 px, patch 8, width 32, "
            "2 layers, all layers in scope) and the image list, then extracts generated 16×16 PNGs (batch 64, "
            "shards of 512 images). Extraction holds one shard at a time, so the peak does not grow with the "
            "number of images.",
            "RSS before = VmRSS just before `extract`; peak during extract = VmHWM after it, "
            + ("reset to the current RSS just before `extract` (`/proc/self/clear_refs`)" if hwm_reset else
               "the whole process's peak (resetting it was not permitted here)")
            + ". ru_maxrss = `resource.getrusage(RUSAGE_SELF).ru_maxrss` at the end: on Linux it also counts "
            "the launching (large) parent's RSS carried over fork/exec, so it cannot show the extraction's own "
            "peak; it is listed because it is the usual measure.",
        ],
    )
    return Table(
        name="memory",
        title="Memory: cache size per image and peak RSS during extraction",
        columns=["cache of", "shape", "bytes / image", "per image", "100k images", "1M images"],
        rows=bytes_table_rows,
        notes=[
            "bytes / image = the nbytes of the embedding, heads, remainders (float32) and index (int64) arrays of a "
            f"real extraction of {n_img} random images with random-weight ViT-B-16, divided by the number of images; "
            "it equals 4·d·(1 + L_s·H + 2L + 2) + 8 exactly (checked on every run). fp64 models store float64 "
            "(twice the size); fp16/bf16 models store float32. Files add a 128-byte .npy header per array and shard.",
        ],
        more=[rss],
    )


def _rss_child(args: dict[str, str]) -> None:
    """Runs in a subprocess: load the tiny model and the images, extract, print RSS as JSON."""
    from refineclip_core.features.extraction import ExtractionConfig, extract
    from refineclip_core.loading.data import load_dataset
    from refineclip_core.loading.models import ModelSpec, load_model

    torch.set_num_threads(1)  # a tiny model: more threads only add synchronisation on a busy machine
    torch.manual_seed(0)
    loaded = load_model(ModelSpec("bench-tiny-vit", model_config=args["config"]))
    ds = load_dataset(args["data"])
    before = _proc_status_kib("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    hwm_reset = _reset_peak_rss()
    t0 = time.perf_counter()
    cache = extract(loaded, ds, args["out"], ExtractionConfig(layers="all", batch_size=64, shard_batches=8))
    seconds = time.perf_counter() - t0
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"n": len(cache), "n_shards": cache.manifest.n_shards, "seconds": seconds,
                      "rss_before_mib": before / 1024, "hwm_reset": hwm_reset,
                      "peak_rss_mib": _proc_status_kib("VmHWM") / 1024,
                      "ru_maxrss_before_mib": maxrss_before / 1024, "ru_maxrss_mib": maxrss / 1024}))


def _proc_status_kib(key: str) -> float:
    """``VmRSS`` (current) or ``VmHWM`` (peak) of this process from ``/proc/self/status``."""
    try:
        return float(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))
    except (OSError, AttributeError):
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux >= 4.0), so that the next
    reading is the peak of what runs in between."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# GPU readiness: the decomposition in every precision
# --------------------------------------------------------------------------------------------
def bench_precision(ctx: Ctx) -> Table:
    """Max relative decomposition error per dtype, on CPU (the same code runs on CUDA)."""
    from refineclip_core.features.decomposition import decompose
    from refineclip_core.loading.models import _DTYPES

    batch = 4 if ctx.quick else 8
    base = _random_clip("ViT-B-32").visual
    images = torch.randn(batch, 3, *base.image_size, generator=torch.Generator().manual_seed(2))
    rows = []
    for precision in ("fp64", "fp32", "bf16", "fp16"):
        dtype = _DTYPES[precision]
        ctx.log(f"precision: ViT-B-32 in {precision}")
        visual = copy.deepcopy(base).to(dtype)  # every precision rounds the same fp32 weights
        x = images.to(dtype)
        with torch.inference_mode():
            t0 = time.perf_counter()
            reference = visual(x)  # = model.encode_image(x): a separate call without hooks
            t_enc = time.perf_counter() - t0
        t0 = time.perf_counter()
        dec_all = decompose(visual, x, "all")
        t_dec = time.perf_counter() - t0
        dec4 = decompose(visual, x, 4)
        eps = float(torch.finfo(dtype).eps)
        e_all, e4 = _rel_err(dec_all.reconstruct(), reference), _rel_err(dec4.reconstruct(), reference)
        rows.append([precision, str(dec_all.heads.dtype).replace("torch.", ""), f"{eps:.2e}", f"{e4:.2e}", f"{e_all:.2e}",
                     f"{max(e4, e_all) / eps:.2f}", t_enc, t_dec])
        del visual
    return Table(
        name="precision",
        title="Decomposition error per precision (ViT-B-32, random weights, CPU)",
        columns=["precision", "parts dtype", "eps of dtype", "max rel err, layers=4", "max rel err, all layers",
                 "err / eps", "encode_image s (1 run)", "decompose(all) s (1 run)"],
        rows=rows,
        notes=[
            f"{batch} random images; error = max over images of ||sum of parts - encode_image|| / ||encode_image||, "
            "with encode_image a separate call in the same precision and the comparison in float64.",
            "In bf16/fp16 the error is the model's own rounding (every residual addition is rounded to the "
            "format), a few units of eps; computing the parts in float32 from the half-precision activations "
            "does not reduce it, so the parts are computed in the model's precision. The cache stores float32 "
            "for fp32/fp16/bf16 models and float64 for fp64 ones.",
            "`--device cuda --precision fp16|bf16` runs the same code on a GPU; under torchrun each rank uses "
            "cuda:LOCAL_RANK (not measured here: no GPU on this machine).",
        ],
    )


# --------------------------------------------------------------------------------------------
# d. the method on cached arrays: live ablation, scores + Alg. 1, refinement
# --------------------------------------------------------------------------------------------
def _synthetic_cache(n: int, layers: int, heads: int, d: int, classes: int, seed: int = 0):
    """Random cache-shaped arrays (timing only): E, c (n, L, H, d), normalised texts, labels, groups."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(n, layers, heads, d)).astype(np.float32) / np.sqrt(layers * heads)
    E = c.sum(axis=(1, 2)) + rng.normal(size=(n, d)).astype(np.float32)
    text = rng.normal(size=(classes, d)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    labels = rng.integers(0, classes, size=n)
    groups = rng.integers(0, 2 * classes, size=n)
    return E, c, text, labels, groups


def bench_method(ctx: Ctx) -> Table:
    """Live ablation at 10k images, DE_A..D + Alg. 1 at 1k, and refinement: all on cached arrays."""
    from refineclip_core.features.decomposition import HeadId
    from refineclip_core.method.ablation import AblationEngine
    from refineclip_core.method.errorsets import error_pairs, pair_error_sets
    from refineclip_core.edit.config import PaperConfig
    from refineclip_core.edit.paper import paper_phase2
    from refineclip_core.method.scores import compute_scores
    from refineclip_core.method.selection import select_heads

    n_live = 2_000 if ctx.quick else 10_000
    L, H, d, C = 4, 12, 512, 10
    E, c, text, labels, groups = _synthetic_cache(n_live, L, H, d, C)
    layers = list(range(8, 12))
    classes = [f"class{i}" for i in range(C)]
    group_names = [f"g{i}" for i in range(2 * C)]
    t0 = time.perf_counter()
    engine = AblationEngine(E, c, text, layers)
    t_build = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    ids = engine.head_ids()
    sets = [[ids[i] for i in rng.choice(len(ids), size=int(rng.integers(1, 9)), replace=False)] for _ in range(60)]
    toggle_times = []
    for s in sets:
        t0 = time.perf_counter()
        engine.ablate(s, labels, classes, groups, group_names)
        toggle_times.append(time.perf_counter() - t0)
    toggle_ms = 1000 * statistics.median(toggle_times)
    # what a real forward pass would cost for the same change: ViT-B-16 encode_image, measured per image
    visual = _random_clip("ViT-B-16").visual
    batch = 4 if ctx.quick else 16
    x = torch.randn(batch, 3, *visual.image_size, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        visual(x)
        t0 = time.perf_counter()
        visual(x)
        per_image = (time.perf_counter() - t0) / batch
    rows = [["live ablation: predictions + accuracy per class and group", f"N={n_live:,}, {L * H} heads, d={d}, {C} classes",
             f"{toggle_ms:.2f} ms (median of {len(sets)} random head sets of 1-8 heads)",
             f"≈ {per_image * n_live:,.0f} s (ViT-B-16 encode_image {per_image * 1000:.0f} ms/image × N, 1 thread)",
             "≤ 20 ms"],
            ["ablation engine build (once per cache)", f"N={n_live:,}", f"{t_build:.2f} s", "", ""]]

    # scores + selection at N = 1,000
    n_sc = 1_000
    E1, c1, text1, labels1, _ = _synthetic_cache(n_sc, L, H, d, C, seed=2)
    pred = (E1 @ text1.T).argmax(1)
    top = error_pairs(pred, labels1)[0]
    sets1 = pair_error_sets(pred, labels1, top.true, top.pred)
    eng1 = AblationEngine(E1, c1, text1, layers)
    times = []
    for _ in range(2 if ctx.quick else 5):
        t0 = time.perf_counter()
        scores = compute_scores(E1, c1, text1, sets1, layers)
        select_heads(eng1, scores, np.arange(n_sc), labels1, top_t=15)
        times.append(time.perf_counter() - t0)
    rows.append(["DE_A..DE_D + Alg. 1 (T=15, U over all images)", f"N={n_sc:,}, {L * H} heads, d={d}",
                 f"{statistics.median(times):.3f} s", "", "≤ 1 s"])

    # refinement: 500 Adam steps on 1,000 cached embeddings
    W = sets1.W
    local = np.setdiff1d(np.concatenate([sets1.C, sets1.A]), W)
    train = np.arange(n_sc)
    ablated = eng1.embeddings([HeadId(11, 0), HeadId(10, 3)], "zero", W)
    for strategy in ("diag", "full", "lora"):
        cfg = PaperConfig(strategy=strategy, steps=100 if ctx.quick else 500)
        t0 = time.perf_counter()
        paper_phase2(E1, labels1, text1, 100.0, W, local, ablated, cfg, train_rows=train)
        t = time.perf_counter() - t0
        rows.append([f"refinement ({strategy}), {cfg.steps} steps", f"{n_sc:,} embeddings, d={d}", f"{t:.2f} s", "",
                     "≤ 5 s" if strategy == "diag" else ""])
    return Table(
        name="method",
        title="The method on cached arrays (no forward pass)",
        columns=["operation", "size", "time", "a real forward pass instead", "target"],
        rows=rows,
        notes=["Random arrays shaped like a ViT-B-16 cache of the last 4 layers (timing only; correctness is in "
               "tests/test_method.py).",
               "Live ablation uses precomputed head·text projections: predicted classes need only "
               "E·t − Σ_S c_h·t, so a toggle costs O(N·|S|·C) instead of a forward pass.",
               "The forward-pass column extrapolates one measured ViT-B-16 batch to N images; the dashboard's "
               "click-to-screen latency is measured in a real browser by tests/test_browser.py."],
    )


def bench_textspan(ctx: Ctx) -> Table:
    """TextSpan (the Head inspector's head description) at ViT-L size: N images × M texts, d=1024."""
    from refineclip_core.inspection.textspan import describe_head

    n, m, d = (2_000, 1_000, 1024) if ctx.quick else (10_000, 5_000, 1024)
    rng = np.random.default_rng(11)
    heads = rng.standard_normal((n, 64), dtype=np.float32) @ rng.standard_normal((64, d), dtype=np.float32)
    pool = rng.standard_normal((m, d), dtype=np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    texts = [str(i) for i in range(m)]
    times = []
    for _ in range(2 if ctx.quick else 5):
        t0 = time.perf_counter()
        describe_head(heads, texts, pool, k=5)
        times.append(time.perf_counter() - t0)
    return Table(
        name="textspan",
        title="TextSpan: one head described by 5 texts of a pool (Head inspector)",
        columns=["operation", "size", "time (median)", "runs", "target"],
        rows=[["describe_head, k=5", f"N={n:,} images, M={m:,} texts, d={d}",
               f"{statistics.median(times):.2f} s", len(times), "≤ 2.5 s"]],
        notes=["Random head outputs of rank 64 and a random unit-norm pool (timing only; the picks are checked "
               "against a brute-force greedy search in tests/test_textspan.py, and the memory bound (no N × M "
               "array) by test_full_size_never_forms_an_images_by_texts_array)."],
    )


BENCHMARKS: list[Callable[[Ctx], Table]] = [bench_extraction, bench_memory, bench_precision, bench_method, bench_textspan]


# --------------------------------------------------------------------------------------------
# RESULTS.md: replace only our section, and inside it only the re-measured tables
# --------------------------------------------------------------------------------------------
def _marker(name: str, end: bool = False) -> str:
    return f"<!-- perf:{name}:{'end' if end else 'start'} -->"


SECTION_HEADER = (
    "## Performance\n\n"
    "Generated by `python benchmarks/run.py` (do not edit by hand; `--only NAME` re-measures one table). "
    "Machine and versions are given per table."
)


def render_section(blocks: dict[str, str], order: Sequence[str]) -> str:
    """The body of the ``perf`` section: the header, then each table between its own markers."""
    names = [n for n in order if n in blocks] + [n for n in blocks if n not in order]
    parts = [SECTION_HEADER]
    for n in names:
        parts.append(f"{_marker(n)}\n{blocks[n]}\n{_marker(n, end=True)}")
    return "\n\n".join(parts)


def parse_blocks(section: str) -> dict[str, str]:
    pattern = re.compile(r"<!-- perf:([\w-]+):start -->\n(.*?)\n<!-- perf:\1:end -->", re.S)
    return {m.group(1): m.group(2) for m in pattern.finditer(section)}


def update_results(path: Path, new_blocks: dict[str, str], order: Sequence[str]) -> None:
    """Replace the re-measured tables of the ``perf`` section of RESULTS.md (the others are kept)."""
    from benchmarks.results_md import replace_section, sections

    blocks = parse_blocks(sections(path.read_text()).get("perf", "")) if path.exists() else {}
    blocks.update(new_blocks)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_section(path, "perf", render_section(blocks, order))


def _bench_name(fn: Callable) -> str:
    return fn.__name__.removeprefix("bench_")


def main(argv: Sequence[str] | None = None) -> int:
    # open_clip warns about random weights on every model; quieted for this run only, never at import
    # (tests import machine_info from here)
    logging.getLogger().setLevel(logging.ERROR)
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--rss-child":
        _rss_child(json.loads(sys.argv[2]))
        return 0
    names = [_bench_name(b) for b in BENCHMARKS]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes and fewer repetitions (< 2 min); prints only "
                                                        "unless --out is given")
    p.add_argument("--out", type=Path, help=f"Markdown file to update (default in a full run: {DEFAULT_OUT})")
    p.add_argument("--only", action="append", choices=names, metavar="NAME",
                   help=f"run only this benchmark (repeatable): {', '.join(names)}")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads for the timings (default 1: steadiest on a shared machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    out = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
    selected = [b for b in BENCHMARKS if not args.only or _bench_name(b) in args.only]

    info = machine_info()
    blocks: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="refineclip-bench-") as tmp:
        for bench in selected:
            ctx = Ctx(quick=args.quick, workdir=Path(tmp) / _bench_name(bench))
            ctx.workdir.mkdir(parents=True)
            t0 = time.perf_counter()
            table = bench(ctx)
            table.run_info = run_info_line(info, args.quick, time.perf_counter() - t0)
            blocks[_bench_name(bench)] = table.markdown()
            print(table.markdown() + "\n", flush=True)
            shutil.rmtree(ctx.workdir, ignore_errors=True)
    if out is not None:
        update_results(out, blocks, names)
        print(f"updated {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

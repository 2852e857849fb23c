"""Real folders at real scale: the loader's equivalences, caches read shard by shard, float16
storage, read-only shared caches, and a small run of the scale benchmark (timings stay there)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from refineclip_core.errors import CacheError, RefineClipError
from refineclip_core.features.cache import FeatureCache
from refineclip_core.features.sharded import ShardedArray, row_blocks
from refineclip_core.features.extraction import ExtractionConfig, check_decomposition, extract, load_batch
from refineclip_core.features.zeroshot import normalize
from refineclip_core.loading.batches import DRAFT_FACTOR, DecodeConfig, decode_min_side, iter_batches
from refineclip_core.loading.data import load_dataset
from refineclip_core.loading.decode import load_image
from refineclip_core.loading.models import ModelSpec, load_model
from refineclip_core.method.ablation import AblationEngine
from refineclip_core.method.evaluation import accuracy_report
from refineclip_core.method.protocol import DEFAULT_PROTOCOL, identify, make_engine
from refineclip_core.session.caches import cache_source

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def loaded(tiny_model_files):
    return load_model(ModelSpec(tiny_model_files["name"], model_config=str(tiny_model_files["config"]),
                                checkpoint=str(tiny_model_files["checkpoint"])))


def _photo(rng: np.random.Generator, colour, size=(400, 300)) -> Image.Image:
    """A smooth, textured, noisy picture (what reduced decoding is for), of a colour."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.array(colour, np.float32)[None, None] * (0.7 + 0.3 * np.sin(x / 37.0 + rng.uniform(0, 6))[..., None])
    base += 25 * np.cos(y / 23.0)[..., None] + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """JPEGs several times the tiny model's input (one stored rotated with EXIF orientation), a PNG,
    and a file that is not an image."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    for cls, colour in {"red": (200, 60, 50), "green": (60, 190, 70), "blue": (50, 70, 200)}.items():
        (root / cls).mkdir()
        for i in range(5):
            img = _photo(rng, colour)
            if i == 1:
                exif = Image.Exif()
                exif[0x0112] = 6
                img.transpose(Image.Transpose.ROTATE_90).save(root / cls / f"{i}.jpg", quality=92, exif=exif)
            else:
                img.save(root / cls / f"{i}.jpg", quality=92)
        _photo(rng, colour, (60, 50)).save(root / cls / "small.png")
    (root / "red" / "broken.jpg").write_bytes(b"not a jpeg at all")
    return root


# ------------------------------------------------------------------------------------------------
# The loader

def test_reduced_decoding_keeps_both_sides_at_least_twice_the_input(photos, loaded):
    side = decode_min_side(loaded, exact=False)
    assert side == DRAFT_FACTOR * 32 and decode_min_side(loaded, exact=True) is None
    full = load_image(photos / "red" / "0.jpg")
    reduced = load_image(photos / "red" / "0.jpg", min_side=side)
    assert full.size == (400, 300) and reduced.size == (100, 75) and min(reduced.size) >= side
    rotated = load_image(photos / "red" / "1.jpg", min_side=side)   # EXIF orientation still applied
    assert rotated.size == (100, 75)
    assert load_image(photos / "red" / "small.png", min_side=side).size == (60, 50)   # not a JPEG: untouched


def test_reduced_decoding_agrees_with_exact_decoding(photos, loaded, tmp_path):
    """The stated tolerance: embeddings of reduced and exact decoding agree to a cosine ≥ 0.99
    (benchmarks/RESULTS.md measures ~0.999 on camera-sized photos), the same zero-shot top-1."""
    ds = load_dataset(photos)
    draft = extract(loaded, ds, tmp_path / "draft", ExtractionConfig(layers="all", batch_size=4))
    exact = extract(loaded, ds, tmp_path / "exact",
                    ExtractionConfig(layers="all", batch_size=4, decode=DecodeConfig(exact=True)))
    assert draft.manifest.decode_min_side == 64 and exact.manifest.decode_min_side is None
    assert draft.manifest.fingerprint != exact.manifest.fingerprint
    assert len(draft) == len(exact) == 18 and [s.path for s in draft.skipped] == [str(photos / "red" / "broken.jpg")]
    cos = np.einsum("nd,nd->n", normalize(draft.embeddings.astype(np.float64)),
                    normalize(exact.embeddings.astype(np.float64)))
    assert cos.min() > 0.99
    pngs = [i for i, r in enumerate(draft.records) if r.path.endswith(".png")]
    np.testing.assert_array_equal(draft.embeddings[pngs], exact.embeddings[pngs])
    # checks that decode again decode like the cache did: the decomposition holds to float precision
    assert check_decomposition(loaded, draft)["max_rel_error"] < 1e-5
    assert check_decomposition(loaded, exact)["max_rel_error"] < 1e-5


def test_exact_decoding_is_the_plain_transform(photos, loaded):
    recs = load_dataset(photos).records[:4]
    batch, keep, bad = load_batch(loaded, recs, 10)
    assert keep == [10, 11, 12, 13] and not bad
    ref = torch.stack([loaded.preprocess(load_image(r.path)) for r in recs])
    assert torch.equal(batch, ref)


@pytest.mark.parametrize("decode", [DecodeConfig(workers=2), DecodeConfig(workers=3, prefetch=1),
                                    DecodeConfig(workers=2, kind="process")])
def test_worker_count_and_kind_do_not_change_the_cache(photos, loaded, tmp_path, decode):
    ds = load_dataset(photos)
    cfg = ExtractionConfig(layers=2, batch_size=3, shard_batches=2)
    ref = extract(loaded, ds, tmp_path / "serial", replace(cfg, decode=DecodeConfig(workers=0)))
    got = extract(loaded, ds, tmp_path / "parallel", replace(cfg, decode=decode))
    assert got.manifest.fingerprint == ref.manifest.fingerprint and got.manifest.n_shards == 4
    for name in ("embeddings", "index"):
        np.testing.assert_array_equal(getattr(got, name), getattr(ref, name))
    for name in ("heads", "remainders"):
        np.testing.assert_array_equal(np.asarray(getattr(got, name)), np.asarray(getattr(ref, name)))
    assert [(s.path, s.reason) for s in got.skipped] == [(s.path, s.reason) for s in ref.skipped]


def test_batches_come_in_order_and_pinning_is_optional(photos, loaded):
    recs = load_dataset(photos).records
    spans = [(0, 5), (5, 11), (11, 19)]
    serial = list(iter_batches(recs, spans, loaded.preprocess, 64, DecodeConfig(workers=0)))
    threaded = list(iter_batches(recs, spans, loaded.preprocess, 64, DecodeConfig(workers=2, prefetch=1)))
    assert [b.keep for b in serial] == [b.keep for b in threaded]
    assert sum(len(b.keep) for b in serial) == 18 and sum(len(b.skipped) for b in serial) == 1
    for a, b in zip(serial, threaded):
        assert torch.equal(a.images, b.images)
    if torch.cuda.is_available():  # pragma: no cover - no GPU on the CI machine
        pinned = next(iter_batches(recs, spans[:1], loaded.preprocess, 64, DecodeConfig(workers=2), pin=True))
        assert pinned.images.is_pinned()
    with pytest.raises(RefineClipError, match="decoder kind"):
        DecodeConfig(kind="fibre")
    with pytest.raises(RefineClipError, match="workers"):
        DecodeConfig(workers=-1)


def test_cli_extract_decoding_and_storage_flags(photos, tiny_model_files, tmp_path):
    from refineclip_core.cli import main

    base = ["extract", "--model", tiny_model_files["name"], "--model-config", str(tiny_model_files["config"]),
            "--checkpoint", str(tiny_model_files["checkpoint"]), "--data", str(photos), "--layers", "2"]
    assert main(base + ["--out", str(tmp_path / "a"), "--exact-decode", "--decode-workers", "0"]) == 0
    assert main(base + ["--out", str(tmp_path / "b"), "--store", "fp16", "--decode-with", "process"]) == 0
    a, b = FeatureCache(tmp_path / "a"), FeatureCache(tmp_path / "b")
    assert a.manifest.decode_min_side is None and b.manifest.decode_min_side == 64
    assert a.heads.dtype == np.float32 and b.heads.dtype == np.float16 and b.embeddings.dtype == np.float32


# ------------------------------------------------------------------------------------------------
# Caches: shards read on demand, float16 storage, read-only shared folders

@pytest.fixture(scope="module")
def sharded(loaded, image_folder, tmp_path_factory):
    """The 18 test images in shards of 4 (5 shards), all layers in scope."""
    out = tmp_path_factory.mktemp("sharded")
    return extract(loaded, load_dataset(image_folder), out, ExtractionConfig(layers="all", batch_size=2,
                                                                              shard_batches=2))


def test_sharded_array_indexes_like_the_whole_array(sharded):
    arr = sharded.heads
    assert isinstance(arr, ShardedArray) and sharded.manifest.n_shards == 5
    full = np.asarray(arr)
    assert full.shape == arr.shape == (18, 3, 4, 32) and arr.dtype == full.dtype and len(arr) == 18
    rows = np.array([17, 0, 5, 4, 4, 9])
    mask = np.zeros(18, bool)
    mask[[1, 2, 8, 16]] = True
    for key in (3, -1, slice(None), slice(2, 11), slice(1, 17, 3), rows, mask, (rows, 1), (slice(None), 2, 3),
                (slice(3, 9), -1, slice(1, 3)), (rows, 0, 1), (np.zeros(0, np.int64), 1), (7, 2, 1)):
        np.testing.assert_array_equal(arr[key], full[key])
    np.testing.assert_array_equal(arr.reshape(18, -1), full.reshape(18, -1))
    np.testing.assert_array_equal(arr.astype(np.float64), full.astype(np.float64))
    seen = np.zeros(18, bool)
    for pos, block in row_blocks(arr, rows[::-1]):
        np.testing.assert_array_equal(block, full[rows[::-1][pos]])
        seen[pos] = True
    assert seen[:len(rows)].all()
    with pytest.raises(IndexError):
        arr[18]
    with pytest.raises(TypeError):
        arr[:, [0, 1]]


def test_engine_over_shards_matches_the_in_memory_engine(sharded):
    """Every mode of the engine (projected or not, any mean rows, subsets) against brute force."""
    E, H = sharded.embeddings.astype(np.float64), np.asarray(sharded.heads, dtype=np.float64)
    t = sharded.text.astype(np.float64)
    layers = sharded.manifest.layers
    disk = make_engine(sharded)
    direct = AblationEngine(sharded.embeddings, sharded.heads, sharded.text, layers, projection_budget=0)
    memory = AblationEngine(sharded.embeddings, np.asarray(sharded.heads), sharded.text, layers)
    assert disk.projected and not direct.projected
    ids = disk.head_ids()
    rows = np.array([1, 4, 7, 8, 15])
    rng = np.random.default_rng(1)
    for size in (0, 1, 4):
        pick = sorted(rng.choice(len(ids), size=size, replace=False).tolist())
        heads = [ids[i] for i in pick]
        flat = H.reshape(18, len(ids), -1)
        for mean_rows in (None, rows):
            m = flat[np.arange(18) if mean_rows is None else mean_rows].mean(0)
            for mode in ("zero", "mean"):
                ref = E - flat[:, pick].sum(1) + (m[pick].sum(0) if mode == "mean" else 0)
                for eng in (disk, direct, memory):
                    e = eng if mean_rows is None else eng.with_mean_rows(mean_rows)
                    np.testing.assert_allclose(e.embeddings(heads, mode), ref, rtol=1e-5, atol=1e-6)
                    np.testing.assert_allclose(e.dots(heads, mode), ref @ t.T, rtol=1e-5, atol=1e-5)
                    np.testing.assert_array_equal(e.predict(heads, mode), (ref @ t.T).argmax(1))
                    cos = ref @ t.T / np.linalg.norm(ref, axis=1, keepdims=True)
                    np.testing.assert_allclose(e.cosines(heads, mode), cos, rtol=1e-4, atol=1e-5)
                    np.testing.assert_allclose(e.subset(rows).cosines(heads, mode), cos[rows], rtol=1e-4, atol=1e-5)
    assert disk.with_mean_rows(rows) is disk.with_mean_rows(rows.copy())   # means computed once per row set
    assert disk.subset(rows) is disk.subset(rows.copy())


def _tied_world(seed: int, n: int, H: int, k: int, L: int = 2, d: int = 16):
    """Random head contributions (n, L, H, d), E = their sum + a residual, and k class texts plus a duplicate of
    the first and a 1e-7 perturbation of the second (exact and near ties everywhere); also the generator."""
    rng = np.random.default_rng(seed)
    heads = rng.normal(size=(n, L, H, d)).astype(np.float32)
    E = heads.sum((1, 2)) + rng.normal(size=(n, d)).astype(np.float32)
    t = rng.normal(size=(k, d))
    t = np.concatenate([t, t[:1], t[1:2] + 1e-7 * rng.normal(size=(1, d))])
    return heads, E, (t / np.linalg.norm(t, axis=1, keepdims=True)).astype(np.float32), rng


def test_predictions_equal_the_argmax_of_the_float64_scores_even_at_ties():
    """predict() finds the argmax in float32 and rechecks close calls in float64: with duplicated and
    nearly duplicated class texts (exact and 1e-7 ties everywhere) it must still equal argmax(dots)."""
    heads, E, text, _ = _tied_world(5, n=300, H=3, k=4)
    for budget in (1 << 30, 0):
        eng = AblationEngine(E, heads, text, [0, 1], projection_budget=budget)
        ids = eng.head_ids()
        for pick in ([], [0], [2, 5], [0, 1, 2, 3, 4, 5]):
            for mode in ("zero", "mean"):
                chosen = [ids[i] for i in pick]
                np.testing.assert_array_equal(eng.predict(chosen, mode), eng.dots(chosen, mode).argmax(1))
                rows = np.array([7, 3, 299, 0, 3])
                np.testing.assert_array_equal(eng.predict(chosen, mode, rows), eng.dots(chosen, mode, rows).argmax(1))


def test_toggles_from_a_running_score_equal_a_fresh_engine():
    """50 toggles in sequence (one to three heads ticked or unticked each), on every row or a held-out mask,
    projected or computed per head, zero and mean ablation: each step's predictions and accuracies equal
    those of a fresh engine's, and argmax(dots), with duplicated and nearly duplicated class texts (ties)."""
    n = 240
    heads, E, text, rng = _tied_world(11, n=n, H=4, k=6)
    labels = rng.integers(0, len(text), n)
    classes = [f"c{i}" for i in range(len(text))]
    groups, names = rng.integers(0, 2, n), ["g0", "g1"]
    adapt = np.arange(0, n, 3)
    for budget in (1 << 30, 3 * n * len(text) * 4):       # every head's kept; three arrays' worth kept
        eng = AblationEngine(E, heads, text, [0, 1], projection_budget=budget).with_mean_rows(adapt)
        ids = eng.head_ids()
        for mask in (None, rng.random(n) < 0.5):
            current: list = []
            for step in range(50):
                for i in rng.choice(len(ids), size=int(rng.integers(1, 4)), replace=False).tolist():
                    current = [h for h in current if h != ids[i]] if ids[i] in current else current + [ids[i]]
                mode = "mean" if step % 3 else "zero"
                got = eng.ablate(current, labels, classes, groups, names, mode=mode, mask=mask, mask_only=True)
                fresh = AblationEngine(E, heads, text, [0, 1], projection_budget=budget).with_mean_rows(adapt)
                want = fresh.ablate(current, labels, classes, groups, names, mode=mode, mask=mask)
                rows = slice(None) if mask is None else mask
                np.testing.assert_array_equal(got.predictions[rows], want.predictions[rows])
                assert mask is None or (got.predictions[~mask] == -1).all()
                np.testing.assert_array_equal(got.predictions[rows], fresh.dots(current, mode).argmax(1)[rows])
                assert got.report == want.report
                for f in ("flipped", "fixed", "broken"):
                    np.testing.assert_array_equal(getattr(got, f), getattr(want, f))
        assert any(k[0] == "s" for k in eng.store._kept)                  # running scores were kept and reused


def test_a_pass_over_every_row_beyond_the_budget_keeps_nothing():
    """Over the projection budget, predictions for every row (the findings, a refinement's evaluation) stream a
    block of rows at a time: they equal brute force over the raw arrays, across more than one block, and leave
    what the toggles keep (the held-out rows' projections and running score) as it was."""
    rng = np.random.default_rng(13)
    n, L, H, d, C = 5000, 2, 3, 8, 7
    heads = rng.normal(size=(n, L, H, d)).astype(np.float32)
    E = heads.sum((1, 2)) + rng.normal(size=(n, d)).astype(np.float32)
    text = rng.normal(size=(C, d)).astype(np.float32)
    held = np.flatnonzero(rng.random(n) < 0.5)
    eng = AblationEngine(E, heads, text, [0, 1], projection_budget=4 * len(held) * C * 4)
    assert not eng.projected
    ids = eng.head_ids()
    for h in ids[:3]:
        eng.predict([h], "zero", held)
    kept = dict(eng.store._kept)
    flat = heads.reshape(n, L * H, d).astype(np.float64)
    for pick in ([0], [1, 4], [5, 0, 2]):
        chosen = [ids[i] for i in pick]
        m = flat.mean(0)
        for mode in ("zero", "mean"):
            ref = E - flat[:, pick].sum(1) + (m[pick].sum(0) if mode == "mean" else 0)
            np.testing.assert_array_equal(eng.predict(chosen, mode), (ref @ text.astype(np.float64).T).argmax(1))
    assert eng.store._kept.keys() == kept.keys() and all(eng.store._kept[k] is v for k, v in kept.items())


def test_concurrent_toggles_of_different_sets_do_not_mix():
    """Two threads toggling different head sets on one shared engine each get a fresh engine's predictions."""
    import threading

    rng = np.random.default_rng(12)
    n, L, H, d = 400, 2, 4, 16
    heads = rng.normal(size=(n, L, H, d)).astype(np.float32)
    E = heads.sum((1, 2)) + rng.normal(size=(n, d)).astype(np.float32)
    text = rng.normal(size=(9, d)).astype(np.float32)
    shared = AblationEngine(E, heads, text, [0, 1], projection_budget=4 * n * len(text) * 4)
    ids = shared.head_ids()
    fresh = AblationEngine(E, heads, text, [0, 1], projection_budget=0)
    rows = np.flatnonzero(rng.random(n) < 0.6)
    failures: list = []

    def user(seed: int) -> None:
        r, current = np.random.default_rng(seed), []
        for _ in range(40):
            h = ids[int(r.integers(len(ids)))]
            current = [x for x in current if x != h] if h in current else current + [h]
            if not np.array_equal(shared.predict(current, "zero", rows), fresh.dots(current, "zero", rows).argmax(1)):
                failures.append((seed, list(current)))

    threads = [threading.Thread(target=user, args=(s,)) for s in (1, 2, 3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not failures


def test_accuracy_report_counts_like_a_loop_over_classes():
    """The one-pass tally against the straightforward per-class and per-group loop."""
    rng = np.random.default_rng(0)
    labels, pred = rng.integers(0, 7, 500), rng.integers(0, 7, 500)
    groups = np.where(rng.random(500) < 0.1, -1, rng.integers(0, 5, 500))
    mask = rng.random(500) < 0.6
    classes, group_names = [f"c{i}" for i in range(8)], [f"g{i}" for i in range(5)]
    rep = accuracy_report(pred, labels, classes, groups, group_names, mask)
    ok = (pred == labels) & mask
    for c, name in enumerate(classes):
        sel = mask & (labels == c)
        assert (name in rep.per_class) == bool(sel.any())
        if sel.any():
            assert rep.per_class[name] == float(ok[sel].mean()) and rep.counts[name] == int(sel.sum())
    for g, name in enumerate(group_names):
        sel = mask & (groups == g)
        assert rep.per_group[name] == float(ok[sel].mean()) and rep.counts[f"group:{name}"] == int(sel.sum())
    assert list(rep.per_class) == [c for c in classes if c in rep.per_class]
    assert rep.n_images == int(mask.sum()) and rep.accuracy == float(ok.sum() / mask.sum())


def test_fp16_storage_costs_a_reported_decomposition_error(loaded, image_folder, tmp_path, sharded):
    half = extract(loaded, load_dataset(image_folder), tmp_path / "half",
                   ExtractionConfig(layers="all", batch_size=2, shard_batches=2, store="fp16"))
    assert half.heads.dtype == np.float16 and half.remainders.dtype == np.float16
    assert half.manifest.parts_dtype == "float16" and half.manifest.fingerprint != sharded.manifest.fingerprint
    np.testing.assert_array_equal(half.embeddings, sharded.embeddings)           # E is never rounded
    np.testing.assert_array_equal(np.asarray(half.heads), np.asarray(sharded.heads).astype(np.float16))
    exact, rounded = check_decomposition(loaded, sharded), check_decomposition(loaded, half)
    assert exact["stored_max_rel_error"] < 1e-6 and exact["parts_dtype"] == "float32"
    assert 1e-6 < rounded["stored_max_rel_error"] < 5e-3 and rounded["parts_dtype"] == "float16"
    # the method runs unchanged on it: the same zero-shot predictions, ablation within the rounding
    a, b = make_engine(sharded), make_engine(half)
    np.testing.assert_array_equal(a.base_predictions, b.base_predictions)
    heads = a.head_ids()[:3]
    np.testing.assert_allclose(b.embeddings(heads, "mean"), a.embeddings(heads, "mean"), rtol=5e-3, atol=1e-3)
    with pytest.raises(RefineClipError, match="storage"):
        ExtractionConfig(store="int8")


_READER = """
import json, os, sys
FOLDER = os.path.realpath(sys.argv[1])
WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def inside(path):
    try:
        return os.path.realpath(os.fsdecode(path)).startswith(FOLDER)
    except (TypeError, ValueError):
        return False


def no_writes(event, args):
    # the permissions stop other users; this stops root too: any write into the folder fails loudly
    if event == "open" and inside(args[0]) and ((isinstance(args[1], str) and set(args[1]) & set("wax+"))
                                               or (args[2] or 0) & WRITES):
        raise PermissionError(f"opened for writing: {args[0]}")
    if event in ("os.rename", "os.replace", "os.remove", "os.mkdir", "os.rmdir", "os.chmod", "os.utime",
                 "os.link", "os.symlink", "os.truncate", "shutil.rmtree") and any(inside(a) for a in args[:2]):
        raise PermissionError(f"{event} in the shared folder: {args}")
    if event == "mmap.__new__" and args[2] not in (1, 3) and args[0] >= 0 and inside(f"/proc/self/fd/{args[0]}"):
        raise PermissionError("a writable mapping of a cache file")


sys.addaudithook(no_writes)
import numpy as np
from refineclip_core.features.cache import FeatureCache
from refineclip_core.edit.compare import fit_edit
from refineclip_core.edit.config import DEFAULT_EDIT
from refineclip_core.edit.record import build_run_report
from refineclip_core.method.protocol import DEFAULT_PROTOCOL, identify, make_engine
from refineclip_core.reporting.run_report import render_html
from refineclip_core.session.caches import cache_source
cache = FeatureCache(sys.argv[1])
cache_source(sys.argv[1])
engine = make_engine(cache)
ident = identify(cache, DEFAULT_PROTOCOL, engine)
out = fit_edit(cache, ident, DEFAULT_EDIT, engine=engine, baselines=False)
render_html(build_run_report(cache, ident, engine, out))
print(json.dumps({"heads": [str(h) for h in ident.heads], "pred": out.report.predictions["refineclip-fit"].tolist()}))
"""


def _snapshot(root: Path) -> dict[str, tuple]:
    return {str(p.relative_to(root)): (p.stat().st_mode, p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))} | {".": (root.stat().st_mode, root.stat().st_mtime_ns)}


@pytest.mark.slow
def test_a_read_only_shared_cache_serves_several_processes_at_once(sharded):
    """The folder is made read-only; two processes open it at the same time, score, refine and
    report, with every write into the folder turned into an error (an audit hook: the permissions
    alone do not stop root), and nothing in the folder changes."""
    shared = Path(tempfile.mkdtemp(prefix="refineclip-shared-"))
    try:
        folder = shared / "cache"
        shutil.copytree(sharded.root, folder)
        home = shared / "home"
        home.mkdir()
        for p in [folder, *folder.rglob("*")]:
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) | stat.S_IROTH
                    | (stat.S_IXOTH if p.is_dir() else 0))
        os.chmod(shared, 0o755)
        os.chmod(home, 0o777)
        before = _snapshot(folder)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(home), "REFINECLIP_HOME": str(home),
               "MPLCONFIGDIR": str(home)}
        procs = [subprocess.Popen([sys.executable, "-c", _READER, str(folder)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env, cwd=str(home)) for _ in range(2)]
        outs = [p.communicate(timeout=600) for p in procs]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0, err[-2000:]
        results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
        assert results[0] == results[1]
        assert _snapshot(folder) == before
        guard = _READER.split("import numpy")[0]          # the guard catches a write (a negative control)
        bad = subprocess.run([sys.executable, "-c", guard + "open(sys.argv[1] + '/manifest.json', 'a')", str(folder)],
                             capture_output=True, text=True, env=env, cwd=str(home))
        assert bad.returncode != 0 and "opened for writing" in bad.stderr
        src = cache_source(folder)
        assert src.cache_dir == str(folder) and src.fingerprint() == sharded.manifest.fingerprint
    finally:
        for p in [shared, *shared.rglob("*")]:
            if p.is_dir():
                p.chmod(0o755)
        shutil.rmtree(shared, ignore_errors=True)


def test_opening_something_that_is_not_a_cache_says_so(tmp_path):
    with pytest.raises(CacheError, match="not a complete feature cache"):
        cache_source(tmp_path)


# ------------------------------------------------------------------------------------------------
# A small scale run: the benchmark's synthetic caches behave like extracted ones

@pytest.mark.slow
def test_small_scale_run(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.scale import SHAPES, cache_bytes, make_cache, measure_cache, standin_model, write_base

    shape = replace(SHAPES["ViT-B/16"], n_heads=4, embed_dim=64)
    n = 600
    E = write_base(tmp_path / "base", shape, n, log=lambda _: None)
    model = standin_model(tmp_path / "model", shape.embed_dim)
    for classes in (2, 30):
        folder = make_cache(tmp_path / f"c{classes}", tmp_path / "base", shape, E, n, classes, model)
        cache = FeatureCache(folder)
        assert len(cache) == n and cache.heads.shape == (n, 4, 4, 64) and cache.manifest.n_shards == 3
        assert cache_bytes(folder) >= shape.bytes_per_image() * n
        np.testing.assert_allclose(cache.reconstruct(), cache.embeddings, rtol=1e-4, atol=1e-4)   # Eq. 4 holds
        res = measure_cache(str(folder), n_toggles=4, pool_size=50)
        names = [s["step"] for s in res["steps"]]
        assert any("scoring" in s for s in names) and any("toggle" in s for s in names)
        assert any("inspector" in s for s in names) and any("refinement" in s for s in names)
        assert all(s["seconds"] >= 0 and s["rss_mib"] > 0 for s in res["steps"]) and res["n"] == n
        # what the benchmark measured is what the method computes: the toggled predictions against brute force
        ident = identify(cache, DEFAULT_PROTOCOL, make_engine(cache))
        eng = ident.ablation_engine(make_engine(cache))
        heads = cache.head_ids()[:2]
        flat = np.asarray(cache.heads, np.float64).reshape(n, -1, 64)
        m = flat[ident.adapt_rows].mean(0)
        ref = cache.embeddings - flat[:, :2].sum(1) + m[:2].sum(0)
        np.testing.assert_array_equal(eng.predict(heads, "mean"), (ref @ cache.text.astype(np.float64).T).argmax(1))

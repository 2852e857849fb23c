"""TextSpan head descriptions (Gandelsman et al. 2024; paper Appendix A.1, Table 5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refineclip_core.errors import DataError, RefineClipError
from refineclip_core.features.decomposition import HeadId
from refineclip_core.inspection.textspan import (
    MIN_RESIDUAL,
    RESIDUAL_STOP,
    HeadDescription,
    describe_head,
    describe_heads,
    encode_text_pool,
    greedy_text_span,
    load_text_pool,
    text_pool_cache_file,
)
from refineclip_core.loading.models import ModelSpec, load_model


def unit_rows(rng: np.random.Generator, m: int, d: int) -> np.ndarray:
    x = rng.standard_normal((m, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(X: np.ndarray, T: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    """TextSpan by the definition: loop over texts, explicit projections of data and texts."""
    X = np.array(X, dtype=np.float64)
    T = np.array(T, dtype=np.float64)
    C = X - X.mean(axis=0)
    R = T - T.mean(axis=0)
    original = [float(np.sqrt(R[j] @ R[j])) for j in range(len(R))]
    total = sum(float(C[i] @ C[i]) for i in range(len(C)))
    if total == 0:
        return [], []
    picks: list[int] = []
    fractions: list[float] = []
    for _ in range(k):
        residual = sum(float(C[i] @ C[i]) for i in range(len(C)))
        if residual <= RESIDUAL_STOP * total:
            break
        best, best_var = None, -np.inf
        for j in range(len(R)):
            norm = float(np.sqrt(R[j] @ R[j]))
            if j in picks or original[j] == 0 or norm <= MIN_RESIDUAL * original[j]:
                continue
            u = R[j] / norm
            var = sum(float(C[i] @ u) ** 2 for i in range(len(C)))
            if var > best_var:
                best, best_var = j, var
        if best is None:
            break
        u = R[best] / np.sqrt(R[best] @ R[best])
        picks.append(best)
        fractions.append(best_var / total)
        C = C - np.outer(C @ u, u)
        R = R - np.outer(R @ u, u)
    return picks, fractions


@pytest.mark.parametrize("n_images,method", [(100, "direct"), (400, "scatter"), (100, "auto"), (400, "auto")])
def test_recovers_planted_texts(n_images, method):
    rng = np.random.default_rng(0)
    d, m = 32, 40
    pool = unit_rows(rng, m, d)
    texts = [f"text {i}" for i in range(m)]
    planted = [7, 19, 33]
    centred = pool - pool.mean(axis=0)        # TextSpan works with the mean-centred pool
    coeffs = rng.standard_normal((n_images, 3)) * np.array([3.0, 2.0, 1.0])
    heads = coeffs @ centred[planted] + 1e-3 * rng.standard_normal((n_images, d)) + rng.standard_normal(d)

    idx, explained, total = greedy_text_span(heads, pool, k=5, method=method)
    assert sorted(idx[:3]) == planted
    desc = describe_head(heads, texts, pool, k=5, head=HeadId(3, 1))
    assert desc.texts[:3] == [texts[i] for i in idx[:3]]
    assert desc.head == HeadId(3, 1) and len(desc.texts) == 5
    cum = desc.cumulative
    assert cum[2] > 0.999
    assert all(v >= 0 for v in desc.variance_explained)
    assert all(b >= a - 1e-12 for a, b in zip(cum, cum[1:])) and cum[-1] <= 1 + 1e-9
    # total variance = trace of the covariance of the head outputs
    expected_total = float(np.trace(np.cov(heads.T, bias=True)))
    assert desc.total_variance == pytest.approx(expected_total, rel=1e-9)


@pytest.mark.parametrize("seed,n,m,d,k", [(1, 60, 25, 16, 6), (2, 12, 30, 20, 5), (3, 200, 9, 12, 6), (4, 5, 40, 8, 6)])
@pytest.mark.parametrize("method", ["direct", "scatter"])
def test_vectorised_matches_brute_force(seed, n, m, d, k, method):
    # k stays below both d - 1 and the pool's rank - 1: with one free direction left all the
    # remaining texts point the same way, and the pick among them is an exact tie.
    rng = np.random.default_rng(seed)
    heads = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    pool = unit_rows(rng, m, d)
    idx, explained, total = greedy_text_span(heads, pool, k=k, method=method)
    ref_idx, ref_fractions = brute_force(heads, pool, k)
    assert idx == ref_idx
    np.testing.assert_allclose(np.array(explained) / total, ref_fractions, rtol=1e-8, atol=1e-12)


def test_float32_close_to_float64():
    rng = np.random.default_rng(5)
    heads = (rng.standard_normal((300, 8)) @ rng.standard_normal((8, 48))).astype(np.float32)
    pool = unit_rows(rng, 120, 48).astype(np.float32)
    idx32, ex32, tot32 = greedy_text_span(heads, pool, k=5)
    idx64, ex64, tot64 = greedy_text_span(heads.astype(np.float64), pool.astype(np.float64), k=5)
    assert idx32 == idx64
    np.testing.assert_allclose(np.array(ex32) / tot32, np.array(ex64) / tot64, rtol=1e-4, atol=1e-6)


def test_single_image_and_constant_head_give_empty_description():
    rng = np.random.default_rng(6)
    pool = unit_rows(rng, 10, 8)
    texts = [f"t{i}" for i in range(10)]
    for heads in (rng.standard_normal((1, 8)), np.tile(rng.standard_normal(8), (20, 1))):
        desc = describe_head(heads, texts, pool, k=5)
        assert desc.texts == [] and desc.variance_explained == [] and desc.cumulative == []
        assert desc.total_variance == 0.0
        assert not np.isnan(desc.total_variance)


def test_pool_smaller_than_k():
    rng = np.random.default_rng(7)
    pool = unit_rows(rng, 3, 8)
    heads = rng.standard_normal((50, 8))
    desc = describe_head(heads, ["a", "b", "c"], pool, k=5)
    # three centred texts span only two directions
    assert len(desc.texts) == 2 and len(set(desc.texts)) == 2
    assert np.all(np.isfinite(desc.variance_explained)) and desc.cumulative[-1] <= 1 + 1e-9
    ref_idx, ref_fractions = brute_force(heads, pool, 5)
    # after the first pick the two other centred texts are opposite (they sum to minus the
    # first): an exact tie, so only the first index is determined
    assert desc.indices[0] == ref_idx[0] and len(ref_idx) == 2
    np.testing.assert_allclose(desc.variance_explained, ref_fractions, rtol=1e-9)


def test_duplicate_texts_are_not_picked_twice():
    rng = np.random.default_rng(8)
    base = unit_rows(rng, 6, 10)
    pool = np.vstack([base, base[2:3]])      # text 6 duplicates text 2
    centred = pool - pool.mean(axis=0)
    heads = rng.standard_normal((80, 1)) * 5 * centred[2] + 0.1 * rng.standard_normal((80, 10))
    idx, explained, total = greedy_text_span(heads, pool, k=7)
    assert idx[0] in (2, 6)
    assert not {2, 6} <= set(idx)
    # 6 distinct texts, centred: they sum to zero (text 2 counted twice), so they span 5 directions
    assert len(idx) == 5
    assert np.all(np.isfinite(explained))


def test_user_errors_are_clear():
    rng = np.random.default_rng(9)
    pool = unit_rows(rng, 5, 8)
    heads = rng.standard_normal((10, 8))
    with pytest.raises(RefineClipError, match="at least 2 texts"):
        describe_head(heads, ["only"], pool[:1])
    with pytest.raises(RefineClipError, match="k >= 1"):
        greedy_text_span(heads, pool, k=0)
    with pytest.raises(RefineClipError, match="dimension"):
        greedy_text_span(heads[:, :6], pool)
    with pytest.raises(RefineClipError, match="5 embeddings"):
        describe_head(heads, ["a", "b"], pool)
    bad = heads.copy()
    bad[0, 0] = np.nan
    with pytest.raises(RefineClipError, match="NaN"):
        greedy_text_span(bad, pool)
    with pytest.raises(RefineClipError, match="empty"):
        greedy_text_span(heads[:0], pool)


def test_describe_heads_maps_absolute_layers():
    rng = np.random.default_rng(10)
    arr = rng.standard_normal((30, 2, 3, 12))          # cache of layers 5 and 6, 3 heads each
    pool = unit_rows(rng, 15, 12)
    texts = [f"t{i}" for i in range(15)]
    out = describe_heads(arr, [HeadId(6, 1), HeadId(5, 2)], texts, pool, k=3, layers=[5, 6])
    assert [d.head for d in out] == [HeadId(6, 1), HeadId(5, 2)]
    assert isinstance(out[0], HeadDescription)
    assert out[0].indices == describe_head(arr[:, 1, 1], texts, pool, k=3).indices
    assert out[1].indices == describe_head(arr[:, 0, 2], texts, pool, k=3).indices
    rows = np.arange(10)
    sub = describe_heads(arr, [HeadId(6, 1)], texts, pool, k=3, layers=[5, 6], rows=rows)[0]
    assert sub.indices == describe_head(arr[:10, 1, 1], texts, pool, k=3).indices
    with pytest.raises(RefineClipError, match="layer scope"):
        describe_heads(arr, [HeadId(4, 0)], texts, pool, layers=[5, 6])
    with pytest.raises(RefineClipError, match="does not exist"):
        describe_heads(arr, [HeadId(5, 3)], texts, pool, layers=[5, 6])
    assert out[0].to_dict()["head"] == [6, 1]



def test_many_images_are_described_on_a_seeded_sample_that_keeps_the_top_texts():
    """Past MAX_IMAGES rows a seeded random sample is described: exactly describe_head on those rows
    (recomputed here from the same draw), the sample recorded on the description; and on heads whose
    variance lies along a few texts, the sample finds the same texts in the same order as every image."""
    rng = np.random.default_rng(12)
    n, d, m = 6_000, 24, 40
    pool = unit_rows(rng, m, d)
    texts = [f"t{i}" for i in range(m)]
    planted = [7, 21, 3]
    coef = rng.standard_normal((n, 3)) * np.array([3.0, 2.0, 1.3])
    arr = (coef @ pool[planted] + 0.3 * rng.standard_normal((n, d)))[:, None, None, :].astype(np.float32)
    full = describe_heads(arr, [HeadId(0, 0)], texts, pool, k=3, max_images=None)[0]
    assert full.n_images == n and full.sampled_from is None
    sampled = describe_heads(arr, [HeadId(0, 0)], texts, pool, k=3, max_images=1_000, seed=5)[0]
    assert sampled.n_images == 1_000 and sampled.sampled_from == n
    rows = np.sort(np.random.default_rng(5).choice(np.arange(n), 1_000, replace=False))
    assert sampled.indices == describe_head(arr[rows, 0, 0], texts, pool, k=3).indices
    assert full.indices[:3] == sampled.indices[:3] == planted
    assert abs(sampled.total_variance - full.total_variance) < 0.1 * full.total_variance
    # a subset of rows is sampled within itself; few enough rows are all used
    half = np.arange(0, n, 2)
    sub = describe_heads(arr, [HeadId(0, 0)], texts, pool, k=3, rows=half, max_images=1_000, seed=5)[0]
    picked = np.sort(np.random.default_rng(5).choice(half, 1_000, replace=False))
    assert sub.sampled_from == len(half) and sub.indices == describe_head(arr[picked, 0, 0], texts, pool, k=3).indices
    small = describe_heads(arr, [HeadId(0, 0)], texts, pool, k=3, rows=np.arange(500), max_images=1_000)[0]
    assert small.sampled_from is None and small.n_images == 500
    assert sampled.to_dict()["sampled_from"] == n

def test_full_size_never_forms_an_images_by_texts_array():
    """With many images and texts the greedy search works on the (d, d) scatter, never on the
    (N, M) product C T^T: its peak memory stays far below one such array, and its picks are the
    direct method's. (Its time at ViT-L size is in benchmarks/RESULTS.md, ``textspan``.)"""
    import tracemalloc

    rng = np.random.default_rng(11)
    n, m, d = 4_000, 2_000, 256
    heads = rng.standard_normal((n, 32), dtype=np.float32) @ rng.standard_normal((32, d), dtype=np.float32)
    pool = rng.standard_normal((m, d), dtype=np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    texts = [str(i) for i in range(m)]
    one_product = n * m * 4  # bytes of one (N, M) float32 array
    tracemalloc.start()
    try:
        desc = describe_head(heads, texts, pool, k=5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(desc.texts) == 5
    assert peak < one_product, f"peak {peak / 1e6:.1f} MB; one (N, M) array is {one_product / 1e6:.1f} MB"
    direct, _, _ = greedy_text_span(heads, pool, k=5, method="direct")
    assert desc.indices == direct


def test_load_text_pool(tmp_path):
    path = tmp_path / "pool.txt"
    path.write_text("# header\nA photo of water\n\n  A meadow  \nA photo of water\nCity square\n", encoding="utf-8")
    assert load_text_pool(path) == ["A photo of water", "A meadow", "City square"]
    with pytest.raises(DataError, match="does not exist"):
        load_text_pool(tmp_path / "missing.txt")
    (tmp_path / "one.txt").write_text("just one\n")
    with pytest.raises(DataError, match="at least 2"):
        load_text_pool(tmp_path / "one.txt")


def test_encode_text_pool_caches_by_model_and_pool(tiny_model_files, tmp_path, monkeypatch):
    import refineclip_core.features.zeroshot as zeroshot

    spec = ModelSpec(tiny_model_files["name"], checkpoint=str(tiny_model_files["checkpoint"]),
                     model_config=str(tiny_model_files["config"]))
    loaded = load_model(spec)
    texts = ["a bird on water", "a bird on land", "a forest", "a beach"]
    cache_dir = tmp_path / "pools"
    emb = encode_text_pool(loaded, texts, cache_path=cache_dir)
    reference = zeroshot.encode_texts(loaded, texts).numpy()
    assert emb.shape == (4, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, reference, atol=1e-6)
    target = text_pool_cache_file(loaded, texts, cache_dir)
    assert target.exists() and [p.name for p in cache_dir.iterdir()] == [target.name]

    def refuse(*_a, **_k):
        raise AssertionError("the cached embeddings should have been used")

    monkeypatch.setattr(zeroshot, "encode_texts", refuse)
    np.testing.assert_array_equal(encode_text_pool(loaded, texts, cache_path=cache_dir), emb)
    monkeypatch.undo()
    # another pool, another model: other files
    assert text_pool_cache_file(loaded, texts[:3], cache_dir) != target
    other_ckpt = tmp_path / "other.pt"
    state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    state["logit_scale"] = state["logit_scale"] + 1.0
    torch.save(state, other_ckpt)
    other = load_model(ModelSpec(tiny_model_files["name"], checkpoint=str(other_ckpt),
                                 model_config=str(tiny_model_files["config"])))
    assert text_pool_cache_file(other, texts, cache_dir) != target

"""The RefineCLIP method (paper Eq. 5-13) against independent computations."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch

from refineclip_core.cli import main
from refineclip_core.features.cache import FeatureCache
from refineclip_core.features.decomposition import HeadId, direct_ablation_forward, parse_heads
from refineclip_core.features.extraction import ExtractionConfig, extract, load_batch
from refineclip_core.loading.data import load_dataset
from refineclip_core.loading.models import ModelSpec, load_model
from refineclip_core.method.ablation import AblationEngine
from refineclip_core.method.verification import verify_ablation
from refineclip_core.method.baselines import TipAdapter
from refineclip_core.method.errorsets import ErrorSets, error_pairs, pair_error_sets, sample_per_class
from refineclip_core.edit.config import FitConfig
from refineclip_core.method.protocol import ProtocolConfig, identify
from refineclip_core.edit.compare import fit_edit
from refineclip_core.edit.config import EditConfig
from refineclip_core.edit.config import PaperConfig
from refineclip_core.edit.export import export_checkpoint
from refineclip_core.edit.paper import paper_phase2
from refineclip_core.method.scores import compute_scores
from refineclip_core.method.selection import select_heads


@pytest.fixture(scope="module")
def loaded(tiny_model_files):
    return load_model(ModelSpec(tiny_model_files["name"], model_config=str(tiny_model_files["config"]),
                                checkpoint=str(tiny_model_files["checkpoint"])))


@pytest.fixture(scope="module")
def cache(loaded, image_folder, tmp_path_factory):
    """A cache of the tiny random model whose class texts are replaced by noisy class means of
    the image embeddings (first seed that gives a pair with W, C and A all non-empty), so
    that the random model makes a realistic mix of right and wrong predictions."""
    from refineclip_core.files import atomic_write_bytes, npy_bytes

    out = tmp_path_factory.mktemp("method-cache")
    c = extract(loaded, load_dataset(image_folder), out, ExtractionConfig(layers="all", batch_size=6))
    E = c.embeddings / np.linalg.norm(c.embeddings, axis=1, keepdims=True)
    means = np.stack([E[c.labels == k].mean(0) for k in range(len(c.classes))])
    for seed in range(200):
        noise = np.random.default_rng(seed).normal(size=means.shape) * np.linalg.norm(means, axis=1).mean()
        text = means + 0.8 * noise
        text = (text / np.linalg.norm(text, axis=1, keepdims=True)).astype(np.float32)
        pred = (E @ text.T).argmax(1)
        for p in error_pairs(pred, c.labels):
            sets = pair_error_sets(pred, c.labels, p.true, p.pred)
            if len(sets.W) >= 2 and len(sets.C) >= 2 and len(sets.A) >= 2:
                atomic_write_bytes(out / "text.npy", npy_bytes(text))
                return FeatureCache(out)
    pytest.fail("no text perturbation gave a usable error pair")


def _pred(cache):
    return (cache.embeddings @ cache.text.T).argmax(1)


def _a_pair_with_everything(cache):
    pred, labels = _pred(cache), cache.labels
    for p in error_pairs(pred, labels):
        s = pair_error_sets(pred, labels, p.true, p.pred)
        if len(s.W) and len(s.C) and len(s.A):
            return s
    pytest.fail("the tiny model's errors give no pair with W, C and A all non-empty")


def _cos(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_scores_match_brute_force_with_the_real_model(loaded, cache):
    """Eq. 6-9 recomputed head by head with the real model: the head is removed inside the
    model (direct path, Eq. 5) and the replacement mean added, then cosines taken explicitly."""
    sets = _a_pair_with_everything(cache)
    scores = compute_scores(cache.embeddings, cache.heads, cache.text, sets, cache.manifest.layers)
    records = cache.records
    batch, _, _ = load_batch(loaded, records, 0)
    t = cache.text.astype(np.float64)
    ye, yh = sets.y_true, sets.y_pred
    E = loaded.model.encode_image(batch).double().numpy()
    for hid in [HeadId(0, 1), HeadId(1, 3), HeadId(2, 0), HeadId(2, 2)]:
        li = cache.manifest.layers.index(hid.layer)
        c = cache.heads[:, li, hid.head].astype(np.float64)
        removed = direct_ablation_forward(loaded.visual, batch, [hid]).double().numpy()
        mean = {k: c[getattr(sets, k)].mean(0) for k in "WCA"}

        def delta(i, y, m):
            return _cos(removed[i] + m, t[y]) - _cos(E[i], t[y])

        brute = {
            "DE_A": np.mean([delta(i, ye, mean["C"]) - delta(i, yh, mean["C"]) for i in sets.W]),
            "DE_B": np.mean([delta(i, ye, mean["W"]) - delta(i, yh, mean["W"]) for i in sets.C]),
            "DE_C": np.mean([delta(i, yh, mean["W"]) - delta(i, ye, mean["W"]) for i in sets.A]),
            "DE_D": np.mean([delta(i, yh, mean["A"]) - delta(i, ye, mean["A"]) for i in sets.W]),
        }
        for name, value in brute.items():
            assert scores[name].value(hid) == pytest.approx(value, abs=2e-5), (name, hid)


def test_proposition_1_exact_with_dot_product_approximate_with_cosine(cache):
    sets = _a_pair_with_everything(cache)
    layers = cache.manifest.layers
    dot = compute_scores(cache.embeddings, cache.heads, cache.text, sets, layers, similarity="dot")
    np.testing.assert_allclose(dot["DE_A"].values, -dot["DE_B"].values, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dot["DE_C"].values, -dot["DE_D"].values, rtol=1e-9, atol=1e-12)
    cos = compute_scores(cache.embeddings, cache.heads, cache.text, sets, layers, similarity="cosine")
    for a, b in (("DE_A", "DE_B"), ("DE_C", "DE_D")):
        x, y = cos[a].values.ravel(), -cos[b].values.ravel()
        assert not np.allclose(x, y, rtol=1e-9, atol=1e-12)          # not exact under cosine...
        assert np.corrcoef(x, y)[0, 1] > 0.8                          # ...but close
        assert np.sign(x[np.abs(x) > np.abs(x).max() / 2]).tolist() == np.sign(
            y[np.abs(x) > np.abs(x).max() / 2]).tolist()


def test_empty_sets_make_scores_unavailable_not_zero(cache):
    n = len(cache)
    empty = np.zeros(0, dtype=np.int64)
    some = np.arange(3)
    sets = ErrorSets(0, 1, W=empty, C=some, A=some + 6, true_class=np.zeros(n, int), wrong_class=np.ones(n, int))
    s = compute_scores(cache.embeddings, cache.heads, cache.text, sets, cache.manifest.layers)
    assert s["DE_A"].values is None and s["DE_D"].values is None and "W is empty" in s["DE_A"].reason
    assert s["DE_B"].available and "zero replacement" in s["DE_B"].reason
    assert s["DE_A"].to_list() is None and s["DE_A"].ranking() == []


def test_ablation_engine_matches_explicit_arithmetic(cache):
    eng = AblationEngine(cache.embeddings, cache.heads, cache.text, cache.manifest.layers)
    rng = np.random.default_rng(0)
    ids = eng.head_ids()
    E = cache.embeddings.astype(np.float64)
    flat = cache.heads.reshape(len(cache), len(ids), -1).astype(np.float64)
    m = flat.mean(0)
    t = cache.text.astype(np.float64)
    for size in (0, 1, 3, len(ids)):
        pick = sorted(rng.choice(len(ids), size=size, replace=False).tolist())
        heads = [ids[i] for i in pick]
        zero = E - flat[:, pick].sum(1)
        mean = zero + m[pick].sum(0)
        for mode, ref in (("zero", zero), ("mean", mean)):
            np.testing.assert_allclose(eng.embeddings(heads, mode), ref, rtol=1e-5, atol=1e-6)
            cos = ref @ t.T / np.linalg.norm(ref, axis=1, keepdims=True)
            np.testing.assert_allclose(eng.cosines(heads, mode), cos, rtol=1e-4, atol=1e-5)
            np.testing.assert_array_equal(eng.predict(heads, mode), (ref @ t.T).argmax(1))
    res = eng.ablate(ids[:2], cache.labels, cache.classes, cache.groups, cache.group_names)
    base = eng.base_predictions
    np.testing.assert_array_equal(res.flipped, np.flatnonzero(res.predictions != base))


def test_derived_engines_share_the_store_and_keep_their_own_means(cache):
    """with_mean_rows/subset are explicit copies: the store (arrays, projections, Gram matrix) is shared, never
    copied; each engine's m_h are its own, and equal the brute-force means over its rows."""
    eng = AblationEngine(cache.embeddings, cache.heads, cache.text, cache.manifest.layers)
    ids = eng.head_ids()
    flat = cache.heads.reshape(len(cache), len(ids), -1).astype(np.float64)
    rows = np.arange(len(cache))[1::3]
    derived = eng.with_mean_rows(rows)
    assert derived is not eng and derived.store is eng.store and derived.means is not eng.means
    assert eng.with_mean_rows(rows.copy()) is derived                       # one per row set (by content)
    np.testing.assert_allclose(derived.m, flat[rows].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(eng.m, flat.mean(0), rtol=1e-5, atol=1e-6)  # the parent's are unchanged
    heads = ids[:2]
    E, t = cache.embeddings.astype(np.float64), cache.text.astype(np.float64)
    ref = E - flat[:, :2].sum(1) + flat[rows][:, :2].mean(0).sum(0)
    np.testing.assert_allclose(derived.norms(heads, "mean"), np.linalg.norm(ref, axis=1), rtol=1e-5)
    np.testing.assert_array_equal(derived.predict(heads, "mean"), (ref @ t.T).argmax(1))
    sub_rows = np.arange(5)
    sub = derived.subset(sub_rows)
    assert sub.store is not eng.store and len(sub.E) == 5
    np.testing.assert_array_equal(sub.m, derived.m)                         # the parent's means, not the subset's
    np.testing.assert_allclose(sub.embeddings(heads, "mean"), ref[sub_rows], rtol=1e-5, atol=1e-6)


def test_verify_ablation_against_the_real_model(loaded, cache):
    eng = AblationEngine(cache.embeddings, cache.heads, cache.text, cache.manifest.layers)
    rows = np.arange(8)
    batch, _, _ = load_batch(loaded, [cache.records[i] for i in rows], 0)
    v = verify_ablation(loaded, batch, eng, rows, [HeadId(2, 1), HeadId(0, 2)])
    assert v.n_images == 8 and v.max_rel_error < 1e-5 and v.predictions_agree
    # mean ablation (the Ablate page's default): the real pass plus each head's mean contribution, the mean
    # taken here from the raw cached contributions (not the engine's), must match the engine's mean ablation
    heads = [HeadId(2, 1), HeadId(0, 2)]
    mean_rows = np.arange(len(cache))[::2]
    eng_m = eng.with_mean_rows(mean_rows)
    v = verify_ablation(loaded, batch, eng_m, rows, heads, mode="mean")
    assert v.n_images == 8 and v.max_rel_error < 1e-5 and v.predictions_agree
    flat = np.asarray(cache.heads).reshape(len(cache), -1, cache.heads.shape[-1])
    idx = [cache.manifest.layers.index(h.layer) * cache.manifest.n_heads + h.head for h in heads]
    offset = flat[mean_rows][:, idx].mean(0).sum(0)
    np.testing.assert_allclose(eng_m.embeddings(heads, "mean", rows) - eng_m.embeddings(heads, "zero", rows),
                               np.broadcast_to(offset, (8, offset.shape[0])), rtol=1e-4, atol=1e-6)


def test_selection_matches_a_brute_force_algorithm_1(cache):
    sets = _a_pair_with_everything(cache)
    scores = compute_scores(cache.embeddings, cache.heads, cache.text, sets, cache.manifest.layers)
    eng = AblationEngine(cache.embeddings, cache.heads, cache.text, cache.manifest.layers)
    rows = sets.rows
    sel = select_heads(eng, scores, rows, cache.labels, top_t=5)
    E = cache.embeddings.astype(np.float64)
    t = cache.text.astype(np.float64)
    best = (-np.inf, None, None)
    for name, s in scores.items():
        flat_values = s.values.ravel()
        order = np.argsort(-flat_values if s.descending else flat_values, kind="stable")[:5]
        H = s.values.shape[1]
        curve = []
        for k in range(1, 6):
            abl = E.copy()
            for i in order[:k]:
                abl -= cache.heads[:, i // H, i % H].astype(np.float64)
            us = []
            for x in rows:
                sims = [_cos(abl[x], t[y]) for y in range(len(t))]
                own = sims[cache.labels[x]]
                us.append(own - (sum(sims) - own) / (len(t) - 1))
            curve.append(np.mean(us))
            if curve[-1] > best[0]:
                best = (curve[-1], name, k)
        np.testing.assert_allclose(sel.curves[name], curve, rtol=1e-5, atol=1e-6)
    assert (sel.score, sel.t) == (best[1], best[2]) and sel.utility == pytest.approx(best[0], rel=1e-5)
    assert len(sel.heads) == sel.t


def test_top_t_larger_than_number_of_heads(cache):
    sets = _a_pair_with_everything(cache)
    scores = compute_scores(cache.embeddings, cache.heads, cache.text, sets, cache.manifest.layers)
    eng = AblationEngine(cache.embeddings, cache.heads, cache.text, cache.manifest.layers)
    sel = select_heads(eng, scores, sets.rows, cache.labels, top_t=1000)
    assert all(len(c) == 12 for c in sel.curves.values())


def test_sampling_is_seeded_and_per_class():
    labels = np.array([0] * 30 + [1] * 5 + [2] * 20)
    a = sample_per_class(labels, 10, seed=3)
    assert np.array_equal(a, sample_per_class(labels, 10, seed=3))
    assert not np.array_equal(a, sample_per_class(labels, 10, seed=4))
    assert np.bincount(labels[a]).tolist() == [10, 5, 10]


@pytest.mark.parametrize("strategy", ["diag", "full", "lora"])
def test_refinement_export_reproduces_the_refined_embeddings(loaded, cache, tiny_model_files, tmp_path, strategy):
    sets = _a_pair_with_everything(cache)
    eng = AblationEngine(cache.embeddings, cache.heads, cache.text, cache.manifest.layers)
    heads = [HeadId(2, 0), HeadId(2, 3)]
    local = np.concatenate([sets.C, sets.A])
    cfg = PaperConfig(strategy=strategy, steps=60, lr=5e-2, success_weight=100.0, locality_weight=10.0)
    res = paper_phase2(cache.embeddings, cache.labels, cache.text, cache.logit_scale, sets.W, local,
                       eng.embeddings(heads, "zero", sets.W), cfg)
    h = res.history
    assert set(h) == {"total", "success", "locality", "ce"} and len(h["total"]) == 60
    assert h["total"][-1] < h["total"][0]
    out = export_checkpoint(str(tiny_model_files["checkpoint"]), loaded.model, res.refined, tmp_path / "edited.safetensors")
    open_clip.add_model_config(tiny_model_files["config"])
    plain = open_clip.create_model(tiny_model_files["name"], pretrained=str(out)).eval()
    batch, _, _ = load_batch(loaded, cache.records[:6], 0)
    with torch.no_grad():
        edited = plain.encode_image(batch).double().numpy()
    expected = res.refined.apply(cache.embeddings[:6])
    rel = np.linalg.norm(edited - expected, axis=1) / np.linalg.norm(expected, axis=1)
    assert rel.max() < 1e-5
    assert not np.allclose(expected, cache.embeddings[:6], rtol=1e-4)  # the edit did something


def test_tip_adapter_formula():
    rng = np.random.default_rng(0)
    E, text = rng.normal(size=(6, 4)), rng.normal(size=(3, 4))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    labels = np.array([0, 1, 2, 0, 1, 2])
    tip = TipAdapter.build(E, labels, text, logit_scale=10.0, residual_ratio=2.0, sharpness=3.0)
    x = rng.normal(size=(2, 4))
    f = x / np.linalg.norm(x, axis=1, keepdims=True)
    keys = E / np.linalg.norm(E, axis=1, keepdims=True)
    expected = np.zeros((2, 3))
    for i in range(2):
        for j in range(6):
            expected[i, labels[j]] += 2.0 * np.exp(-3.0 * (1 - f[i] @ keys[j]))
        expected[i] += 10.0 * f[i] @ text.T
    np.testing.assert_allclose(tip.logits(x), expected, rtol=1e-12)


def test_score_keys_are_typed_and_records_keep_their_text(cache):
    """ident.scores is keyed by ScoreKey(score, pair); records, tables and the screen show the text they
    always did: "DE_A" for one pair, "DE_A[true→pred]" for two (issue 36: no string parsed back)."""
    from refineclip_core.edit.record import scores_to_dict
    from refineclip_core.method.scores import SCORE_NAMES, ScoreKey

    one = identify(cache, ProtocolConfig(pair="auto", samples_per_class=3, seed=1, top_t=4, resamples=0))
    both = identify(cache, ProtocolConfig(pair="both", samples_per_class=3, seed=1, top_t=4, resamples=0))
    (a, b), = one.pairs
    names = (cache.classes[a], cache.classes[b])
    assert list(one.scores) == [ScoreKey(s, names, alone=True) for s in SCORE_NAMES]
    assert list(scores_to_dict(one.scores)) == list(SCORE_NAMES)
    assert len(both.pairs) == 2
    want = [f"{s}[{cache.classes[x]}→{cache.classes[y]}]" for x, y in both.pairs for s in SCORE_NAMES]
    assert [str(k) for k in both.scores] == want == list(scores_to_dict(both.scores))
    assert [k.pair for k in both.scores] == [(cache.classes[x], cache.classes[y]) for x, y in both.pairs for _ in SCORE_NAMES]
    # the documented API reads a score by the text the screen shows (docs/API.md: ident.scores["DE_A"])
    assert one.scores["DE_A"] is one.scores[ScoreKey("DE_A", names, alone=True)] and "DE_B" in one.scores
    assert both.scores[want[0]] is next(iter(both.scores.values())) and "DE_A" not in both.scores
    assert both.scores.get("DE_Z") is None
    with pytest.raises(KeyError):
        one.scores["DE_A[x→y]"]
    sel = json.loads(json.dumps(both.selection.to_dict()))            # JSON-safe: keys written as their text
    assert set(sel["curves"]) <= {"consensus", "stable", *want} and sel["selected"]["score"] == both.selection.score_name


def test_error_sets_are_keyed_by_a_typed_pair_and_records_keep_their_text(cache, tmp_path):
    """ident.sets is keyed by ClassPair(true, pred) (class indices; names for the text): looked up by the pair
    of ident.pairs, the typed key or the text 'true→pred' that records show; the run report writes the text."""
    from refineclip_core.edit.record import build_run_report
    from refineclip_core.method.errorsets import ClassPair, pair_error_sets
    from refineclip_core.method.protocol import make_engine

    both = identify(cache, ProtocolConfig(pair="both", samples_per_class=3, seed=1, top_t=4, resamples=0))
    assert list(both.sets) == [ClassPair(a, b) for a, b in both.pairs]
    for (a, b), key in zip(both.pairs, both.sets):
        names = (cache.classes[a], cache.classes[b])
        assert key.names == names and str(key) == f"{names[0]}→{names[1]}"
        s = both.sets[(a, b)]
        assert s is both.sets[key] is both.sets[str(key)] and (a, b) in both.sets and str(key) in both.sets
        ref = pair_error_sets(both.base_predictions, cache.labels, a, b, both.sample_rows)   # recomputed here
        assert s.sizes() == ref.sizes() and np.array_equal(s.W, ref.W) and np.array_equal(s.C, ref.C)
    (a, b) = both.pairs[0]
    assert (b, a) in both.sets and (a, a) not in both.sets and both.sets.get("x→y") is None
    with pytest.raises(KeyError):
        both.sets["x→y"]
    report = build_run_report(cache, both, make_engine(cache))
    sets = (report if isinstance(report, dict) else report.to_dict())["sets"]
    assert list(json.loads(json.dumps(sets))) == [str(k) for k in both.sets]


def test_run_report_is_written_and_read_through_one_schema(cache, tmp_path):
    """build_run_report writes RunReport.to_dict() (versioned: "schema"); read_run_report gives the typed
    RunReport back, equal to what was written; a file from before the schema (no "schema" key) still reads,
    one from a newer schema is refused in one sentence, and fields the schema does not name survive."""
    from refineclip_core.edit.record import build_run_report, read_run_report
    from refineclip_core.reporting.run_report import render_html
    from refineclip_core.reporting.report_schema import RUN_REPORT_SCHEMA, RunReport
    from refineclip_core.errors import RefineClipError
    from refineclip_core.method.protocol import make_engine

    ident = identify(cache, ProtocolConfig(samples_per_class=3, seed=1, top_t=4, resamples=0))
    built = build_run_report(cache, ident, make_engine(cache))
    assert isinstance(built, RunReport) and built.schema == RUN_REPORT_SCHEMA and built.findings is not None
    assert built.scoring == cache.scoring and cache.scoring.describe() in render_html(built)   # how it scores
    report = json.loads(json.dumps(built.to_dict()))
    assert report["schema"] == RUN_REPORT_SCHEMA and report["eval_files"]
    path = tmp_path / "run.json"
    path.write_text(json.dumps(report))
    run = read_run_report(path)
    assert run == built                                                            # the file reads back typed
    assert isinstance(run, RunReport) and run.data.classes == tuple(cache.classes)
    assert run.eval_files == tuple(report["eval_files"]) and run.heads == tuple(tuple(h) for h in report["heads"])
    assert run.data.n_images == len(cache) and run.data.layers == tuple(cache.manifest.layers)
    assert json.loads(json.dumps(run.to_dict())) == report                         # read back = written
    old = {k: v for k, v in report.items() if k != "schema"}                      # schema 1: before it was named
    path.write_text(json.dumps({**old, "a_later_field": [1, 2]}))
    run = read_run_report(path)
    assert run.schema == 1 and run.to_dict()["a_later_field"] == [1, 2]
    assert {k: v for k, v in run.to_dict().items() if k not in ("schema", "a_later_field")} == old
    path.write_text(json.dumps({**report, "schema": RUN_REPORT_SCHEMA + 1}))
    with pytest.raises(RefineClipError, match=f"uses schema {RUN_REPORT_SCHEMA + 1}, newer"):
        read_run_report(path)
    path.write_text(json.dumps({**report, "heads": [["a", 1]]}))
    with pytest.raises(RefineClipError, match="'heads' that is not a list of whole numbers"):
        read_run_report(path)


def test_pipeline_and_cli_score_refine(cache, tmp_path):
    ident = identify(cache, ProtocolConfig(samples_per_class=3, seed=1, top_t=4))
    assert set(np.unique(cache.labels[ident.sample_rows])) <= set(ident.pairs[0])
    assert not np.intersect1d(ident.sample_rows, ident.eval_rows).size       # samples never evaluated
    assert set(cache.splits[ident.eval_rows]) == {"test"}
    outcome = fit_edit(cache, ident, EditConfig(fit=FitConfig(steps=10), paper=PaperConfig(steps=20)))
    assert set(outcome.report.reports) == {"zero-shot", "ablated", "refineclip-fit", "refineclip-diag",
                                           "standard-finetune", "tip-adapter"}
    assert outcome.exported == "refineclip-fit" and outcome.refinement is outcome.results["refineclip-fit"]
    assert main(["score", "--cache", str(cache.root), "--samples-per-class", "3", "--top-t", "4", "--pair", "auto",
                 "--selection", "alg1", "--json", str(tmp_path / "s.json")]) == 0
    s = json.loads((tmp_path / "s.json").read_text())
    assert set(s["scores"]) == {"DE_A", "DE_B", "DE_C", "DE_D"}
    assert s["selected"]["heads"] and s["config"]["samples_per_class"] == 3
    ckpt = tmp_path / "edited.pt"
    assert main(["refine", "--cache", str(cache.root), "--samples-per-class", "3", "--steps", "20", "--method", "paper",
                 "--strategy", "lora", "--out", str(ckpt), "--json", str(tmp_path / "r.json"),
                 "--html", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "Plotly.newPlot" in page and "refineclip-lora" in page  # the same report the Refine page offers
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["checkpoint"]["file"] == ckpt.name and ckpt.exists() and r["refine_config"]["paper"]["strategy"] == "lora"
    assert {"zero-shot", "ablated", "refineclip-lora", "refineclip-fit"} <= set(r["methods"]["reports"])
    assert r["exported"] == "refineclip-lora" and r["extra"]["heads_arg"] == "auto"
    assert r["verdict"]["method"] == "refineclip-lora" and isinstance(r["verdict"]["ok"], bool)
    assert main(["score", "--cache", str(cache.root), "--pair", "cat:cat"]) == 2
    assert parse_heads("L2.H1, 0.3", [0, 1, 2], 4) == [HeadId(2, 1), HeadId(0, 3)]


def test_head_ids_parse_one_way():
    from refineclip_core.errors import RefineClipError

    assert HeadId.parse(" l22.h0 ") == HeadId.parse("22.0") == HeadId.of([22, 0]) == HeadId.of(HeadId(22, 0))
    assert str(HeadId.of((3, 1))) == "L3.H1" and HeadId.of("L3.H1").as_list() == [3, 1]
    assert parse_heads("L2.H1, 2.1, 0.3") == [HeadId(2, 1), HeadId(0, 3)]      # a set: duplicates dropped
    assert parse_heads([(0, 3), [2, 1]], [0, 1, 2], 4) == [HeadId(0, 3), HeadId(2, 1)]
    with pytest.raises(RefineClipError, match="LAYER.HEAD"):
        HeadId.parse("eleven")
    with pytest.raises(RefineClipError, match="outside the cached scope"):
        parse_heads("5.0", [0, 1, 2], 4)


def test_evaluation_mask_helper(cache):
    from refineclip_core.method.evaluation import rows_mask

    np.testing.assert_array_equal(rows_mask(5, [1, 3]), [False, True, False, True, False])
    assert rows_mask(3).all() and not rows_mask(3, []).any()
    ident = identify(cache, ProtocolConfig(samples_per_class=3, seed=1, top_t=4))
    np.testing.assert_array_equal(np.flatnonzero(ident.eval_mask), ident.eval_rows)
    assert ident.target_classes == sorted(set(ident.pairs[0]))


def test_refinement_reports_progress_cancels_and_leaves_the_global_rng_alone(cache):
    from refineclip_core.errors import Cancelled

    sets = _a_pair_with_everything(cache)
    eng = AblationEngine(cache.embeddings, cache.heads, cache.text, cache.manifest.layers)
    local = np.concatenate([sets.C, sets.A])
    args = (cache.embeddings, cache.labels, cache.text, cache.logit_scale, sets.W, local,
            eng.embeddings([HeadId(2, 0)], "zero", sets.W))
    cfg = PaperConfig(strategy="lora", steps=25)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    calls = []
    first = paper_phase2(*args, cfg, progress=lambda stage, done, total, values=None: calls.append((stage, done, total,
                                                                                             values)))
    np.testing.assert_array_equal(torch.rand(3), expected_next)  # torch's global RNG was not touched
    again = paper_phase2(*args, cfg)                                     # the local generator alone seeds LoRA
    np.testing.assert_array_equal(first.refined.matrix, again.refined.matrix)
    assert [c[1] for c in calls] == [1, 11, 21, 25] and {c[2] for c in calls} == {25}
    assert calls[0][0] == "RefineCLIP (lora)" and set(calls[-1][3]) == {"total", "success", "locality", "ce"}
    seen = []
    with pytest.raises(Cancelled, match="cancelled after 3 of 25 steps"):
        paper_phase2(*args, cfg, cancel=lambda: seen.append(1) or len(seen) > 3)


def test_pair_grammar_is_read_in_one_place():
    """PairSpec reads 'auto', 'both' and explicit pairs for the protocol and every page; pair_spec
    writes a pair that reads back to the same classes, names with ':' or ',' included (issue 25)."""
    from refineclip_core.errors import RefineClipError
    from refineclip_core.method.errorsets import ErrorPair
    from refineclip_core.method.protocol import PairSpec, pair_spec, resolve_pairs

    assert PairSpec.parse("auto") == PairSpec(True, False, ())
    assert PairSpec.parse("both") == PairSpec(True, True, ())
    two = PairSpec.parse("a:b, b : a")
    assert (two.automatic, two.both_directions, two.items) == (False, True, (("a", "b"), ("b", "a")))
    assert two.label() == "a → b, b → a"
    with pytest.raises(RefineClipError, match="TRUE:PRED"):
        PairSpec.parse("a-b")
    classes = ["cat, wild", "dog:x", "7", " fish", "bird"]
    for t in range(len(classes)):
        for p in range(len(classes)):
            if t != p:
                assert resolve_pairs(pair_spec(t, p, classes), [], classes) == [(t, p)]
    ranked = [ErrorPair(true=4, pred=0, count=3)]
    assert resolve_pairs("both", ranked, classes) == [(4, 0), (0, 4)]
    with pytest.raises(RefineClipError, match="no errors"):
        resolve_pairs("auto", [], classes)


def test_prediction_confidence_is_the_softmax_of_the_shown_prediction_by_blocks():
    """One number per image, computed by blocks, equals the full (N, C) softmax read at the given
    prediction (the Errors page keeps this instead of the whole matrix; issue 25 / 26)."""
    from refineclip_core.features.zeroshot import cosine_logits, prediction_confidence

    rng = np.random.default_rng(0)
    E, text = rng.normal(size=(37, 8)), rng.normal(size=(5, 8))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    pred = rng.integers(0, 5, size=37)                       # any class, not only the argmax
    full = torch.softmax(torch.as_tensor(30.0 * cosine_logits(E, text)), -1).numpy()   # a bare scale: CLIP's
    got = prediction_confidence(E, text, 30.0, pred, block=8)
    np.testing.assert_allclose(got, full[np.arange(37), pred], rtol=1e-6)
    assert got.dtype == np.float32 and got.shape == (37,)

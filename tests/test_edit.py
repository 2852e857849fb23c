"""The trustworthy edit (issue 14): intervals, consensus selection, RefineCLIP-fit, the guard and
the protocol's rows, each against an independent computation."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from fractions import Fraction

import numpy as np
import open_clip
import pytest
import torch

from refineclip_core.demo.world import write_world
from refineclip_core.features.cache import FeatureCache
from refineclip_core.features.decomposition import HeadId
from refineclip_core.features.extraction import ExtractionConfig, extract, load_batch
from refineclip_core.loading.data import load_dataset
from refineclip_core.loading.models import DEMO_DIR, ModelSpec, load_model
from refineclip_core.edit.config import FitConfig
from refineclip_core.edit.fit import fit_ablation, least_squares_map, teacher_embeddings
from refineclip_core.method.intervals import binomial_interval, binomial_intervals
from refineclip_core.edit.guard import HARMFUL, assess_edit
from refineclip_core.method.protocol import DEFAULT_PROTOCOL, ProtocolConfig, identify, make_engine
from refineclip_core.edit.compare import fit_edit
from refineclip_core.edit.config import DEFAULT_EDIT, EditConfig
from refineclip_core.edit.export import export_checkpoint
from refineclip_core.method.scores import HeadScores
from refineclip_core.method.selection import consensus_ranking, select_consensus, utility


# -- intervals ------------------------------------------------------------------------------------
def _binom_tail_ge(k: int, n: int, p: Fraction) -> Fraction:
    return sum(Fraction(math.comb(n, j)) * p ** j * (1 - p) ** (n - j) for j in range(k, n + 1))


def _clopper_pearson_by_bisection(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The definition, solved by bisection with exact rational tail sums: low is the p with
    P(X >= k | p) = a/2, high the p with P(X <= k | p) = a/2."""
    a = Fraction(1 - level).limit_denominator(10 ** 6) / 2

    def solve(f, lo=Fraction(0), hi=Fraction(1)):   # f increasing in p
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
        return float((lo + hi) / 2)

    low = 0.0 if k == 0 else solve(lambda p: _binom_tail_ge(k, n, p) - a)
    high = 1.0 if k == n else solve(lambda p: a - (1 - _binom_tail_ge(k + 1, n, p)))   # a/2 − P(X <= k | p)
    return low, high


@pytest.mark.parametrize("k,n", [(0, 7), (3, 7), (7, 7), (1, 12), (11, 20)])
def test_binomial_interval_is_clopper_pearson(k, n):
    assert binomial_interval(k, n) == pytest.approx(_clopper_pearson_by_bisection(k, n), abs=1e-7)


def test_binomial_interval_covers_at_least_95_percent():
    n = 25
    for p in (0.05, 0.3, 0.5, 0.8):
        low, high = binomial_intervals(np.arange(n + 1), np.full(n + 1, n))
        inside = (low <= p) & (p <= high)
        coverage = sum(math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(n + 1) if inside[k])
        assert coverage >= 0.95


# -- consensus selection --------------------------------------------------------------------------
def test_consensus_ranking_matches_a_loop_over_heads():
    rng = np.random.default_rng(3)
    layers = (4, 5)
    scores = {name: HeadScores(name, rng.normal(size=(2, 3)), layers, desc)
              for name, desc in (("DE_A", True), ("DE_B", False), ("DE_C", True), ("DE_D[x]", False))}
    scores["DE_E"] = HeadScores("DE_E", None, layers, True, "no W")              # unavailable: no vote
    scores["DE_F"] = HeadScores("DE_F", np.ones((2, 3)), layers, True)          # constant: no vote
    total = {}
    for l_i, layer in enumerate(layers):
        for h in range(3):
            z = 0.0
            for s in list(scores.values())[:4]:
                v = s.values
                z += (1 if s.descending else -1) * (v[l_i, h] - v.mean()) / v.std()
            total[HeadId(layer, h)] = z
    expected = sorted(total, key=lambda k: -total[k])
    assert consensus_ranking(scores) == expected


def test_select_consensus_takes_the_best_prefix_or_nothing(demo):
    cache, engine, ident = demo["cache"], demo["engine"], demo["ident"]
    sel = select_consensus(engine, ident.scores, ident.sample_rows, cache.labels, top_t=15)
    ranked = consensus_ranking(ident.scores)[:15]
    curve = [utility(engine, ranked[:t], ident.sample_rows, cache.labels) for t in range(1, 16)]
    np.testing.assert_allclose(sel.curves["consensus"], curve, rtol=1e-6)   # float32 engine arithmetic
    base = utility(engine, [], ident.sample_rows, cache.labels)
    t = int(np.argmax(curve)) + 1
    assert sel.heads == (ranked[:t] if max(curve) > base else [])
    # the protocol mean-ablates, so its utility is the mean-ablated model's (means over the adaptation rows)
    ident = identify(cache, ProtocolConfig(seed=0, selection="consensus", resamples=0), engine)
    assert ident.config.ablation == "mean" and ident.selection.score in ("consensus", None)
    mean_engine = ident.ablation_engine(engine)
    sel_mean = select_consensus(mean_engine, ident.scores, ident.sample_rows, cache.labels, top_t=ident.config.top_t, mode="mean")
    assert ident.heads == sel_mean.heads
    np.testing.assert_allclose(ident.selection.curves["consensus"], sel_mean.curves["consensus"], rtol=1e-6)


def test_the_mean_ablation_utility_is_eq_10_on_the_mean_ablated_embeddings(demo):
    """U(S) with mode="mean", against Eq. 10 computed by hand from E − Σ_S (c_h − m_h) (Eq. 5), the
    means taken here over the adaptation rows from the cached contributions."""
    cache, engine, ident = demo["cache"], demo["engine"], demo["ident"]
    rows, labels = ident.sample_rows, cache.labels
    heads = consensus_ranking(ident.scores)[:4]
    layers = list(cache.manifest.layers)
    idx = [layers.index(h.layer) for h in heads]
    c = np.asarray(cache.heads[ident.adapt_rows], dtype=np.float64)
    m = [c[:, i, h.head].mean(0) for i, h in zip(idx, heads)]
    x = np.asarray(cache.heads[rows], dtype=np.float64)
    emb = np.asarray(cache.embeddings[rows], dtype=np.float64)
    for i, h, mh in zip(idx, heads, m):
        emb = emb - x[:, i, h.head] + mh
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    text = np.asarray(cache.text, dtype=np.float64)
    cos = emb @ (text / np.linalg.norm(text, axis=1, keepdims=True)).T
    own = cos[np.arange(len(rows)), labels[rows]]
    expected = float(np.mean(own - (cos.sum(1) - own) / (cos.shape[1] - 1)))
    got = utility(ident.ablation_engine(engine), heads, rows, labels, "mean")
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert got != pytest.approx(utility(engine, heads, rows, labels), rel=1e-6)   # not the zero-ablation value


# -- RefineCLIP-fit ---------------------------------------------------------------------------------
def test_least_squares_start_solves_the_ridge_problem():
    rng = np.random.default_rng(0)
    E, T = rng.normal(size=(50, 6)), rng.normal(size=(50, 6))
    ridge = 0.1
    lam = ridge * np.trace(E.T @ E) / 6
    # [E; √λ I] B = [T; √λ I] in the least-squares sense, by an independent solver
    A = np.vstack([E, np.sqrt(lam) * np.eye(6)])
    Y = np.vstack([T, np.sqrt(lam) * np.eye(6)])
    expected = np.linalg.lstsq(A, Y, rcond=None)[0]
    np.testing.assert_allclose(least_squares_map(E, T, ridge), expected, atol=1e-10)


def test_fit_distils_the_teacher_and_exports_through_plain_open_clip(demo, tmp_path):
    """The merged checkpoint equals the fitted map: plain open_clip loads it and reproduces E·B."""
    cache, ident = demo["cache"], demo["ident"]
    engine = ident.ablation_engine(demo["engine"])
    teacher, succ = teacher_embeddings(engine, ident.heads, "mean", ident.adapt_rows, ident.target_classes)
    assert succ.any() and (~succ).any()
    np.testing.assert_array_equal(teacher[~succ], cache.embeddings[ident.adapt_rows][~succ])
    np.testing.assert_allclose(teacher[succ], engine.embeddings(ident.heads, "mean", ident.adapt_rows[succ]))
    res = fit_ablation(cache.embeddings[ident.adapt_rows], cache.text, cache.logit_scale, teacher, succ,
                       FitConfig(steps=30))
    h = res.history
    assert len(h["total"]) == 30 and h["total"][-1] < h["total"][0]
    assert res.refined.strategy == "fit" and res.refined.matrix.shape == (cache.embeddings.shape[1],) * 2
    loaded = demo["loaded"]
    src = loaded.spec.resolved().checkpoint
    out = export_checkpoint(src, loaded.model, res.refined, tmp_path / "fit.safetensors")
    open_clip.add_model_config(DEMO_DIR / "refineclip-demo.json")
    plain = open_clip.create_model("refineclip-demo", pretrained=str(out)).eval()
    batch, _, _ = load_batch(loaded, cache.records[:8], 0)
    with torch.no_grad():
        edited = plain.encode_image(batch).double().numpy()
    expected = res.refined.apply(cache.embeddings[:8])
    rel = np.linalg.norm(edited - expected, axis=1) / np.linalg.norm(expected, axis=1)
    assert rel.max() < 1e-5        # float16 checkpoint, but the merged projection is stored in float32
    assert not np.allclose(expected, cache.embeddings[:8], rtol=1e-3)


def test_the_teachers_strength_scales_each_heads_centred_contribution(demo):
    """``E + α(E_abl − E)`` on Ŵ, recomputed by hand from the cached per-head contributions c_h and their means
    m_h over the adaptation rows (Eq. 4-5): E − α Σ_S (c_h − m_h); α = 1 is the ablated embedding itself, and
    fit_edit hands the config's strength to the teacher (a weaker edit moves fewer predictions)."""
    cache, ident = demo["cache"], demo["ident"]
    engine = ident.ablation_engine(demo["engine"])
    rows, heads = ident.adapt_rows, ident.heads
    assert heads
    teacher, succ = teacher_embeddings(engine, heads, "mean", rows, ident.target_classes, strength=0.6)
    c = np.asarray(cache.heads[rows[succ]], dtype=np.float64)                        # (n, L_s, H, d)
    all_c = np.asarray(cache.heads[rows], dtype=np.float64)
    layers = list(cache.manifest.layers)
    removed = sum(c[:, layers.index(h.layer), h.head] - all_c[:, layers.index(h.layer), h.head].mean(0) for h in heads)
    E = np.asarray(cache.embeddings[rows[succ]], dtype=np.float64)
    np.testing.assert_allclose(teacher[succ], E - 0.6 * removed, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(teacher[~succ], cache.embeddings[rows][~succ])
    full, _ = teacher_embeddings(engine, heads, "mean", rows, ident.target_classes, strength=1.0)
    np.testing.assert_allclose(full[succ], E - removed, rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="strength"):
        FitConfig(strength=0.0)
    moved = {a: fit_edit(cache, ident, EditConfig(fit=FitConfig(steps=20, strength=a)), engine=demo["engine"],
                         baselines=False) for a in (0.3, 1.0)}
    flips = {a: int((o.report.predictions["refineclip-fit"] != engine.base_predictions).sum()) for a, o in moved.items()}
    assert flips[0.3] <= flips[1.0] and moved[0.3].config.fit.strength == 0.3


@pytest.mark.slow
def test_concept_removal_reaches_the_teacher_and_the_exported_checkpoint(demo, tmp_path):
    """With a concept removed, Ŵ's teachers are the ablated embeddings off the concept's span (the rest keep E),
    fit_edit compares the edit with the same fit keeping it, and the export still reproduces E·B."""
    from refineclip_core.edit.concept import ConceptConfig, project_off, resolve_concept
    from refineclip_core.method.protocol import CONCEPT_KEPT

    cache, ident, loaded = demo["cache"], demo["ident"], demo["loaded"]
    engine = ident.ablation_engine(demo["engine"])
    removal = resolve_concept(ConceptConfig(("water", "land")), loaded, cache.manifest.templates, cache.text)
    teacher, succ = teacher_embeddings(engine, ident.heads, "mean", ident.adapt_rows, ident.target_classes, removal)
    ablated = engine.embeddings(ident.heads, "mean", ident.adapt_rows[succ])
    np.testing.assert_allclose(teacher[succ], project_off(ablated, removal.basis))
    np.testing.assert_allclose(teacher[succ] @ removal.basis.T, 0, atol=1e-9)
    np.testing.assert_array_equal(teacher[~succ], cache.embeddings[ident.adapt_rows][~succ])
    cfg = EditConfig(fit=FitConfig(steps=20), concept=ConceptConfig(("water", "land")))
    with pytest.raises(Exception, match="none was resolved"):
        fit_edit(cache, ident, cfg, engine=demo["engine"], baselines=False)
    out = fit_edit(cache, ident, cfg, engine=demo["engine"], baselines=True, concept=removal, loaded=loaded)
    assert {"refineclip-fit", CONCEPT_KEPT, "coop", "tip-adapter"} <= set(out.report.predictions)
    assert out.concept is removal and not np.array_equal(out.results["refineclip-fit"].refined.matrix,
                                                         out.results[CONCEPT_KEPT].refined.matrix)
    res = out.refinement
    exported = export_checkpoint(loaded.spec.resolved().checkpoint, loaded.model, res.refined, tmp_path / "c.safetensors")
    open_clip.add_model_config(DEMO_DIR / "refineclip-demo.json")
    plain = open_clip.create_model("refineclip-demo", pretrained=str(exported)).eval()
    batch, _, _ = load_batch(loaded, cache.records[:8], 0)
    with torch.no_grad():
        edited = plain.encode_image(batch).double().numpy()
    expected = res.refined.apply(cache.embeddings[:8])
    assert (np.linalg.norm(edited - expected, axis=1) / np.linalg.norm(expected, axis=1)).max() < 1e-5


# -- the guard --------------------------------------------------------------------------------------
def test_guard_fires_on_a_harmful_edit_and_stays_quiet_on_the_default(demo):
    cache, ident = demo["cache"], demo["ident"]
    outcome = fit_edit(cache, ident, DEFAULT_EDIT, engine=demo["engine"], baselines=False)
    preds = outcome.report.predictions
    default = assess_edit(cache, ident, preds["zero-shot"], preds["refineclip-fit"], "refineclip-fit")
    assert outcome.exported == "refineclip-fit" and default.ok, default.summary()
    assert default.worst_group.value > 0
    # a deliberately harmful edit: swap the two bird classes' text directions in the embedding
    a, b = ident.target_classes
    T = cache.text.astype(np.float64)
    swap = np.eye(T.shape[1]) - np.outer(T[a] - T[b], T[a] - T[b]) / ((T[a] - T[b]) @ (T[a] - T[b]))
    harmful = (cache.embeddings @ swap.T @ T.T).argmax(1)
    verdict = assess_edit(cache, ident, outcome.report.predictions["zero-shot"], harmful, "harmful")
    assert not verdict.ok and verdict.status == HARMFUL and verdict.summary().startswith("Harmful")
    assert any("got worse" in s for s in verdict.harmed)


# -- protocol rows and defaults ---------------------------------------------------------------------
def test_protocol_rows_are_disjoint_and_hold_out_without_a_test_split(demo):
    cache, ident = demo["cache"], demo["ident"]
    everything = np.arange(len(cache))
    assert not np.intersect1d(ident.eval_rows, ident.adapt_rows).size
    assert not np.intersect1d(ident.eval_rows, ident.sample_rows).size
    np.testing.assert_array_equal(np.union1d(ident.eval_rows, ident.adapt_rows), everything)
    assert set(cache.splits[ident.eval_rows]) == {"test"}
    # a folder written as a single split: half of every class x group is held out before sampling
    one = FeatureCache(cache.root)
    one.splits = np.full(len(one), "test", dtype=object)
    i2 = identify(one, ProtocolConfig(seed=3))
    assert not np.intersect1d(i2.eval_rows, i2.adapt_rows).size
    assert not np.intersect1d(i2.eval_rows, i2.sample_rows).size
    assert set(i2.sample_rows) <= set(i2.adapt_rows)
    for c in np.unique(one.labels):
        for g in np.unique(one.groups[one.labels == c]):
            m = (one.labels == c) & (one.groups == g)
            assert int(m[i2.eval_rows].sum()) == min(max(round(0.5 * m.sum()), 1), m.sum() - 1)


def test_the_headline_was_measured_with_todays_defaults():
    """The committed multi-draw table (benchmarks/RESULTS.md, ``demo`` section, written by
    benchmarks/demo_world.py) records the defaults it ran with; they must be today's
    ``DEFAULT_PROTOCOL`` and ``DEFAULT_EDIT``: a change of defaults re-runs the benchmark."""
    import re

    text = (Path(__file__).resolve().parent.parent / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    section = " ".join(text[text.index("<!-- demo:start -->"):text.index("<!-- demo:end -->")].split())
    selection, ablation = re.search(r"ablation of the chosen heads \(default: (\w+), (\w+)\)", section).groups()
    assert (selection, ablation) == (DEFAULT_PROTOCOL.selection, DEFAULT_PROTOCOL.ablation)
    assert int(re.search(r"(\d+) resamples", section).group(1)) == DEFAULT_PROTOCOL.resamples
    assert float(re.search(r"share s = ([\d.]+)", section).group(1)) == DEFAULT_EDIT.fit.strength
    assert "RefineCLIP-fit: the exported edit (default)" in section and DEFAULT_EDIT.exported == "refineclip-fit"
    assert EditConfig(method="paper").exported == "refineclip-diag"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A small fresh sample of the demo world (train/val/test), extracted with the demo model."""
    root = tmp_path_factory.mktemp("demo-edit")
    data = write_world(root / "data", "all", seed=424242, n_per_group=25)
    loaded = load_model(ModelSpec("demo"))
    cache = extract(loaded, load_dataset(data), root / "cache", ExtractionConfig(layers=4, batch_size=64))
    engine = make_engine(cache)
    ident = identify(cache, ProtocolConfig(seed=0), engine)
    return {"cache": cache, "engine": engine, "ident": ident, "loaded": loaded}


def test_paper_loss_weights_have_their_own_flags_and_the_old_ones_still_work(capsys):
    """--success-weight/--locality-weight set the paper's α, β of Eq. 13 (PaperConfig.success_weight,
    .locality_weight); --alpha/--beta, kept one release, set the same and note the new name on stderr."""
    from refineclip_core.cli import build_parser
    from refineclip_core.cli.refine import edit_config

    parse = build_parser().parse_args
    new = edit_config(parse(["refine", "--cache", "x", "--success-weight", "7", "--locality-weight", "3"]))
    assert (new.paper.success_weight, new.paper.locality_weight) == (7.0, 3.0) and capsys.readouterr().err == ""
    old = edit_config(parse(["refine", "--cache", "x", "--alpha", "7", "--beta", "3"]))
    assert old.paper == new.paper
    err = capsys.readouterr().err.splitlines()
    assert err == ["refineclip: --alpha is deprecated and will be removed; use --success-weight (same meaning).",
                   "refineclip: --beta is deprecated and will be removed; use --locality-weight (same meaning)."]
    rep = parse(["reproduce", "waterbirds", "--data", "x", "--model", "demo", "--alpha", "5"])
    assert rep.success_weight == 5.0 and "--alpha is deprecated" in capsys.readouterr().err
    assert new.fit.strength == DEFAULT_EDIT.fit.strength                  # the fit's strength is its own option


def test_one_set_of_defaults_for_cli_and_reproduction():
    """The CLI's options and the reproduction harness read their defaults from DEFAULT_PROTOCOL and
    DEFAULT_EDIT (the dashboard's and the benchmark's are checked in test_app / test_demo_world)."""
    import inspect

    from refineclip_core.cli import build_parser
    from refineclip_core.cli.refine import edit_config
    from refineclip_core.cli.score import protocol
    from refineclip_core.edit.reproduce import run_protocol

    args = build_parser().parse_args(["refine", "--cache", "somewhere"])
    assert protocol(args) == DEFAULT_PROTOCOL
    assert edit_config(args) == DEFAULT_EDIT
    args = build_parser().parse_args(["score", "--cache", "somewhere"])
    assert protocol(args) == DEFAULT_PROTOCOL
    rep = build_parser().parse_args(["reproduce", "waterbirds", "--data", "x", "--model", "demo"])
    paper = DEFAULT_EDIT.paper
    assert (rep.success_weight, rep.locality_weight, rep.steps, rep.lr, rep.top_t) == (
        paper.success_weight, paper.locality_weight, paper.steps, paper.lr, DEFAULT_PROTOCOL.top_t)
    params = inspect.signature(run_protocol).parameters
    assert params["edit"].default is DEFAULT_EDIT and params["protocol"].default is DEFAULT_PROTOCOL


@pytest.mark.slow
def test_coop_beyond_its_budget_is_left_out_with_the_reason(demo):
    """An edit whose CoOp would pass its cost budget runs without it and says why: in the outcome, the run
    report (JSON and HTML) and the CLI's lines; within the budget the row is there."""
    from refineclip_core.edit.record import build_run_report
    from refineclip_core.method.baselines import CoOpConfig, coop_cost
    from refineclip_core.reporting.run_report import render_html

    cache, ident, loaded = demo["cache"], demo["ident"], demo["loaded"]
    cost = coop_cost(loaded, cache.classes, cache.manifest.templates, CoOpConfig(steps=3))
    tight = EditConfig(fit=FitConfig(steps=5), coop=CoOpConfig(steps=3, max_flops=cost / 2))
    out = fit_edit(cache, ident, tight, engine=demo["engine"], baselines=True, loaded=loaded)
    assert "coop" not in out.report.predictions and "tip-adapter" in out.report.predictions
    why = out.left_out["coop"]
    assert f"{cost:.1e}" in why and f"{len(cache.classes):,} class prompts" in why
    report = build_run_report(cache, ident, demo["engine"], out)
    assert report.left_out["coop"] == why and why in render_html(report)
    assert set(report.left_out) == {"coop", "cue-projection", "ltc"}     # the LTC rows: no text typed
    roomy = replace(tight, coop=CoOpConfig(steps=3, max_flops=cost * 2))
    out = fit_edit(cache, ident, roomy, engine=demo["engine"], baselines=True, loaded=loaded)
    assert "coop" in out.report.predictions and "coop" not in out.left_out


def test_a_teacher_of_the_success_rows_only_fits_the_same_map(demo, monkeypatch):
    """fit_ablation from Ŵ's teachers alone (the other rows' teacher is their embedding, never copied) equals the
    fit from every row's teacher, bit for bit, over more than one block of the least squares and the KL steps."""
    from refineclip_core.edit import fit as fit_module

    cache, ident = demo["cache"], demo["ident"]
    engine = ident.ablation_engine(demo["engine"])
    full, succ = teacher_embeddings(engine, ident.heads, "mean", ident.adapt_rows, ident.target_classes, strength=0.8)
    only, succ2 = teacher_embeddings(engine, ident.heads, "mean", ident.adapt_rows, ident.target_classes, strength=0.8,
                                     success_only=True)
    np.testing.assert_array_equal(succ, succ2)
    np.testing.assert_array_equal(only, full[succ])
    E = cache.embeddings[ident.adapt_rows]
    block = max(8, len(E) // 3)            # several blocks on the demo's adaptation rows
    monkeypatch.setattr(fit_module, "FIT_BLOCK", block)
    cfg = FitConfig(steps=15, max_rows=len(E) - 5)
    a = fit_ablation(E, cache.text, cache.logit_scale, full, succ, cfg)
    b = fit_ablation(E, cache.text, cache.logit_scale, only, succ, cfg)
    np.testing.assert_array_equal(a.refined.matrix, b.refined.matrix)
    np.testing.assert_array_equal(least_squares_map(E, full, 0.1, block), least_squares_map(E, only, 0.1, block, succ))

"""A head choice that does not depend on luck (issue 23, item 6): the bootstrap resamples of the labelled
images, the per-head selection counts against a brute-force loop, determinism, the order of the stable
selection, and what the CLI and the run report show."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from refineclip_core.demo.world import write_world
from refineclip_core.errors import RefineClipError
from refineclip_core.features.decomposition import HeadId
from refineclip_core.features.extraction import ExtractionConfig, extract
from refineclip_core.loading.data import load_dataset
from refineclip_core.loading.models import ModelSpec, load_model
from refineclip_core.method.protocol import ProtocolConfig, identify, make_engine, selection_mean_rows
from refineclip_core.method.scores import compute_scores
from refineclip_core.method.errorsets import ErrorSets
from refineclip_core.method.selection import (consensus_ranking, select_consensus, select_heads, select_stable,
                                              smoothed_prefix, stable_ranking, utility)
from refineclip_core.method.stability import ONE_OFF_BELOW, HeadStability, bootstrap_rows, head_stability


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A small fresh sample of the demo world (train/val/test), extracted with the demo model."""
    root = tmp_path_factory.mktemp("demo-stability")
    data = write_world(root / "data", "all", seed=515151, n_per_group=25)
    cache = extract(load_model(ModelSpec("demo")), load_dataset(data), root / "cache",
                    ExtractionConfig(layers=4, batch_size=64))
    return cache, make_engine(cache)


# -- the resamples ----------------------------------------------------------------------------------
def test_bootstrap_rows_resample_each_class_to_its_own_size():
    rows = np.array([3, 5, 8, 13, 21, 34, 55])
    labels = np.zeros(60, dtype=int)
    labels[[21, 34, 55]] = 1
    draws = bootstrap_rows(rows, labels, 400, seed=7)
    assert len(draws) == 400
    counts = Counter()
    for d in draws:
        assert np.all(np.diff(d) >= 0) and len(d) == len(rows)
        assert sorted(labels[d].tolist()) == [0, 0, 0, 0, 1, 1, 1]       # class sizes kept
        assert set(d.tolist()) <= set(rows.tolist())
        counts.update(d.tolist())
    # with replacement and uniform within a class: every row is drawn about 400 times on average
    assert all(abs(counts[r] - 400) < 4 * np.sqrt(400) for r in rows)
    assert any(len(np.unique(d)) < len(d) for d in draws)                # repeats happen
    same = bootstrap_rows(rows, labels, 400, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(draws, same))
    other = bootstrap_rows(rows, labels, 400, seed=8)
    assert not all(np.array_equal(a, b) for a, b in zip(draws, other))
    assert bootstrap_rows(rows, labels, 0, seed=7) == []
    with pytest.raises(RefineClipError):
        bootstrap_rows(rows, labels, -1, seed=7)


def test_head_stability_counts_and_orders_heads():
    a, b, c = HeadId(1, 0), HeadId(1, 1), HeadId(2, 0)
    picks = iter([[a, b], [b], [b, c, c], [a, b]])
    s = head_stability(lambda rows: next(picks), np.arange(4), np.zeros(4, dtype=int), resamples=4, seed=0)
    assert s.counts == {b: 4, a: 2, c: 1}                   # a repeated head counts once per resample
    assert list(s.counts) == [b, a, c]
    assert s.frequency(a) == 0.5 and s.frequency(c) == 0.25
    assert s.one_off([a, b, c]) == [c] and not s.is_one_off(a) and ONE_OFF_BELOW == 0.5
    rows = s.rows([c])
    assert rows[0] == {"head": "L2.H0", "in_set": True, "chosen_in": 1, "resamples": 4, "note": "one-off choice"}
    assert [r["head"] for r in rows[1:]] == ["L1.H1", "L1.H0"] and not rows[1]["in_set"]
    assert rows[2]["note"] == "chosen in 2 of 4 resamples, not in this set"     # the count, not "most"
    text = s.summary([c])
    assert "L2.H0 1/4" in text and "One-off choice" in text and "L1.H1 (in 4 of 4), L1.H0 (in 2 of 4)" in text
    assert HeadStability(0).summary([a]).startswith("The choice was not repeated")


# -- the protocol's counts against a brute-force loop -------------------------------------------------
def _sets_by_hand(pred, labels, a, b, rows) -> ErrorSets:
    """W, C, A of the pair a → b among ``rows`` (repeats kept), written out with a plain loop."""
    W = [r for r in rows if labels[r] == a and pred[r] == b]
    C = [r for r in rows if labels[r] == a and pred[r] == a]
    A = [r for r in rows if labels[r] == b and pred[r] == b]
    n = len(labels)
    return ErrorSets(a, b, np.array(W, dtype=np.int64), np.array(C, dtype=np.int64), np.array(A, dtype=np.int64),
                     np.full(n, a), np.full(n, b))


@pytest.mark.parametrize("rule", ["consensus", "alg1"])
def test_stability_counts_match_a_brute_force_loop_over_resamples(demo, rule):
    cache, engine = demo
    cfg = ProtocolConfig(seed=3, selection=rule, resamples=6)
    ident = identify(cache, cfg, engine)
    labels, pred = cache.labels, engine.base_predictions
    judge = engine.with_mean_rows(selection_mean_rows(ident.adapt_rows, cfg.seed))
    counts = Counter()
    for rows in bootstrap_rows(ident.sample_rows, labels, cfg.resamples, cfg.seed):
        scores = {}
        for a, b in ident.pairs:
            key = f"{cache.classes[a]}→{cache.classes[b]}"
            for name, hs in compute_scores(cache.embeddings, cache.heads, cache.text,
                                           _sets_by_hand(pred, labels, a, b, rows.tolist()),
                                           cache.manifest.layers).items():
                scores[name if len(ident.pairs) == 1 else f"{name}[{key}]"] = hs
        select = select_consensus if rule == "consensus" else select_heads
        counts.update(set(select(judge, scores, rows, labels, cfg.top_t, "mean").heads))
    stability = ident.selection.stability
    assert stability.resamples == 6 and stability.counts == dict(counts)
    assert list(stability.counts.values()) == sorted(counts.values(), reverse=True)
    assert ident.selection.to_dict()["stability"]["counts"] == [[h.layer, h.head, n] for h, n in stability.counts.items()]


def test_the_choice_is_deterministic_given_the_seed(demo):
    cache, engine = demo
    one = identify(cache, ProtocolConfig(seed=4, selection="stable", resamples=8), engine)
    two = identify(cache, ProtocolConfig(seed=4, selection="stable", resamples=8), make_engine(cache))
    assert one.heads == two.heads and one.selection.stability.counts == two.selection.stability.counts
    other = identify(cache, ProtocolConfig(seed=5, selection="stable", resamples=8), engine)
    assert not np.array_equal(one.sample_rows, other.sample_rows)
    assert identify(cache, ProtocolConfig(seed=4, resamples=0), engine).selection.stability.counts == {}


def _smoothed_t_by_hand(curve, base) -> int:
    """The t whose U averaged with its neighbours (ends repeated) beats U(∅) most; 0 when none beats it."""
    T = len(curve)
    best_t, best = 0, 0.0
    for t in range(1, T + 1):
        around = [curve[min(max(j, 1), T) - 1] - base for j in (t - 1, t, t + 1)]
        if sum(around) / 3 > best:
            best_t, best = t, sum(around) / 3
    return best_t


def test_smoothed_prefix_against_a_loop():
    assert smoothed_prefix([0.1, 0.9, 0.2, 0.6, 0.7, 0.65], 0.0) == 6      # not the lone spike at t = 2
    assert smoothed_prefix([0.5, 0.4], 0.6) == 0 and smoothed_prefix([], 0.0) == 0
    assert smoothed_prefix([0.3], 0.0) == 1
    rng = np.random.default_rng(0)
    for _ in range(200):
        curve = rng.normal(size=rng.integers(1, 16)).tolist()
        base = float(rng.normal())
        assert smoothed_prefix(curve, base) == _smoothed_t_by_hand(curve, base)


def test_stable_selection_returns_heads_in_the_documented_order(demo):
    """Heads ranked by how many resamples chose them, ties in the consensus order; cut at the prefix whose U
    (Eq. 10, the applied mean ablation) averaged with its neighbours is the largest, or nothing when none beats
    removing nothing."""
    cache, engine = demo
    cfg = ProtocolConfig(seed=1, selection="stable", resamples=10)
    ident = identify(cache, cfg, engine)
    st = ident.selection.stability
    consensus = consensus_ranking(ident.scores)
    expected = sorted(consensus, key=lambda h: (-st.count(h), consensus.index(h)))[: cfg.top_t]
    assert stable_ranking(ident.scores, st)[: cfg.top_t] == expected
    judge = engine.with_mean_rows(selection_mean_rows(ident.adapt_rows, cfg.seed))
    curve = [utility(judge, expected[:t], ident.sample_rows, cache.labels, "mean") for t in range(1, len(expected) + 1)]
    base = utility(judge, [], ident.sample_rows, cache.labels, "mean")
    np.testing.assert_allclose(ident.selection.curves["stable"], curve, rtol=1e-6)
    assert ident.heads == expected[: _smoothed_t_by_hand(curve, base)]
    assert ident.selection.score == ("stable" if ident.heads else None)
    counts = [st.count(h) for h in ident.heads]
    assert counts == sorted(counts, reverse=True)
    # with no resamples every count is 0: the stable ranking is the consensus ranking
    sel = select_stable(judge, ident.scores, ident.sample_rows, cache.labels, HeadStability(0), cfg.top_t, "mean")
    assert sel.candidates["stable"] == consensus[: cfg.top_t]


def test_protocol_refuses_a_bad_number_of_resamples():
    with pytest.raises(RefineClipError):
        ProtocolConfig(resamples=-1)
    with pytest.raises(RefineClipError):
        ProtocolConfig(selection="lucky")


# -- what the user sees -------------------------------------------------------------------------------
def test_cli_score_and_the_run_report_show_the_stability(demo, tmp_path, capsys):
    from refineclip_core.cli import main
    from refineclip_core.reporting.run_report import render_html
    from refineclip_core.edit.record import build_run_report

    cache, engine = demo
    assert main(["score", "--cache", str(cache.root), "--resamples", "5", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "resamples of the labelled images" in out and "/5" in out
    assert main(["score", "--cache", str(cache.root), "--resamples", "5", "--seed", "2", "--json",
                 str(tmp_path / "s.json")]) == 0
    record = json.loads((tmp_path / "s.json").read_text())
    assert record["stability"]["resamples"] == 5 and record["stability"]["counts"]

    ident = identify(cache, ProtocolConfig(seed=2, resamples=5), engine)
    odd = HeadId(cache.manifest.layers[0], 0)
    st = ident.selection.stability
    st.counts = {**{h: 5 for h in ident.heads}, odd: 1}
    ident.selection.heads = [*ident.heads, odd] if odd not in ident.heads else ident.heads
    from refineclip_core.reporting.report_sections import StabilityRow

    report = build_run_report(cache, ident, engine)
    block = report.head_stability
    assert block.resamples == 5 and str(odd) in block.to_dict()["one_off"]
    assert StabilityRow(str(odd), True, 1, 5, "one-off choice") in block.rows
    page = render_html(report)
    assert "How stable is the choice of heads" in page and "1/5 resamples" in page and "one-off choice" in page

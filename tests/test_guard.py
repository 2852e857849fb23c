"""The guard (refineclip_core/edit/guard.py): each outcome on hand-built predictions, and its
formulas against independent computations (brute force, simulation)."""

from __future__ import annotations

from itertools import product

import numpy as np
import pytest
from scipy.stats import binom

from refineclip_core.edit.bounds import drop_bound, exact_broken_bound, gain_bound, images_to_bound, statement_significance
from refineclip_core.edit.guard import HARMFUL, NOT_VERIFIED, STATUSES, VERIFIED, GuardConfig, holm, judge_edit
from refineclip_core.reporting.tables import csv_text, safe_cell, shown_points, verdict_rows
from refineclip_core.errors import RefineClipError
from refineclip_core.method.intervals import (difference_interval, mcnemar_p, paired_change_interval,
                                              paired_counts, wilson_interval)

CLASSES = ["landbird", "waterbird", "dog", "fish"]
GROUPS = ["landbird on land", "landbird on water", "waterbird on land", "waterbird on water"]


def world(n: int = 40):
    """Two edited classes with two groups each (``n`` held-out images per group), two other classes
    of ``n`` images without groups; zero-shot gets every image right except half of group 1."""
    labels = np.repeat([0, 0, 1, 1, 2, 3], n)
    groups = np.repeat([0, 1, 2, 3, -1, -1], n)
    before = labels.copy()
    before[n:n + n // 2] = 1            # landbird on water: half called waterbird
    return labels, groups, before


def judge(labels, groups, before, after, **kw):
    return judge_edit(labels, before, after, np.arange(len(labels)), [0, 1], CLASSES, groups, GROUPS, "test", **kw)


def test_a_clear_fix_with_nothing_broken_is_verified():
    labels, groups, before = world(n=200)
    after = labels.copy()                # the edit fixes all 100
    v = judge(labels, groups, before, after)
    assert v.status == VERIFIED and v.ok, v.summary()
    assert [u.name for u in v.groups] == GROUPS and len(v.classes) == 4 and v.others.n == 400
    w = v.worst
    assert w.before.name == "landbird on water" and w.change.value == pytest.approx(0.5)
    assert w.change.n == 200             # the worst group's own n, not the edited classes' 800
    assert w.change.low > 0 and not v.reasons and v.images_needed is None
    assert v.summary().startswith("Verified") and "Bonferroni" in v.summary()
    assert v.gain_bound > 0 and v.drop_bound <= 0.05 and "no group or class lost more than" in v.sentence()
    d = v.to_dict()
    assert d["status"] in STATUSES and len(d["groups"]) == 4 and d["worst"]["n"] == 200
    rows = verdict_rows(d)               # every group and class: 4 groups + 4 classes + the rest together
    assert len(rows) == 9 and {r["name"] for r in rows} >= set(GROUPS) | set(CLASSES)


def test_the_same_fix_on_few_images_is_not_verified_because_harm_cannot_be_bounded():
    """With 40 held-out images per group nothing was broken, yet a drop of 10 points in a group would
    go unnoticed as often as not: the guard says it cannot rule out a 5-point drop (all units at once)."""
    labels, groups, before = world(n=40)
    v = judge(labels, groups, before, labels.copy())
    assert v.status == NOT_VERIFIED and v.ok and not v.harmed, v.summary()
    assert v.worst.change.low > 0                      # the gain itself is clear ...
    assert any("cannot rule out a drop of more than 5 points" in r and "landbird on land" in r for r in v.reasons)
    assert v.images_needed is not None
    # ... and a hidden trade (3 of 40 landbirds on land broken, not significant) is not verified either
    after = labels.copy()
    after[:3] = 1
    hidden = judge(labels, groups, before, after)
    assert hidden.status == NOT_VERIFIED and not any(u.worse for u in hidden.units())


def test_an_edit_that_moves_the_error_to_another_group_is_harmful():
    """The issue's demo case: the worst group gains, "landbird on land" falls from 100% to 60%."""
    labels, groups, before = world()
    after = labels.copy()
    after[:16] = 1                       # 16 of 40 landbirds on land now called waterbird
    v = judge(labels, groups, before, after)
    assert v.status == HARMFUL and not v.ok, v.summary()
    bad = [u for u in v.units() if u.worse]
    assert [u.name for u in bad if u.kind == "group"] == ["landbird on land"]
    assert "Holm" in v.summary() and "landbird on land" in v.harmed[0] and "n=40" in v.harmed[0]


def test_harm_to_an_other_class_is_harmful_too():
    labels, groups, before = world()
    after = labels.copy()
    after[200:215] = 0                   # 15 of 40 fish called landbird
    v = judge(labels, groups, before, after)
    assert v.status == HARMFUL and any(u.name == "fish" and u.worse for u in v.classes)


def test_too_few_held_out_images_is_not_verified_and_says_how_many_would_tell():
    labels, groups, before = world(n=8)
    after = labels.copy()
    v = judge(labels, groups, before, after)
    assert v.status == NOT_VERIFIED and v.ok
    assert any("too few held-out images" in r and "has 8" in r for r in v.reasons)
    assert v.images_needed is not None and v.images_needed > 8
    assert f"About {v.images_needed} held-out images per group would bound every drop within 5 points" in v.summary()


def test_edited_classes_absent_is_not_verified():
    """The issue's real-photo case: every held-out image is a dog or a fish."""
    labels, groups, before = world()
    rows = np.flatnonzero(labels >= 2)
    v = judge_edit(labels, before, labels.copy(), rows, [0, 1], CLASSES, groups, GROUPS, "test")
    assert v.status == NOT_VERIFIED and v.worst is None and not v.groups
    assert "no held-out images of the edited classes" in v.summary()


def test_a_group_with_no_held_out_image_is_listed_as_not_checked_and_does_not_block():
    """The issue's `--split all` world: groups that only the training split has are not checkable."""
    labels, groups, before = world(n=200)
    rows = np.flatnonzero(groups != 3)                    # "waterbird on water" has images, none held out
    v = judge_edit(labels, before, labels.copy(), rows, [0, 1], CLASSES, groups, GROUPS, "test")
    assert v.status == VERIFIED and v.not_checked == ["waterbird on water"], v.summary()
    assert "Checked on 3 groups and 4 classes" in v.summary()
    assert "not checked (no held-out images): waterbird on water" in v.summary()
    # a whole edited class without held-out images still blocks: the edit was never judged where it acts
    rows = np.flatnonzero(labels != 1)
    v = judge_edit(labels, before, labels.copy(), rows, [0, 1], CLASSES, groups, GROUPS, "test")
    assert v.status == NOT_VERIFIED and "no held-out images of waterbird." in v.summary()


def test_an_interval_that_includes_zero_is_not_verified():
    labels, groups, before = world()
    after = before.copy()
    after[40:43] = 0                     # fixes 3 of 20
    v = judge(labels, groups, before, after)
    assert v.status == NOT_VERIFIED and v.worst.change.value > 0 and v.gain_bound <= 0
    assert any("not clearly above zero" in r for r in v.reasons) and "possibly as little as" in v.sentence()


def test_without_groups_the_edited_classes_are_the_strata():
    labels, _, before = world()
    after = labels.copy()
    v = judge_edit(labels, before, after, np.arange(len(labels)), [0, 1], CLASSES, None, (), "test")
    assert v.strata == "class" and [u.name for u in v.groups] == ["landbird", "waterbird"]
    assert v.tests == 5                  # 4 classes + the other classes together, each once
    assert len(verdict_rows(v.to_dict())) == 5


def test_config_is_checked():
    with pytest.raises(RefineClipError):
        GuardConfig(min_per_group=0)
    with pytest.raises(RefineClipError):
        GuardConfig(max_drop=0)
    with pytest.raises(RefineClipError):
        GuardConfig(max_drop=1.5)


# -- the formulas -------------------------------------------------------------------------------------
def test_holm_against_its_definition():
    """Adjusted p-values reject exactly what the step-down procedure rejects (brute force over levels)."""
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted 0.005 <= .05/4, 0.01 <= .05/3, 0.03 > .05/2: stop
    assert (holm(p) <= 0.05).tolist() == [True, False, False, True]
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    rng = np.random.default_rng(0)
    for _ in range(200):
        q = rng.uniform(0, 0.1, size=rng.integers(1, 8))
        for alpha in (0.01, 0.05):
            order, step = np.argsort(q), np.zeros(len(q), bool)
            for i, j in enumerate(order):
                if q[j] > alpha / (len(q) - i):
                    break
                step[j] = True
            assert ((holm(q) <= alpha) == step).all()
    assert holm([]).size == 0


def test_mcnemar_p_is_the_exact_binomial_test():
    for fixed, broken in [(0, 0), (3, 0), (10, 2), (5, 5), (1, 12)]:
        m = fixed + broken
        # brute force: probability of a split at least as lopsided as the observed one under p = 1/2
        obs = abs(fixed - broken)
        brute = sum(binom.pmf(k, m, 0.5) for k in range(m + 1) if abs(2 * k - m) >= obs) if m else 1.0
        assert mcnemar_p(fixed, broken) == pytest.approx(min(1.0, brute))


def test_wilson_and_newcombe_match_the_published_example():
    # Newcombe (1998, Stat. Med. 17:873) example (a): 56/70 vs 48/80 -> 0.0524 to 0.3339 (method 10)
    low, high = difference_interval(56, 70, 48, 80)
    assert (low, high) == pytest.approx((0.0524, 0.3339), abs=5e-4)
    # paired, no image changed: the interval is not zero-width (Newcombe's corrected phi)
    low, high = paired_change_interval(20, 0, 0, 20)
    assert low < -0.02 and high > 0.02
    # AD − BC = 9 − 4 = 5 is not above n/2 = 5: no correlation, so the independent-samples interval
    assert paired_change_interval(3, 2, 2, 3) == pytest.approx(difference_interval(5, 10, 5, 10, 0.0))
    # a negative association widens it (AD − BC = −25: phi = −1)
    assert np.ptp(paired_change_interval(0, 5, 5, 0)) > np.ptp(difference_interval(5, 10, 5, 10, 0.0))
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0


@pytest.mark.parametrize("p_both,p_fixed,p_broken,n", [(0.6, 0.15, 0.05, 30), (0.85, 0.1, 0.0, 25),
                                                          (0.4, 0.05, 0.25, 40), (0.9, 0.02, 0.03, 60)])
def test_the_paired_interval_covers_the_true_change(p_both, p_fixed, p_broken, n):
    """Coverage by simulation: 3,000 samples of n paired images; the true change is p_fixed − p_broken."""
    rng = np.random.default_rng(0)
    probs = [p_both, p_fixed, p_broken, 1 - p_both - p_fixed - p_broken]
    truth = p_fixed - p_broken
    counts = rng.multinomial(n, probs, size=3000)
    cover = np.mean([lo <= truth <= hi for lo, hi in (paired_change_interval(*c) for c in counts)])
    assert cover >= 0.93, cover


def test_paired_counts_and_interval_agree_with_brute_force_enumeration():
    """Every 2x2 table of 6 images: the interval holds the observed change and stays in [-1, 1]."""
    for cells in product(range(7), repeat=4):
        if sum(cells) != 6:
            continue
        low, high = paired_change_interval(*cells)
        change = (cells[1] - cells[2]) / 6
        assert -1 <= low <= change + 1e-12 and change - 1e-12 <= high <= 1
    before = np.array([1, 1, 0, 0, 1], bool)
    after = np.array([1, 0, 1, 0, 1], bool)
    assert paired_counts(before, after) == (2, 1, 1, 1)


def test_the_verdicts_bounds_hold_together_at_95_percent():
    """Coverage by simulation of the whole family at once: every unit's drop bound and the worst-before
    group's gain bound, with two groups tied before (the worst is chosen from the data) and one unit the edit
    leaves unchanged (where the exact half of the drop bound acts)."""
    rng = np.random.default_rng(1)
    cells = np.array([[0.55, 0.20, 0.05, 0.20],     # (both right, fixed, broken, both wrong): group 0 +15
                      [0.55, 0.10, 0.05, 0.30],     # group 1: +5, tied worst before with group 0
                      [0.80, 0.05, 0.10, 0.05],     # group 2: −5
                      [0.97, 0.00, 0.00, 0.03]])    # group 3: unchanged
    truth = cells[:, 1] - cells[:, 2]
    n, trials, hits = 40, 600, 0
    each = statement_significance(len(cells))
    for _ in range(trials):
        counts = [rng.multinomial(n, c) for c in cells]
        drops = [drop_bound(*c, each) for c in counts]
        before = [(c[0] + c[2]) / n for c in counts]
        w = int(np.argmin(before))
        ok = all(-t <= d for t, d in zip(truth, drops)) and gain_bound(*counts[w], each) <= truth[w]
        hits += ok
    assert hits / trials >= 0.95, hits / trials


def test_the_exact_half_of_the_drop_bound_against_its_closed_form():
    """No image broken among n: the Clopper–Pearson bound is 1 − (α/2)^(1/n); Newcombe's interval is wider
    there (φ undefined at 100% accuracy), so the drop bound is the exact one."""
    for n in (40, 150):
        assert exact_broken_bound(0, n, 0.01) == pytest.approx(1 - 0.01 ** (1 / n))
        assert drop_bound(n, 0, 0, 0, 0.02) == pytest.approx(1 - 0.01 ** (1 / n))
    assert drop_bound(10, 0, 0, 0, 0.02) <= exact_broken_bound(0, 10, 0.01)     # the smaller of the two
    assert exact_broken_bound(5, 5, 0.01) == 1.0
    # brute force: the bound is the p at which seeing <= k broken has probability alpha
    k, n, a = 3, 50, 0.01
    p = exact_broken_bound(k, n, a)
    assert binom.cdf(k, n, p) == pytest.approx(a, rel=1e-6)


def test_images_to_bound_is_the_fewest_that_bound_the_drop():
    each = statement_significance(9)
    n = images_to_bound((40, 0, 0, 0), 0.05, each)
    assert drop_bound(n, 0, 0, 0, each) <= 0.05 < drop_bound(n - 1, 0, 0, 0, each)
    # a unit whose measured drop is already 7.5 points: no number of images would bound it within 5
    assert images_to_bound((30, 0, 3, 7), 0.05, each) is None
    m = images_to_bound((60, 2, 1, 17), 0.05, each)
    f, b, w = round(m * 2 / 80), round(m / 80), round(m * 17 / 80)
    assert drop_bound(m - f - b - w, f, b, w, each) <= 0.05


def test_one_interval_per_number_and_the_worst_group_after_is_its_own_row():
    """The worst group before, its own change and the interval of its row; the worst group after likewise:
    the sentence, the details and the table say the same number with the same interval."""
    labels, groups, before = world(n=40)
    after = labels.copy()
    after[:4] = 1                        # landbird on land: 4 of 40 broken; landbird on water: 20 fixed
    v = judge(labels, groups, before, after)
    rows = {r["name"]: r for r in v.rows()}
    w = v.worst
    assert w.before.name == "landbird on water" and w.after.name == "landbird on land"
    for u in (w.before, w.after):
        row = rows[u.name]
        text = f"{row['change (pts)']} pts {row['95% interval']}"
        assert text == u.change_text() and text in v.summary()
    d = v.to_dict()
    assert d["worst"]["change"] == d["groups"][1]["change"] and d["worst"]["after_name"] == "landbird on land"
    # the bounds are labelled as such and never printed as a change's interval
    assert "not the 95% intervals above" in v.summary()


def test_unchanged_groups_are_said_in_words_and_a_wider_margin_verifies():
    labels, groups, before = world(n=40)
    v = judge(labels, groups, before, labels.copy())
    assert "unchanged on all 40 held-out images" in v.sentence()
    assert "Unchanged (no held-out image went from right to wrong or back): landbird on land" in v.summary()
    assert "where the edit left landbird on land (all 40)" in v.reasons[0]   # words first, then the bound
    assert {r["fixed / broken"] for r in v.rows() if r["name"] == "dog"} == {"0 / 0 (unchanged on all 40)"}
    wide = judge(labels, groups, before, labels.copy(), config=GuardConfig(max_drop=0.2))
    assert wide.status == VERIFIED and "acceptable: 20" in wide.sentence() and wide.drop_bound <= 0.2


def test_shown_changes_are_the_difference_of_the_shown_accuracies_and_csv_keeps_them_numeric():
    assert shown_points(0.8396, 0.8724) == pytest.approx(3.2)       # 84.0% → 87.2%, not +3.3
    assert f"{shown_points(0.5, 0.5):+.1f}" == "+0.0"
    labels, groups, before = world(n=40)
    after = labels.copy()
    after[:4] = 1
    v = judge(labels, groups, before, after)
    assert {r["change (pts)"] for r in v.rows() if r["name"] == "landbird on land"} == {"-10.0"}   # shown signed
    rows = verdict_rows(v.to_dict(), numeric=True)      # what the dashboard's table (and its CSV) holds
    assert safe_cell("+cmd") == "'+cmd"                 # text is still neutralised
    text = csv_text(rows, list(rows[0]))
    assert "'" not in text                                           # no cell neutralised: none is a formula
    assert ',-10.0,"[' in text and ",+" not in text                   # the change is a plain number


# -- held-out images by design (the protocol's split) ----------------------------------------------------
from types import SimpleNamespace

from refineclip_core.method.errorsets import sample_per_class
from refineclip_core.method.protocol import ProtocolConfig, evaluation_and_fit_rows, stratified_holdout


def fake_cache(labels, groups=None, names=None, splits=None):
    """What the split reads of a feature cache: labels, groups (with names) and splits."""
    labels = np.asarray(labels)
    names = list(names or [])
    g = np.asarray(groups) if groups is not None else np.full(len(labels), -1)
    s = np.asarray(splits if splits is not None else [""] * len(labels), dtype=object)
    return SimpleNamespace(labels=labels, groups=g, group_names=names, splits=s,
                           classes=[f"c{i}" for i in range(labels.max() + 1)])


def test_a_small_folder_keeps_held_out_images_of_every_class():
    """The issue's real-photo folder: 4 classes x 10 images, no groups, no splits. Before, 10 labelled
    samples per edited class used up every bird image; now half of every class is held out first."""
    cache = fake_cache(np.repeat(np.arange(4), 10))
    ev, fit = evaluation_and_fit_rows(cache, ProtocolConfig())
    assert not np.intersect1d(ev, fit).size
    for c in range(4):
        assert (cache.labels[ev] == c).sum() == 5 and (cache.labels[fit] == c).sum() == 5
    samples = sample_per_class(cache.labels, 10, 0, fit, [2, 3])
    assert not np.intersect1d(samples, ev).size and len(samples) == 10   # only 5 per class were left to draw


def test_unbalanced_groups_each_keep_a_held_out_image_and_a_sample():
    sizes = {0: 30, 1: 3, 2: 2, 3: 1}                       # group -> images; groups 0, 1 class 0; 2, 3 class 1
    groups = np.concatenate([np.full(n, g) for g, n in sizes.items()])
    labels = np.where(groups < 2, 0, 1)
    cache = fake_cache(labels, groups, ["a0", "a1", "b0", "b1"])
    for seed in range(5):
        ev, fit = evaluation_and_fit_rows(cache, ProtocolConfig(seed=seed))
        held = {g: int((groups[ev] == g).sum()) for g in sizes}
        assert held == {0: 15, 1: 2, 2: 1, 3: 1}            # round(share * m), at least 1, at most m - 1
        left = {g: int((groups[fit] == g).sum()) for g in sizes}
        assert left == {0: 15, 1: 1, 2: 1, 3: 0}
    # the draw depends on the seed, the counts do not
    assert not np.array_equal(stratified_holdout(groups, np.arange(len(groups)), 0.5, 0),
                              stratified_holdout(groups, np.arange(len(groups)), 0.5, 1))


def test_a_test_split_is_the_held_out_set_and_samples_come_from_the_rest():
    labels = np.repeat([0, 1], 20)
    splits = np.array((["train"] * 12 + ["test"] * 8) * 2, dtype=object)
    cache = fake_cache(labels, splits=splits)
    ev, fit = evaluation_and_fit_rows(cache, ProtocolConfig())
    assert set(splits[ev]) == {"test"} and set(splits[fit]) == {"train"} and len(ev) == 16


# -- sanity warnings ----------------------------------------------------------------------------------------
from refineclip_core.edit.sanity import MIN_SET, sanity_warnings
from refineclip_core.method.evaluation import rows_mask


def fake_ident(cache, eval_rows, predictions, sets, targets=(0, 1), min_heldout=10):
    eval_rows = np.asarray(eval_rows)
    return SimpleNamespace(eval_rows=eval_rows, eval_mask=rows_mask(len(cache.labels), eval_rows),
                           base_predictions=np.asarray(predictions), sets=sets, target_classes=list(targets),
                           config=ProtocolConfig(min_heldout=min_heldout))


def sets_of(w: int, c: int):
    return SimpleNamespace(W=np.arange(w), C=np.arange(c))


def test_each_sanity_warning_fires_on_its_case_and_only_then():
    labels = np.repeat(np.arange(4), 40)
    groups = np.repeat(np.arange(8), 20)                  # two groups per class
    cache = fake_cache(labels, groups, [f"g{i}" for i in range(8)])
    rows = np.flatnonzero(np.arange(len(labels)) % 2 == 0)   # 10 held out per group
    good = labels.copy()
    fine = sanity_warnings(cache, fake_ident(cache, rows, good, {"c0→c1": sets_of(6, 9)}), demo_data=True)
    assert fine == []
    # at chance: 25% right of 4 classes
    chance = labels.copy()
    chance[rows] = (labels[rows] + (np.arange(len(rows)) % 4 != 0)) % 4
    w = sanity_warnings(cache, fake_ident(cache, rows, chance, {"c0→c1": sets_of(6, 9)}), demo_data=True)
    assert [x.kind for x in w] == ["chance"] and "25.0% on 80 held-out images" in w[0].text
    assert w[0].numbers["chance"] == pytest.approx(0.25)
    # W = 2 misclassified samples
    w = sanity_warnings(cache, fake_ident(cache, rows, good, {"c0→c1": sets_of(2, 9)}), demo_data=True)
    assert [x.kind for x in w] == ["few-errors"] and "W = 2" in w[0].text and w[0].numbers["W"] == 2 < MIN_SET
    # a group of the edited classes with 3 held-out images (rows 20, 22, 24 of its 20..39)
    short = np.setdiff1d(rows, np.flatnonzero(groups == 1)[6:])
    w = sanity_warnings(cache, fake_ident(cache, short, good, {"c0→c1": sets_of(6, 9)}), demo_data=True)
    assert [x.kind for x in w] == ["few-heldout"] and "g1: 3 of 20 images" in w[0].text
    assert w[0].numbers["groups"] == [{"name": "g1", "class_name": "c0", "n_heldout": 3, "n_images": 20}]
    # data other than the demo world
    w = sanity_warnings(cache, fake_ident(cache, rows, good, {"c0→c1": sets_of(6, 9)}), demo_data=False)
    assert [x.kind for x in w] == ["untested-data"] and "demo world" in w[0].text


def test_the_guard_benchmarks_constructed_good_edit_breaks_nothing_and_lifts_the_worst_group():
    """benchmarks/guard.py's ``fix`` edits measure the guard's power: they must be good by construction."""
    from types import SimpleNamespace

    from benchmarks.guard import fix_predictions

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 400)
    groups = np.where(labels == 2, -1, labels * 2 + (np.arange(len(labels)) % 2))   # two groups per edited class
    base = labels.copy()
    wrong = rng.random(len(labels)) < np.where(groups == 1, 0.6, 0.1)              # group 1 is the worst
    base[wrong] = (labels[wrong] + 1) % 3
    cache = SimpleNamespace(labels=labels, groups=groups)
    ident = SimpleNamespace(base_predictions=base, target_classes=[0, 1])
    pool = np.arange(len(labels))
    after = fix_predictions(cache, ident, pool, 0.25, [1])
    assert np.all(after[base == labels] == labels[base == labels])                   # nothing correct is broken
    assert np.array_equal(after[labels == 2], base[labels == 2])                      # other classes untouched
    acc = lambda p, g: float((p[groups == g] == labels[groups == g]).mean())          # noqa: E731
    assert 0.18 <= acc(after, 1) - acc(base, 1) <= 0.32

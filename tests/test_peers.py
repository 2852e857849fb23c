"""The compared peers as they really are (issue 35): LTC and TextSpan as released, each checked on a fixed tiny
input against an independent implementation written here from the papers' and repositories' descriptions
(plain loops, no code shared with the library), edge cases included; and the one registry of compared methods
(what each row needs, the labels it used, the rows left out with their sentence)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from sklearn.metrics.pairwise import cosine_similarity

from refineclip_core.demo.world import write_world
from refineclip_core.edit.compare import fit_compared, fit_edit
from refineclip_core.edit.config import DEFAULT_EDIT, EditConfig, FitConfig
from refineclip_core.edit.methods import BY_KEY, METHODS, LabelsUsed
from refineclip_core.errors import RefineClipError
from refineclip_core.features.decomposition import HeadId
from refineclip_core.features.extraction import ExtractionConfig, extract
from refineclip_core.inspection.textspan import describe_head
from refineclip_core.inspection.textspan_released import released_text_span
from refineclip_core.loading.data import load_dataset
from refineclip_core.loading.models import ModelSpec, load_model
from refineclip_core.method.ablation import AblationEngine
from refineclip_core.method.ltc import LocateThenCorrect, PeersConfig, accept, minority_groups, parse_accept_pairs
from refineclip_core.method.protocol import ProtocolConfig, identify, make_engine


# -- TextSpan as released -------------------------------------------------------------------------

def textspan_by_the_description(X: np.ndarray, T: np.ndarray, k: int, rank: int) -> list[int]:
    """The released loop as its description reads: the texts projected onto the span of the head's top
    ``rank`` right singular vectors (found here from the eigenvectors of XᵀX, keeping the non-zero ones), the
    outputs centred, then k times: the text whose projections have the largest standard deviation over the
    images, removed (its direction) from the outputs and from every text."""
    w, v = np.linalg.eigh(X.T @ X)
    order = np.argsort(-w)
    w, v = w[order], v[:, order]
    basis = v[:, :rank][:, w[:rank] > w[0] * 1e-10]
    texts = [basis @ (basis.T @ t) for t in T]
    data = X - X.mean(0)
    picked = []
    for _ in range(k):
        stds = [np.std(data @ t, ddof=1) if t @ t > 1e-20 else -1.0 for t in texts]
        j = int(np.argmax(stds))
        if stds[j] <= 1e-9:
            break
        picked.append(j)
        t = texts[j].copy()
        data = data - np.outer(data @ t / (t @ t), t)
        texts = [s - (s @ t) / (t @ t) * t for s in texts]
    return picked


def tiny_pool(rng, m: int, d: int) -> np.ndarray:
    T = rng.normal(size=(m, d)) + 0.5 * rng.normal(size=d)      # a shared component, as real prompts have
    return T / np.linalg.norm(T, axis=1, keepdims=True)


def test_released_textspan_picks_what_the_description_picks():
    rng = np.random.default_rng(7)
    X = rng.normal(size=(60, 24)) * np.linspace(3, 0.2, 24) + rng.normal(size=24)
    T = tiny_pool(rng, 40, 24)
    for rank in (24, 8):
        idx, explained, total = released_text_span(X, T, k=6, rank=rank)
        assert idx == textspan_by_the_description(X, T, 6, rank)
        # each pick's share: the variance along its (orthogonalised) unit direction; together at most all of it
        C = X - X.mean(0)
        assert total == pytest.approx(float((C ** 2).sum()) / len(X))
        assert 0 < sum(explained) <= total * (1 + 1e-9)
    # it is not our centred variant: on this pool the two disagree somewhere in the top 6
    ours = describe_head(X, [str(i) for i in range(40)], T, k=6, method="centred").indices
    assert ours != released_text_span(X, T, k=6, rank=8)[0]


def test_released_textspan_on_a_head_whose_rank_is_below_the_span_size():
    """Rank-3 outputs (plus a mean: rank 4) against a span size of 8: the released code's extra 4 directions would
    be arbitrary null-space vectors; the port keeps the determined ones and stops when the variance is spanned."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(40, 3)) @ rng.normal(size=(3, 16)) + rng.normal(size=16)
    T = tiny_pool(rng, 30, 16)
    idx, explained, total = released_text_span(X, T, k=8, rank=8)
    assert idx == textspan_by_the_description(X, T, 8, 8)
    # the texts live in the 4-dimensional span of the raw outputs (rank 3 plus the mean): at most 4 picks, which
    # then span the centred outputs' variance whole
    assert len(idx) == 4 and sum(explained) == pytest.approx(total, rel=1e-6)
    desc = describe_head(X, [f"t{i}" for i in range(30)], T, k=8, method="released")
    assert desc.method == "released" and desc.cumulative[-1] == pytest.approx(1.0, rel=1e-6)
    assert released_text_span(np.ones((5, 16)), T, k=3) == ([], [], 0.0)       # a constant head: nothing varies


# -- LTC as released ------------------------------------------------------------------------------

def ltc_locate_by_the_description(heads: np.ndarray, text: np.ndarray, labels: np.ndarray, rows: list[int]):
    """LTC's locate step read from the paper and repository: per sample the single head with the largest share
    of the gap between the predicted class and the other one (runner-up when right, true class when wrong);
    per head how often it tops the correct and the wrong samples (as fractions of each); heads whose wrong
    minus correct fraction exceeds 1/(heads counted at all) are spurious, the reverse salient."""
    K = heads.shape[1]
    tops = {True: [], False: []}
    for r in rows:
        logits = heads[r].sum(0) @ text.T
        pred = int(np.argmax(logits))
        ok = pred == labels[r]
        other = int(np.argsort(-logits)[1]) if ok else int(labels[r])
        gaps = [heads[r, h] @ (text[pred] - text[other]) for h in range(K)]
        tops[ok].append(int(np.argmax(gaps)))
    frac = {ok: np.array([tops[ok].count(h) / len(tops[ok]) if tops[ok] else 0.0 for h in range(K)])
            for ok in (True, False)}
    counted = sum(1 for h in range(K) if frac[True][h] > 0 or frac[False][h] > 0)
    spurious = [h for h in range(K) if frac[False][h] - frac[True][h] > 1 / counted]
    salient = [h for h in range(K) if frac[True][h] - frac[False][h] > 1 / counted]
    return (sorted(spurious, key=lambda h: -(frac[False][h] - frac[True][h])),
            sorted(salient, key=lambda h: -(frac[True][h] - frac[False][h])))


@pytest.fixture(scope="module")
def toy():
    """12 heads (2 layers × 6) writing into d = 8 for 40 images of 3 classes: a planted head (L1.H2) pushes
    class 0's images toward class 1, another (L0.H4) toward their true class."""
    rng = np.random.default_rng(11)
    N, L, H, d, C = 40, 2, 6, 8, 3
    text = rng.normal(size=(C, d))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    labels = np.arange(N) % C
    heads = 0.3 * rng.normal(size=(N, L, H, d))
    heads[:, 0, 4] += 0.8 * text[labels]
    heads[labels == 0, 1, 2] += 1.2 * text[1] * rng.uniform(0.2, 1.5, size=(int((labels == 0).sum()), 1))
    E = heads.sum((1, 2)) + 0.05 * rng.normal(size=(N, d))            # plus a remainder, as a real cache has
    engine = AblationEngine(E.astype(np.float32), heads.astype(np.float32), text.astype(np.float32), [0, 1])
    return {"E": E, "heads": heads, "text": text, "labels": labels, "engine": engine}


def test_ltc_locates_the_heads_the_description_locates(toy):
    e, flat = toy["engine"], toy["heads"].reshape(len(toy["E"]), -1, toy["E"].shape[1])
    rows = list(range(0, 40, 2))
    pairs = np.stack([np.stack([toy["text"][0], toy["text"][1]])])
    fitted = LocateThenCorrect.fit(e, np.array(rows), toy["labels"], pairs)
    # the engine's head-text products are of the heads themselves; the description's sums the heads (no
    # remainder), which moves no argmax on this input: check that, then compare
    assert (np.argmax(toy["E"][rows] @ toy["text"].T, 1) == np.argmax(flat[rows].sum(1) @ toy["text"].T, 1)).all()
    spurious, salient = ltc_locate_by_the_description(flat, toy["text"], toy["labels"], rows)
    ids = e.head_ids()
    assert fitted.spurious == [ids[h] for h in spurious] and fitted.salient == [ids[h] for h in salient]
    assert HeadId(1, 2) in fitted.spurious and fitted.threshold == pytest.approx(
        1 / sum(1 for h in map(str, ids) if fitted.counts_right[h] > 0 or fitted.counts_wrong[h] > 0))


def test_ltc_corrects_as_the_description_corrects(toy):
    """Mean ablation of the spurious heads and RoboShot's accept step on the salient ones, in the units where
    each image's contributions sum to its unit embedding, against a loop that uses scikit-learn's cosine."""
    e = toy["engine"]
    rng = np.random.default_rng(5)
    pairs = rng.normal(size=(2, 2, 8))
    fitted = LocateThenCorrect.fit(e, np.arange(40), toy["labels"], pairs, mean_rows=np.arange(20, 40))
    fitted.spurious, fitted.salient = [HeadId(1, 2)], [HeadId(0, 4), HeadId(1, 0)]   # fix the sets for the check
    norms = np.linalg.norm(toy["E"], axis=1)
    fitted.mean = (toy["heads"][20:, 1, 2] / norms[20:, None]).mean(0)[None]
    q, _ = np.linalg.qr((pairs[:, 0] - pairs[:, 1]).T)
    want = []
    for i in range(40):
        x = toy["E"][i] / norms[i] - toy["heads"][i, 1, 2] / norms[i] + fitted.mean[0]
        for layer, head in ((0, 4), (1, 0)):
            c = toy["heads"][i, layer, head] / norms[i]
            z = c[None].copy()
            for u in q.T:
                z = z + cosine_similarity(z, u[None])[0, 0] * u[None]
                z = z / np.linalg.norm(z)
            x = x - c + z[0]
        want.append(x)
    np.testing.assert_allclose(fitted.embeddings(), np.array(want), rtol=1e-5, atol=1e-6)
    assert np.array_equal(fitted.predict(), np.argmax(np.array(want) @ toy["text"].T, 1))
    out = accept(rng.normal(size=(4, 8)), q.T)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0)          # every salient head at unit norm


def test_ltc_edge_cases_empty_minority_group_and_no_wrong_samples(toy):
    groups = np.array([0] * 20 + [1] * 20)
    labels = np.array([0] * 10 + [1] * 10 + [0] * 10 + [1] * 10)
    correct = np.ones(40, dtype=bool)
    correct[[0, 1, 2, 35]] = False              # class 0 does worse in group a, class 1 in group b: the minorities
    assert minority_groups(groups, labels, correct, ["a", "b"]) == ["a", "b"]
    assert minority_groups(groups, labels, np.ones(40, bool), ["a", "b"]) == []        # no group is worse
    assert minority_groups(groups, labels, correct, ["a", "b", "c"], named=("c",)) == ["c"]   # named, even if empty
    with pytest.raises(RefineClipError, match="not a group"):
        minority_groups(groups, labels, correct, ["a", "b"], named=("z",))
    pairs = np.stack([np.stack([toy["text"][0], toy["text"][2]])])
    with pytest.raises(RefineClipError, match="minority groups' images; there are none"):
        LocateThenCorrect.fit(toy["engine"], np.zeros(0, dtype=np.int64), toy["labels"], pairs)
    right = [r for r in range(40) if toy["engine"].base_predictions[r] == toy["labels"][r]]
    only_right = LocateThenCorrect.fit(toy["engine"], np.array(right), toy["labels"], pairs)
    assert only_right.n_wrong == 0 and not only_right.spurious          # nothing wrong: no spurious head, no NaN
    assert all(np.isfinite(v) for v in only_right.counts_wrong.values())


# -- the registry and the rows as a run makes them -------------------------------------------------

def test_typed_attribute_pairs_are_parsed_one_per_line_and_bad_lines_refused():
    """The Refine page's attribute pair box: one pair a line, 'A | B', sides stripped, blank lines skipped;
    text is data ('{}' and '%s' stay as typed); a line without exactly one '|', an empty side or a text over
    the prompt limit is refused in one sentence naming the line."""
    from refineclip_core.loading.data import MAX_CLASS_NAME_CHARS

    text = "  a bird with webbed feet |a bird with thin toes \n\n a {0} bill | a %s bill\n"
    assert parse_accept_pairs(text) == (("a bird with webbed feet", "a bird with thin toes"), ("a {0} bill", "a %s bill"))
    assert parse_accept_pairs("") == () and parse_accept_pairs(" \n ") == ()
    for bad, line in (("a | b\nno bar here", 2), ("a | b | c", 1), (" | a bird", 1), ("a bird |  ", 1)):
        with pytest.raises(RefineClipError, match=f"line {line} ") as err:
            parse_accept_pairs(bad)
        assert "\n" not in str(err.value) and ". " not in str(err.value).replace("e.g. ", "")   # one sentence
    long = "x" * (MAX_CLASS_NAME_CHARS + 1)
    with pytest.raises(RefineClipError, match="limited to"):
        PeersConfig(accept=parse_accept_pairs(f"{long} | a bird"))
    with pytest.raises(RefineClipError, match="limited to"):
        PeersConfig(cue=(long,), cue_versus=("a land background",))


def test_the_registry_is_the_one_list_of_methods():
    keys = [m.key for m in METHODS]
    assert len(set(keys)) == len(keys) and len({m.label for m in METHODS}) == len(METHODS)
    assert all(m.colour.startswith("#") and m.what and m.fit is not None for m in METHODS)
    assert BY_KEY["ltc"].needs.group_labels and BY_KEY["ltc"].label == "LTC (as released)"
    assert not BY_KEY["cue-projection"].needs.group_labels and "LTC" not in BY_KEY["cue-projection"].label
    assert LabelsUsed().sentence() == "none (class names only)"
    assert LabelsUsed(20, 8, ("a on b",), ("x",), 300).sentence() == \
        "20 class labels · 8 group labels (a on b) · typed: “x” · 300 unlabelled images"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("peers")
    loaded = load_model(ModelSpec("demo"))
    cache = extract(loaded, load_dataset(write_world(root / "data", "all", seed=3535, n_per_group=15)),
                    root / "cache", ExtractionConfig(layers=4, batch_size=64))
    engine = make_engine(cache)
    return {"cache": cache, "engine": engine, "loaded": loaded, "ident": identify(cache, ProtocolConfig(seed=1), engine)}


TYPED = PeersConfig(cue=("a water background",), cue_versus=("a land background",),
                    accept=(("a bird with webbed feet", "a bird with thin toes"),
                            ("a bird with a broad flat bill", "a bird with a pointed bill")))


def test_fit_compared_fits_one_row_at_a_time_and_records_the_labels_used(world):
    cache, ident = world["cache"], world["ident"]
    cfg = replace(EditConfig(fit=FitConfig(steps=3)), peers=TYPED)
    out = fit_edit(cache, ident, cfg, engine=world["engine"], baselines=False)
    assert list(out.report.predictions) == ["zero-shot", "ablated", "refineclip-fit"]
    seen = []
    fit_compared(cache, ident, out, keys=["tip-adapter", "ltc", "cue-projection"], engine=world["engine"],
                 loaded=world["loaded"], on_row=lambda k, o: seen.append((k, k in o.report.predictions)))
    assert [k for k, _ in seen] == ["tip-adapter", "cue-projection", "ltc"]          # registry order
    used = out.report.to_dict()["labels_used"]
    n = len(ident.sample_rows)
    assert used["tip-adapter"]["class_labels"] == n and used["tip-adapter"]["group_labels"] == 0
    assert used["cue-projection"]["text"] == ["a water background", "a land background"]
    if "ltc" in out.report.predictions:                  # it ran: it read the labelled images' groups
        assert used["ltc"]["group_labels"] == n and used["ltc"]["groups"]
        assert set(used["ltc"]["groups"]) <= set(cache.group_names) and len(used["ltc"]["text"]) == 4
    else:
        assert "minority" in out.left_out["ltc"]
    assert out.report.to_dict()["about"]["ltc" if "ltc" in out.report.predictions else "tip-adapter"]["colour"]


def test_a_method_without_the_labels_it_needs_is_left_out_with_the_sentence(world, monkeypatch):
    cache, ident = world["cache"], world["ident"]
    monkeypatch.setattr(type(cache), "groups", property(lambda self: np.full(len(self.records), -1)))
    cfg = replace(EditConfig(fit=FitConfig(steps=3)), peers=TYPED)
    out = fit_edit(cache, ident, cfg, engine=world["engine"], baselines=False)
    fit_compared(cache, ident, out, keys=["ltc"], engine=world["engine"], loaded=world["loaded"])
    assert "ltc" not in out.report.predictions
    assert out.left_out["ltc"].startswith("LTC (as released) is left out") and "no group labels" in out.left_out["ltc"]
    out2 = fit_edit(cache, ident, DEFAULT_EDIT, engine=world["engine"], baselines=False)
    fit_compared(cache, ident, out2, keys=["ltc", "cue-projection"], loaded=None, engine=world["engine"])
    assert "none were typed" in out2.left_out["ltc"] and "none was typed" in out2.left_out["cue-projection"]
    with pytest.raises(RefineClipError, match="Unknown compared method"):
        fit_compared(cache, ident, out2, keys=["nope"])


def test_the_cli_and_the_html_report_show_the_labels_used(world):
    from refineclip_core.cli.common import cells_table
    from refineclip_core.edit.record import build_run_report
    from refineclip_core.reporting.findings import labels_used_column, method_summary
    from refineclip_core.reporting.run_report import render_html

    cache, ident = world["cache"], world["ident"]
    out = fit_edit(cache, ident, EditConfig(fit=FitConfig(steps=3)), engine=world["engine"], baselines=False)
    fit_compared(cache, ident, out, keys=["tip-adapter"], engine=world["engine"])
    used = labels_used_column(out.report)
    lines = cells_table(method_summary(out.report), {"worst group": "worst group"}, "method", text={"labels used": used})
    assert "labels used" in lines[0] and any(f"{len(ident.sample_rows)} class labels" in l for l in lines)
    assert any("none (class names only)" in l for l in lines if l.strip().startswith("zero-shot"))
    html = render_html(build_run_report(cache, ident, world["engine"], out))
    assert "<th>labels used</th>" in html and f"{len(ident.sample_rows)} class labels" in html

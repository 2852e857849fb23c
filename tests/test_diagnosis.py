"""The diagnosis in words (issue 17): concepts, the greedy span, head splits, the planted cue,
the known-attribute mode, LTC, the CLI and the report; checked against brute force and, on the
committed demo model, against the demo world's known backgrounds."""

from __future__ import annotations

import json
import re
from itertools import combinations

import numpy as np
import pytest

from refineclip_core.cli import main
from refineclip_core.errors import RefineClipError
from refineclip_core.features.decomposition import HeadId
from refineclip_core.features.zeroshot import encode_texts
from refineclip_core.inspection.diagnosis import (NAME_MIN, STOPWORDS, attribute_heads,
                                                  attribute_shares, concept_span, concept_vocabulary, diagnose,
                                                  diagnose_removed, diagnosis_rows, group_profile, head_evidence,
                                                  head_shares, phrase_direction, pool_units, project_rows, separation_auc,
                                                  summary_lines)
from refineclip_core.inspection.textspan import MIN_RESIDUAL
from refineclip_core.method.ltc import HeadSearchCueProjection
from refineclip_core.method.protocol import ProtocolConfig, identify, make_engine
from refineclip_core.reporting.run_report import render_html
from refineclip_core.edit.record import build_run_report

from .test_method import _a_pair_with_everything, cache, loaded  # noqa: F401  (the tiny model and its cache)

TINY_POOL = [f"{art} {colour} {thing}" for art in ("a", "a photo of a", "a drawing of a")
             for colour in ("red", "green", "blue") for thing in ("cat", "dog", "fish")] + \
            ["cats and dogs", "a big cat", "a big dog", "a big fish", "red and blue"]


# -- brute-force references ---------------------------------------------------------------------

def flat_heads(cache, rows) -> np.ndarray:
    """Head contributions ``(n, L_s·H, d)`` of ``rows`` read straight from the cache (not through the engine)."""
    c = np.asarray(cache.heads)[np.asarray(rows, dtype=np.int64)]
    return c.reshape(len(c), -1, c.shape[-1])


def brute_vocabulary(texts, emb, min_texts=3, merge=0.8):
    """Word concepts by the definition, with loops."""
    emb = np.asarray(emb, dtype=np.float64)
    mean = sum(emb) / len(emb)
    units = []
    for e in emb:
        c = e - mean
        units.append(c / np.sqrt(c @ c))
    words = {}
    for j, t in enumerate(texts):
        for w in re.findall(r"[a-z][a-z'-]*[a-z]", t.lower()):
            if w not in STOPWORDS:
                words.setdefault(w, set()).add(j)
    forms = {w: [w] for w in words}
    for w in sorted(list(words), key=len, reverse=True):
        if w.endswith("s"):
            for stem in (w[:-1], w[:-2]):
                if stem in words and stem != w:
                    words[stem] = words[stem] | words.pop(w)
                    forms[stem] = forms[stem] + forms.pop(w)
                    break
    order = sorted([w for w in words if len(words[w]) >= min_texts], key=lambda w: (-len(words[w]), w))
    groups, sets = [], []
    for w in order:
        for i in range(len(groups)):
            if len(words[w] & sets[i]) >= merge * len(words[w] | sets[i]):
                groups[i] += forms[w]
                sets[i] = sets[i] | words[w]
                break
        else:
            groups.append(list(forms[w]))
            sets.append(set(words[w]))
    directions = [sum(units[j] for j in sorted(s)) / len(s) for s in sets]
    return groups, [sorted(s) for s in sets], np.array(directions)


def brute_span(R, D, k, tau, target=None):
    """TextSpan over concept directions, by the definition: explicit Gram-Schmidt and residuals;
    with ``target`` g, a concept's score is its coherence² times (its residual direction · g)²."""
    X = np.array(R, dtype=np.float64)
    X = X - X.mean(0)
    total = float((X * X).sum())
    basis, used, picks = [], set(), []
    for _ in range(k):
        g = None if target is None else target - sum((target @ u) * u for u in basis) if basis else target
        Xr = X - sum(np.outer(X @ u, u) for u in basis) if basis else X.copy()
        best = None
        residual_dirs = {}
        for j in range(len(D)):
            if j in used or D[j] @ D[j] == 0:
                continue
            v = D[j] / np.sqrt(D[j] @ D[j])
            for u in basis:
                v = v - (v @ u) * u
            if np.sqrt(v @ v) <= MIN_RESIDUAL:
                continue
            residual_dirs[j] = v
            var = sum(float(x @ (v / np.sqrt(v @ v))) ** 2 for x in Xr)
            if g is not None:
                var = float(g @ (v / np.sqrt(v @ v))) ** 2
            score = float(D[j] @ D[j]) * var
            if best is None or score > best[0]:
                best = (score, j)
        if best is None:
            break
        p = best[1]
        u = residual_dirs[p] / np.sqrt(residual_dirs[p] @ residual_dirs[p])
        a = Xr @ u
        joined = []
        for j, v in residual_dirs.items():
            if j == p:
                continue
            prof = Xr @ v
            r = float(prof @ a) / np.sqrt(float(prof @ prof) * float(a @ a))
            if r >= tau and float(D[j] @ u) / np.sqrt(D[j] @ D[j]) >= NAME_MIN:    # same way, a near-duplicate
                var = sum(float(x @ (v / np.sqrt(v @ v))) ** 2 for x in Xr)
                if g is not None:
                    var = float(g @ (v / np.sqrt(v @ v))) ** 2
                joined.append((-float(D[j] @ D[j]) * var, j, 1))
        joined.sort()
        target_share = None if g is None else float(g @ u) ** 2 / float(target @ target)
        picks.append((p, float(a @ a) / total, [(p, 1)] + [(j, s) for _, j, s in joined], target_share))
        used |= {p} | {j for _, j, _ in joined}
        basis.append(u)
    return picks


# -- concepts, span, splits -----------------------------------------------------------------------

def test_concept_vocabulary_matches_brute_force():
    rng = np.random.default_rng(0)
    texts = TINY_POOL + ["small cats", "a small cat", "a small dog", "two fish", "red fish"]
    emb = rng.standard_normal((len(texts), 12))
    vocab = concept_vocabulary(texts, emb)
    groups, members, directions = brute_vocabulary(texts, emb)
    assert vocab.words == groups and [m.tolist() for m in vocab.members] == members
    np.testing.assert_allclose(vocab.directions, directions, rtol=1e-10, atol=1e-12)
    assert "cat" in vocab.words[vocab.index("cats")] and "small" in vocab.labels    # plural merged, 3 texts kept
    assert "photo" not in vocab.labels and "a" not in vocab.labels                   # stop words name nothing
    np.testing.assert_allclose(np.linalg.norm(pool_units(emb), axis=1), 1.0)
    with pytest.raises(RefineClipError, match="embed the same list"):
        concept_vocabulary(texts[:-1], emb)


def test_near_duplicate_words_merge_and_modifiers_stay():
    texts = ["clip art of a cat", "clip art of a dog", "clip art of a fish", "a flat bill", "a bird with a flat bill",
             "a big flat bill", "a pointed bill", "a long pointed bill", "a pointed bill on a bird"]
    vocab = concept_vocabulary(texts, np.random.default_rng(1).standard_normal((len(texts), 8)))
    assert ["clip", "art"] in vocab.words or ["art", "clip"] in vocab.words             # always together: one concept
    assert {"flat", "pointed", "bill"} <= set(vocab.labels)                            # a modifier keeps its meaning


@pytest.mark.parametrize("seed,n,k_concepts,d,tau", [(0, 40, 12, 10, 0.9), (1, 25, 20, 8, 0.7), (2, 60, 6, 16, 0.95),
                                                      (3, 50, 30, 6, 0.5)])
@pytest.mark.parametrize("with_target", [False, True])
def test_concept_span_matches_brute_force(seed, n, k_concepts, d, tau, with_target):
    rng = np.random.default_rng(seed)
    R = rng.standard_normal((n, 3)) @ rng.standard_normal((3, d)) * 3 + 0.3 * rng.standard_normal((n, d))
    D = rng.standard_normal((k_concepts, d)) * rng.uniform(0.3, 1.0, (k_concepts, 1))
    push = (R - R.mean(0)) @ rng.standard_normal(d)
    g = (R - R.mean(0)).T @ (push - push.mean()) / n if with_target else None
    picks, total = concept_span(R, D, k=5, tau=tau, target=g)
    ref = brute_span(R, D, 5, tau, g)
    assert [p.concept for p in picks] == [r[0] for r in ref]
    np.testing.assert_allclose([p.share for p in picks], [r[1] for r in ref], rtol=1e-9)
    assert [p.members for p in picks] == [r[2] for r in ref]
    if with_target:
        np.testing.assert_allclose([p.target_share for p in picks], [r[3] for r in ref], rtol=1e-9)
        assert sum(p.target_share for p in picks) <= 1 + 1e-12
    assert sum(p.share for p in picks) <= 1 + 1e-12
    X = R - R.mean(0)
    assert total == pytest.approx(float((X * X).sum()) / n)
    B = np.stack([p.direction for p in picks])
    np.testing.assert_allclose(B @ B.T, np.eye(len(picks)), atol=1e-10)       # orthonormal picks


def test_head_shares_split_the_variance_exactly():
    rng = np.random.default_rng(3)
    c = rng.standard_normal((30, 4, 6))
    u = rng.standard_normal(6)
    u /= np.linalg.norm(u)
    shares = head_shares(c, u)
    total = c.sum(1) @ u
    total = total - total.mean()
    for h in range(4):
        x = c[:, h] @ u
        assert shares[h] == pytest.approx(sum((x - x.mean()) * total) / sum(total * total), rel=1e-10)
    assert shares.sum() == pytest.approx(1.0)
    assert not head_shares(np.ones((5, 2, 6)), u).any()


def test_separation_auc_and_group_profile_by_counting():
    rng = np.random.default_rng(4)
    v = np.round(rng.standard_normal(40), 1)                         # ties included
    pos = rng.random(40) < 0.4
    pairs = [(a, b) for a in v[pos] for b in v[~pos]]
    auc = (sum(a > b for a, b in pairs) + 0.5 * sum(a == b for a, b in pairs)) / len(pairs)
    assert separation_auc(v, pos) == pytest.approx(max(auc, 1 - auc))
    assert separation_auc(v, np.zeros(40, bool)) != separation_auc(v, np.zeros(40, bool))     # NaN
    prof = group_profile(np.array([1.0, 3.0, 5.0]), ["a", "b", "a"])
    assert prof == {"a": (3.0, 2.0, 2), "b": (3.0, 0.0, 1)}


# -- the planted cue --------------------------------------------------------------------------------

def _planted_world(cue: str, seed: int = 0):
    """A text pool whose words are orthogonal atoms, two classes, and removed parts in which ``cue``
    (background or colour) pushes toward the wrong class and separates the errors from the correct
    images, while the other attribute varies as much but does neither."""
    rng = np.random.default_rng(seed)
    atoms = ["water", "land", "white", "brown", "webbed", "pointed", "bird", "star", "small"]
    basis = dict(zip(atoms, np.linalg.qr(rng.standard_normal((24, 24)))[0][: len(atoms)]))
    texts = []
    for place in ("water", "land"):
        for colour in ("white", "brown"):
            texts += [f"a {colour} bird on {place}", f"a small {colour} star on {place}"]
        texts += [f"a {place} scene", f"a {place} background"]
    for colour in ("white", "brown"):
        texts += [f"a {colour} star", f"a {colour} object"]
    for part in ("webbed", "pointed"):
        texts += [f"a bird with {part} feet", f"{part} toes", f"a small bird, {part}"]
    emb = np.stack([sum(basis[w] for w in re.findall(r"[a-z]+", t) if w in basis) + 0.05 * rng.standard_normal(24)
                    for t in texts])
    vocab = concept_vocabulary(texts, emb)
    text = np.stack([basis["webbed"] + basis["bird"], basis["pointed"] + basis["bird"]])   # waterbird, landbird
    n = 80
    place, colour = rng.choice([-1, 1], n), rng.choice([-1, 1], n)
    planted = place if cue == "background" else colour
    error = planted > 0                                                         # errors: on land / brown
    # both attributes vary as much; only the planted one also writes toward the wrong class (landbird)
    removed = (place[:, None] * (basis["land"] - basis["water"]) + colour[:, None] * (basis["brown"] - basis["white"])
               + planted[:, None] * (basis["pointed"] - basis["webbed"])) * 2 + 0.1 * rng.standard_normal((n, 24))
    heads = rng.dirichlet(np.ones(3), n)[:, :, None] * removed[:, None, :]     # three heads share the removed part
    W, C = np.flatnonzero(error)[:10], np.flatnonzero(~error)[:10]
    return vocab, text, removed, heads, W, C


@pytest.mark.parametrize("cue,expected,other", [("background", "land", ("white", "brown")),
                                                ("color", "brown", ("land", "water"))])
def test_the_sentence_follows_the_planted_cue(cue, expected, other):
    vocab, text, removed, heads, W, C = _planted_world(cue)
    (pair,), _ = diagnose_removed(removed, heads, [HeadId(5, h) for h in range(3)], vocab, text,
                                  ["waterbird", "landbird"], [(0, 1, W, C)])
    named = {w for c in pair.named for w in c.words}
    assert expected in named and not named & set(other)               # the planted cue, not the other one
    lead = pair.concepts[pair.lead[0]]
    toward = next(c for c in pair.named if c.push > 0)                  # what pushes toward the wrong class
    assert expected in toward.words and toward.contrast > 0.5 and toward.text in pair.sentence
    assert pair.sentence.startswith("waterbird → landbird: the removed heads carry ")
    assert abs(lead.contrast) > 1 and lead.share > 0.2 and lead.push_share > 0.3
    assert pair.verdict == "shortcut"                  # no scope given: nothing to compare the set with
    assert "webbed" in pair.class_concept and "webbed" in pair.sentence
    # the other attribute varies as much but neither pushes nor separates the errors
    assert sum(c.push_share for c in pair.concepts) <= 1 + 1e-9
    others = [c for c in pair.concepts if set(c.words) & set(other)]
    assert all(c.push_share < 0.05 for c in others) and max(c.share for c in others) > 0.2


# -- on the tiny model: the removed part, the shares, the CLI, the report ----------------------------

@pytest.fixture(scope="module")
def tiny_vocab(loaded):  # noqa: F811
    return concept_vocabulary(TINY_POOL, encode_texts(loaded, TINY_POOL).numpy())


def test_diagnosis_on_a_tiny_model_against_brute_force(cache, tiny_vocab):  # noqa: F811
    engine = make_engine(cache)
    ident = identify(cache, ProtocolConfig(samples_per_class=3, seed=1, top_t=4, pair="both"), engine)
    heads = [HeadId(l, h) for l, h in [(2, 0), (1, 3), (0, 1)]]
    diag = diagnose(cache, ident, tiny_vocab, heads, engine)
    rows = diagnosis_rows(cache, ident, engine)
    assert np.array_equal(diag.rows, rows)
    assert not np.intersect1d(rows, ident.eval_rows).size
    # the removed part is what zero ablation removes (Eq. 5)
    removed = engine.E[rows].astype(np.float64) - engine.embeddings(heads, "zero", rows)
    layers = list(cache.manifest.layers)
    explicit = sum(np.asarray(cache.heads[rows, layers.index(h.layer), h.head], dtype=np.float64) for h in heads)
    np.testing.assert_allclose(removed, explicit, rtol=1e-5, atol=1e-6)
    # each concept's share is the removed variance along its Gram-Schmidt direction, computed here
    a, b = sorted(ident.pairs[0])
    delta = cache.text[a].astype(np.float64) - cache.text[b]
    delta /= np.sqrt(delta @ delta)                       # the classes' text difference is projected out first
    X0 = explicit - explicit.mean(0)
    push = X0 @ -delta                                    # ranked by the push toward the pair's other class
    target = X0.T @ (push - push.mean()) / len(X0)
    ref = brute_span(explicit, np.array([d - (d @ delta) * delta for d in tiny_vocab.directions]), 8, 0.9, target)
    assert [c.share for c in diag.concepts] == pytest.approx([r[1] for r in ref], rel=1e-4)
    X = explicit - explicit.mean(0)
    for c in diag.concepts:
        assert sum(c.head_shares.values()) == pytest.approx(1.0)
        a = X @ c.direction
        for h in heads:
            x = np.asarray(cache.heads[rows, layers.index(h.layer), h.head], dtype=np.float64) @ c.direction
            assert c.head_shares[str(h)] == pytest.approx(float((x - x.mean()) @ a) / float(a @ a), abs=1e-6)
        assert 0 <= c.n_scope * c.coverage / c.enrichment - len(heads) < 1e-6
        # the share of random sets holding as much: by brute force over every set of that size
        split = head_shares(flat_heads(cache, rows), c.direction)
        sums = [split[list(s)].sum() for s in combinations(range(len(split)), len(heads))]
        assert c.p_random == pytest.approx(np.mean(np.array(sums) >= c.coverage - 1e-12), abs=0.03)
    assert len(diag.pairs) == 2 and diag.sentence.count("→") == 2
    # the control: the set's part of the W − C gap of every head in scope, against all sets of its size
    pair = diag.pairs[0]
    scope = flat_heads(cache, rows).astype(np.float64)
    position = {int(r): i for i, r in enumerate(rows)}
    s = ident.sets[next(iter(ident.sets))]
    total_scope = scope.sum(1)
    if len(s.W) and len(s.C):
        gap = total_scope[[position[int(r)] for r in s.W]].mean(0) - total_scope[[position[int(r)] for r in s.C]].mean(0)
        split = head_shares(scope, gap / np.linalg.norm(gap))
        held = split[engine.flat_index(heads)].sum()
        assert pair.gap_coverage == pytest.approx(held)
        sums = [split[list(c)].sum() for c in combinations(range(len(split)), len(heads))]
        assert pair.gap_p_random == pytest.approx(np.mean(np.array(sums) >= held - 1e-12), abs=0.03)
    ev = head_evidence(cache, diag, engine, heads[0], ident.target_classes)
    assert ev.in_set and ev.concept is not None and set(ev.profile) and len(ev.shares) == len(diag.concepts)
    lines = summary_lines(diag)
    assert lines[0] == diag.pairs[0].sentence and len(lines) <= 2 * (1 + 1 + 5 + 1)
    # the list says what it is ranked by, and each concept's push (issue 24: explain printed no push)
    p0 = diag.pairs[0]
    if p0.concepts:
        assert lines[1] == f"  Concepts, ranked by their share of the push toward {p0.wrong}:"
        c = p0.concepts[0]
        assert lines[2].startswith(f"  1. {c.text}: {c.push_share:.0%} of the push toward {p0.wrong} "
                                   f"(correlation {c.push:+.2f})")
    none = diagnose(cache, ident, tiny_vocab, [], engine)
    assert "no heads are removed" in none.sentence and none.concepts == []


def test_diagnosis_rows_are_capped_keeping_every_labelled_sample(cache):  # noqa: F811
    """Beyond ``max_rows`` the diagnosis reads every labelled sample of the pair's classes and a seeded
    subset of the unlabelled images predicted as them; the block-wise projection equals one product."""
    engine = make_engine(cache)
    ident = identify(cache, ProtocolConfig(samples_per_class=1, seed=1, top_t=4, pair="both"), engine)
    every = diagnosis_rows(cache, ident, engine)
    samples = ident.sample_rows[np.isin(cache.labels[ident.sample_rows], ident.target_classes)]
    assert len(every) - len(samples) >= 2
    cap = len(samples) + (len(every) - len(samples)) // 2
    capped = diagnosis_rows(cache, ident, engine, max_rows=cap)
    assert len(capped) == cap and set(samples) <= set(capped) and set(capped) <= set(every)
    assert np.array_equal(capped, diagnosis_rows(cache, ident, engine, max_rows=cap))     # seeded
    u = np.random.default_rng(0).normal(size=cache.manifest.embed_dim)
    heads = engine.head_ids()[:3]
    np.testing.assert_allclose(project_rows(engine, every, u, heads, block=2),
                               flat_heads(cache, every)[:, engine.flat_index(heads)].astype(np.float64) @ u, rtol=1e-12)


def test_attribute_mode_and_ltc_against_brute_force(cache, loaded):  # noqa: F811
    engine = make_engine(cache)
    ident = identify(cache, ProtocolConfig(samples_per_class=3, seed=1, top_t=4), engine)
    u = phrase_direction(encode_texts(loaded, ["a red cat"]).numpy(), encode_texts(loaded, ["a blue dog"]).numpy())
    assert np.linalg.norm(u) == pytest.approx(1.0)
    rows = np.union1d(ident.sample_rows, ident.adapt_rows)
    shares = attribute_shares(engine, u, rows)
    e = engine.E[rows].astype(np.float64) @ u
    for k in (0, 5, len(shares) - 1):
        x = flat_heads(cache, rows)[:, k].astype(np.float64) @ u
        assert shares[k] == pytest.approx(float((x - x.mean()) @ (e - e.mean())) / float((e - e.mean()) @ (e - e.mean())))
    res = attribute_heads(cache, ident, ["a red cat"], ["a blue dog"], u, engine, top_t=4)
    assert [res.shares[str(h)] for h in res.ranking] == sorted(res.shares.values(), reverse=True)
    assert res.heads == res.ranking[: len(res.heads)] and len(res.heads) <= 4 and len(res.curve) == 4
    with pytest.raises(RefineClipError, match="same direction"):
        phrase_direction(np.ones((1, 4)), np.ones((2, 4)))
    # LTC: scores by the definition; the corrected embedding has nothing left along u
    s = _a_pair_with_everything(cache)
    a, b = s.y_true, s.y_pred
    ltc = HeadSearchCueProjection.fit(engine, [(a, b, s.W, s.C)], cache.labels, u, s.rows, top_t=4)
    def v(r):
        c_r = flat_heads(cache, [r])[0].astype(np.float64)
        x = c_r @ (cache.text[a] - cache.text[b])
        return x / np.abs(x).sum()
    ref = np.mean([v(r) for r in s.C], 0) - np.mean([v(r) for r in s.W], 0)
    ids = engine.head_ids()
    assert [ltc.spurious_scores[str(h)] for h in ids] == pytest.approx(ref.tolist(), rel=1e-4, abs=1e-7)
    assert all(ltc.spurious_scores[str(h)] > 0 for h in ltc.spurious) and len(ltc.spurious) <= 4
    np.testing.assert_allclose(ltc.embeddings() @ u, 0, atol=1e-8)
    assert ltc.predict().shape == cache.labels.shape


def test_explain_cli_prints_a_summary_and_writes_the_record(cache, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("REFINECLIP_HOME", str(tmp_path / "home"))
    pool = tmp_path / "pool.txt"
    pool.write_text("\n".join(TINY_POOL) + "\n")
    base = ["explain", "--cache", str(cache.root), "--samples-per-class", "3", "--top-t", "4", "--text-pool", str(pool)]
    assert main(base) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("Removed heads (the protocol's choice)") and "→" in out
    assert main(base + ["--json", "-"]) == 0
    record = json.loads(capsys.readouterr().out)              # nothing but the record on stdout
    assert isinstance(record["sentence"], str) and record["sentence"]
    assert record["config"]["samples_per_class"] == 3 and record["config"]["seed"] == 0
    for c in record["concepts"]:
        assert isinstance(c["text"], str) and 0 <= c["share"] <= 1 and c["heads"]
    assert main(base + ["--attribute", "a red cat", "--versus", "a blue dog", "--json", str(tmp_path / "e.json")]) == 0
    saved = json.loads((tmp_path / "e.json").read_text())
    assert saved["attribute"]["side_a"] == ["a red cat"] and saved["heads"] == saved["attribute"]["heads"]
    assert "wrote" in capsys.readouterr().out
    assert main(base + ["--attribute", "a red cat"]) == 2                       # --versus is required with it
    assert "--versus" in capsys.readouterr().err



def test_describe_cli_gives_the_inspectors_descriptions(cache, tmp_path, monkeypatch, capsys):  # noqa: F811
    """`refineclip describe` computes what the Head inspector shows through the same function
    (describe_heads): same texts and shares, one summary line per head; a sample past --max-images."""
    from refineclip_core.inspection.textspan import describe_heads, encode_text_pool, load_text_pool
    from refineclip_core.loading.models import ModelSpec, load_model

    monkeypatch.setenv("REFINECLIP_HOME", str(tmp_path / "home"))
    pool = tmp_path / "pool.txt"
    pool.write_text("\n".join(TINY_POOL) + "\n")
    heads = [HeadId(2, 0), HeadId(1, 1)]
    base = ["describe", "--cache", str(cache.root), "--text-pool", str(pool), "--k", "3"]
    assert main(base + ["--heads", "2.0,1.1", "--json", "-"]) == 0
    record = json.loads(capsys.readouterr().out)
    texts = load_text_pool(pool)
    emb = encode_text_pool(load_model(ModelSpec(**cache.manifest.model)), texts)
    direct = describe_heads(cache, heads, texts, emb, k=3)
    assert [r["head"] for r in record["heads"]] == [[2, 0], [1, 1]]
    for r, d in zip(record["heads"], direct):
        assert r["texts"] == d.texts and r["variance_explained"] == pytest.approx(d.variance_explained)
        assert r["n_images"] == len(cache.labels) and r["sampled_from"] is None
    assert main(base + ["--heads", "2.0,1.1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("TextSpan descriptions of 2 head(s) (--heads), over all") and len(lines) == 3
    assert lines[1].startswith("  L2.H0: ") and "%)" in lines[1]
    assert main(base + ["--heads", "2.0", "--max-images", "5", "--json", "-"]) == 0
    sampled = json.loads(capsys.readouterr().out)["heads"][0]
    assert sampled["n_images"] == 5 and sampled["sampled_from"] == len(cache.labels)
    assert main(base + ["--samples-per-class", "3", "--top-t", "4"]) == 0       # the protocol's heads
    assert "(the protocol's choice)" in capsys.readouterr().out
    assert main(base + ["--heads", "99.0"]) == 2
    assert "outside the cached scope" in capsys.readouterr().err


def test_a_one_head_set_is_said_in_the_singular(cache, tiny_vocab):  # noqa: F811
    engine = make_engine(cache)
    ident = identify(cache, ProtocolConfig(samples_per_class=3, seed=1, top_t=4), engine)
    sentence = diagnose(cache, ident, tiny_vocab, [HeadId(2, 0)], engine).pairs[0].sentence
    assert " in scope, this head holds " in sentence and "random single heads" in sentence, sentence
    assert "these 1 " not in sentence and "sets of 1 heads" not in sentence

def test_the_report_leads_with_the_escaped_sentence(cache, tiny_vocab):  # noqa: F811
    engine = make_engine(cache)
    ident = identify(cache, ProtocolConfig(samples_per_class=3, seed=1, top_t=4), engine)
    diag = diagnose(cache, ident, tiny_vocab, [HeadId(2, 0), HeadId(1, 1)], engine)
    diag.pairs[0].sentence = "<script>alert(1)</script> " + diag.pairs[0].sentence
    diag.pairs[0].concepts[0].text = "<b>bold</b>"
    page = render_html(build_run_report(cache, ident, engine, diagnosis=diag))
    assert "<script>alert" not in page and "&lt;script&gt;" in page and "<b>bold</b>" not in page
    assert page.index("Why:") < page.index("What the removed heads carry") < page.index("Configuration")


# -- where the truth is known: the committed demo model on a fresh sample of its world ---------------

@pytest.fixture(scope="module")
def demo_world(tmp_path_factory):
    """The embedded demo model on a fresh world sample (seed never used in development)."""
    from refineclip_core.demo.world import write_world
    from refineclip_core.features.extraction import ExtractionConfig, extract
    from refineclip_core.loading.data import load_dataset
    from refineclip_core.loading.models import DEMO_DIR, DEMO_MODEL_NAME, ModelSpec, load_model

    if not (DEMO_DIR / f"{DEMO_MODEL_NAME}.safetensors").is_file():
        pytest.skip("the embedded demo checkpoint is not installed")
    work = tmp_path_factory.mktemp("demo-world")
    data = write_world(work / "data", "all", 31337, {"train": 0, "val": 40, "test": 40})
    loaded = load_model(ModelSpec("demo"))
    cache = extract(loaded, load_dataset(data), work / "cache", ExtractionConfig(layers=4, batch_size=64))
    from refineclip_core.inspection.diagnosis import load_vocabulary

    return cache, load_vocabulary(loaded, cache_path=work)


@pytest.mark.slow
def test_demo_world_diagnosis_names_the_background_and_a_random_set_does_not(demo_world):
    from refineclip_core.demo.world import BIRD_PART_WORDS, CUE_WORDS, names_cue

    cache, vocab = demo_world
    engine = make_engine(cache)
    rng = np.random.default_rng(0)
    same_for_random = []
    for seed in (0, 1, 2):
        ident = identify(cache, ProtocolConfig(seed=seed), engine)
        diag = diagnose(cache, ident, vocab, None, engine)
        pair = diag.pairs[0]
        lead = pair.concepts[pair.lead[0]]
        assert pair.verdict == "shortcut", pair.sentence
        named = [c.words[0] for c in pair.named]
        assert names_cue(named, CUE_WORDS["background"]) and not names_cue(named, BIRD_PART_WORDS), pair.sentence
        # on held-out bird images, the blamed heads' part along the concept separates backgrounds, not birds
        test = ident.eval_rows[np.isin(cache.labels[ident.eval_rows], ident.target_classes)]
        values = flat_heads(cache, test)[:, engine.flat_index(ident.heads)].sum(1, dtype=np.float64) @ lead.direction
        groups = [cache.records[r].group for r in test]
        on_water = np.array([g.endswith("on water") for g in groups])
        waterbird = np.array([g.startswith("waterbird") for g in groups])
        auc_bg, auc_bird = separation_auc(values, on_water), separation_auc(values, waterbird)
        assert auc_bg >= 0.9 and auc_bird <= auc_bg - 0.2, (auc_bg, auc_bird)
        # the control: random sets of the same size rarely get the same diagnosis
        ids = engine.head_ids()
        for _ in range(4):
            heads = [ids[i] for i in rng.choice(len(ids), len(ident.heads), replace=False)]
            p = diagnose(cache, ident, vocab, heads, engine).pairs[0]
            same_for_random.append(p.verdict == "shortcut" and
                                   names_cue([c.words[0] for c in p.named], CUE_WORDS["background"]))
    assert np.mean(same_for_random) <= 1 / 3, same_for_random

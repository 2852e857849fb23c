"""Concept removal in the edit and the CoOp baseline (issue 27), each against an independent computation."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from refineclip_core.edit.concept import (ConceptConfig, concept_directions, concept_texts, orthonormal_basis,
                                          project_off, resolve_concept)
from refineclip_core.errors import RefineClipError
from refineclip_core.features.zeroshot import DEFAULT_TEMPLATES, class_text_embeddings
from refineclip_core.loading.models import ModelSpec, load_model
from refineclip_core.method.baselines import CoOp, CoOpConfig, encode_from_token_embeddings


def _brute_force_projector(D: np.ndarray) -> np.ndarray:
    """I − D⁺D: the orthogonal projector onto the complement of the rows' span, by the pseudo-inverse."""
    return np.eye(D.shape[1]) - np.linalg.pinv(D) @ D


@pytest.mark.parametrize("k", [1, 3])
def test_projection_removes_exactly_the_concepts_span(k):
    rng = np.random.default_rng(k)
    d = 12
    D = rng.normal(size=(k, d))
    D = np.vstack([D, D[:1] * 2.0 + (D[1:2] if k > 1 else 0)])   # a dependent direction adds nothing to the span
    X = rng.normal(size=(30, d))
    Q = orthonormal_basis(D)
    assert Q.shape == (k, d)
    np.testing.assert_allclose(Q @ Q.T, np.eye(k), atol=1e-12)
    P = _brute_force_projector(D)
    np.testing.assert_allclose(project_off(X, Q), X @ P, atol=1e-10)
    np.testing.assert_allclose(project_off(X, Q) @ D.T, 0, atol=1e-10)          # nothing of the span is left
    np.testing.assert_allclose(project_off(X, Q, 0.4), X - 0.4 * (X - X @ P), atol=1e-10)
    # the complement is untouched: a vector orthogonal to every direction stays as it is
    v = rng.normal(size=d) @ P
    np.testing.assert_allclose(project_off(v[None], Q)[0], v, atol=1e-10)


def test_directions_are_taken_against_a_reference():
    rng = np.random.default_rng(0)
    C, ref = rng.normal(size=(2, 5)), rng.normal(size=(4, 5))
    np.testing.assert_allclose(concept_directions(C, ref), C - ref.mean(0))
    with pytest.raises(RefineClipError, match="same direction"):
        concept_directions(ref[:1], ref[:1])


def _diagnosis(*named_words):
    pairs = [SimpleNamespace(named=[SimpleNamespace(words=list(w), text=" / ".join(w)) for w in pair])
             for pair in named_words]
    return SimpleNamespace(pairs=pairs)


def test_diagnosed_stands_for_the_concepts_the_diagnosis_names():
    diag = _diagnosis([["water", "lake", "sea"]], [["land", "grass"], ["water", "lake", "sea"]])
    texts, diagnosed = concept_texts(ConceptConfig(("diagnosed", "reed"), words=1), diag)
    assert texts == [["water"], ["land"], ["reed"]] and diagnosed == ["water", "land"]
    texts, diagnosed = concept_texts(ConceptConfig(("diagnosed",), words=2), diag)
    assert texts == [["water", "lake"], ["land", "grass"]] and diagnosed == ["water / lake", "land / grass"]
    with pytest.raises(RefineClipError, match="needs the diagnosis"):
        concept_texts(ConceptConfig(("diagnosed",)), None)
    with pytest.raises(RefineClipError, match="names no concept"):
        concept_texts(ConceptConfig(("diagnosed",)), _diagnosis([]))
    assert not ConceptConfig(("  ",)).active and not ConceptConfig(("water",), strength=0).active
    with pytest.raises(RefineClipError):
        ConceptConfig(("water",), strength=1.5)


@pytest.fixture(scope="module")
def demo_model():
    return load_model(ModelSpec("demo"))


def test_concept_texts_go_through_the_class_prompt_path(demo_model):
    classes = ["landbird", "waterbird", "fish"]
    text = class_text_embeddings(demo_model, classes, DEFAULT_TEMPLATES)
    emb = class_text_embeddings(demo_model, ["water", "land"], DEFAULT_TEMPLATES).astype(np.float64)
    u = (emb[0] - emb[1]) / np.linalg.norm(emb[0] - emb[1])
    # against the class texts' mean: the span of both texts' directions from it
    removal = resolve_concept(ConceptConfig(("water", "land"), reference="classes"), demo_model, DEFAULT_TEMPLATES,
                              text)
    D = emb - text.astype(np.float64).mean(0)
    np.testing.assert_allclose(removal.basis.T @ removal.basis, np.linalg.pinv(D) @ D, atol=1e-6)
    # against their own mean (the default for several texts) and against a typed versus: the contrast alone
    for cfg in (ConceptConfig(("water", "land")), ConceptConfig(("water",), versus=("land",))):
        r = resolve_concept(cfg, demo_model, DEFAULT_TEMPLATES, text)
        assert r.basis.shape[0] == 1
        np.testing.assert_allclose(np.abs(r.basis[0]), np.abs(u), atol=1e-6)
    versus = resolve_concept(ConceptConfig(("water",), versus=("land",)), demo_model, DEFAULT_TEMPLATES, text)
    # a concept of several words gives a direction per word: "water / land" (its first 2 words) is their contrast
    group = resolve_concept(ConceptConfig(("diagnosed",), words=2), demo_model, DEFAULT_TEMPLATES, text,
                            _diagnosis([["water", "land", "sky"]]))
    assert group.texts == ["water / land"] and group.diagnosed == ["water / land"] and group.basis.shape[0] == 1
    np.testing.assert_allclose(np.abs(group.basis[0]), np.abs(u), atol=1e-6)
    # one text without versus: against the class texts' mean
    one = resolve_concept(ConceptConfig(("water",)), demo_model, DEFAULT_TEMPLATES, text)
    d = emb[0] - text.astype(np.float64).mean(0)
    np.testing.assert_allclose(np.abs(one.basis[0]), np.abs(d / np.linalg.norm(d)), atol=1e-6)
    assert "'water'" in versus.sentence() and "versus 'land'" in versus.sentence()
    assert resolve_concept(ConceptConfig(), demo_model, DEFAULT_TEMPLATES, text) is None


def test_token_embedding_path_is_open_clips_encode_text(demo_model):
    tokens = demo_model.tokenizer(["a photo of a waterbird.", "a close-up photo of a small red car."])
    with torch.no_grad():
        ours = encode_from_token_embeddings(demo_model.model, demo_model.model.token_embedding(tokens), tokens)
        theirs = demo_model.model.encode_text(tokens)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_coop_without_steps_is_zero_shot_and_fits_the_labelled_images(demo_model):
    classes = ["landbird", "waterbird", "star", "fish"]
    templates = ["a photo of a {}.", "an image of the {}.", "{}"]
    text = class_text_embeddings(demo_model, classes, templates).astype(np.float64)
    rng = np.random.default_rng(0)
    E = rng.normal(size=(16, text.shape[1]))
    y = np.arange(16) % 4
    grads = [p.requires_grad for p in demo_model.model.parameters()]
    zero = CoOp.fit(demo_model, classes, templates, E, y, 50.0, CoOpConfig(steps=5, lr=0.0))
    np.testing.assert_allclose(zero.text, text, atol=1e-5)
    np.testing.assert_array_equal(zero.predict(E), (E @ text.T).argmax(1))
    fitted = CoOp.fit(demo_model, classes, templates, E, y, 50.0, CoOpConfig(steps=60, lr=0.02))
    assert fitted.history[-1] < 0.5 * fitted.history[0]
    assert (fitted.predict(E) == y).mean() > (zero.predict(E) == y).mean()
    assert [p.requires_grad for p in demo_model.model.parameters()] == grads    # the model is left as it was
    assert not np.allclose(fitted.text, text, atol=1e-3)


def test_coop_cost_matches_the_operations_torch_counts(demo_model):
    """coop_cost against torch's own count of one forward pass (matmuls; a backward pass ≈ 2 forwards)."""
    from torch.utils.flop_counter import FlopCounterMode

    from refineclip_core.features.zeroshot import fill_template
    from refineclip_core.method.baselines import coop_cost

    classes = ["landbird", "waterbird", "a very long class name of many words", "fish"]
    templates = ["a photo of a {}.", "{}"]
    cfg = CoOpConfig(steps=7)
    counted = 0
    for t in templates:
        tok = demo_model.tokenizer([fill_template(t, c) for c in classes])
        x = demo_model.model.token_embedding(tok)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            encode_from_token_embeddings(demo_model.model, x, tok)
        counted += fc.get_total_flops()
    estimate = coop_cost(demo_model, classes, templates, cfg)
    assert 0.7 < estimate / (3 * cfg.steps * counted) < 1.5

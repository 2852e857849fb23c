"""The model's own scoring (issue 34 item 3): CLIP's softmax, SigLIP's sigmoid with its logit bias.

Every number here is checked against a computation that does not go through
:class:`~refineclip_core.features.scoring.Scoring`: open_clip's own forward pass, torch.distributions,
or a loop over classes in plain Python.
"""

from __future__ import annotations

import json
import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from refineclip_core.features.scoring import Scoring, uses_sigmoid_loss

from .conftest import tiny_config, write_config


def _model(bias: float | None, seed: int = 0) -> torch.nn.Module:
    cfg = tiny_config()
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"],
                                 init_logit_bias=bias).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(7.5))
        if bias is not None:
            model.logit_bias.fill_(bias)
    return model


@torch.no_grad()
def _forward(model, n_images: int = 5, n_classes: int = 4):
    """open_clip's own forward pass: normalised features, its scale and (SigLIP) bias."""
    torch.manual_seed(1)
    images = torch.randn(n_images, 3, 32, 32)
    tokens = torch.randint(1, 400, (n_classes, 16))
    out = model(images, tokens)
    return model.encode_image(images), tuple(x.detach() for x in out)


def test_a_model_with_a_logit_bias_scores_with_its_sigmoid():
    model = _model(-3.7)
    assert uses_sigmoid_loss(model)
    scoring = Scoring.of_model(model)
    assert scoring.kind == "sigmoid" and scoring.scale == pytest.approx(7.5) and scoring.bias == pytest.approx(-3.7)
    raw, (img, txt, scale, bias) = _forward(model)
    expected = torch.sigmoid(scale * img @ txt.T + bias).double().numpy()   # open_clip's SigLIP logits
    got = scoring.probabilities(raw.numpy(), txt.numpy())                  # the unnormalised embedding
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(got.sum(1), 1.0)                                # not a distribution over classes


def test_a_clip_model_scores_with_its_softmax_as_before():
    model = _model(None)
    assert not uses_sigmoid_loss(model)
    scoring = Scoring.of_model(model)
    assert scoring == Scoring("softmax", pytest.approx(7.5), 0.0)
    raw, out = _forward(model)
    img, txt, scale = out
    expected = torch.softmax(scale * img @ txt.T, dim=-1).double().numpy()
    np.testing.assert_allclose(scoring.probabilities(raw.numpy(), txt.numpy()), expected, rtol=1e-5, atol=1e-7)
    assert Scoring.of(7.5) == Scoring("softmax", 7.5)                      # a bare scale is CLIP's softmax


def test_prediction_confidence_by_blocks_follows_the_scoring():
    from refineclip_core.features.zeroshot import predict, prediction_confidence

    rng = np.random.default_rng(0)
    E, text = rng.normal(size=(37, 8)), rng.normal(size=(5, 8))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    cos = (E / np.linalg.norm(E, axis=1, keepdims=True)) @ text.T
    pred = rng.integers(0, 5, size=37)
    sig = Scoring("sigmoid", 12.0, -4.0)
    got = prediction_confidence(E, text, sig, pred, block=8)
    expected = 1.0 / (1.0 + np.exp(-(12.0 * cos + -4.0)))
    np.testing.assert_allclose(got, expected[np.arange(37), pred], rtol=1e-6)
    labels, probs = predict(E, text, sig)
    np.testing.assert_array_equal(labels, cos.argmax(1))                   # argmax as for CLIP
    np.testing.assert_allclose(probs, expected, rtol=1e-12)
    labels_clip, _ = predict(E, text, Scoring("softmax", 12.0))
    np.testing.assert_array_equal(labels, labels_clip)


def _bernoulli_kl_by_hand(t: torch.Tensor, s: torch.Tensor) -> np.ndarray:
    out = []
    for trow, srow in zip(t.tolist(), s.tolist()):
        total = 0.0
        for a, b in zip(trow, srow):
            p, q = 1 / (1 + math.exp(-a)), 1 / (1 + math.exp(-b))
            total += p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
        out.append(total)
    return np.array(out)


def test_divergences_against_torch_distributions_and_a_loop():
    from torch.distributions import Bernoulli, Categorical, kl_divergence

    torch.manual_seed(0)
    t, s = 3 * torch.randn(6, 5, dtype=torch.float64), 3 * torch.randn(6, 5, dtype=torch.float64)
    sig, soft = Scoring("sigmoid", 10.0, -2.0), Scoring("softmax", 10.0)
    np.testing.assert_allclose(sig.divergence(t, s).numpy(), _bernoulli_kl_by_hand(t, s), rtol=1e-10)
    np.testing.assert_allclose(sig.divergence(t, s).numpy(),
                               kl_divergence(Bernoulli(logits=t), Bernoulli(logits=s)).sum(-1).numpy(), rtol=1e-10)
    np.testing.assert_allclose(soft.divergence(t, s).numpy(),
                               kl_divergence(Categorical(logits=t), Categorical(logits=s)).numpy(), rtol=1e-10)
    # the old formula of edit/paper.py (log_softmax teacher/student, mean over rows) is the softmax path
    lp, lq = F.log_softmax(t, -1), F.log_softmax(s, -1)
    assert float(soft.mean_divergence(t, s)) == pytest.approx(float((lp.exp() * (lp - lq)).sum(-1).mean()), rel=1e-12)
    assert float(sig.mean_divergence(t[:0], s[:0])) == 0.0
    # cross-entropy: softmax CE, or the sigmoid loss with the true class the one positive
    y = torch.tensor([0, 3, 1, 4, 2, 2])
    assert float(soft.cross_entropy(s, y)) == pytest.approx(float(F.nll_loss(lq, y)), rel=1e-12)
    by_hand = np.mean([-sum(math.log(1 / (1 + math.exp(-z))) if c == yy else math.log(1 - 1 / (1 + math.exp(-z)))
                            for c, z in enumerate(row)) for row, yy in zip(s.tolist(), y.tolist())])
    assert float(sig.cross_entropy(s, y)) == pytest.approx(by_hand, rel=1e-10)


def _problem(seed: int = 0, n: int = 12, d: int = 6, c: int = 3):
    rng = np.random.default_rng(seed)
    E = rng.normal(size=(n, d))
    T = rng.normal(size=(c, d))
    T /= np.linalg.norm(T, axis=1, keepdims=True)
    return E, rng.integers(0, c, size=n), T, rng


def _logits(X, T, s: Scoring) -> torch.Tensor:
    cos = (X / np.linalg.norm(X, axis=1, keepdims=True)) @ T.T
    return torch.as_tensor(s.scale * cos + (s.bias if s.kind == "sigmoid" else 0.0))


def test_paper_phase2_on_a_sigmoid_model_uses_the_bernoulli_kl_and_the_sigmoid_loss():
    """At θ = 1 (the loss before the first step) the recorded L_success and L_CE are the hand-computed
    Bernoulli KL from the ablated teacher and the sigmoid loss; the softmax run records other numbers."""
    from refineclip_core.edit.config import PaperConfig
    from refineclip_core.edit.paper import paper_phase2

    E, labels, T, rng = _problem()
    W, local = np.array([0, 1, 2]), np.array([3, 4, 5, 6])
    ablated = E[W] + rng.normal(size=(3, E.shape[1]))
    train = np.arange(len(E))
    sig = Scoring("sigmoid", 9.0, -1.5)
    cfg = PaperConfig(steps=1)
    res = paper_phase2(E, labels, T, sig, W, local, ablated, cfg, train_rows=train)
    kl = _bernoulli_kl_by_hand(_logits(ablated, T, sig), _logits(E[W], T, sig)).mean()
    assert res.history["success"][0] == pytest.approx(kl, rel=1e-9)
    assert res.history["locality"][0] == pytest.approx(0.0, abs=1e-12)
    z = _logits(E, T, sig).numpy()
    bce = np.mean([-sum(np.log(1 / (1 + np.exp(-v))) if k == y else np.log(1 - 1 / (1 + np.exp(-v)))
                        for k, v in enumerate(row)) for row, y in zip(z, labels)])
    assert res.history["ce"][0] == pytest.approx(bce, rel=1e-9)
    soft = paper_phase2(E, labels, T, Scoring("softmax", 9.0), W, local, ablated, cfg, train_rows=train)
    assert soft.history["success"][0] != pytest.approx(kl, rel=1e-3)


def test_the_exported_edits_fit_on_a_sigmoid_model_uses_the_bernoulli_kl():
    """fit_ablation's first recorded loss (at B₀, the least-squares start) is the hand-computed Bernoulli KL
    of the teachers against g(E·B₀), split over Ŵ and the rest as the docstring says."""
    from refineclip_core.edit.config import FitConfig
    from refineclip_core.edit.fit import fit_ablation, least_squares_map

    E, _, T, rng = _problem(1, n=16)
    in_success = np.zeros(len(E), dtype=bool)
    in_success[[1, 4, 7, 9, 12]] = True
    teacher = E + np.where(in_success[:, None], rng.normal(size=E.shape), 0.0)
    cfg = FitConfig(steps=1)
    sig = Scoring("sigmoid", 11.0, -2.5)
    res = fit_ablation(E, T, sig, teacher, in_success, cfg)
    B0 = least_squares_map(E, teacher, cfg.ridge, in_success=in_success)
    kl = _bernoulli_kl_by_hand(_logits(teacher, T, sig), _logits(E @ B0, T, sig))
    assert res.history["success"][0] == pytest.approx(kl[in_success].mean(), rel=1e-4)   # float32 steps
    assert res.history["locality"][0] == pytest.approx(kl[~in_success].mean(), rel=1e-4)
    soft = fit_ablation(E, T, Scoring("softmax", 11.0), teacher, in_success, cfg)
    assert soft.history["success"][0] != pytest.approx(kl[in_success].mean(), rel=1e-2)


def test_a_cache_records_the_models_scoring(tmp_path, image_folder):
    """Extraction writes the sigmoid's bias into the manifest (FeatureCache.scoring); a cache written before
    the bias was recorded gets it on the next extraction without re-extracting; CLIP caches stay softmax."""
    from refineclip_core.features.extraction import ExtractionConfig, extract
    from refineclip_core.loading.data import load_dataset
    from refineclip_core.loading.models import ModelSpec, load_model

    path = write_config(tmp_path, "rcscore-sig", {**tiny_config(), "init_logit_bias": -6.5})
    loaded = load_model(ModelSpec("rcscore-sig", model_config=str(path)))
    cfg = ExtractionConfig(layers=1, batch_size=9)
    cache = extract(loaded, load_dataset(image_folder), tmp_path / "cache", cfg)
    assert cache.scoring == Scoring("sigmoid", pytest.approx(loaded.logit_scale), pytest.approx(-6.5))
    manifest = tmp_path / "cache" / "manifest.json"
    old = json.loads(manifest.read_text())
    del old["logit_bias"]
    manifest.write_text(json.dumps(old))
    shards = sorted(p.stat().st_mtime_ns for p in (tmp_path / "cache" / "shards").rglob("*.npy"))
    again = extract(loaded, load_dataset(image_folder), tmp_path / "cache", cfg)
    assert again.scoring.kind == "sigmoid" and again.scoring.bias == pytest.approx(-6.5)
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "cache" / "shards").rglob("*.npy")) == shards
    _run_report_records_the_scoring(again, tmp_path)
    clip_path = write_config(tmp_path, "rcscore-clip", tiny_config())
    clip = extract(load_model(ModelSpec("rcscore-clip", model_config=str(clip_path))), load_dataset(image_folder),
                   tmp_path / "clip", cfg)
    assert clip.manifest.logit_bias is None and clip.scoring.kind == "softmax"


def _run_report_records_the_scoring(cache, tmp_path):
    """The run report (JSON and HTML) says which scoring was used; read back, a malformed one is one sentence."""
    from refineclip_core.edit.record import build_run_report, read_run_report
    from refineclip_core.errors import RefineClipError
    from refineclip_core.method.protocol import ProtocolConfig, identify, make_engine
    from refineclip_core.reporting.run_report import render_html

    ident = identify(cache, ProtocolConfig(samples_per_class=3, seed=1, top_t=4, resamples=0))
    report = build_run_report(cache, ident, make_engine(cache))
    d = report if isinstance(report, dict) else report.to_dict()
    assert d["scoring"] == {"kind": "sigmoid", "scale": cache.scoring.scale, "bias": cache.scoring.bias}
    assert "scored with per-class sigmoid σ(" in render_html(report)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(d))
    assert read_run_report(path).scoring == cache.scoring
    path.write_text(json.dumps({**d, "scoring": {"kind": "tanh", "scale": 1, "bias": 0}}))
    with pytest.raises(RefineClipError, match="has a 'scoring' that is not"):
        read_run_report(path)


def test_the_edit_and_the_compared_fits_use_the_caches_scoring(tmp_path):
    """Through fit_edit / fit_compared (the registry's rows): a cache that records a logit bias fits the
    exported edit and the paper's phase 2 in the sigmoid scoring, i.e. exactly the direct calls with the
    sigmoid Scoring, and not the softmax ones (the demo model's cache, its manifest given a bias)."""
    from refineclip_core.demo.world import write_world
    from refineclip_core.edit.compare import fit_compared, fit_edit
    from refineclip_core.edit.config import EditConfig, FitConfig, PaperConfig
    from refineclip_core.edit.fit import fit_ablation, teacher_embeddings
    from refineclip_core.edit.methods import PAPER_KEYS
    from refineclip_core.edit.paper import paper_phase2
    from refineclip_core.features.cache import FeatureCache
    from refineclip_core.features.extraction import ExtractionConfig, extract
    from refineclip_core.loading.data import load_dataset
    from refineclip_core.loading.models import ModelSpec, load_model
    from refineclip_core.method.protocol import ProtocolConfig, identify, make_engine

    data = write_world(tmp_path / "data", "all", seed=424242, n_per_group=12)
    extract(load_model(ModelSpec("demo")), load_dataset(data), tmp_path / "cache", ExtractionConfig(layers=2, batch_size=64))
    manifest = tmp_path / "cache" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "logit_bias": -3.0}))
    cache = FeatureCache(tmp_path / "cache")
    sig = cache.scoring
    assert sig == Scoring("sigmoid", cache.logit_scale, -3.0)
    engine = make_engine(cache)
    ident = identify(cache, ProtocolConfig(seed=0), engine)
    cfg = EditConfig(fit=FitConfig(steps=3), paper=PaperConfig(steps=3))
    outcome = fit_edit(cache, ident, cfg, engine=engine, baselines=False)
    fit_compared(cache, ident, outcome, [PAPER_KEYS[cfg.paper.strategy]], engine=engine)

    teacher, succ = teacher_embeddings(ident.ablation_engine(engine), outcome.heads, ident.config.ablation,
                                       ident.adapt_rows, ident.target_classes, None, cfg.fit.strength, success_only=True)
    args = (cache.embeddings[ident.adapt_rows], cache.text)
    assert outcome.refinement.history == fit_ablation(*args, sig, teacher, succ, cfg.fit).history
    assert outcome.refinement.history != fit_ablation(*args, cache.logit_scale, teacher, succ, cfg.fit).history
    W = np.unique(np.concatenate([s.W for s in ident.sets.values()]))
    local = np.setdiff1d(np.unique(np.concatenate([np.concatenate([s.C, s.A]) for s in ident.sets.values()])), W)
    paper = outcome.results[PAPER_KEYS[cfg.paper.strategy]].history
    ablated = ident.ablation_engine(engine).embeddings(outcome.heads, ident.config.ablation, W)
    direct = paper_phase2(cache.embeddings, cache.labels, cache.text, sig, W, local, ablated, cfg.paper,
                          train_rows=ident.sample_rows)
    assert paper == direct.history and len(W)
    assert paper != paper_phase2(cache.embeddings, cache.labels, cache.text, cache.logit_scale, W, local, ablated,
                                 cfg.paper, train_rows=ident.sample_rows).history


def test_a_transformers_siglip_folder_scores_as_transformers_does(tmp_path):
    """A Hugging Face ``SiglipModel`` folder loads with its logit bias: the confidences are
    ``sigmoid(logits_per_image)`` of transformers' own forward pass (its documented probabilities)."""
    pytest.importorskip("transformers")
    from refineclip_core.loading.models import ModelSpec, load_model

    from .test_families_extra import PROMPTS, _image_size, _images, _save

    hf, folder = _save(tmp_path, "siglip")
    loaded = load_model(ModelSpec("x", checkpoint=str(folder)))
    scoring = Scoring.of_model(loaded.model)
    assert scoring.kind == "sigmoid" and scoring.bias == pytest.approx(-3.0) and scoring.scale == pytest.approx(12.0)
    images, tokens = _images(_image_size("siglip")), loaded.tokenizer(PROMPTS)
    with torch.no_grad():
        expected = torch.sigmoid(hf(input_ids=tokens, pixel_values=images).logits_per_image).double().numpy()
        image_emb = loaded.model.encode_image(images).numpy()
        text_emb = F.normalize(loaded.model.encode_text(tokens), dim=-1).numpy()
    np.testing.assert_allclose(scoring.probabilities(image_emb, text_emb), expected, rtol=1e-4, atol=1e-6)

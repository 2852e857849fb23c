"""Grad-CAM of zero-shot logits, whole model and head sets (paper Appendix A.1, Figure 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from refineclip_core.errors import RefineClipError
from refineclip_core.features.decomposition import HeadId, decompose
from refineclip_core.inspection.gradcam import (
    ZeroShotClassifierModule,
    gradcam_maps,
    model_input_image,
    overlay,
)
from refineclip_core.loading.models import ModelSpec, load_model

HEAD_SETS = [
    [HeadId(2, 1)],
    [HeadId(1, 0), HeadId(2, 3), HeadId(2, 1)],
]


def _spec(files, precision="fp32"):
    return ModelSpec(files["name"], checkpoint=str(files["checkpoint"]), model_config=str(files["config"]),
                     precision=precision)


@pytest.fixture(scope="module")
def loaded(tiny_model_files):
    return load_model(_spec(tiny_model_files))


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def text():
    t = torch.randn(4, 32, generator=torch.Generator().manual_seed(4))
    return torch.nn.functional.normalize(t, dim=-1).numpy()


def _hook_counts(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in module.modules())


@pytest.mark.parametrize("heads", [None] + HEAD_SETS)
def test_maps_shape_and_range(loaded, images, text, heads):
    maps = gradcam_maps(loaded, images, 1, text, heads=heads)
    assert maps.shape == (3, 32, 32) and maps.dtype == np.float32
    assert np.all(np.isfinite(maps)) and maps.min() >= 0.0 and maps.max() <= 1.0
    # every map is normalised to [0, 1]: a map that is flat zero would mean no gradient reached it
    assert np.all(maps.reshape(3, -1).max(axis=1) > 0.99)


def test_head_maps_differ_from_whole_model(loaded, images, text):
    whole = gradcam_maps(loaded, images, 2, text)
    for heads in HEAD_SETS:
        restricted = gradcam_maps(loaded, images, 2, text, heads=heads)
        assert np.abs(whole - restricted).max() > 0.1
    # same target layer, different function: a head of the last layer vs the whole model
    last = gradcam_maps(loaded, images, 2, text, heads=[HeadId(2, 1)], layer=2)
    assert np.abs(whole - last).max() > 0.1


@pytest.mark.parametrize("heads", HEAD_SETS)
def test_head_classifier_logits_equal_cached_decomposition(loaded, images, text, heads):
    clf = ZeroShotClassifierModule(loaded, text, head_mask=heads)
    with torch.no_grad():
        logits = clf(images)
    dec = decompose(loaded.visual, images, "all")
    e = sum(dec.heads[:, h.layer, h.head] for h in heads)
    e = e / e.norm(dim=-1, keepdim=True)
    expected = loaded.logit_scale * e @ torch.as_tensor(text).T
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_whole_model_classifier_logits(loaded, images, text):
    clf = ZeroShotClassifierModule(loaded, text)
    with torch.no_grad():
        logits = clf(images)
        e = loaded.model.encode_image(images, normalize=True)
    torch.testing.assert_close(logits, loaded.logit_scale * e @ torch.as_tensor(text).T, atol=1e-5, rtol=0)


def test_head_gradient_is_the_gradient_of_the_cached_function(tiny_model_files, text):
    """The differentiable head path has the true derivative of the head-set logit as computed
    by the (non-differentiable) cached decomposition: central finite differences in fp64."""
    loaded64 = load_model(_spec(tiny_model_files, "fp64"))
    heads = HEAD_SETS[1]
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 3, 32, 32, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 3, 32, 32, generator=gen, dtype=torch.float64)
    t = torch.as_tensor(text, dtype=torch.float64)

    def cached_logit(img):
        dec = decompose(loaded64.visual, img, "all")
        e = sum(dec.heads[:, h.layer, h.head] for h in heads)
        return float(loaded64.logit_scale * (e / e.norm(dim=-1, keepdim=True)) @ t[3])

    clf = ZeroShotClassifierModule(loaded64, text, head_mask=heads)
    xg = x.clone().requires_grad_(True)
    clf(xg)[0, 3].backward()
    analytic = float((xg.grad * v).sum())
    eps = 1e-5
    numeric = (cached_logit(x + eps * v) - cached_logit(x - eps * v)) / (2 * eps)
    assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-8)


def _manual_gradcam(clf, visual, images, target, layer):
    """Grad-CAM by its definition: activations A and gradients dY/dA of a block's ln_1 output,
    channel weights = spatial mean of the gradients, map = ReLU(sum_c w_c A_c)."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    store = {}
    handle = visual.transformer.resblocks[layer].ln_1.register_forward_hook(
        lambda _m, _a, out: store.__setitem__("act", out))
    try:
        x = images.clone().requires_grad_(True)
        logits = clf(x)
        (grad,) = torch.autograd.grad(logits[:, target].sum(), store["act"])
    finally:
        handle.remove()
    act = store["act"].detach()[:, 1:]                    # (B, gh*gw, D), CLS dropped
    grad = grad[:, 1:]
    gh, gw = visual.grid_size
    weights = grad.mean(dim=1, keepdim=True)             # (B, 1, D)
    cam = torch.relu((weights * act).sum(-1)).reshape(-1, gh, gw).numpy()
    return scale_cam_image(scale_cam_image(cam, (images.shape[-1], images.shape[-2])))


@pytest.mark.parametrize("heads,layer", [(None, 2), ([HeadId(1, 2)], 1)])
def test_maps_match_gradcam_definition(loaded, images, text, heads, layer):
    maps = gradcam_maps(loaded, images, 3, text, heads=heads)
    clf = ZeroShotClassifierModule(loaded, text, head_mask=heads)
    expected = _manual_gradcam(clf, loaded.visual, images, 3, layer)
    np.testing.assert_allclose(maps, expected, atol=1e-4)


def test_per_image_targets(loaded, images, text):
    per_image = gradcam_maps(loaded, images, [0, 3, 1], text)
    for i, c in enumerate([0, 3, 1]):
        np.testing.assert_allclose(per_image[i], gradcam_maps(loaded, images[i:i + 1], c, text)[0], atol=1e-5)


def test_hooks_released_grad_flags_and_outputs_restored(loaded, images, text):
    visual = loaded.visual
    params = list(visual.parameters())
    with torch.no_grad():
        before_out = loaded.model.encode_image(images).clone()
    # a mixed requires_grad state, as during fine-tuning of a projection, in train mode
    params[0].requires_grad_(True)
    visual.train()
    before_flags = [p.requires_grad for p in params]
    before_hooks = _hook_counts(visual)
    try:
        for heads in [None] + HEAD_SETS:
            gradcam_maps(loaded, images, 0, text, heads=heads)
        assert _hook_counts(visual) == before_hooks == 0
        assert [p.requires_grad for p in params] == before_flags
        assert all(p.grad is None for p in params)
        assert all(m.training for m in visual.modules())
        visual.eval()
        params[0].requires_grad_(False)
        with torch.no_grad():
            assert torch.equal(loaded.model.encode_image(images), before_out)
    finally:
        visual.eval()
        params[0].requires_grad_(False)


def test_hooks_released_when_gradcam_fails(loaded, images, text, monkeypatch):
    """GradCAM's own context manager swallows IndexError; ours must not, and must still
    remove every hook."""
    from pytorch_grad_cam import GradCAM

    def broken(*_a, **_k):
        raise IndexError("boom")

    monkeypatch.setattr(GradCAM, "get_cam_weights", broken)
    with pytest.raises(IndexError, match="boom"):
        gradcam_maps(loaded, images, 0, text, heads=HEAD_SETS[1])
    assert _hook_counts(loaded.visual) == 0
    assert not any(p.requires_grad for p in loaded.visual.parameters())


def test_works_inside_inference_mode(loaded, images, text):
    expected = gradcam_maps(loaded, images, 1, text, heads=HEAD_SETS[0])
    with torch.inference_mode():
        inference_images = images.clone()
        inference_text = torch.as_tensor(text).clone()
        maps = gradcam_maps(loaded, inference_images, 1, inference_text, heads=HEAD_SETS[0])
    np.testing.assert_allclose(maps, expected, atol=1e-6)


def test_user_errors(loaded, images, text):
    with pytest.raises(RefineClipError, match="does not exist"):
        gradcam_maps(loaded, images, 9, text)
    with pytest.raises(RefineClipError, match="one per image"):
        gradcam_maps(loaded, images, [0, 1], text)
    with pytest.raises(RefineClipError, match="does not exist"):
        gradcam_maps(loaded, images, 0, text, heads=[HeadId(3, 0)])
    with pytest.raises(RefineClipError, match="empty"):
        gradcam_maps(loaded, images, 0, text, heads=[])
    with pytest.raises(RefineClipError, match="Layer 5"):
        gradcam_maps(loaded, images, 0, text, layer=5)
    with pytest.raises(RefineClipError, match="dimension"):
        gradcam_maps(loaded, images, 0, text[:, :16])
    with pytest.raises(RefineClipError, match="RGB"):
        gradcam_maps(loaded, images[:, :1], 0, text)
    assert _hook_counts(loaded.visual) == 0


def test_tokens_to_grid_places_tokens_on_the_grid():
    """Grad-CAM's reshape (each backend's ``tokens_to_grid``): patch token j lands at row-major cell j."""
    from refineclip_core.features.backends.base import tokens_to_grid

    B, gh, gw, D = 2, 3, 4, 5
    tokens = torch.randn(B, 1 + gh * gw, D)
    out = tokens_to_grid(tokens, (gh, gw), 1)
    assert out.shape == (B, D, gh, gw)
    for j in range(1, 1 + gh * gw):
        r, c = divmod(j - 1, gw)
        torch.testing.assert_close(out[:, :, r, c], tokens[:, j])
    with pytest.raises(ValueError):
        tokens_to_grid(tokens, (3, 3), 1)


def test_overlay():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(20, 30, 3)).astype(np.uint8)
    arr[0, 0] = 255
    image = Image.fromarray(arr)
    cam = np.zeros((10, 15), dtype=np.float32)
    cam[:, 8:] = 1.0                                     # right half hot, left half cold
    out = overlay(image, cam, alpha=0.5)
    assert out.size == image.size and out.mode == "RGB"
    only_image = np.asarray(overlay(image, cam, alpha=0.0)).astype(int)
    assert np.abs(only_image - arr.astype(int)).max() <= 1
    heat = np.asarray(overlay(image, cam, alpha=1.0)).astype(int)
    right, left = heat[:, 20:], heat[:, :10]
    assert right[..., 0].mean() > right[..., 2].mean() + 100     # hot: red
    assert left[..., 2].mean() > left[..., 0].mean() + 100       # cold: blue
    with pytest.raises(RefineClipError):
        overlay(image, cam, alpha=1.5)


def test_model_input_image_round_trip(loaded):
    rng = np.random.default_rng(1)
    picture = Image.fromarray(rng.integers(0, 256, size=(40, 48, 3)).astype(np.uint8))
    tensor = loaded.preprocess(picture)
    seen = model_input_image(loaded, tensor)
    assert seen.size == (32, 32)
    again = loaded.preprocess(seen)
    std = torch.tensor(loaded.visual.preprocess_cfg["std"]).view(3, 1, 1)
    assert float(((again - tensor) * std).abs().max()) <= 1.0 / 255 + 1e-6

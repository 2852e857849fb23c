"""The head decomposition (paper Eq. 3-5) against the real model."""

from __future__ import annotations

import itertools

import pytest
import torch

from refineclip_core.errors import UnsupportedModelError
from refineclip_core.features.decomposition import (
    HeadId,
    architecture_info,
    decompose,
    direct_ablation_forward,
    heads_zeroed,
    resolve_layers,
)
from refineclip_core.features.backends import backend_for
from refineclip_core.features.backends.base import head_parts
from refineclip_core.loading.models import ModelSpec, load_model

from .conftest import tiny_config, write_config

VARIANTS = {
    "plain": dict(),
    "layer-scale": dict(ls=0.3),
    "quick-gelu": dict(quick_gelu=True),
    "wide-patch4": dict(width=96, head_width=32, patch=4, image=24, layers=2),
    "narrow-heads": dict(width=48, head_width=8, layers=4, ls=1.5, quick_gelu=True),
    "no-ln-pre": dict(no_ln_pre=True),
}


def _load(tmp_path, name, cfg, precision="fp32"):
    path = write_config(tmp_path, name, cfg)
    torch.manual_seed(1)
    loaded = load_model(ModelSpec(name, model_config=str(path), precision=precision))
    with torch.no_grad():  # move LayerNorm/bias params off their trivial init
        for p in loaded.model.visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return loaded


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())


@pytest.mark.parametrize("variant,precision", list(itertools.product(VARIANTS, ["fp32", "fp64"])))
def test_sum_of_parts_reproduces_encode_image(tmp_path, variant, precision):
    loaded = _load(tmp_path, f"v-{variant}", tiny_config(**VARIANTS[variant]), precision)
    size = loaded.visual.image_size[0]
    images = torch.randn(4, 3, size, size, dtype=loaded.dtype, generator=torch.Generator().manual_seed(2))
    dec = decompose(loaded.visual, images, "all")
    reference = loaded.model.encode_image(images)  # a separate call, no hooks
    bound = 1e-5 if precision == "fp32" else 1e-10
    assert _rel_error(dec.reconstruct(), reference) <= bound
    assert _rel_error(dec.embedding, reference) <= bound
    info = architecture_info(loaded.visual)
    assert dec.heads.shape == (4, info.n_layers, info.n_heads, info.embed_dim)
    assert len(dec.remainder_names) == dec.remainders.shape[1] == 2 * info.n_layers + 2
    assert dec.remainder_names[0] == "embed" and dec.remainder_names[-1] == "ln_post_bias"


def test_last_k_layers_scope_moves_other_heads_into_remainders(tmp_path):
    loaded = _load(tmp_path, "scope", tiny_config(layers=4, ls=0.5), "fp64")
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    full = decompose(loaded.visual, images, "all")
    last2 = decompose(loaded.visual, images, 2)
    assert last2.layers == (2, 3)
    torch.testing.assert_close(last2.heads, full.heads[:, 2:], rtol=0, atol=1e-12)
    assert "attn.0" in last2.remainder_names and "attn_bias.3" in last2.remainder_names
    assert _rel_error(last2.reconstruct(), full.embedding) < 1e-10


def test_head_outputs_match_torch_attention_weights(tmp_path):
    """Independent check of the per-head CLS computation: use torch's own per-head attention
    weights (need_weights=True) and the explicit V projection of every token."""
    loaded = _load(tmp_path, "heads", tiny_config(ls=0.7), "fp64")
    block = loaded.visual.transformer.resblocks[1]
    x = torch.randn(2, 17, 64, dtype=torch.float64)
    attn = block.attn
    _, weights = attn(x, x, x, need_weights=True, average_attn_weights=False)  # (B, H, N, N)
    D, H = attn.embed_dim, attn.num_heads
    dh = D // H
    v = x @ attn.in_proj_weight[2 * D:].T + attn.in_proj_bias[2 * D:]        # (B, N, D)
    backend = backend_for(loaded.visual)
    eye = torch.ones(2, 1, 1, dtype=x.dtype)
    mine = head_parts(backend.attn_weights(1), backend.scores(1, x, (0,), {}), x, eye, None)[:, 0]
    for h in range(H):
        ctx = torch.einsum("bn,bne->be", weights[:, h, 0], v[..., h * dh:(h + 1) * dh])
        out = ctx @ attn.out_proj.weight[:, h * dh:(h + 1) * dh].T * block.ls_1.gamma
        torch.testing.assert_close(mine[:, h], out, rtol=1e-10, atol=1e-12)
    full = attn(x, x, x, need_weights=False)[0][:, 0] * block.ls_1.gamma
    torch.testing.assert_close(mine.sum(1) + attn.out_proj.bias * block.ls_1.gamma, full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("precision,bound", [("fp32", 1e-5), ("fp64", 1e-10)])
def test_direct_ablation_through_the_model_matches_eq5(tmp_path, precision, bound):
    loaded = _load(tmp_path, f"abl-{precision}", tiny_config(layers=3, ls=0.5), precision)
    images = torch.randn(4, 3, 32, 32, dtype=loaded.dtype, generator=torch.Generator().manual_seed(3))
    dec = decompose(loaded.visual, images, "all")
    for heads in ([HeadId(2, 1)], [HeadId(0, 3)], [HeadId(0, 0), HeadId(1, 2), HeadId(2, 3)]):
        real = direct_ablation_forward(loaded.visual, images, heads)
        eq5 = dec.embedding - sum(dec.heads[:, h.layer, h.head] for h in heads)
        assert _rel_error(real, eq5) <= bound
        assert _rel_error(real, dec.embedding) > 1e-4  # the ablation did change something


def test_hooks_and_weights_are_restored(tmp_path):
    loaded = _load(tmp_path, "restore", tiny_config(), "fp32")
    visual = loaded.visual
    before = {k: v.clone() for k, v in visual.state_dict().items()}
    images = torch.randn(2, 3, 32, 32)
    decompose(visual, images, "all")
    direct_ablation_forward(visual, images, [HeadId(1, 1)])
    with pytest.raises(RuntimeError):
        with heads_zeroed(visual, [HeadId(0, 0)]):
            raise RuntimeError("boom")
    for module in visual.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    for k, v in visual.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("extra,match", [
    (dict(pool_type="none"), "pools with 'none'"),
    (dict(qk_norm=True), "CustomResidualAttentionBlock"),
])
def test_unsupported_vits_are_refused(tmp_path, extra, match):
    loaded = _load(tmp_path, "bad-" + "-".join(extra), tiny_config(**extra), "fp32")
    with pytest.raises(UnsupportedModelError, match=match):
        decompose(loaded.visual, torch.randn(1, 3, 32, 32))


def test_resnet_tower_is_refused(tmp_path):
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1}}
    loaded = load_model(ModelSpec("tiny-rn", model_config=str(write_config(tmp_path, "tiny-rn", cfg))))
    with pytest.raises(UnsupportedModelError, match="ModifiedResNet"):
        decompose(loaded.visual, torch.randn(1, 3, 32, 32))


def test_resolve_layers():
    assert resolve_layers(12, 4) == (8, 9, 10, 11)
    assert resolve_layers(3, 10) == (0, 1, 2)
    assert resolve_layers(5, "all") == (0, 1, 2, 3, 4)
    assert resolve_layers(5, "2") == (3, 4)
    assert resolve_layers(5, [4, 1]) == (1, 4)
    with pytest.raises(ValueError):
        resolve_layers(5, 0)
    with pytest.raises(ValueError):
        resolve_layers(5, [7])

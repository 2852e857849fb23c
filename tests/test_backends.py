"""Every vision-backend family on tiny random towers: the parts sum to ``encode_image`` (Eq. 4),
each head's part equals a frozen-stage forward pass of the real model with that head's values
zeroed (Eq. 5, hooks), Grad-CAM and the export go through the seam."""

from __future__ import annotations

import pytest
import torch

from refineclip_core.errors import RefineClipError, UnsupportedModelError
from refineclip_core.features.backends import backend_for, refusal
from refineclip_core.features.decomposition import HeadId, decompose, direct_ablation_forward, hook_modules

TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1}


def _register_tiny_timm() -> None:
    import timm
    from timm.models import register_model
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    if "rc_tiny_siglip" in timm.list_models("rc_tiny_*"):
        return

    def cfg(model):                             # what timm's factory would attach
        model.default_cfg = model.pretrained_cfg = {}
        return model

    def args(defaults: dict, kw: dict) -> dict:   # timm's factory also passes its pretrained_cfg keys
        return {**defaults, **{k: v for k, v in kw.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay",
                                                                         "cache_dir")}}

    @register_model
    def rc_tiny_siglip(pretrained=False, **kw):       # SigLIP: no class token, map pooling
        return cfg(VisionTransformer(**args(dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4,
                                           class_token=False, global_pool="map"), kw)))

    @register_model
    def rc_tiny_vit_reg(pretrained=False, **kw):      # class + 2 register tokens, layer scale, map pool
        return cfg(VisionTransformer(**args(dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4,
                                           reg_tokens=2, init_values=0.5, global_pool="map"), kw)))

    @register_model
    def rc_tiny_vit_avg(pretrained=False, **kw):      # average pooling, then fc_norm (a LayerNorm after the pool)
        return cfg(VisionTransformer(**args(dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4,
                                                 global_pool="avg", qk_norm=True), kw)))

    @register_model
    def rc_tiny_vit_rms(pretrained=False, **kw):      # timm test_vit4's layout: RMSNorm, 1 register, layer scale
        return cfg(VisionTransformer(**args(dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4,
                                                 class_token=False, reg_tokens=1, init_values=0.5,
                                                 norm_layer="rmsnorm", global_pool="map"), kw)))

    @register_model
    def rc_tiny_eva_rms(pretrained=False, **kw):      # Eva with RMSNorms, one of them inside the attention
        from timm.layers import RmsNorm

        return cfg(Eva(**args(dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4,
                                   scale_attn_inner=True, norm_layer=RmsNorm, use_rot_pos_emb=True,
                                   ref_feat_shape=(4, 4), global_pool="token"), kw)))

    @register_model
    def rc_tiny_eva_reg(pretrained=False, **kw):      # Eva: class + 2 registers, RoPE, average pooling
        return cfg(Eva(**args(dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4, num_reg_tokens=2,
                                   use_rot_pos_emb=True, ref_feat_shape=(4, 4), global_pool="avg"), kw)))

    @register_model
    def rc_tiny_eva02(pretrained=False, **kw):        # EVA-02 CLIP: RoPE, SwiGLU, inner LayerNorm, CLS
        return cfg(Eva(**args(dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4, qkv_fused=False,
                             mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True,
                             use_rot_pos_emb=True, ref_feat_shape=(4, 4), global_pool="token"), kw)))

    @register_model
    def rc_tiny_pe(pretrained=False, **kw):           # PE-Core: RoPE attention, pre-norm, map pooling
        return cfg(Eva(**args(dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4, global_pool="map",
                             attn_type="rope", use_pre_transformer_norm=True, use_rot_pos_emb=True,
                             ref_feat_shape=(4, 4), rope_grid_offset=1.0, rope_grid_indexing="xy",
                             attn_pool_num_heads=4, attn_pool_mlp_ratio=4.0, init_values=0.3), kw)))


_register_tiny_timm()

VIT = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "head_width": 16}
CONFIGS = {
    "clip-tok": {"embed_dim": 32, "vision_cfg": dict(VIT, ls_init_value=0.5)},
    "avg": {"embed_dim": 32, "vision_cfg": dict(VIT, pool_type="avg")},
    "clipa": {"embed_dim": 32, "vision_cfg": dict(VIT, pool_type="avg", final_ln_after_pool=True, no_ln_pre=True)},
    "coca": {"embed_dim": 32, "vision_cfg": dict(VIT, attentional_pool=True, attn_pooler_heads=4, attn_pooler_queries=5,
                                                  output_tokens=True)},
    "siglip": {"embed_dim": 48, "vision_cfg": {"image_size": 32, "timm_model_name": "rc_tiny_siglip",
                                               "timm_pool": "map", "timm_proj": "none"}},
    "vit-reg": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "timm_model_name": "rc_tiny_vit_reg",
                                                "timm_pool": "map", "timm_proj": "linear"}},
    "vit-avg": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "timm_model_name": "rc_tiny_vit_avg",
                                                "timm_pool": "avg", "timm_proj": "linear"}},
    "vit-rms": {"embed_dim": 48, "vision_cfg": {"image_size": 32, "timm_model_name": "rc_tiny_vit_rms",
                                                "timm_pool": "map", "timm_proj": "none"}},
    "eva-rms": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "timm_model_name": "rc_tiny_eva_rms",
                                                "timm_pool": "token", "timm_proj": None}},
    "eva-reg": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "timm_model_name": "rc_tiny_eva_reg",
                                                "timm_pool": "avg", "timm_proj": None}},
    "eva02": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "timm_model_name": "rc_tiny_eva02",
                                              "timm_pool": "token", "timm_proj": None}},
    "pe-core": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "timm_model_name": "rc_tiny_pe",
                                                "timm_pool": "map", "timm_proj": None}},
}


from open_clip.model import CLIP as CLIP_  # noqa: E402


def build(name: str, dtype=torch.float32) -> torch.nn.Module:
    from open_clip.coca_model import CoCa
    from open_clip.model import CLIP

    cfg = CONFIGS[name]
    torch.manual_seed(3)
    if name == "coca":
        model = CoCa(cfg["embed_dim"], {"width": 32, "heads": 4, "layers": 1, "context_length": 16},
                     TEXT, cfg["vision_cfg"])
    else:
        model = CLIP(cfg["embed_dim"], cfg["vision_cfg"], TEXT)
    model = model.to(dtype).eval()
    with torch.no_grad():  # move LayerNorm / bias / layer-scale parameters off their trivial init
        for p in model.visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@torch.no_grad()
def encode(model, images):
    return model.encode_image(images, normalize=False)


def _rel(a, b):
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parts_sum_to_encode_image(name, dtype, bound):
    model = build(name, dtype)
    images = torch.randn(3, 3, 32, 32, dtype=dtype, generator=torch.Generator().manual_seed(1))
    reference = encode(model, images)
    info = backend_for(model.visual).info
    for layers in ("all", 2):
        dec = decompose(model.visual, images, layers)
        assert _rel(dec.reconstruct(), reference) <= bound, (name, layers)
        assert dec.heads.shape[2:] == (info.n_heads, info.embed_dim)
        assert len(dec.remainder_names) == dec.remainders.shape[1]
    assert dec.heads.abs().sum() > 0
    backend = backend_for(model.visual)
    with torch.inference_mode():
        decompose_with = backend.decompose(images, (1, 2))
    per_image = backend.last_capture_bytes / images.shape[0]
    estimate = backend.capture_bytes_per_image((1, 2), images.element_size())
    assert per_image <= estimate <= 2 * per_image + 4 * info.n_heads * info.n_tokens ** 2 * images.element_size()
    assert _rel(decompose_with.reconstruct(), reference) <= bound


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_head_equals_a_frozen_forward_pass_with_the_head_zeroed(name):
    """Independent of the decomposition's formulas: the real model runs with one head's values
    zeroed, LayerNorm sigmas and pool attention frozen and later sub-layers reading clean inputs;
    the change of the embedding is that head's part, head by head."""
    model = build(name, torch.float64)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    dec = decompose(model.visual, images, "all")
    info = backend_for(model.visual).info
    for layer in range(info.n_layers):
        for head in range(info.n_heads):
            real = direct_ablation_forward(model.visual, images, [HeadId(layer, head)])
            change = dec.embedding - real
            part = dec.heads[:, layer, head]
            assert float((change - part).norm() / dec.embedding.norm()) < 1e-10, (name, layer, head)
            assert float(part.norm()) > 1e-6
    several = [HeadId(0, 1), HeadId(2, 0), HeadId(2, 3)]
    real = direct_ablation_forward(model.visual, images, several)
    assert _rel(real, dec.embedding - sum(dec.heads[:, h.layer, h.head] for h in several)) < 1e-10
    for module in model.visual.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hook_points_are_the_models_modules(name):
    model = build(name)
    mine = {id(m) for m in model.visual.modules()}
    points = hook_modules(model.visual, 1)
    assert {"embed", "blocks.1.ln_1", "blocks.1.attn_out", "blocks.1.ln_2", "blocks.1.mlp_out"} <= set(points)
    assert all(id(m) in mine for m in points.values())


def test_facts_of_token_layouts():
    assert backend_for(build("siglip").visual).info.n_prefix_tokens == 0
    reg = backend_for(build("vit-reg").visual).info
    assert reg.n_prefix_tokens == 3 and reg.n_tokens == 16 + 3 and reg.grid == (4, 4)
    assert backend_for(build("clipa").visual).info.pool == "avg+ln"


def test_a_trunk_that_resizes_counts_the_tokens_it_is_fed():
    """The SigLIP-shaped demo's ``test_vit`` trunk is built for 160 px (timm's default) and fed 96 px
    (``dynamic_img_size``): the facts, and so Grad-CAM's token grid, follow the input, as a forward shows."""
    from refineclip_core.demo.siglip import siglip_model_config
    from refineclip_core.inspection.gradcam import gradcam_maps

    cfg = siglip_model_config()
    torch.manual_seed(0)
    model = CLIP_(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], init_logit_bias=-2.0).eval()
    info = backend_for(model.visual).info
    seen = []
    model.visual.trunk.blocks[0].register_forward_hook(lambda _m, _i, out: seen.append(out.shape[1]))
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    model.encode_image(images)
    assert info.n_tokens == seen[0] == 6 * 6 + 1 and info.grid == (6, 6)

    class Loaded:
        visual, device, dtype, logit_scale = model.visual, torch.device("cpu"), torch.float32, 10.0

    maps = gradcam_maps(Loaded, images, [0, 1], torch.randn(3, info.embed_dim).numpy())
    assert maps.shape == (2, 96, 96) and maps.max() > 0


@pytest.mark.parametrize("name", ["siglip", "vit-reg", "pe-core", "coca"])
def test_gradcam_through_the_seam(name):
    from refineclip_core.inspection.gradcam import gradcam_maps

    model = build(name)
    info = backend_for(model.visual).info

    class Loaded:
        visual, device, dtype, logit_scale = model.visual, torch.device("cpu"), torch.float32, 10.0

    text = torch.randn(3, info.embed_dim).numpy()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    whole = gradcam_maps(Loaded, images, 1, text)
    heads = gradcam_maps(Loaded, images, [0, 2], text, heads=[HeadId(2, 1), HeadId(1, 0)])
    assert whole.shape == heads.shape == (2, 32, 32)
    assert whole.max() > 0 and heads.max() > 0


@pytest.mark.parametrize("name,key", [("pe-core", "visual.trunk.head.weight"), ("eva02", "visual.trunk.head.weight"),
                                      ("vit-reg", "visual.head.proj.weight"), ("clipa", "visual.proj"),
                                      ("coca", "visual.proj")])
def test_export_merges_into_the_last_linear_layer(tmp_path, name, key):
    """The exported state dict, loaded into a fresh model of the same config (plain open_clip
    classes), reproduces the edited embedding M E."""
    import numpy as np

    from refineclip_core.edit.export import export_checkpoint
    from refineclip_core.edit.paper import RefinedMap

    model = build(name)
    d = backend_for(model.visual).info.embed_dim
    rng = np.random.default_rng(0)
    edit = RefinedMap("full", matrix=np.eye(d) + 0.1 * rng.standard_normal((d, d)))
    out = export_checkpoint(None, model, edit, tmp_path / "edited.safetensors")
    from safetensors.torch import load_file

    state = load_file(out)
    fresh = build(name)
    fresh.load_state_dict(state)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = encode(model, images).double() @ torch.from_numpy(edit.matrix).T
        got = encode(fresh, images).double()
    assert _rel(got, expected) < 1e-5
    changed = [k for k in state if not torch.equal(state[k], model.state_dict()[k])]
    assert set(changed) <= {key, key.replace(".weight", ".bias")} and key in changed


def test_export_of_a_tower_ending_in_the_pool_mlp_adds_a_projection(tmp_path):
    """SigLIP's embedding ends in the map pool's MLP residual: no layer merges the edit exactly, so
    the export adds a bias-free projection (config beside the weights) and plain open_clip loads
    the pair and reproduces M E; without the config the export is refused in one sentence."""
    import json

    import numpy as np
    import open_clip

    from refineclip_core.edit.export import export_checkpoint
    from refineclip_core.edit.paper import RefinedMap

    model = build("siglip")
    rng = np.random.default_rng(1)
    edit = RefinedMap("full", matrix=np.eye(48) + 0.1 * rng.standard_normal((48, 48)))
    with pytest.raises(RefineClipError, match="cannot be merged exactly"):
        export_checkpoint(None, model, edit, tmp_path / "x.safetensors")
    config = {**CONFIGS["siglip"], "text_cfg": TEXT}
    out = export_checkpoint(None, model, edit, tmp_path / "rcfam-siglip-edited.safetensors", config=config)
    written = json.loads(out.with_suffix(".json").read_text())
    assert written["vision_cfg"]["timm_proj"] == "linear" and written["vision_cfg"]["timm_proj_bias"] is False
    open_clip.add_model_config(str(out.with_suffix(".json")))
    fresh = open_clip.create_model("rcfam-siglip-edited", pretrained=str(out)).eval()
    images = torch.randn(2, 3, 32, 32)
    expected = encode(model, images).double() @ torch.from_numpy(edit.matrix).T
    assert _rel(encode(fresh, images).double(), expected) < 1e-5
    assert backend_for(fresh.visual).merge_target()[0] == "visual.head.proj.weight"
    from refineclip_core.edit.export import merged_into

    assert merged_into(model, config) == "visual.head.proj.weight, added after the pool (every other weight unchanged)"
    assert merged_into(build("clip-tok")) == "visual.proj" and merged_into(fresh) == "visual.head.proj.weight"
    assert merged_into(build("pe-core")) == "visual.trunk.head.weight + visual.trunk.head.bias"


def test_refusal_from_configs_and_models():
    assert refusal(CONFIGS["clipa"]) is None and refusal(CONFIGS["siglip"]) is None
    assert refusal(build("pe-core")) is None
    resnet = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16}}
    reason = refusal(resnet)
    assert reason is not None and "ModifiedResNet" in reason and reason.count(". ") == 0
    convnext = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "timm_model_name": "convnext_atto",
                                                "timm_pool": "avg", "timm_proj": "linear"}}
    assert "ConvNeXt" in refusal(convnext)
    with pytest.raises(UnsupportedModelError):
        backend_for(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("name", ["siglip", "pe-core"])
def test_extraction_scores_and_real_ablation_on_all_token_pools(tmp_path, image_folder, name, monkeypatch):
    """The whole cached workflow on towers that pool over every token: extraction through the seam,
    the cache's sum of parts against encode_image, DE scores on the cached parts, and the cached
    ablation against the real model's (method/verification.py)."""
    import numpy as np

    from refineclip_core.features.extraction import ExtractionConfig, check_decomposition, extract
    from refineclip_core.loading.data import load_dataset
    from refineclip_core.loading.models import ModelSpec, load_model
    from refineclip_core.method.ablation import AblationEngine
    from refineclip_core.method.verification import verify_on_images

    from .conftest import write_config

    tag = f"rcfam{list(CONFIGS).index(name)}"   # a name open_clip does not map to a SigLIP tokenizer (hub)
    path = write_config(tmp_path, tag, {**CONFIGS[name], "text_cfg": TEXT})
    loaded = load_model(ModelSpec(tag, model_config=str(path)))
    cache = extract(loaded, load_dataset(image_folder), tmp_path / "cache", ExtractionConfig(layers=2, batch_size=6))
    assert cache.manifest.remainder_names[0] == "resid_pre.1" and "pool_mlp" in cache.manifest.remainder_names
    assert check_decomposition(loaded, cache)["max_rel_error"] < 1e-5
    engine = AblationEngine(cache.embeddings, cache.heads, cache.text, cache.manifest.layers)
    heads = [HeadId(2, 1), HeadId(1, 3)]
    for mode in ("zero", "mean"):
        result = verify_on_images(loaded, cache.records, engine, list(range(6)), heads, mode=mode)
        assert result.n_images == 6 and result.max_rel_error < 1e-5 and result.predictions_agree
    assert np.isfinite(engine.embeddings(heads, "zero", np.arange(len(cache)))).all()
    monkeypatch.setenv("REFINECLIP_MEMORY_BUDGET", "100kB")   # below what 6 images' captures hold
    with pytest.raises(RefineClipError, match="over the memory budget"):
        extract(loaded, load_dataset(image_folder), tmp_path / "cache2", ExtractionConfig(layers=2, batch_size=6))

"""transformers ``SiglipModel`` / ``Siglip2Model`` ⇄ open_clip, exactly (both ways).

The open_clip side is what open_clip builds for its own SigLIP configs: a ``CustomTextCLIP``
whose image tower is a timm ``VisionTransformer`` (no class token, attention-map pooling:
``timm_pool: map``, no projection: ``timm_proj: none``) and whose text tower is open_clip's
``TextTransformer`` without a causal mask, pooled at the last position and projected with a bias.

==========================================================  ====================================================
transformers                                                open_clip (``visual.trunk.`` / ``text.``)
==========================================================  ====================================================
``vision_model.embeddings.patch_embedding``                 ``patch_embed.proj`` (SigLIP 2: a Linear over
                                                            (row, column, channel)-flattened patches → Conv2d)
``vision_model.embeddings.position_embedding.weight``       ``pos_embed`` (1 × patches × width)
``…encoder.layers.i.self_attn.{q,k,v}_proj``                ``blocks.i.attn.qkv`` (q;k;v)
``…encoder.layers.i.self_attn.out_proj``                    ``blocks.i.attn.proj``
``…encoder.layers.i.layer_norm1`` / ``layer_norm2``         ``blocks.i.norm1`` / ``norm2``
``…encoder.layers.i.mlp.fc1`` / ``fc2``                     ``blocks.i.mlp.fc1`` / ``fc2``
``vision_model.post_layernorm``                             ``norm``
``vision_model.head.probe``                                 ``attn_pool.latent``
``vision_model.head.attention.in_proj_{weight,bias}``       ``attn_pool.q`` (first third), ``attn_pool.kv`` (rest)
``vision_model.head.attention.out_proj``                    ``attn_pool.proj``
``vision_model.head.layernorm`` / ``mlp.fc1`` / ``fc2``     ``attn_pool.norm`` / ``mlp.fc1`` / ``fc2``
``text_model.embeddings.token_embedding`` / ``position…``   ``text.token_embedding`` / ``text.positional_embedding``
``text_model.encoder.layers.i.…``                           ``text.transformer.resblocks.i.…`` (as for CLIP)
``text_model.final_layer_norm`` / ``head``                  ``text.ln_final`` / ``text.text_projection``
``logit_scale`` / ``logit_bias`` (shape 1)                  ``logit_scale`` / ``logit_bias`` (scalars)
==========================================================  ====================================================

open_clip passes no size arguments to timm, so the image tower's timm architecture is registered
under a name derived from its arguments (:func:`timm_trunk`: width, depth, heads, MLP width,
patch and image size, activation, layer-norm eps; ``gelu_pytorch_tanh`` is timm's ``gelu_tanh``),
in this process only. The prompts are tokenised by the tokenizer saved in the folder itself
(``text_cfg.hf_tokenizer_name`` is the folder; ``AutoTokenizer`` loads it as transformers does,
padding on the side its class or ``tokenizer_config.json`` says), after open_clip's SigLIP text
cleaning (``canonicalize``); every prompt is padded to the context length, and the text tower
reads the last position.

SigLIP 2 checkpoints are NaFlex models (any number of patches; the position embeddings resized to
each image's grid). Converted, the model runs at one resolution: the checkpoint's own grid
(``sqrt(num_patches)`` patches a side), where the resize is the identity; other resolutions are
not offered.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any, Mapping

import torch

from ...errors import CheckpointError, RefineClipError
from .convert import ACTIVATIONS, BUFFERS, _mlp_ratio, _transformers, resblock_pairs

SIGLIP_TYPES = ("siglip", "siglip2")

#: transformers activation → timm ``act_layer`` name computing the same function.
TIMM_ACTIVATIONS = {"gelu": "gelu", "gelu_python": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                    "gelu_python_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "quick_gelu": "quick_gelu"}

TRUNK_PREFIX = "refineclip_siglip_"


def is_siglip(raw: Mapping[str, Any]) -> bool:
    """Whether a ``config.json`` is a transformers SigLIP or SigLIP 2 (both towers)."""
    return raw.get("model_type") in SIGLIP_TYPES


def _config(raw: Mapping[str, Any], source: str):
    transformers = _transformers()
    cls = transformers.SiglipConfig if raw.get("model_type") == "siglip" else transformers.Siglip2Config
    try:
        return cls.from_dict(dict(raw))
    except Exception as exc:  # transformers validates configs with its own error types
        reason = " ".join(str(exc).split())
        raise CheckpointError(f"'{source}' is not a valid transformers {cls.__name__} ({reason}).") from exc


def _positive_int(value: Any, what: str, source: str) -> int:
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CheckpointError(f"'{source}': vision_config.{what} is {value!r}; only one positive integer is supported.")
    return value


def _grid(cfg: Any, source: str) -> tuple[int, int]:
    """(image size, patch size) of the converted model's fixed resolution."""
    v = cfg.vision_config
    patch = _positive_int(v.patch_size, "patch_size", source)
    if cfg.model_type == "siglip":
        return _positive_int(v.image_size, "image_size", source), patch
    side = math.isqrt(int(v.num_patches))
    if side * side != v.num_patches:
        raise CheckpointError(f"'{source}': vision_config.num_patches is {v.num_patches}, not a square grid, so this "
                              "SigLIP 2 (NaFlex) model has no fixed resolution open_clip can run it at.")
    return side * patch, patch


def trunk_arguments(raw: Mapping[str, Any], source: str = "config.json") -> dict[str, Any]:
    """The timm ``VisionTransformer`` arguments (JSON values) of a SigLIP config's image tower."""
    cfg = _config(raw, source)
    v = cfg.vision_config
    if not getattr(v, "vision_use_head", True):
        raise CheckpointError(f"'{source}': the vision tower has no attention-pooling head (vision_use_head false), so "
                              "its image embedding is not defined the way open_clip's SigLIP computes it.")
    if v.num_channels != 3:
        raise CheckpointError(f"'{source}': the vision tower takes {v.num_channels} channels; RefineCLIP needs RGB (3).")
    if v.hidden_act not in TIMM_ACTIVATIONS:
        raise CheckpointError(f"'{source}': the vision tower uses the activation '{v.hidden_act}', which timm's "
                              f"blocks cannot compute exactly (supported: {', '.join(TIMM_ACTIVATIONS)}).")
    image, patch = _grid(cfg, source)
    if image % patch:
        raise CheckpointError(f"'{source}': image size {image} is not a multiple of the patch size {patch}.")
    return {"img_size": image, "patch_size": patch, "embed_dim": v.hidden_size, "depth": v.num_hidden_layers,
            "num_heads": v.num_attention_heads, "mlp_ratio": _mlp_ratio(v.hidden_size, v.intermediate_size),
            "act_layer": TIMM_ACTIVATIONS[v.hidden_act], "norm_eps": float(v.layer_norm_eps)}


def timm_trunk(args: Mapping[str, Any]) -> str:
    """Register (once per process) and return the timm model name building a SigLIP image tower with
    ``args`` (:func:`trunk_arguments`); the name is derived from the arguments, so equal towers share it."""
    import timm
    from functools import partial
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    digest = hashlib.sha256(json.dumps(dict(args), sort_keys=True).encode()).hexdigest()[:16]
    name = f"{TRUNK_PREFIX}{digest}"
    if timm.is_model(name):
        return name
    fixed = {k: v for k, v in args.items() if k != "norm_eps"}

    def build(pretrained: bool = False, **kwargs):
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        return VisionTransformer(**{**fixed, "class_token": False, "global_pool": "map", "qkv_bias": True,
                                    "norm_layer": partial(torch.nn.LayerNorm, eps=args["norm_eps"]), **kwargs})

    build.__name__ = build.__qualname__ = name
    build.__module__ = __name__
    register_model(build)
    return name


def open_clip_config(raw: Mapping[str, Any], source: str = "config.json", tokenizer: str | None = None) -> dict:
    """The open_clip model config that computes what the transformers SigLIP config ``raw`` does;
    ``tokenizer``: the folder holding the model's tokenizer files."""
    cfg = _config(raw, source)
    t, v = cfg.text_config, cfg.vision_config
    vision_args = trunk_arguments(raw, source)
    if t.hidden_act not in ACTIVATIONS:
        raise CheckpointError(f"'{source}': the text tower uses the activation '{t.hidden_act}', which open_clip's "
                              f"blocks cannot compute exactly (supported: {', '.join(ACTIVATIONS)}).")
    embed_dim = getattr(t, "projection_size", None) or t.hidden_size
    if embed_dim != v.hidden_size:
        raise CheckpointError(f"'{source}': the text tower projects to {embed_dim} dimensions but the image tower, "
                              f"which has no projection, embeds in {v.hidden_size}; the towers cannot be compared.")
    quick, act = ACTIVATIONS[t.hidden_act]
    text: dict[str, Any] = {
        "context_length": t.max_position_embeddings, "vocab_size": t.vocab_size, "width": t.hidden_size,
        "heads": t.num_attention_heads, "layers": t.num_hidden_layers,
        "mlp_ratio": _mlp_ratio(t.hidden_size, t.intermediate_size), "no_causal_mask": True, "proj_bias": True,
        "pool_type": "last", "norm_kwargs": {"eps": float(t.layer_norm_eps)},
        "tokenizer_kwargs": {"clean": "canonicalize"},
    }
    if act:
        text["act_kwargs"] = act
    if tokenizer:
        text["hf_tokenizer_name"] = tokenizer
    return {"embed_dim": embed_dim, "quick_gelu": quick, "init_logit_bias": -10.0, "custom_text": True,
            "vision_cfg": {"image_size": vision_args["img_size"], "timm_model_name": timm_trunk(vision_args),
                           "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"},
            "text_cfg": text}


def _count(state: Mapping[str, Any], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _pairs(n_vision: int, n_text: int, linear_patches: bool) -> list[tuple[str, str, str]]:
    """``(open_clip key, transformers key, how)``; ``how``: ``same``, ``qkv`` (``{}`` = q, k, v),
    ``q``/``kv`` (split of a fused in-projection), ``scalar``, ``probe`` or ``patch`` (SigLIP 2 Linear)."""
    v, h = "visual.trunk.", "vision_model."
    pairs = [
        (f"{v}patch_embed.proj.weight", f"{h}embeddings.patch_embedding.weight", "patch" if linear_patches else "same"),
        (f"{v}patch_embed.proj.bias", f"{h}embeddings.patch_embedding.bias", "same"),
        (f"{v}pos_embed", f"{h}embeddings.position_embedding.weight", "probe"),
        (f"{v}attn_pool.latent", f"{h}head.probe", "same"),
        ("text.token_embedding.weight", "text_model.embeddings.token_embedding.weight", "same"),
        ("text.positional_embedding", "text_model.embeddings.position_embedding.weight", "same"),
        ("logit_scale", "logit_scale", "scalar"), ("logit_bias", "logit_bias", "scalar"),
    ]
    for p in ("weight", "bias"):
        pairs += [(f"{v}norm.{p}", f"{h}post_layernorm.{p}", "same"),
                  (f"{v}attn_pool.q.{p}", f"{h}head.attention.in_proj_{p}", "q"),
                  (f"{v}attn_pool.kv.{p}", f"{h}head.attention.in_proj_{p}", "kv"),
                  (f"{v}attn_pool.proj.{p}", f"{h}head.attention.out_proj.{p}", "same"),
                  (f"{v}attn_pool.norm.{p}", f"{h}head.layernorm.{p}", "same"),
                  (f"{v}attn_pool.mlp.fc1.{p}", f"{h}head.mlp.fc1.{p}", "same"),
                  (f"{v}attn_pool.mlp.fc2.{p}", f"{h}head.mlp.fc2.{p}", "same"),
                  (f"text.ln_final.{p}", f"text_model.final_layer_norm.{p}", "same"),
                  (f"text.text_projection.{p}", f"text_model.head.{p}", "same")]
        for i in range(n_vision):
            o, t = f"{v}blocks.{i}.", f"{h}encoder.layers.{i}."
            pairs += [(f"{o}norm1.{p}", f"{t}layer_norm1.{p}", "same"),
                      (f"{o}attn.qkv.{p}", f"{t}self_attn.{{}}_proj.{p}", "qkv"),
                      (f"{o}attn.proj.{p}", f"{t}self_attn.out_proj.{p}", "same"),
                      (f"{o}norm2.{p}", f"{t}layer_norm2.{p}", "same"),
                      (f"{o}mlp.fc1.{p}", f"{t}mlp.fc1.{p}", "same"),
                      (f"{o}mlp.fc2.{p}", f"{t}mlp.fc2.{p}", "same")]
        for i in range(n_text):
            o, t = f"text.transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
            pairs += resblock_pairs(o, t, p)
    return pairs


def hf_to_open_clip(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename a transformers SiglipModel / Siglip2Model state dict to open_clip's names."""
    n_vision, n_text = _count(state, "vision_model.encoder.layers."), _count(state, "text_model.encoder.layers.")
    patch = state.get("vision_model.embeddings.patch_embedding.weight")
    linear = patch is not None and patch.ndim == 2
    pairs = _pairs(n_vision, n_text, linear)
    expected = {h.format(x) for _, h, how in pairs for x in (("q", "k", "v") if how == "qkv" else ("_",))}
    extra = sorted(set(state) - expected - set(BUFFERS))
    if extra:
        raise CheckpointError(f"'{source}' has {len(extra)} weights a transformers SigLIP model does not (e.g. "
                              f"'{extra[0]}'); it is another architecture.")
    out: dict[str, torch.Tensor] = {}
    try:
        for oc, hf, how in pairs:
            if how == "qkv":
                out[oc] = torch.cat([state[hf.format(x)] for x in ("q", "k", "v")])
                continue
            tensor = state[hf]
            if how == "q":
                tensor = tensor[: tensor.shape[0] // 3]
            elif how == "kv":
                tensor = tensor[tensor.shape[0] // 3:]
            elif how == "scalar":
                tensor = tensor.reshape(())
            elif how == "probe":
                tensor = tensor.unsqueeze(0)
            elif how == "patch":
                d, side = tensor.shape[0], math.isqrt(tensor.shape[1] // 3)
                tensor = tensor.reshape(d, side, side, 3).permute(0, 3, 1, 2)
            out[oc] = tensor.contiguous()
    except KeyError as exc:
        raise CheckpointError(f"'{source}' lacks the weight {exc}, which a transformers SigLIP model has.") from None
    return out


def open_clip_to_hf(state: Mapping[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """The inverse of :func:`hf_to_open_clip` (``model_type``: ``siglip`` or ``siglip2``)."""
    n_vision, n_text = _count(state, "visual.trunk.blocks."), _count(state, "text.transformer.resblocks.")
    out: dict[str, torch.Tensor] = {}
    try:
        for oc, hf, how in _pairs(n_vision, n_text, model_type == "siglip2"):
            tensor = state[oc]
            if how == "qkv":
                for x, part in zip(("q", "k", "v"), tensor.chunk(3)):
                    out[hf.format(x)] = part.contiguous()
            elif how in ("q", "kv"):
                q, kv = (state[oc.replace(".kv.", ".q.")], tensor) if how == "kv" else (tensor, None)
                if how == "kv":
                    out[hf] = torch.cat([q, kv]).contiguous()
            elif how == "scalar":
                out[hf] = tensor.reshape(1).contiguous()
            elif how == "probe":
                out[hf] = tensor.squeeze(0).contiguous()
            elif how == "patch":
                out[hf] = tensor.permute(0, 2, 3, 1).reshape(tensor.shape[0], -1).contiguous()
            else:
                out[hf] = tensor.contiguous()
    except KeyError as exc:
        raise RefineClipError(f"The weights lack {exc}, which a transformers SigLIP model needs; export them in "
                              "open_clip format instead.") from None
    return out

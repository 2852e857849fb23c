"""transformers CLIP ⇄ open_clip: the config that computes the same functions and the renamed weights (both ways)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import torch

from ...errors import CheckpointError, RefineClipError
from .folder import HFCheckpoint, _read_json


CLIP_VOCAB_SIZE = 49408  # CLIP's byte-pair vocabulary: what open_clip's SimpleTokenizer emits


CLIP_EOT_ID = 49407      # <end_of_text>, the highest id of that vocabulary


LEGACY_EOS_ID = 2        # transformers' marker for "pool at input_ids.argmax()" (old configs)


#: HF activation name → (open_clip quick_gelu flag, act_kwargs). Same function in both libraries.
ACTIVATIONS: dict[str, tuple[bool, dict | None]] = {
    "quick_gelu": (True, None),
    "gelu": (False, None),
    "gelu_python": (False, None),
    "gelu_pytorch_tanh": (False, {"approximate": "tanh"}),
    "gelu_python_tanh": (False, {"approximate": "tanh"}),
    "gelu_new": (False, {"approximate": "tanh"}),
}


#: PIL resampling codes in ``preprocessor_config.json`` → open_clip interpolation names.
_RESAMPLE = {2: "bilinear", 3: "bicubic", "bilinear": "bilinear", "bicubic": "bicubic"}


@dataclass(frozen=True)
class ConvertedCLIP:
    """An HF checkpoint as open_clip needs it: a model config, a state dict, preprocessing."""

    label: str
    config: dict                 # open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``, ...)
    state_dict: dict[str, torch.Tensor]
    preprocess: dict = field(default_factory=dict)  # open_clip PreprocessCfg overrides (mean, std, interpolation)


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise RefineClipError(
            "Hugging Face CLIP checkpoints need the optional 'transformers' package; install it with "
            "pip install 'refineclip-studio[hf]' (or pip install transformers).") from exc
    return transformers


def _clip_config(raw: Mapping[str, Any], source: str):
    """The raw ``config.json`` as a ``transformers.CLIPConfig`` (defaults and legacy keys resolved)."""
    model_type = raw.get("model_type")
    if model_type != "clip":
        kind = {"clip_vision_model": "a vision tower only", "clip_text_model": "a text tower only"}.get(
            str(model_type), f"model_type '{model_type}'")
        raise CheckpointError(
            f"'{source}' holds {kind}, not a transformers CLIPModel, SiglipModel or Siglip2Model (model_type 'clip', "
            "'siglip' or 'siglip2'); RefineCLIP needs both towers of one of them.")
    transformers = _transformers()
    try:
        return transformers.CLIPConfig.from_dict(dict(raw))
    except Exception as exc:  # transformers validates configs with its own error types
        reason = " ".join(str(exc).split())  # transformers' validation messages span several lines
        raise CheckpointError(f"'{source}' is not a valid transformers CLIP config ({reason}).") from exc


def _activation(tower: Any, which: str, source: str) -> tuple[bool, dict | None]:
    act = tower.hidden_act
    if act not in ACTIVATIONS:
        raise CheckpointError(
            f"'{source}': the {which} tower uses the activation '{act}', which open_clip's blocks cannot compute "
            f"exactly (supported: {', '.join(ACTIVATIONS)}).")
    return ACTIVATIONS[act]


def _eps(tower: Any, which: str, source: str) -> dict | None:
    eps = tower.layer_norm_eps
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise CheckpointError(f"'{source}': the {which} tower's layer_norm_eps is {eps!r}, not a positive number.")
    return None if float(eps) == 1e-5 else {"eps": float(eps)}  # 1e-5: nn.LayerNorm's default


def _mlp_ratio(hidden: int, intermediate: int) -> float:
    """A ratio with ``int(hidden * ratio) == intermediate`` (open_clip's mlp width rule)."""
    ratio = intermediate / hidden
    return ratio if int(hidden * ratio) == intermediate else (intermediate + 0.5) / hidden


def _square(value: Any, what: str, source: str) -> int:
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CheckpointError(f"'{source}': vision_config.{what} is {value!r}; only one positive integer is supported.")
    return value


def open_clip_config(raw: Mapping[str, Any], source: str = "config.json") -> dict:
    """The open_clip model config that computes what the transformers CLIP config ``raw`` does
    (SigLIP configs: :func:`.siglip.open_clip_config`).

    Raises :class:`CheckpointError` (one sentence) for what open_clip cannot express exactly.
    """
    if siglip.is_siglip(raw):
        return siglip.open_clip_config(raw, source)
    cfg = _clip_config(raw, source)
    v, t = cfg.vision_config, cfg.text_config
    (v_quick, v_act), (t_quick, t_act) = _activation(v, "vision", source), _activation(t, "text", source)
    if v_quick != t_quick:
        raise CheckpointError(
            f"'{source}': one tower uses quick_gelu and the other '{(t if v_quick else v).hidden_act}'; open_clip "
            "applies QuickGELU to both towers or to neither, so this model cannot be converted exactly.")
    if v.num_channels != 3:
        raise CheckpointError(f"'{source}': the vision tower takes {v.num_channels} channels; CLIP ViTs take RGB (3).")
    image, patch = _square(v.image_size, "image_size", source), _square(v.patch_size, "patch_size", source)
    if t.vocab_size < CLIP_VOCAB_SIZE:
        raise CheckpointError(
            f"'{source}': the text tower has {t.vocab_size} tokens, fewer than the {CLIP_VOCAB_SIZE} of CLIP's "
            "tokenizer that RefineCLIP encodes prompts with, so its vocabulary is another one.")
    eos = t.eos_token_id
    if eos == LEGACY_EOS_ID:
        pool = {"pool_type": "argmax"}
    elif eos == CLIP_EOT_ID:
        pool = {"pool_type": "eos", "eos_id": CLIP_EOT_ID}
    else:
        raise CheckpointError(
            f"'{source}': the text tower pools at token id {eos!r}, which CLIP's tokenizer (end of text = "
            f"{CLIP_EOT_ID}) never emits, so prompts would be read at the wrong position.")
    vision: dict[str, Any] = {
        "image_size": image, "patch_size": patch, "width": v.hidden_size, "layers": v.num_hidden_layers,
        "head_width": v.hidden_size // v.num_attention_heads, "mlp_ratio": _mlp_ratio(v.hidden_size, v.intermediate_size),
    }
    text: dict[str, Any] = {
        "context_length": t.max_position_embeddings, "vocab_size": t.vocab_size, "width": t.hidden_size,
        "heads": t.num_attention_heads, "layers": t.num_hidden_layers,
        "mlp_ratio": _mlp_ratio(t.hidden_size, t.intermediate_size), **pool,
    }
    for tower, act, norm in ((vision, v_act, _eps(v, "vision", source)), (text, t_act, _eps(t, "text", source))):
        if act:
            tower["act_kwargs"] = act
        if norm:
            tower["norm_kwargs"] = norm
    return {"embed_dim": cfg.projection_dim, "quick_gelu": v_quick, "vision_cfg": vision, "text_cfg": text}


def _key_pairs(n_vision: int, n_text: int) -> list[tuple[str, str, str]]:
    """``(open_clip key, transformers key, how)`` for every weight; ``how``: ``same``, ``T``
    (transposed) or ``qkv`` (the transformers key has ``{}`` for q, k, v; concatenated)."""
    pairs = [
        ("visual.class_embedding", "vision_model.embeddings.class_embedding", "same"),
        ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight", "same"),
        ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight", "same"),
        ("visual.proj", "visual_projection.weight", "T"),
        ("token_embedding.weight", "text_model.embeddings.token_embedding.weight", "same"),
        ("positional_embedding", "text_model.embeddings.position_embedding.weight", "same"),
        ("text_projection", "text_projection.weight", "T"),
        ("logit_scale", "logit_scale", "same"),
    ]
    for oc, hf in (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
                   ("ln_final", "text_model.final_layer_norm")):
        pairs += [(f"{oc}.{p}", f"{hf}.{p}", "same") for p in ("weight", "bias")]
    for oc_tower, hf_tower, n in (("visual.transformer", "vision_model.encoder", n_vision),
                                  ("transformer", "text_model.encoder", n_text)):
        for i in range(n):
            o, h = f"{oc_tower}.resblocks.{i}.", f"{hf_tower}.layers.{i}."
            for p in ("weight", "bias"):
                pairs += resblock_pairs(o, h, p)
    return pairs


def resblock_pairs(o: str, h: str, p: str) -> list[tuple[str, str, str]]:
    """One open_clip ``ResidualAttentionBlock`` (prefix ``o``) against one transformers encoder layer
    (prefix ``h``), for parameter ``p`` (weight or bias): (open_clip key, transformers key, how)."""
    return [(f"{o}ln_1.{p}", f"{h}layer_norm1.{p}", "same"),
            (f"{o}attn.in_proj_{p}", f"{h}self_attn.{{}}_proj.{p}", "qkv"),
            (f"{o}attn.out_proj.{p}", f"{h}self_attn.out_proj.{p}", "same"),
            (f"{o}ln_2.{p}", f"{h}layer_norm2.{p}", "same"),
            (f"{o}mlp.c_fc.{p}", f"{h}mlp.fc1.{p}", "same"),
            (f"{o}mlp.c_proj.{p}", f"{h}mlp.fc2.{p}", "same")]


#: transformers keys that hold no weights (older checkpoints saved the position-id buffers).
BUFFERS = ("vision_model.embeddings.position_ids", "text_model.embeddings.position_ids")


def hf_to_open_clip(state: Mapping[str, torch.Tensor], n_vision: int, n_text: int,
                    source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename (and fuse q/k/v, transpose projections of) a transformers CLIPModel state dict."""
    extra = sorted(set(state) - {h.format(x) for _, h, how in _key_pairs(n_vision, n_text)
                                 for x in ("qkv" if how == "qkv" else "_")} - set(BUFFERS))
    biases = [k for k in extra if k in ("visual_projection.bias", "text_projection.bias")]
    if biases:
        raise CheckpointError(
            f"'{source}' has a bias on its projection ('{biases[0]}'), which CLIPModel and open_clip's CLIP do not "
            "have; the decomposition and the edit assume a bias-free visual.proj, so it is refused.")
    if extra:
        raise CheckpointError(
            f"'{source}' has {len(extra)} weights a transformers CLIPModel does not (e.g. "
            f"{', '.join(repr(k) for k in extra[:3])}); it is another architecture.")
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for oc, hf, how in _key_pairs(n_vision, n_text):
        names = [hf.format(x) for x in "qkv"] if how == "qkv" else [hf]
        if any(n not in state for n in names):
            missing += [n for n in names if n not in state]
            continue
        if how == "qkv":
            out[oc] = torch.cat([state[n] for n in names], dim=0)
        elif how == "T":
            out[oc] = state[hf].T.contiguous()
        else:
            out[oc] = state[hf]
    if missing:
        raise CheckpointError(
            f"'{source}' lacks {len(missing)} weights its config.json implies (e.g. "
            f"{', '.join(repr(k) for k in missing[:3])}); the weights and the config do not belong together.")
    return out


def open_clip_to_hf(state: Mapping[str, torch.Tensor], n_vision: int, n_text: int) -> dict[str, torch.Tensor]:
    """The inverse of :func:`hf_to_open_clip` (q/k/v split, projections transposed back)."""
    out: dict[str, torch.Tensor] = {}
    for oc, hf, how in _key_pairs(n_vision, n_text):
        tensor = state[oc]
        if how == "qkv":
            for x, part in zip("qkv", tensor.chunk(3, dim=0)):
                out[hf.format(x)] = part.contiguous()
        elif how == "T":
            out[hf] = tensor.T.contiguous()
        else:
            out[hf] = tensor.contiguous()
    return out


def _read_weights(ckpt: HFCheckpoint) -> dict[str, torch.Tensor]:
    from ..checkpoints import read_state_dict

    state: dict[str, torch.Tensor] = {}
    for path in ckpt.weights:
        state.update(read_state_dict(path))
    return state


def _preprocess(ckpt: HFCheckpoint) -> dict:
    """Normalisation and interpolation from ``preprocessor_config.json`` (when present)."""
    if ckpt.preprocessor is None:
        return {}
    raw = _read_json(ckpt.preprocessor)
    out: dict[str, Any] = {}
    if not isinstance(raw, dict):
        return out
    for key, ours in (("image_mean", "mean"), ("image_std", "std")):
        value = raw.get(key)
        if isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(x, (int, float)) for x in value):
            out[ours] = tuple(float(x) for x in value)
    if raw.get("resample") in _RESAMPLE:
        out["interpolation"] = _RESAMPLE[raw["resample"]]
    return out


def read_hf_config(ckpt: HFCheckpoint) -> ConvertedCLIP:
    """The open_clip config and preprocessing of a transformers CLIP checkpoint, without its weights
    (so a model's size can be checked before anything large is read; ``state_dict`` is empty)."""
    raw = _read_json(ckpt.config)
    if not isinstance(raw, dict):
        raise CheckpointError(f"'{ckpt.config}' is not a transformers config (a JSON object).")
    if siglip.is_siglip(raw):  # prompts are tokenised by the folder's own tokenizer; SigLIP squashes images
        config = siglip.open_clip_config(raw, str(ckpt.config), tokenizer=str(ckpt.folder.resolve()))
        return ConvertedCLIP(label=ckpt.label, config=config, state_dict={},
                             preprocess={**_preprocess(ckpt), "resize_mode": "squash"})
    return ConvertedCLIP(label=ckpt.label, config=open_clip_config(raw, str(ckpt.config)), state_dict={},
                         preprocess=_preprocess(ckpt))


def read_hf_state_dict(ckpt: HFCheckpoint, converted: ConvertedCLIP) -> dict[str, torch.Tensor]:
    """The checkpoint's weights under open_clip's names (for the config :func:`read_hf_config` gave)."""
    config = converted.config
    if config["vision_cfg"].get("timm_model_name"):  # only SigLIP folders convert to a timm image tower
        return siglip.hf_to_open_clip(_read_weights(ckpt), str(ckpt.folder))
    return hf_to_open_clip(_read_weights(ckpt), config["vision_cfg"]["layers"], config["text_cfg"]["layers"],
                           str(ckpt.folder))


def read_hf_checkpoint(ckpt: HFCheckpoint) -> ConvertedCLIP:
    """Convert a transformers CLIP checkpoint into an open_clip config and state dict."""
    converted = read_hf_config(ckpt)
    return replace(converted, state_dict=read_hf_state_dict(ckpt, converted))


from . import siglip  # noqa: E402  (siglip reuses this module's helpers)

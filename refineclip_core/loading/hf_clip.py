"""Hugging Face ``transformers`` CLIP checkpoints, read as open_clip models and written back, exactly.

Reading (:func:`find_hf_checkpoint`, :func:`read_hf_checkpoint`). A ``CLIPModel.save_pretrained``
folder (``config.json`` + ``model.safetensors``, sharded safetensors or ``pytorch_model.bin``), or
one of its weight files with ``config.json`` beside it, becomes the open_clip model that computes
the same functions: the open_clip config is built from the HF config and the weights are renamed.

=====================================================  ==============================================
transformers ``CLIPModel``                             open_clip ``CLIP``
=====================================================  ==============================================
``vision_model.embeddings.class_embedding``            ``visual.class_embedding``
``vision_model.embeddings.patch_embedding.weight``     ``visual.conv1.weight``
``vision_model.embeddings.position_embedding.weight``  ``visual.positional_embedding``
``vision_model.pre_layrnorm`` / ``post_layernorm``     ``visual.ln_pre`` / ``visual.ln_post``
``…encoder.layers.i.self_attn.{q,k,v}_proj``           ``…resblocks.i.attn.in_proj_{weight,bias}`` (q;k;v)
``…encoder.layers.i.self_attn.out_proj``               ``…resblocks.i.attn.out_proj``
``…encoder.layers.i.layer_norm1`` / ``layer_norm2``    ``…resblocks.i.ln_1`` / ``ln_2``
``…encoder.layers.i.mlp.fc1`` / ``fc2``                ``…resblocks.i.mlp.c_fc`` / ``c_proj``
``visual_projection.weight`` (out × in)                ``visual.proj`` (in × out): transposed
``text_model.embeddings.token_embedding.weight``       ``token_embedding.weight``
``text_model.embeddings.position_embedding.weight``    ``positional_embedding``
``text_model.final_layer_norm``                        ``ln_final``
``text_projection.weight`` (out × in)                  ``text_projection`` (in × out): transposed
``logit_scale``                                        ``logit_scale``
=====================================================  ==============================================

Both encode the image as ``post_layernorm(x[:, 0]) @ Wᵀ`` and pool the text at its end-of-text
token: transformers takes the first position of ``eos_token_id``, or ``input_ids.argmax`` for the
legacy ``eos_token_id == 2`` — open_clip's ``pool_type`` ``"eos"`` and ``"argmax"``. Activations
map to ``QuickGELU`` (``quick_gelu``), ``nn.GELU()`` (``gelu``) or ``nn.GELU(approximate="tanh")``
(``gelu_pytorch_tanh``, and ``gelu_new``, the same function written out); layer-norm eps goes into
each tower's ``norm_kwargs``. A config open_clip cannot reproduce exactly — another activation,
towers that disagree on QuickGELU, a bias on a projection, a vocabulary that open_clip's CLIP
tokenizer does not fit, another ``model_type`` — is refused with one sentence
(:class:`~refineclip_core.errors.CheckpointError`) instead of loading something that computes
other numbers.

Writing (:func:`write_hf_checkpoint`). The edited model goes back out as a folder that
``CLIPModel.from_pretrained`` loads: ``config.json`` (the source's own when the model came from
transformers, else built from the open_clip model, which must then be a plain ViT CLIP) and
``model.safetensors`` with the merged ``visual.proj`` as ``visual_projection.weight``.

``transformers`` is optional (``pip install 'refineclip-studio[hf]'``): it is imported only to
read or write an HF config, and its absence is reported in one sentence.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import CheckpointError, OutsideRootsError, RefineClipError
from .confine import OUTSIDE_REASON, loads_json, read_bytes, resolve_roots

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
WEIGHTS_FILE = "model.safetensors"
#: Weight files of a ``save_pretrained`` folder, in the order transformers prefers them.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
#: Weight-file endings: an export folder holding other weights than the one it writes is refused.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".index.json")
#: The only files of a source folder an export carries besides the weights it writes: the model's
#: config and what ``CLIPProcessor.from_pretrained`` reads (image processor, tokenizer). Anything
#: else in the folder (notes, caches, links to elsewhere) stays behind.
EXPORT_FILES = (CONFIG_FILE, PREPROCESSOR_FILE, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "vocab.json", "merges.txt", "added_tokens.json")
#: Largest file an export copies (a CLIP tokenizer.json is about 2 MB).
MAX_EXPORT_FILE_BYTES = 64_000_000

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
class HFCheckpoint:
    """Where the files of a transformers checkpoint are."""

    folder: Path
    config: Path
    weights: tuple[Path, ...]  # one file, or the shards named by an index
    preprocessor: Path | None = None

    @property
    def label(self) -> str:
        """A readable name for the model: its folder's name."""
        return self.folder.resolve().name or "hf-clip"

    def files(self) -> tuple[Path, ...]:
        """Every file whose bytes define the model (for fingerprints)."""
        return (self.config, *(() if self.preprocessor is None else (self.preprocessor,)), *self.weights)


@dataclass(frozen=True)
class ConvertedCLIP:
    """An HF checkpoint as open_clip needs it: a model config, a state dict, preprocessing."""

    label: str
    config: dict                 # open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``, ...)
    state_dict: dict[str, torch.Tensor]
    preprocess: dict = field(default_factory=dict)  # open_clip PreprocessCfg overrides (mean, std, interpolation)


# --- finding and reading ---------------------------------------------------------------------------------------


#: Largest JSON file of a checkpoint folder read (configs and shard indexes are a few kB to a few MB).
MAX_JSON_BYTES = 16_000_000


def _read_json(path: Path, roots=None) -> Any:
    """A JSON file's content, read only inside ``roots`` when given (see loading/confine.py), its
    size and nesting limited before it is parsed."""
    try:
        data = read_bytes(path, resolve_roots(roots), limit=MAX_JSON_BYTES)
    except OSError as exc:
        raise CheckpointError(f"'{path}' is not readable JSON ({exc}).") from exc
    if len(data) > MAX_JSON_BYTES:
        raise CheckpointError(f"'{path}' is larger than {MAX_JSON_BYTES // 1_000_000} MB; not a checkpoint's JSON.")
    return loads_json(data, f"'{path}'", CheckpointError)


def _is_hf_config(path: Path, roots=None) -> bool:
    try:
        cfg = _read_json(path, roots)
    except RefineClipError:
        return False
    return isinstance(cfg, dict) and "model_type" in cfg


def _shards(index: Path, roots=None) -> tuple[Path, ...]:
    data = _read_json(index, roots)
    names = sorted(set((data.get("weight_map") or {}).values())) if isinstance(data, dict) else []
    if not names:
        raise CheckpointError(f"The shard index '{index}' names no weight files.")
    return tuple(index.parent / n for n in names)


def find_hf_checkpoint(path: str | os.PathLike | None, roots=None) -> HFCheckpoint | None:
    """The transformers checkpoint at ``path``, or None when ``path`` is not one.

    ``path`` is a ``save_pretrained`` folder, or a weight file (``.safetensors``, ``.bin``, a
    shard index) with a transformers ``config.json`` (one with a ``model_type``) beside it.
    With ``roots`` every file read is checked against them when opened (loading/confine.py).
    """
    if not path:
        return None
    p = Path(path).expanduser()
    if p.is_dir():
        config = p / CONFIG_FILE
        if not config.is_file():
            return None
        weights = next((p / n for n in WEIGHT_FILES if (p / n).is_file()), None)
        if weights is None:
            raise CheckpointError(
                f"The folder '{p}' has a config.json but no weights ({', '.join(WEIGHT_FILES)}); pass the folder "
                "CLIPModel.save_pretrained wrote.")
        folder = p
    elif p.is_file() and (p.parent / CONFIG_FILE).is_file() and _is_hf_config(p.parent / CONFIG_FILE, roots):
        config, weights, folder = p.parent / CONFIG_FILE, p, p.parent
    else:
        return None
    shards = _shards(weights, roots) if weights.name.endswith(".index.json") else (weights,)
    pre = folder / PREPROCESSOR_FILE
    return HFCheckpoint(folder=folder, config=config, weights=shards, preprocessor=pre if pre.is_file() else None)


def hf_folder_in(root: str | os.PathLike) -> Path:
    """The ``save_pretrained`` folder inside an unpacked zip: ``root`` itself, or the one folder
    below it (at any depth) that holds a ``config.json``."""
    root = Path(root)
    found = sorted(p.parent for p in root.rglob(CONFIG_FILE) if "__MACOSX" not in p.parts)
    if not found:
        raise CheckpointError("The zip holds no config.json: zip the folder CLIPModel.save_pretrained wrote.")
    if len(found) > 1:
        raise CheckpointError(f"The zip holds {len(found)} config.json files; zip one save_pretrained folder.")
    return found[0]


def is_hf_checkpoint(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a transformers checkpoint (see :func:`find_hf_checkpoint`)."""
    try:
        return find_hf_checkpoint(path) is not None
    except CheckpointError:
        return True  # a transformers folder, though a broken one: loading it says what is wrong


def hf_key_hint(keys) -> str:
    """A sentence for a state dict with transformers' key names offered as an open_clip one."""
    if any(str(k).startswith(("vision_model.", "text_model.")) for k in keys):
        return (" These are Hugging Face transformers CLIP weights: pass the folder CLIPModel.save_pretrained "
                "wrote (config.json beside the weights) as the checkpoint instead.")
    return ""


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
            f"'{source}' holds {kind}, not a transformers CLIPModel (model_type 'clip'); RefineCLIP needs both towers "
            "of a CLIP ViT.")
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
    """The open_clip model config that computes what the transformers CLIP config ``raw`` does.

    Raises :class:`CheckpointError` (one sentence) for what open_clip cannot express exactly.
    """
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
                pairs += [(f"{o}ln_1.{p}", f"{h}layer_norm1.{p}", "same"),
                          (f"{o}attn.in_proj_{p}", f"{h}self_attn.{{}}_proj.{p}", "qkv"),
                          (f"{o}attn.out_proj.{p}", f"{h}self_attn.out_proj.{p}", "same"),
                          (f"{o}ln_2.{p}", f"{h}layer_norm2.{p}", "same"),
                          (f"{o}mlp.c_fc.{p}", f"{h}mlp.fc1.{p}", "same"),
                          (f"{o}mlp.c_proj.{p}", f"{h}mlp.fc2.{p}", "same")]
    return pairs


#: transformers keys that hold no weights (older checkpoints saved the position-id buffers).
_BUFFERS = ("vision_model.embeddings.position_ids", "text_model.embeddings.position_ids")


def hf_to_open_clip(state: Mapping[str, torch.Tensor], n_vision: int, n_text: int,
                    source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename (and fuse q/k/v, transpose projections of) a transformers CLIPModel state dict."""
    extra = sorted(set(state) - {h.format(x) for _, h, how in _key_pairs(n_vision, n_text)
                                 for x in ("qkv" if how == "qkv" else "_")} - set(_BUFFERS))
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


def _read_weights(ckpt: HFCheckpoint, roots=None) -> dict[str, torch.Tensor]:
    from .models import read_state_dict

    state: dict[str, torch.Tensor] = {}
    for path in ckpt.weights:
        state.update(read_state_dict(path, roots))
    return state


def _preprocess(ckpt: HFCheckpoint, roots=None) -> dict:
    """Normalisation and interpolation from ``preprocessor_config.json`` (when present)."""
    if ckpt.preprocessor is None:
        return {}
    raw = _read_json(ckpt.preprocessor, roots)
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


def read_hf_config(ckpt: HFCheckpoint, roots=None) -> ConvertedCLIP:
    """The open_clip config and preprocessing of a transformers CLIP checkpoint, without its weights
    (so a model's size can be checked before anything large is read; ``state_dict`` is empty)."""
    raw = _read_json(ckpt.config, roots)
    if not isinstance(raw, dict):
        raise CheckpointError(f"'{ckpt.config}' is not a transformers config (a JSON object).")
    return ConvertedCLIP(label=ckpt.label, config=open_clip_config(raw, str(ckpt.config)), state_dict={},
                         preprocess=_preprocess(ckpt, roots))


def read_hf_state_dict(ckpt: HFCheckpoint, converted: ConvertedCLIP, roots=None) -> dict[str, torch.Tensor]:
    """The checkpoint's weights under open_clip's names (for the config :func:`read_hf_config` gave)."""
    config = converted.config
    return hf_to_open_clip(_read_weights(ckpt, roots), config["vision_cfg"]["layers"], config["text_cfg"]["layers"],
                           str(ckpt.folder))


def read_hf_checkpoint(ckpt: HFCheckpoint, roots=None) -> ConvertedCLIP:
    """Convert a transformers CLIP checkpoint into an open_clip config and state dict."""
    converted = read_hf_config(ckpt, roots)
    return replace(converted, state_dict=read_hf_state_dict(ckpt, converted, roots))


# --- writing ---------------------------------------------------------------------------------------------------


def _model_activation(blocks, which: str) -> str:
    from open_clip.transformer import QuickGELU

    names = set()
    for block in blocks:
        act = block.mlp.gelu
        if isinstance(act, QuickGELU):
            names.add("quick_gelu")
        elif type(act) is torch.nn.GELU:
            names.add("gelu" if act.approximate == "none" else "gelu_pytorch_tanh")
        else:
            raise RefineClipError(f"The {which} tower's activation {type(act).__name__} has no transformers CLIP "
                                  "equivalent; export it in open_clip format instead.")
    if len(names) != 1:
        raise RefineClipError(f"The {which} tower mixes activations; export it in open_clip format instead.")
    return names.pop()


def _model_eps(norms, which: str) -> float:
    eps = {float(n.eps) for n in norms}
    if len(eps) != 1 or not all(isinstance(n, torch.nn.LayerNorm) and n.elementwise_affine for n in norms):
        raise RefineClipError(f"The {which} tower's layer norms differ from transformers CLIP's (one eps, affine); "
                              "export it in open_clip format instead.")
    return eps.pop()


def _plain_blocks(blocks, which: str) -> None:
    from open_clip.transformer import ResidualAttentionBlock

    for block in blocks:
        if (type(block) is not ResidualAttentionBlock or not isinstance(block.attn, torch.nn.MultiheadAttention)
                or block.attn.in_proj_bias is None or hasattr(block, "ln_1_kv")):
            raise RefineClipError(f"The {which} tower's blocks are not plain CLIP blocks; export it in open_clip "
                                  "format instead.")
        if not (isinstance(block.ls_1, torch.nn.Identity) and isinstance(block.ls_2, torch.nn.Identity)):
            raise RefineClipError(f"The {which} tower uses layer scale, which transformers CLIP does not have; "
                                  "export it in open_clip format instead.")


def hf_config_dict(model: torch.nn.Module) -> dict:
    """The transformers ``CLIPConfig`` (as a dict) of an open_clip ``CLIP`` ViT, or a refusal.

    Only what transformers' CLIPModel computes is accepted: class-token pooling, ``ln_pre``,
    no layer scale or attentional pooler, plain blocks, a causal text tower pooled at the EOT
    token (``argmax`` or ``eos``), bias-free projections and no logit bias.
    """
    from open_clip.model import CLIP
    from open_clip.transformer import VisionTransformer

    visual = getattr(model, "visual", None)
    if type(model) is not CLIP or not isinstance(visual, VisionTransformer):
        raise RefineClipError("Only open_clip CLIP ViTs with the built-in text tower can be written in transformers "
                              "format; export this model in open_clip format instead.")
    if (visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool
            or isinstance(visual.ln_pre, torch.nn.Identity) or visual.conv1.bias is not None):
        raise RefineClipError("This ViT pools or normalises differently from transformers CLIP (class token, ln_pre, "
                              "ln_post); export it in open_clip format instead.")
    if not isinstance(model.text_projection, torch.nn.Parameter) or getattr(model, "logit_bias", None) is not None:
        raise RefineClipError("This model has a projection bias or a logit bias, which transformers CLIP does not; "
                              "export it in open_clip format instead.")
    if getattr(model, "attn_mask", None) is None:
        raise RefineClipError("This text tower is not causal, unlike transformers CLIP's; export it in open_clip "
                              "format instead.")
    pool, eos = model.text_pool_type, getattr(model, "text_eos_id", None)
    if pool == "argmax":
        eos_id = LEGACY_EOS_ID
    elif pool == "eos" and isinstance(eos, int):
        eos_id = eos
    else:
        raise RefineClipError(f"This text tower pools with '{pool}', which transformers CLIP cannot; export it in "
                              "open_clip format instead.")
    size, patch = visual.image_size, visual.patch_size
    if size[0] != size[1] or patch[0] != patch[1] or visual.conv1.in_channels != 3:
        raise RefineClipError("transformers CLIP needs square images and patches of RGB; export this model in "
                              "open_clip format instead.")
    vb, tb = list(visual.transformer.resblocks), list(model.transformer.resblocks)
    _plain_blocks(vb, "vision")
    _plain_blocks(tb, "text")
    embed_dim = int(visual.proj.shape[1])
    vision = {
        "hidden_size": int(visual.class_embedding.shape[0]), "intermediate_size": vb[0].mlp.c_fc.out_features,
        "num_hidden_layers": len(vb), "num_attention_heads": vb[0].attn.num_heads, "image_size": int(size[0]),
        "patch_size": int(patch[0]), "num_channels": 3, "hidden_act": _model_activation(vb, "vision"),
        "layer_norm_eps": _model_eps([visual.ln_pre, visual.ln_post, *(n for b in vb for n in (b.ln_1, b.ln_2))],
                                     "vision"),
        "projection_dim": embed_dim,
    }
    text = {
        "vocab_size": model.token_embedding.num_embeddings, "hidden_size": model.token_embedding.embedding_dim,
        "intermediate_size": tb[0].mlp.c_fc.out_features, "num_hidden_layers": len(tb),
        "num_attention_heads": tb[0].attn.num_heads, "max_position_embeddings": int(model.positional_embedding.shape[0]),
        "hidden_act": _model_activation(tb, "text"),
        "layer_norm_eps": _model_eps([model.ln_final, *(n for b in tb for n in (b.ln_1, b.ln_2))], "text"),
        "bos_token_id": CLIP_EOT_ID - 1, "eos_token_id": eos_id, "projection_dim": embed_dim,
    }
    if (vision["hidden_act"] == "quick_gelu") != (text["hidden_act"] == "quick_gelu"):
        raise RefineClipError("The towers disagree on QuickGELU; export this model in open_clip format instead.")
    return {"model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": embed_dim,
            "logit_scale_init_value": float(model.logit_scale.detach().reshape(-1)[0]),
            "text_config": text, "vision_config": vision}


def _preprocessor_config(model: torch.nn.Module) -> dict:
    """A ``CLIPImageProcessor`` config matching the open_clip model's validation preprocessing."""
    pp = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    size = int(model.visual.image_size[0])
    resample = {"bilinear": 2, "bicubic": 3}.get(pp.get("interpolation", "bicubic"), 3)
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
            "resample": resample, "do_center_crop": True, "crop_size": {"height": size, "width": size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(pp.get("mean", (0.48145466, 0.4578275, 0.40821073))),
            "image_std": list(pp.get("std", (0.26862954, 0.26130258, 0.27577711))), "do_convert_rgb": True}


def _check_out_dir(out_dir: Path, source: HFCheckpoint | None) -> None:
    if out_dir.name.endswith(_WEIGHT_SUFFIXES) or (out_dir.exists() and not out_dir.is_dir()):
        raise RefineClipError(f"'{out_dir}' names a file, but a transformers checkpoint is a folder: give a folder "
                              "path (or ask for the open_clip format to get one weights file).")
    if source is not None and out_dir.resolve() == source.folder.resolve():
        raise RefineClipError(f"'{out_dir}' is the folder the model was loaded from; write the edit to another one.")
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir()
                         if p.name != WEIGHTS_FILE and p.name.endswith(_WEIGHT_SUFFIXES))
        if foreign:
            raise RefineClipError(f"The folder '{out_dir}' already holds other weights ({', '.join(foreign[:3])}); "
                                  "choose an empty or new folder.")


def export_roots(source: HFCheckpoint, roots=None) -> tuple[Path, ...]:
    """The folders an export of ``source`` may copy files from: ``roots`` (the dashboard's) when
    given; otherwise (the CLI) the source folder itself, plus, for a Hugging Face hub snapshot
    (``models--org--name/snapshots/<rev>/``, whose files link to ``../../blobs/``), its repository
    folder. A file linking anywhere else is never copied."""
    if roots is not None:
        return resolve_roots(roots)
    folder = source.folder.expanduser().resolve()
    own = [folder]
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        own.append(folder.parent.parent)
    return resolve_roots(own)


def _export_files(source: HFCheckpoint, roots=None) -> dict[str, bytes]:
    """The files of :data:`EXPORT_FILES` present in ``source``'s folder, each read through the
    confined read (loading/confine.py) inside :func:`export_roots`: a link leaving them, a device
    or pipe, or an oversized file refuses the export in one sentence; other names are not read."""
    allowed = export_roots(source, roots)
    files: dict[str, bytes] = {}
    for name in EXPORT_FILES:
        path = source.folder / name
        if not os.path.lexists(path):
            continue
        try:
            data = read_bytes(path, allowed, limit=MAX_EXPORT_FILE_BYTES)
        except OutsideRootsError as exc:
            raise RefineClipError(f"'{name}' in '{source.folder}' is a {OUTSIDE_REASON} of the model; the export was "
                                  "not written (replace the link by the file itself).") from exc
        except OSError as exc:
            raise RefineClipError(f"'{name}' in '{source.folder}' cannot be copied into the export "
                                  f"({exc.strerror or exc}); the export was not written.") from exc
        if len(data) > MAX_EXPORT_FILE_BYTES:
            raise RefineClipError(f"'{name}' in '{source.folder}' is larger than {MAX_EXPORT_FILE_BYTES // 1_000_000} "
                                  "MB, too large for a config or tokenizer file; the export was not written.")
        files[name] = data
    return files


def write_hf_checkpoint(out_dir: str | os.PathLike, state: Mapping[str, torch.Tensor], model: torch.nn.Module,
                        source: HFCheckpoint | None = None, roots=None) -> Path:
    """Write the open_clip ``state`` (e.g. with a merged ``visual.proj``) as a transformers folder.

    When the model came from transformers, ``config.json`` and the other files an export needs
    (:data:`EXPORT_FILES`: preprocessor and tokenizer files, nothing else) are copied from
    ``source``, each read like every other file (only inside :func:`export_roots`, links leaving
    them refused); otherwise the config is built from ``model`` (:func:`hf_config_dict`) with a
    matching ``preprocessor_config.json``. The weights go to ``model.safetensors``;
    ``CLIPModel.from_pretrained(out_dir)`` loads the folder.
    """
    from safetensors.torch import save

    out_dir = Path(out_dir)
    _check_out_dir(out_dir, source)
    files: dict[str, bytes] = {}
    if source is not None:
        files = _export_files(source, roots)
        if CONFIG_FILE not in files:
            raise RefineClipError(f"'{source.config}' disappeared; the export was not written.")
        raw = loads_json(files[CONFIG_FILE], f"'{source.config}'", CheckpointError)
        if not isinstance(raw, dict):
            raise CheckpointError(f"'{source.config}' is not a transformers config (a JSON object).")
        n_vision, n_text = (open_clip_config(raw, str(source.config))[k]["layers"] for k in ("vision_cfg", "text_cfg"))
    else:
        cfg = hf_config_dict(model)
        n_vision, n_text = cfg["vision_config"]["num_hidden_layers"], cfg["text_config"]["num_hidden_layers"]
        dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
        dtype = str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "float32"
        config = _transformers().CLIPConfig.from_dict({**cfg, "dtype": dtype})
        files[CONFIG_FILE] = config.to_json_string().encode()
        files[PREPROCESSOR_FILE] = json.dumps(_preprocessor_config(model), indent=2).encode()
    try:
        hf_state = open_clip_to_hf({k: v.detach().cpu() for k, v in state.items()}, n_vision, n_text)
    except KeyError as exc:
        raise RefineClipError(f"The weights lack {exc}, which a transformers CLIPModel needs; export them in "
                              "open_clip format instead.") from exc
    files[WEIGHTS_FILE] = save(hf_state, metadata={"format": "pt"})
    _write_folder(out_dir, files)
    return out_dir


def _write_folder(out_dir: Path, files: Mapping[str, bytes]) -> None:
    """Write ``files`` into ``out_dir``: into a temporary sibling first, then renamed into place
    (the whole folder at once when it is new, file by file when it exists)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would be kept by the rename
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        if not out_dir.exists():
            os.replace(tmp, out_dir)
            return
        for name in files:
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def zip_folder(folder: str | os.PathLike) -> bytes:
    """The files of ``folder`` as a zip archive (one level, for downloads)."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        root = Path(folder)
        for path in sorted(root.iterdir()):
            if path.is_file() and not path.is_symlink():  # the export writes plain files only
                zf.write(path, arcname=f"{root.name}/{path.name}")
    return buf.getvalue()

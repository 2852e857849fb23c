"""Refusing a model that does not fit the machine, from its config alone, before anything is allocated.

A model config JSON is a few numbers; ``open_clip.create_model`` turns them into tensors. On a
shared server one config with an absurd width or depth would take the memory of every user,
so :func:`check_model_budget` runs first: it estimates from the open_clip config (vision and
text width, layers, patch and image size, context length, vocabulary, embedding dimension,
MLP ratio) the number of parameters and the memory of

* the weights as ``create_model`` builds them (float32), plus the causal-mask buffer,
* a checkpoint read alongside them (its file size) and the copy a precision change makes,
* the activations of one batch: ``batch_size`` images through the image tower, or 256
  prompts (:func:`refineclip_core.features.zeroshot.encode_texts`) through the text tower,

and refuses, with one sentence naming the numbers, when the total exceeds the budget:
``REFINECLIP_MEMORY_BUDGET`` (``16GB``, ``512MiB``, ``2e10``) or, by default,
:data:`BUDGET_FRACTION` of the memory available now (``MemAvailable``, capped by a cgroup
limit).

Every part a config can build is counted: the vision tower (ViT or ResNet from the config's
numbers; a timm tower, ``timm_model_name``, and a Hugging Face text tower, ``hf_model_name``,
by building that tower on PyTorch's ``meta`` device, where tensors have shapes but no memory,
and counting its parameters), the text tower, and a CoCa text decoder (``multimodal_cfg``). A
tower that cannot be sized that way (an unknown timm name, a Hugging Face config that is not
on this machine) is refused with one sentence: it could not be built either.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..errors import RefineClipError

#: Environment variable with the memory budget for one model (e.g. ``16GB``).
BUDGET_ENV = "REFINECLIP_MEMORY_BUDGET"
#: Share of the available memory one model may use when no budget is set.
BUDGET_FRACTION = 0.75
#: Images per batch the activation estimate assumes (the extraction's default batch size).
IMAGE_BATCH = 32
#: Prompts per batch the text tower runs (``encode_texts``).
TEXT_BATCH = 256

_BYTES = {"fp32": 4, "fp64": 8, "fp16": 2, "bf16": 2}
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class ModelEstimate:
    """What a model config costs before any tensor exists."""

    n_params: int
    weight_bytes: int        # parameters (float32, as built) and buffers
    load_bytes: int          # checkpoint read alongside + precision copy
    activation_bytes: int    # one batch through the larger of the two towers
    batch_size: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.load_bytes + self.activation_bytes


def format_bytes(n: float) -> str:
    if n >= 10**18:
        return "over 1000 PB"
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def format_count(n: int) -> str:
    if n >= 10**15:
        return "over 1000 trillion"
    for value, word in ((1e12, "trillion"), (1e9, "billion"), (1e6, "million")):
        if n >= value:
            return f"{n / value:.1f} {word}"
    return f"{n:,}"


def parse_size(text: str | int | float) -> int:
    """``"16GB"``, ``"512 MiB"``, ``"2e10"``, ``8000000000`` -> bytes; :class:`RefineClipError` otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise RefineClipError(f"Cannot read the memory budget {str(text)!r}; write it like 16GB, 512MiB or 2e10 (bytes).")
        value, unit = float(m.group(1)), m.group(2).lower()
    if not math.isfinite(value) or value <= 0:
        raise RefineClipError(f"The memory budget must be a positive size, not {text!r}.")
    return int(value * _UNITS[unit])


def available_memory() -> int | None:
    """Bytes of memory available to this process now (``MemAvailable``, capped by a cgroup v2 limit)."""
    avail: int | None = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            avail = min(avail, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return avail


def memory_budget(override: str | int | float | None = None) -> tuple[int | None, str]:
    """The budget in bytes (None: unknown, nothing is refused) and where it comes from."""
    if override is not None:
        return parse_size(override), "the --memory-budget option"
    env = os.environ.get(BUDGET_ENV, "").strip()
    if env:
        return parse_size(env), BUDGET_ENV
    avail = available_memory()
    if avail is None:
        return None, "unknown available memory"
    return int(avail * BUDGET_FRACTION), (f"{BUDGET_FRACTION:.0%} of the memory available now; "
                                         f"set {BUDGET_ENV} or --memory-budget to change it")


# -- the estimate -----------------------------------------------------------------------------------

def _num(cfg: Mapping[str, Any], key: str, default: Any, where: str, cast=int, minimum: float = 1) -> Any:
    value = cfg.get(key, default)
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (isinstance(value, float) and not math.isfinite(value))):
        raise RefineClipError(f"The model config's {where}.{key} must be a number, not {str(value)[:40]!r}.")
    out = cast(value)
    if out < minimum:
        raise RefineClipError(f"The model config's {where}.{key} must be at least {minimum}, not {str(value)[:40]}.")
    return out


def _pair(cfg: Mapping[str, Any], key: str, default: int, where: str) -> tuple[int, int]:
    value = cfg.get(key, default)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return (_num({key: value[0]}, key, None, where), _num({key: value[1]}, key, None, where))
    n = _num(cfg, key, default, where)
    return n, n


def _blocks(width: int, layers: int, mlp_ratio: float, layer_scale: bool) -> int:
    """Parameters of ``layers`` residual attention blocks (open_clip ``ResidualAttentionBlock``)."""
    mlp = int(width * mlp_ratio)
    per = (4 * width                      # ln_1, ln_2
           + 3 * width * width + 3 * width  # in_proj (q, k, v)
           + width * width + width          # out_proj
           + width * mlp + mlp + mlp * width + width  # c_fc, c_proj
           + (2 * width if layer_scale else 0))
    return layers * per


def _vit(v: Mapping[str, Any], embed_dim: int, batch: int) -> tuple[int, int]:
    """(parameters, activation elements for one batch) of a ``VisionTransformer``."""
    w = _num(v, "width", 768, "vision_cfg")
    layers = _num(v, "layers", 12, "vision_cfg")
    head_width = _num(v, "head_width", 64, "vision_cfg")
    mlp_ratio = _num(v, "mlp_ratio", 4.0, "vision_cfg", cast=float, minimum=0)
    ih, iw = _pair(v, "image_size", 224, "vision_cfg")
    ph, pw = _pair(v, "patch_size", 16, "vision_cfg")
    tokens = (ih // ph) * (iw // pw) + 1
    params = 3 * w * ph * pw + w + tokens * w + (0 if v.get("no_ln_pre") else 2 * w)
    params += _blocks(w, layers, mlp_ratio, v.get("ls_init_value") is not None)
    pool = w
    if v.get("attentional_pool"):
        queries = _num(v, "attn_pooler_queries", 256, "vision_cfg")
        pool = embed_dim
        e = embed_dim  # AttentionalPooler: queries, q/k/v/out projections (k and v from width w), two norms
        params += queries * e + 2 * e * e + 2 * e * w + 4 * e + 2 * e + 2 * w
    params += 2 * pool + pool * embed_dim
    heads = max(1, w // head_width)
    mlp = int(w * mlp_ratio)
    acts = batch * (3 * ih * iw + tokens * (6 * w + 2 * mlp) + 2 * heads * tokens * tokens)
    return params, acts


def _resnet(v: Mapping[str, Any], embed_dim: int, batch: int) -> tuple[int, int]:
    """(parameters, activation elements for one batch) of a ``ModifiedResNet``."""
    stages = list(v["layers"])
    if len(stages) != 4:
        raise RefineClipError(f"The model config's vision_cfg.layers must be one number or four, not {stages!r}.")
    stages = [_num({"layers": s}, "layers", None, "vision_cfg") for s in stages]
    w = _num(v, "width", 64, "vision_cfg")
    image = _pair(v, "image_size", 224, "vision_cfg")[0]

    def conv_bn(cin: int, cout: int, k: int) -> int:
        return cin * cout * k * k + 2 * cout

    params = conv_bn(3, w // 2, 3) + conv_bn(w // 2, w // 2, 3) + conv_bn(w // 2, w, 3)
    inplanes = w
    for i, n in enumerate(stages):
        planes = w * 2 ** i
        for b in range(n):
            params += conv_bn(inplanes, planes, 1) + conv_bn(planes, planes, 3) + conv_bn(planes, 4 * planes, 1)
            if b == 0 and (i > 0 or inplanes != 4 * planes):
                params += conv_bn(inplanes, 4 * planes, 1)
            inplanes = 4 * planes
    feat = w * 32
    params += ((image // 32) ** 2 + 1) * feat + 3 * (feat * feat + feat) + feat * embed_dim + embed_dim
    acts = batch * (3 * image * image + 3 * (image // 4) ** 2 * 4 * w)
    return params, acts


def _text(t: Mapping[str, Any], embed_dim: int, batch: int) -> tuple[int, int, int]:
    """(parameters, buffer elements, activation elements for one batch) of a ``TextTransformer``."""
    ctx = _num(t, "context_length", 77, "text_cfg")
    vocab = _num(t, "vocab_size", 49408, "text_cfg")
    w = _num(t, "width", 512, "text_cfg")
    layers = _num(t, "layers", 12, "text_cfg")
    heads = _num(t, "heads", 8, "text_cfg")
    mlp_ratio = _num(t, "mlp_ratio", 4.0, "text_cfg", cast=float, minimum=0)
    positions = ctx + (1 if t.get("embed_cls") else 0)
    params = vocab * w + positions * w + 2 * w  # (CLIP drops an embed_cls vector; CustomTextCLIP keeps w more)
    params += _blocks(w, layers, mlp_ratio, t.get("ls_init_value") is not None)
    if t.get("proj_type", "linear") != "none" and embed_dim:
        params += w * embed_dim + (embed_dim if t.get("proj_bias") else 0)
    mask = 0 if t.get("no_causal_mask") else positions * positions
    mlp = int(w * mlp_ratio)
    acts = batch * (positions * (6 * w + 2 * mlp) + 2 * heads * positions * positions)
    return params, mask, acts


def _decoder(m: Mapping[str, Any], text: Mapping[str, Any]) -> tuple[int, int]:
    """(parameters, buffer elements) of CoCa's ``MultimodalTransformer`` text decoder: ``layers``
    self-attention blocks, as many cross-attention blocks (with a second input norm), a final
    norm and a projection to the vocabulary. It is built with the model although the studio
    never runs it (it only generates captions), so it counts for memory, not for activations."""
    w = _num(m, "width", 512, "multimodal_cfg")
    layers = _num(m, "layers", 12, "multimodal_cfg")
    mlp_ratio = _num(m, "mlp_ratio", 4, "multimodal_cfg", cast=float, minimum=0)
    ctx = _num(m, "context_length", 77, "multimodal_cfg")
    vocab = _num(text, "vocab_size", 49408, "text_cfg")
    ls = m.get("ls_init_value") is not None
    params = 2 * _blocks(w, layers, mlp_ratio, ls) + layers * 2 * w + 2 * w + w * vocab
    return params, ctx * ctx


def _on_meta(what: str, build) -> "Any":
    """Build a tower with ``build()`` on the meta device (shapes, no memory), or refuse in one sentence."""
    import torch

    try:
        with torch.device("meta"):
            return build()
    except RefineClipError:
        raise
    except Exception as exc:  # an unknown timm name, a config the library rejects, a missing HF config
        text = str(exc).strip().splitlines()
        raise RefineClipError(f"The model config's {what} could not be sized before loading "
                              f"({type(exc).__name__}: {(text[0] if text else '')[:200]}); it was refused.") from None


def _count(module) -> tuple[int, int]:
    return (sum(p.numel() for p in module.parameters()), sum(b.numel() for b in module.buffers()))


def _timm_vision(v: Mapping[str, Any], embed_dim: int, batch: int) -> tuple[int, int, int]:
    """(parameters, buffer elements, activation elements for one batch) of a timm vision tower,
    built on the meta device as open_clip builds it."""
    from open_clip.model import _build_vision_tower

    name = str(v.get("timm_model_name"))[:100]
    tower = _on_meta(f"timm vision tower '{name}'",
                     lambda: _build_vision_tower(embed_dim, {**v, "timm_model_pretrained": False}))
    params, buffers = _count(tower)
    trunk = getattr(tower, "trunk", tower)
    width = int(getattr(trunk, "num_features", 0) or getattr(trunk, "embed_dim", 0) or 0)
    patches = getattr(getattr(trunk, "patch_embed", None), "num_patches", None)
    ih, iw = _pair(v, "image_size", 224, "vision_cfg")
    tokens = int(patches) + 1 if patches else max(1, (ih // 16) * (iw // 16))
    heads = max(1, width // 64)
    acts = batch * (3 * ih * iw + tokens * 14 * width + 2 * heads * tokens * tokens)
    return params, buffers, acts


def _hf_text(t: Mapping[str, Any], embed_dim: int, batch: int) -> tuple[int, int, int]:
    """(parameters, buffer elements, activation elements) of a Hugging Face text tower, built on
    the meta device from its config (read from the local Hugging Face cache, as open_clip reads it)."""
    from open_clip.model import _build_text_tower

    name = str(t.get("hf_model_name"))[:100]
    tower = _on_meta(f"Hugging Face text tower '{name}'",
                     lambda: _build_text_tower(embed_dim, {**t, "hf_model_pretrained": False}))
    params, buffers = _count(tower)
    cfg = getattr(getattr(tower, "transformer", None), "config", None)
    width = int(getattr(cfg, "hidden_size", 0) or 0)
    ctx = _num(t, "context_length", 77, "text_cfg")
    heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
    return params, buffers, TEXT_BATCH * (ctx * 14 * width + 2 * heads * ctx * ctx)


def estimate_model(cfg: Mapping[str, Any], precision: str = "fp32", batch_size: int = IMAGE_BATCH,
                   checkpoint_bytes: int | None = 0) -> ModelEstimate:
    """Parameters and memory of the open_clip model ``cfg`` describes (no tensor is created).

    ``checkpoint_bytes`` is the size of the weights file read alongside the model (None: a
    downloaded pretrained file, counted as large as the float32 weights)."""
    if not isinstance(cfg, Mapping):
        raise RefineClipError("A model config must be a JSON object with 'vision_cfg' and 'text_cfg'.")
    embed_dim = _num(cfg, "embed_dim", 512, "model config")
    vision, text = cfg.get("vision_cfg") or {}, cfg.get("text_cfg") or {}
    if not isinstance(vision, Mapping) or not isinstance(text, Mapping):
        raise RefineClipError("The model config's vision_cfg and text_cfg must be JSON objects.")
    multimodal = cfg.get("multimodal_cfg")
    if multimodal is not None and not isinstance(multimodal, Mapping):
        raise RefineClipError("The model config's multimodal_cfg must be a JSON object.")
    v_params = v_acts = t_params = t_mask = t_acts = d_params = d_mask = v_buffers = 0
    # the parts counted from the config's numbers first: a tower built on the meta device below
    # must not be reached with absurd sizes elsewhere in the config
    if not text.get("hf_model_name"):
        t_params, t_mask, t_acts = _text(text, embed_dim, TEXT_BATCH)
        if text.get("embed_cls") and (cfg.get("custom_text") or multimodal is not None):
            t_params += _num(text, "width", 512, "text_cfg")  # CustomTextCLIP/CoCa keep the class embedding
    if multimodal is not None:
        d_params, d_mask = _decoder(multimodal, text)
    if not vision.get("timm_model_name"):
        build = _resnet if isinstance(vision.get("layers"), (list, tuple)) else _vit
        v_params, v_acts = build(vision, embed_dim, batch_size)
    else:
        v_params, v_buffers, v_acts = _timm_vision(vision, embed_dim, batch_size)
    if text.get("hf_model_name"):
        t_params, t_mask, t_acts = _hf_text(text, embed_dim, TEXT_BATCH)
    n_params = v_params + t_params + d_params + 1 + (1 if cfg.get("init_logit_bias") is not None else 0)
    elem = _BYTES.get(precision, 4)
    read = 4 * n_params if checkpoint_bytes is None else checkpoint_bytes
    load = read + (n_params * elem if elem != 4 else 0)
    return ModelEstimate(n_params, 4 * (n_params + t_mask + d_mask + v_buffers), load, elem * max(v_acts, t_acts),
                         batch_size)


def check_model_budget(name: str, cfg: Mapping[str, Any], precision: str = "fp32", checkpoint_bytes: int | None = 0,
                       budget: str | int | float | None = None, batch_size: int = IMAGE_BATCH) -> ModelEstimate:
    """:func:`estimate_model`, refused with :class:`RefineClipError` when it exceeds :func:`memory_budget`."""
    limit, source = memory_budget(budget)
    try:
        est = estimate_model(cfg, precision, batch_size, checkpoint_bytes)
    except OverflowError:  # sizes beyond floating point: beyond any machine too
        raise RefineClipError(f"Model '{name}' was refused before loading: its config's sizes are too large to "
                              f"estimate, far beyond the budget of {format_bytes(limit or 0)} ({source}).") from None
    if limit is not None and est.total_bytes > limit:
        raise RefineClipError(
            f"Model '{name}' was refused before loading: it would need about {format_bytes(est.total_bytes)} of "
            f"memory ({format_count(est.n_params)} parameters = {format_bytes(est.weight_bytes)} of weights, "
            f"{format_bytes(est.load_bytes)} more while reading weights, {format_bytes(est.activation_bytes)} of "
            f"activations for a batch of {batch_size} images) but the budget is {format_bytes(limit)} ({source})."
        )
    return est

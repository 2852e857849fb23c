"""Vision backends: one module per image-tower family behind one seam (:class:`base.VisionBackend`).

* :mod:`.openclip_vit` -- open_clip ``VisionTransformer``: CLS token (OpenAI / LAION CLIP), average
  pooling (CLIPA: ``final_ln_after_pool``, no ``ln_pre``), CoCa's attentional pooler;
* :mod:`.timm_vit` -- open_clip ``TimmModel`` with a timm ``VisionTransformer`` (SigLIP, SigLIP 2:
  map pooling, no class token; MobileCLIP-B; ViTamin, whose convolutional stages come before the
  first attention block and so belong to the ``embed`` term) or ``Eva`` trunk (EVA-01/02, PE-Core:
  RoPE, SwiGLU, inner LayerNorm).

:func:`backend_for` picks the family of a built tower; :func:`refusal` answers for a tower or an
open_clip model config whether it decomposes (None) or why not (one sentence). Nothing outside this
package reads a tower's blocks, final norm, projection or class row directly.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from ...errors import UnsupportedModelError
from .base import ArchitectureInfo, HookSet, VisionBackend

__all__ = ["ArchitectureInfo", "HookSet", "VisionBackend", "backend_for", "refusal"]

def backend_for(visual: nn.Module) -> VisionBackend:
    """The backend of an image tower; :class:`UnsupportedModelError` (one sentence) if none fits."""
    kind = type(visual).__name__
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        from .openclip_vit import OpenClipViT

        backend: VisionBackend = OpenClipViT(visual)
    elif kind == "TimmModel":
        from .timm_vit import TimmViT

        backend = TimmViT(visual)
    else:
        raise UnsupportedModelError(
            f"The image tower is a {kind}; only transformer towers (open_clip ViT, CoCa, CLIPA, timm ViT such as "
            "SigLIP, EVA and PE-Core) decompose into attention heads, convolutional ones (ResNet, ConvNeXt, "
            "FastViT, ViTamin) do not.")
    return backend


def refusal(model_or_config: Any) -> str | None:
    """None when the model decomposes into heads, else the one-sentence reason it is refused.

    Accepts a built open_clip model (or its ``visual`` tower) or an open_clip model config dict
    (``{"embed_dim": ..., "vision_cfg": {...}}``); a config is built on PyTorch's ``meta`` device
    (shapes only, no memory, nothing downloaded)."""
    try:
        if isinstance(model_or_config, Mapping):
            visual = _meta_tower(model_or_config)
        else:
            visual = getattr(model_or_config, "visual", model_or_config)
        backend_for(visual)
    except UnsupportedModelError as exc:
        return str(exc)
    return None


def _meta_tower(config: Mapping) -> nn.Module:
    import torch
    from open_clip.model import _build_vision_tower

    cfg = dict(config.get("vision_cfg", config))
    cfg.pop("timm_model_pretrained", None)
    try:
        with torch.device("meta"):
            return _build_vision_tower(int(config.get("embed_dim", 512)), cfg)
    except Exception as exc:  # an unknown timm name, a config open_clip cannot build
        raise UnsupportedModelError(f"The image tower of this config cannot be built ({type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else ''}).") from exc

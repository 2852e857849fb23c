"""Exporting an edit: the fitted map ``E' = M E`` (or ``E ⊙ θ``) merged into the last linear layer
of the image tower, written as an open_clip checkpoint or a Hugging Face folder. The only module of
the edit that touches :mod:`~refineclip_core.loading`.

Which layer is the vision backend's answer (:meth:`~refineclip_core.features.backends.VisionBackend.merge_target`):
``visual.proj`` (open_clip ViT, CLIPA, CoCa: ``P' = P·Mᵀ``), the timm trunk's classifier head
(``visual.trunk.head``, PE-Core and EVA: ``W' = M W``, ``b' = M b``) or an open_clip ``TimmModel``
projection (``visual.head.proj``). A tower whose embedding ends in a nonlinearity (SigLIP: the map
pool's ``y + mlp(norm(y))``, no projection) has no layer an edit merges into exactly: merging ``M``
into the pool's output projection and its MLP's last layer would also change what the pool's MLP
reads (``norm(M y)`` is not ``norm(y)``), so the edit would not be reproduced. Such a tower gets
one bias-free linear layer after the pool instead: the exported config (written beside the weights)
says ``timm_proj: "linear"``, ``visual.head.proj.weight`` is ``M``, every other weight is unchanged,
and plain open_clip loads it (``open_clip.add_model_config(json)``, ``create_model(stem,
pretrained=weights)``).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Literal, Mapping

import torch

from ..errors import RefineClipError
from ..files import atomic_write_bytes, atomic_write_json
from ..loading import hf_clip
from ..loading.checkpoints import read_state_dict
from ..loading.models import ModelSpec
from .paper import RefinedMap


def merge_into_projection(proj: torch.Tensor, refined: RefinedMap) -> torch.Tensor:
    """``P'`` such that ``pooled @ P' == f(pooled @ P)``: columns scaled by θ, or ``P Mᵀ``."""
    if refined.theta is not None:
        return proj * torch.as_tensor(refined.theta, dtype=proj.dtype)[None, :]
    return proj @ torch.as_tensor(refined.matrix, dtype=proj.dtype).T


def merge_into_linear(weight: torch.Tensor, bias: torch.Tensor | None, refined: RefinedMap,
                      in_out: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear layer's weight (``(in, out)`` when ``in_out``, else ``nn.Linear``'s ``(out, in)``)
    and bias such that the layer's output becomes ``f(output)`` (bias included: ``b' = M b``)."""
    if in_out:
        merged = merge_into_projection(weight, refined)
    else:
        merged = merge_into_projection(weight.T, refined).T
    if bias is not None:
        bias = merge_into_projection(bias[None, :], refined)[0]
    return merged, bias


def _with_projection(model: torch.nn.Module, config: Mapping[str, Any] | None) -> tuple[dict, tuple[str, str | None]]:
    """For a timm tower without projection (``timm_proj: none``): the config with a linear projection
    after the pool, and the state-dict keys of its weight and bias (None: bias-free).

    open_clip's bias-free ``head.proj`` (``timm_proj: linear``) rebuilds the trunk with its timm default
    pool and then resets it to the configured one, which timm cannot do for an attention pool the trunk
    does not have by default (the demo's ``test_vit`` pools its class token by default); such a trunk gets
    its own classifier head as the projection instead (``timm_proj: null``: ``trunk.head``, bias zero)."""
    import timm

    vision = dict((config or {}).get("vision_cfg") or {})
    if type(model.visual).__name__ != "TimmModel" or not vision.get("timm_model_name"):
        raise RefineClipError("This image tower ends in a nonlinear layer and has no projection, and without its "
                              "open_clip config no projection can be added, so the edit cannot be merged exactly.")
    with torch.device("meta"):          # the trunk's default pool, built without memory
        default_pool = getattr(timm.create_model(vision["timm_model_name"]), "global_pool", None)
    if vision.get("timm_pool") in ("map", "prr") and default_pool != vision["timm_pool"]:
        vision.update(timm_proj=None)
        return {**dict(config), "vision_cfg": vision}, ("visual.trunk.head.weight", "visual.trunk.head.bias")
    vision.update(timm_proj="linear", timm_proj_bias=False)
    return {**dict(config), "vision_cfg": vision}, ("visual.head.proj.weight", None)


def _merge_keys(model: torch.nn.Module, config: Mapping[str, Any] | None) -> tuple[str, str | None, bool, dict | None]:
    """Where an edit of ``model`` is merged (open_clip format): ``(weight key, bias key or None, in_out,
    new config)``. The backend's last linear layer (``VisionBackend.merge_target``; new config None),
    or for a tower without one the projection :func:`_with_projection` adds after the pool."""
    from ..features.backends import backend_for

    w_key, b_key, in_out = backend_for(model.visual).merge_target()
    if w_key:
        return w_key, b_key, in_out, None
    new_config, (w_key, b_key) = _with_projection(model, config)
    return w_key, b_key, in_out, new_config


def merged_into(model: torch.nn.Module, config: Mapping[str, Any] | None = None) -> str:
    """The state-dict key(s) :func:`export_checkpoint` merges an edit of ``model`` into (open_clip
    format), as the run report names them: the backend's last linear layer (weight, and bias when it
    has one), or for a tower without one the projection the export adds after the pool."""
    w_key, b_key, _, new_config = _merge_keys(model, config)
    keys = w_key + (f" + {b_key}" if b_key else "")
    return keys if new_config is None else f"{keys}, added after the pool (every other weight unchanged)"


ExportFormat = Literal["auto", "open_clip", "hf"]


EXPORT_FORMATS: tuple[str, ...] = ("auto", "open_clip", "hf")


def resolve_export_format(source_checkpoint: str | os.PathLike | None, fmt: str = "auto") -> str:
    """``"hf"`` or ``"open_clip"``: ``auto`` keeps the source's format (a transformers folder
    stays one; everything else is written as an open_clip state dict)."""
    if fmt not in EXPORT_FORMATS:
        raise RefineClipError(f"Unknown export format '{fmt}'; use one of {', '.join(EXPORT_FORMATS)}.")
    if fmt != "auto":
        return fmt
    return "hf" if hf_clip.is_hf_checkpoint(source_checkpoint) else "open_clip"


def export_checkpoint(source_checkpoint: str | os.PathLike | None, model: torch.nn.Module, refined: RefinedMap,
                      out_path: str | os.PathLike, fmt: ExportFormat = "auto",
                      *, config: Mapping[str, Any] | None = None) -> Path:
    """Write the edited model's weights (the last linear layer merged, see the module docstring) atomically.

    ``fmt`` (see :func:`resolve_export_format`): ``open_clip`` writes ``.safetensors`` or a torch
    state dict (``.pt``/``.bin``) depending on ``out_path``'s suffix; ``hf`` writes a transformers
    folder (``config.json`` + ``model.safetensors``, ``visual_projection.weight`` merged) that
    ``CLIPModel.from_pretrained(out_path)`` loads (:func:`~refineclip_core.loading.hf_clip.write_hf_checkpoint`).
    Weights come from ``source_checkpoint`` when given (keeping its dtype; a transformers
    checkpoint is converted first), else from ``model``'s current state dict. The merged
    ``visual.proj`` is kept in float32 when the checkpoint is in a lower precision (e.g. float16),
    so that the edited model reproduces the evaluated edit exactly instead of up to a rounding
    that can flip borderline predictions. The source is read under the confinement in force
    (loading/confine.py; a dashboard model's: ``with spec.confinement().active():``); a transformers
    export copies only the config and tokenizer files it needs, never through a link leaving it (or, not
    confined, the source folder: :func:`~refineclip_core.loading.hf_clip.export_confinement`). ``config`` (the model's
    open_clip config) is needed only by a tower without a layer to merge into (SigLIP; see the
    module docstring): the edited config is written beside the weights (``<out>.json``).
    """
    out_path = Path(out_path)
    fmt = resolve_export_format(source_checkpoint, fmt)
    hf_source = hf_clip.find_hf_checkpoint(source_checkpoint)
    converted = hf_clip.read_hf_checkpoint(hf_source) if hf_source is not None else None
    if converted is not None:
        state = converted.state_dict
    elif source_checkpoint:
        state = read_state_dict(source_checkpoint)
    else:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from ..features.backends import backend_for

    w_key, b_key, in_out, new_config = (_merge_keys(model, config) if model is not None
                                        else ("visual.proj", None, True, None))
    if new_config is not None:
        width = backend_for(model.visual).info.embed_dim
        if fmt == "hf":
            raise RefineClipError("A tower without projection is exported in open_clip format only (use --export-format open_clip).")
        state[w_key] = torch.eye(width, dtype=torch.float32)
        if b_key is not None:
            state[b_key] = torch.zeros(width, dtype=torch.float32)
    if w_key not in state:
        raise RefineClipError(f"The checkpoint has no '{w_key}' to merge the refinement into.")
    proj = state[w_key]
    keep = proj.dtype if proj.dtype in (torch.float32, torch.float64) else torch.float32
    bias = state[b_key].double() if b_key is not None else None
    merged, bias = merge_into_linear(proj.double(), bias, refined, in_out)
    state = {k: v.contiguous() for k, v in state.items()}
    state[w_key] = merged.to(keep).contiguous()
    if b_key is not None:
        state[b_key] = bias.to(keep).contiguous()
    if fmt == "hf":
        return hf_clip.write_hf_checkpoint(out_path, state, model, hf_source)
    if out_path.suffix == ".safetensors":
        from safetensors.torch import save

        data = save(state)
    else:
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
    atomic_write_bytes(out_path, data)
    if converted is not None or new_config is not None:  # open_clip needs the architecture too, beside the weights
        atomic_write_json(out_path.with_suffix(".json"), new_config if new_config is not None else converted.config)
    return out_path


def export_path(folder: str | os.PathLike, spec: ModelSpec, stem: str) -> Path:
    """Where to export an edit of ``spec``'s model in its own format: ``<stem>-hf/`` (a
    transformers folder) for a Hugging Face checkpoint, else ``<stem>.safetensors``."""
    hf = resolve_export_format(spec.resolved().checkpoint) == "hf"
    return Path(folder) / (f"{stem}-hf" if hf else f"{stem}.safetensors")

"""Reading weight files: safetensors and torch state dicts, read safely and inside the allowed folders.

The read step of loading (:mod:`~refineclip_core.loading.models` resolves a spec, reads its weights
here or through :mod:`~refineclip_core.loading.hf_clip`, then builds the model): no pickle that could
run code is ever loaded, ``module.`` prefixes (DDP) and training-checkpoint wrappers are unwrapped,
and weights that do not fit the architecture or hold NaN/infinity are refused in one sentence.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from typing import Any, Mapping

import torch

from ..errors import CheckpointError
from .confine import confined_path, open_confined


def file_digest(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (streamed; read under the confinement in force)."""
    h = hashlib.sha256()
    with open_confined(path) as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_memory(path: str | os.PathLike, *, budget: str | int | float | None = None) -> int:
    """Bytes the checkpoint ``path`` occupies in memory once read, from the file's own metadata,
    refused in one sentence (:class:`CheckpointError`) when they exceed the memory budget
    (:func:`~refineclip_core.loading.budget.memory_budget`); nothing is inflated or allocated.

    * safetensors: the file size (tensors are stored raw; the reader checks the header's offsets
      against the file, so a header cannot claim more than the file holds);
    * a torch zip (``torch.save`` since PyTorch 1.6): the sum of the entries' uncompressed sizes
      (``ZipInfo.file_size``, what the reader allocates for each record), not the file size: a
      re-deflated ``.pt`` of zeros is a few MB on disk and gigabytes once read;
    * an older (non-zip) torch file is refused: its storages are allocated from sizes inside the
      pickle, which cannot be checked before unpickling.
    """
    path = str(path)
    with open_confined(path) as fh:
        return _checked_memory(fh, path, budget)


def _checked_memory(fh, path: str, budget: str | int | float | None) -> int:
    """:func:`checkpoint_memory` of the open file ``fh`` (``path`` names it in messages and by its suffix)."""
    from .budget import format_bytes, memory_budget

    on_disk = os.fstat(fh.fileno()).st_size
    if path.endswith(".safetensors"):
        need = on_disk
    elif fh.read(4) == b"PK\x03\x04" and zipfile.is_zipfile(fh):  # torch's own test is the first bytes
        fh.seek(0)
        try:
            with zipfile.ZipFile(fh) as zf:
                need = sum(max(0, info.file_size) for info in zf.infolist())
        except (zipfile.BadZipFile, ValueError, OverflowError, OSError) as exc:
            raise CheckpointError(f"Checkpoint '{path}' is not a readable torch file ({exc}).") from exc
    else:
        raise CheckpointError(f"Checkpoint '{path}' is not a zip-format torch file (an old format from before "
                              "PyTorch 1.6, or not a checkpoint): its memory cannot be checked before it is read, "
                              "so it was refused; re-save it with a current torch.save or as .safetensors.")
    limit, source = memory_budget(budget)
    if limit is not None and need > limit:
        raise CheckpointError(f"Checkpoint '{path}' was refused before loading: its {format_bytes(on_disk)} file "
                              f"expands to {format_bytes(need)} in memory but the budget is {format_bytes(limit)} "
                              f"({source}).")
    return need


def read_state_dict(path: str | os.PathLike, *, budget: str | int | float | None = None) -> dict[str, torch.Tensor]:
    """Read a checkpoint file safely and return a plain ``name -> tensor`` state dict.

    Accepts safetensors, and torch files holding a state dict or a training checkpoint with a
    ``state_dict`` entry; strips ``module.`` prefixes. Never unpickles arbitrary objects. Under a
    confinement (:func:`~refineclip_core.loading.confine.current`) the path must lie inside its folders
    (checked before its existence, the same sentence either way) and so must the file actually opened. Its memory is checked against
    ``budget`` from its own metadata before anything is read (:func:`checkpoint_memory`).
    """
    from .sources import check_path

    path = str(path)
    check_path(path, "The checkpoint")
    if not os.path.isfile(path):
        raise CheckpointError(f"Checkpoint '{path}' does not exist.")
    try:
        with confined_path(path) as name:
            with open(name, "rb") as fh:  # the very file checked (``/proc/self/fd/N`` when confined)
                _checked_memory(fh, path, budget)
            state = _read_state(path, name)
    except OSError as exc:
        raise CheckpointError(f"Checkpoint '{path}' cannot be read ({exc.strerror or exc}).") from exc
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"Checkpoint '{path}' holds no state dict (found {type(state).__name__}).")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = str(key)
        while key.startswith("module."):
            key = key[len("module."):]
        out[key] = value
    if not out:
        raise CheckpointError(f"Checkpoint '{path}' contains no tensors.")
    return out


def _read_state(path: str, name: str) -> Any:
    """The object stored in checkpoint ``path``, read from ``name`` (the same file, see ``confined_path``)."""
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file

            state = load_file(name, device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"Checkpoint '{path}' is not a readable safetensors file ({exc}).") from exc
    else:
        try:
            state = torch.load(name, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "global" not in str(exc).lower():
                raise CheckpointError(
                    f"Checkpoint '{path}' could not be read: the safe (weights-only) loader rejected it as not a "
                    "plain tensor checkpoint. Re-save it as a state dict or as .safetensors."
                ) from exc
            raise CheckpointError(
                f"Checkpoint '{path}' was refused: it contains Python objects other than tensors and loading it "
                "could run code. Re-save it as a plain state dict or as .safetensors."
            ) from exc
        except Exception as exc:
            raise CheckpointError(f"Checkpoint '{path}' could not be read as a torch file ({exc}).") from exc
    return state


def load_state_dict_checked(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str, model_name: str) -> None:
    """Load ``state`` into ``model`` strictly, explaining any mismatch in one sentence."""
    own = model.state_dict()
    state = dict(state)
    if "logit_scale" in state and "logit_scale" in own and state["logit_scale"].shape != own["logit_scale"].shape:
        state["logit_scale"] = state["logit_scale"].reshape(own["logit_scale"].shape)
    if "logit_bias" in own and "logit_bias" not in state:
        state["logit_bias"] = torch.zeros_like(own["logit_bias"])
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        parts = []
        if wrong_shape:
            k = wrong_shape[0]
            parts.append(
                f"{len(wrong_shape)} shape mismatches (e.g. '{k}': checkpoint {tuple(state[k].shape)} vs "
                f"model {tuple(own[k].shape)})"
            )
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(repr(k) for k in missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(repr(k) for k in unexpected[:3])})")
        raise CheckpointError(
            f"Checkpoint '{source}' does not fit architecture '{model_name}': {'; '.join(parts)}. "
            "Pass the --model (or --model-config) the checkpoint was trained with." + hf_key_hint(unexpected)
        )
    check_finite(state, source)
    model.load_state_dict(state, strict=True)


def check_finite(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or infinity (a model built from them computes NaN features, and
    every later number, accuracies included, would be meaningless)."""
    for key, tensor in state.items():
        if tensor.is_floating_point() or tensor.is_complex():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise CheckpointError(f"Checkpoint '{source}' holds {bad:,} non-finite values (NaN or infinity) in "
                                      f"'{key}'; it was refused: a model with them computes no usable features.")


def hf_key_hint(keys) -> str:
    """A sentence for a state dict with transformers' key names offered as an open_clip one."""
    if any(str(k).startswith(("vision_model.", "text_model.")) for k in keys):
        return (" These are Hugging Face transformers CLIP weights: pass the folder CLIPModel.save_pretrained "
                "wrote (config.json beside the weights) as the checkpoint instead.")
    return ""

"""Loading open_clip models from names, pretrained tags, local checkpoints and config JSONs.

A :class:`ModelSpec` says *which* model (it is plain data, hashable, and goes into the run
configuration of every JSON output); :func:`load_model` turns it into a :class:`LoadedModel`
(the ``open_clip`` model in eval mode, its validation preprocessing and its tokenizer).

Checkpoints are read with ``torch.load(..., weights_only=True)`` or safetensors only: a
pickle that tries to run code is refused. ``module.`` prefixes (DDP) and open_clip training
checkpoints (``{"state_dict": ..., "epoch": ...}``) are accepted. A checkpoint for another
architecture is refused with the mismatching keys named. A Hugging Face ``transformers`` CLIP
(a ``save_pretrained`` folder, or its weights with ``config.json`` beside them) is converted into
the equivalent open_clip model by :mod:`~refineclip_core.loading.hf_clip`; its config names the
architecture.

Before ``open_clip`` allocates anything, the architecture's config is sized
(:mod:`refineclip_core.loading.budget`) and a model over the memory budget is refused. A spec
with ``roots`` (the dashboard's) reads its checkpoint and config only if the files actually
opened lie inside those folders (:mod:`refineclip_core.loading.confine`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import pickle
import re
import threading
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from ..errors import CheckpointError, RefineClipError
from ..home import ASSETS_DIR
from . import hf_clip
from .budget import check_model_budget
from .confine import confined_path, loads_json, open_confined, read_bytes, resolve_roots

DEMO_MODEL = "demo"
DEMO_DIR = ASSETS_DIR / "demo"
DEMO_MODEL_NAME = "refineclip-demo"

_DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSpec:
    """Which CLIP model to load.

    ``name`` is an open_clip architecture name (``ViT-B-16``), ``"demo"`` for the embedded
    demonstration model, or any name when ``model_config`` points at a config JSON (the schema
    of open_clip's ``model_configs``). Weights come from ``pretrained`` (an open_clip tag,
    downloaded on machines that can) or ``checkpoint`` (a local file, or a Hugging Face
    ``transformers`` CLIP folder — then ``name`` only labels the model); with neither, the
    weights are random (useful for tests and timing only). ``roots`` (the dashboard sets it)
    confines reading the checkpoint and config to those folders; None follows links anywhere.
    """

    name: str
    pretrained: str | None = None
    checkpoint: str | None = None
    model_config: str | None = None
    device: str = "cpu"
    precision: str = "fp32"
    roots: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.roots is not None and not isinstance(self.roots, tuple):  # e.g. a list from JSON
            object.__setattr__(self, "roots", tuple(str(r) for r in self.roots))

    def resolved(self) -> "ModelSpec":
        """The demo shorthand expanded into its committed config and checkpoint."""
        if self.name != DEMO_MODEL:
            return self
        return replace(
            self,
            name=DEMO_MODEL_NAME,
            checkpoint=self.checkpoint or str(_demo_checkpoint()),
            model_config=self.model_config or str(DEMO_DIR / f"{DEMO_MODEL_NAME}.json"),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> str:
        """A hash that changes when the architecture, the weights or the precision change."""
        spec = self.resolved()
        h = hashlib.sha256()
        h.update(json.dumps({k: v for k, v in asdict(spec).items() if k not in ("device", "roots")},
                            sort_keys=True).encode())
        for path in (*_checkpoint_files(spec.checkpoint, spec.roots), spec.model_config):
            if path and os.path.isfile(path):
                h.update(file_digest(path, spec.roots).encode())
        return h.hexdigest()[:16]


def _checkpoint_files(checkpoint: str | None, roots=None) -> tuple[str | Path | None, ...]:
    """The files behind ``checkpoint``: itself, or a transformers folder's config and weights."""
    try:
        hf = hf_clip.find_hf_checkpoint(checkpoint, roots)
    except CheckpointError:  # a broken transformers folder: loading it says what is wrong
        hf = None
    return hf.files() if hf else (checkpoint,)


def _demo_checkpoint() -> Path:
    for suffix in (".safetensors", ".pt"):
        path = DEMO_DIR / f"{DEMO_MODEL_NAME}{suffix}"
        if path.exists():
            return path
    return DEMO_DIR / f"{DEMO_MODEL_NAME}.safetensors"


def file_digest(path: str | os.PathLike, roots=None, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (streamed; read only inside ``roots`` when given)."""
    h = hashlib.sha256()
    with open_confined(path, resolve_roots(roots)) as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class LoadedModel:
    """An open_clip model ready for inference, with what is needed to feed it."""

    spec: ModelSpec
    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    model_name: str

    @property
    def visual(self) -> torch.nn.Module:
        return self.model.visual

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.visual.parameters()).dtype

    @property
    def logit_scale(self) -> float:
        """``logit_scale.exp()``: the temperature CLIP multiplies cosine similarities by."""
        return float(self.model.logit_scale.detach().exp().item())

    def preprocess_signature(self) -> str:
        """A description of the image preprocessing (part of the cache fingerprint)."""
        return repr(self.preprocess)


#: Largest model config JSON read (open_clip's are 1-2 kB).
MAX_CONFIG_BYTES = 1_000_000


def read_config(config_path: str | os.PathLike, roots=None) -> dict:
    """An open_clip model config JSON as a dict, refused in one sentence unless it is one.

    The file is read only inside ``roots`` when given, only up to :data:`MAX_CONFIG_BYTES`, and
    its nesting is measured before it is parsed (:func:`~refineclip_core.loading.confine.loads_json`),
    so a hostile file cannot exhaust the parser. Nothing is registered anywhere."""
    path = Path(config_path)
    what = f"Model config '{config_path}'"
    if not path.is_file():
        raise RefineClipError(f"{what} does not exist; pass an open_clip config JSON file.")
    try:
        data = read_bytes(path, resolve_roots(roots), limit=MAX_CONFIG_BYTES)
    except OSError as exc:
        raise RefineClipError(f"{what} cannot be read ({exc.strerror or exc}).") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise RefineClipError(f"{what} is larger than {MAX_CONFIG_BYTES // 1000} kB; an open_clip "
                              "config JSON is a few kB, so this is not one.")
    cfg = loads_json(data, what, RefineClipError)
    if isinstance(cfg, dict) and isinstance(cfg.get("model_cfg"), dict):  # hub-style open_clip_config.json
        cfg = cfg["model_cfg"]
    if (not isinstance(cfg, dict) or not isinstance(cfg.get("vision_cfg"), dict)
            or not isinstance(cfg.get("text_cfg"), dict)):
        raise RefineClipError(f"{what} lacks 'vision_cfg'/'text_cfg'; use open_clip's model config schema.")
    return cfg


@contextlib.contextmanager
def config_known_to_open_clip(name: str, cfg: Mapping[str, Any]) -> Iterator[str]:
    """While the block runs, ``cfg`` is known to open_clip (``create_model``, ``get_tokenizer``,
    ``get_model_config``) under the name yielded; afterwards it is gone again.

    open_clip's config registry is one dict for the whole process (every dashboard session). A
    user's config enters it only for the duration of one model build, under a name no other
    build uses (``<name>-<random>``), and is removed in a ``finally``: it never changes what
    another session loads, and nothing is written to disk (``open_clip.add_model_config`` would
    keep a file path that every later registration re-reads)."""
    from open_clip import factory

    registered = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)[:80]}-{uuid.uuid4().hex[:12]}"
    factory._MODEL_CONFIGS[registered] = copy.deepcopy(dict(cfg))
    try:
        yield registered
    finally:
        factory._MODEL_CONFIGS.pop(registered, None)


def read_state_dict(path: str | os.PathLike, roots=None) -> dict[str, torch.Tensor]:
    """Read a checkpoint file safely and return a plain ``name -> tensor`` state dict.

    Accepts safetensors, and torch files holding a state dict or a training checkpoint with a
    ``state_dict`` entry; strips ``module.`` prefixes. Never unpickles arbitrary objects. With
    ``roots`` the file actually opened must lie inside those folders.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"Checkpoint '{path}' does not exist.")
    try:
        with confined_path(path, resolve_roots(roots)) as name:
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
            "Pass the --model (or --model-config) the checkpoint was trained with." + hf_clip.hf_key_hint(unexpected)
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


def load_model(spec: ModelSpec, memory_budget: str | int | float | None = None) -> LoadedModel:
    """Build the open_clip model described by ``spec`` (eval mode, on ``spec.device``).

    The architecture's config is sized first and refused above ``memory_budget`` (bytes or a
    size like ``"16GB"``; default :func:`refineclip_core.loading.budget.memory_budget`)."""
    import open_clip
    from open_clip.model import set_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg, image_transform_v2

    spec_r = spec.resolved()
    name = arch = spec_r.name  # arch: the name open_clip knows the architecture by
    if spec.name == DEMO_MODEL and not Path(spec_r.checkpoint).exists():
        raise CheckpointError(
            f"The embedded demo checkpoint '{spec_r.checkpoint}' is missing; run "
            "'python -m refineclip_core.demo.train --out assets/demo' to rebuild it."
        )
    hf = hf_clip.find_hf_checkpoint(spec_r.checkpoint, spec_r.roots)  # a transformers CLIP (loading/hf_clip.py)
    hf_model = hf_clip.read_hf_config(hf, spec_r.roots) if hf else None
    user_cfg: dict | None = None  # a config the user handed in: known to open_clip only while building
    if hf_model is not None:
        if spec_r.model_config or spec_r.pretrained:
            raise RefineClipError(f"'{spec_r.checkpoint}' is a Hugging Face CLIP checkpoint with its own config.json; "
                                  "drop --model-config and --pretrained.")
        user_cfg, label = hf_model.config, f"hf-{hf_model.label}"
    elif spec_r.model_config:
        user_cfg, label = read_config(spec_r.model_config, spec_r.roots), name
    elif not name.startswith(("hf-hub:", "local-dir:")) and name not in open_clip.list_models():
        raise RefineClipError(
            f"Unknown model '{name}': not an open_clip architecture (see open_clip.list_models()) and no "
            "--model-config given."
        )
    if spec_r.precision not in _DTYPES:
        raise RefineClipError(f"Unknown precision '{spec_r.precision}'; use one of {sorted(_DTYPES)}.")
    if spec_r.device.startswith("cuda") and not torch.cuda.is_available():
        raise RefineClipError(f"Device '{spec_r.device}' was asked for but no CUDA GPU is available here; use --device cpu.")
    if spec_r.pretrained and spec_r.checkpoint:
        raise RefineClipError("Give either a pretrained tag or a checkpoint file, not both.")

    pretrained = spec_r.pretrained
    if pretrained and os.path.isfile(pretrained):
        spec_r = replace(spec_r, checkpoint=pretrained, pretrained=None)
        pretrained = None
    cfg = user_cfg if user_cfg is not None else open_clip.get_model_config(arch)
    if cfg is not None:  # None: a hub model whose config open_clip fetches itself
        ckpt_bytes = None if pretrained else os.path.getsize(spec_r.checkpoint) if spec_r.checkpoint else 0
        check_model_budget(name, cfg, spec_r.precision, ckpt_bytes, memory_budget)
    known = config_known_to_open_clip(label, user_cfg) if user_cfg is not None else contextlib.nullcontext(arch)
    with known as arch:
        try:
            # open_clip warns "initialized randomly" when no tag is given; our checkpoint is loaded next
            quiet = _checkpoint_follows() if spec_r.checkpoint else contextlib.nullcontext()
            with quiet:
                model = open_clip.create_model(arch, pretrained=pretrained, device="cpu", weights_only=True)
        except Exception as exc:
            if pretrained:
                raise RefineClipError(
                    f"Could not load weights '{pretrained}' for model '{name}' ({_short(exc)}). This machine may be "
                    f"offline: download them where you have internet and pass the file with --checkpoint, or check "
                    f"the tag with open_clip.list_pretrained_tags_by_model('{name}')."
                ) from exc
            raise RefineClipError(f"Could not build model '{name}' ({_short(exc)}).") from exc
        tokenizer = open_clip.get_tokenizer(arch)
    if hf_model is not None:  # weights read only now: after the size check above
        state = hf_clip.read_hf_state_dict(hf, hf_model, spec_r.roots)
        load_state_dict_checked(model, state, spec_r.checkpoint, name)
        set_model_preprocess_cfg(model, {**model.visual.preprocess_cfg, **hf_model.preprocess})
    elif spec_r.checkpoint:
        load_state_dict_checked(model, read_state_dict(spec_r.checkpoint, spec_r.roots), spec_r.checkpoint, name)
    dtype = _DTYPES[spec_r.precision]
    model = model.to(device=spec_r.device, dtype=dtype).eval().requires_grad_(False)
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    return LoadedModel(spec=spec, model=model, preprocess=preprocess, tokenizer=tokenizer, model_name=name)


class _RandomInitNotice(logging.Filter):
    """Drops open_clip's "initialized randomly" warning, and nothing else, while *this thread* builds
    a model whose weights are read from a checkpoint right after (see :func:`_checkpoint_follows`).

    Installed once on the root logger (open_clip logs there); it never changes a logger's level, so
    other sessions' loads and every other message are untouched, even when loads overlap."""

    NOTICE = "No pretrained weights loaded for model"

    def __init__(self) -> None:
        super().__init__()
        self.active = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not (getattr(self.active, "depth", 0) > 0 and str(record.msg).startswith(self.NOTICE))


_RANDOM_INIT_NOTICE = _RandomInitNotice()
logging.getLogger().addFilter(_RANDOM_INIT_NOTICE)


@contextlib.contextmanager
def _checkpoint_follows():
    """While open_clip builds a model in this thread, its weights come from our checkpoint next:
    its "initialized randomly" notice is dropped (in this thread only)."""
    active = _RANDOM_INIT_NOTICE.active
    active.depth = getattr(active, "depth", 0) + 1
    try:
        yield
    finally:
        active.depth -= 1


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]

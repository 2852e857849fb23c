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
opened lie inside those folders (:mod:`refineclip_core.loading.confine`): :meth:`ModelSpec.confinement`
is put in force once, for the whole load, and every reader below consults it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..errors import CheckpointError, RefineClipError
from ..home import ASSETS_DIR
from . import hf_clip
from .budget import check_model_budget, format_bytes
from .checkpoints import checkpoint_memory, file_digest, load_state_dict_checked, read_state_dict
from .confine import Confinement, loads_json, read_bytes
from .open_clip_state import checkpoint_follows, config_known_to_open_clip
from .sources import LOCAL_DIR_PREFIX, check_config_sources, check_spec_sources, sources_confinement
from .tokenizers import deferred_tokenizer

DEMO_MODEL = "demo"
DEMO_DIR = ASSETS_DIR / "demo"
DEMO_MODEL_NAME = "refineclip-demo"
#: The second embedded demo model, SigLIP-shaped (timm ViT trunk, map pooling, no projection, sigmoid loss):
#: ``ModelSpec("demo-map")`` (refineclip_core/demo/siglip.py, assets/demo_siglip/README.md).
DEMO_MAP_MODEL = "demo-map"
DEMO_MAP_DIR = ASSETS_DIR / "demo_siglip"
DEMO_MAP_MODEL_NAME = "refineclip-demo-map"
#: Shorthand -> (folder, open_clip model name) of the embedded demo models.
DEMO_MODELS = {DEMO_MODEL: (DEMO_DIR, DEMO_MODEL_NAME), DEMO_MAP_MODEL: (DEMO_MAP_DIR, DEMO_MAP_MODEL_NAME)}

#: Key of the model's :meth:`ModelSpec.fingerprint` in a feature cache manifest's ``extra``: a cache
#: is opened only with the model that made it (:func:`refineclip_core.session.caches.cache_model`).
MODEL_FINGERPRINT = "model_fingerprint"

_DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSpec:
    """Which CLIP model to load.

    ``name`` is an open_clip architecture name (``ViT-B-16``), ``"demo"`` for the embedded
    demonstration model (``"demo-map"``: the SigLIP-shaped one), or any name when ``model_config``
    points at a config JSON (the schema of open_clip's ``model_configs``). Weights come from ``pretrained`` (an open_clip tag,
    downloaded on machines that can) or ``checkpoint`` (a local file, or a Hugging Face
    ``transformers`` CLIP folder — then ``name`` only labels the model); with neither, the
    weights are random (useful for tests and timing only). ``roots`` (the dashboard sets it)
    pins the folders its files are read from (:meth:`confinement`); None: the confinement in force.
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
        """A demo shorthand (``demo``, ``demo-map``) expanded into its committed config and checkpoint."""
        if self.name not in DEMO_MODELS:
            return self
        folder, name = DEMO_MODELS[self.name]
        return replace(
            self,
            name=name,
            checkpoint=self.checkpoint or str(_demo_checkpoint(folder, name)),
            model_config=self.model_config or str(folder / f"{name}.json"),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def key(self) -> str:
        """The spec as canonical JSON (sorted keys): the one string that keys a model (the dashboard's
        shared resources, a source's key); :meth:`from_key` reads it back."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_key(cls, key: str) -> "ModelSpec":
        """The spec :meth:`key` wrote."""
        return cls(**json.loads(key))

    def confinement(self) -> Confinement:
        """What this model's files are read under: its pinned ``roots`` (a dashboard session's), else the
        confinement in force (:func:`~.sources.sources_confinement`), with the embedded demo models' folders."""
        return sources_confinement(self.roots).widened(*(folder for folder, _ in DEMO_MODELS.values()))

    def fingerprint(self) -> str:
        """A hash that changes when the architecture, the weights or the precision change (the files
        are hashed only after every model source passed :func:`~.sources.check_spec_sources`)."""
        spec = self.resolved()
        with self.confinement().active():
            check_spec_sources(spec.name, spec.checkpoint, spec.model_config, spec.pretrained)
            h = hashlib.sha256()
            h.update(json.dumps({k: v for k, v in asdict(spec).items() if k not in ("device", "roots")},
                                sort_keys=True).encode())
            local = _local_dir_files(spec.name) if spec.name.startswith(LOCAL_DIR_PREFIX) else ()
            for path in (*_checkpoint_files(spec.checkpoint), spec.model_config, *local):
                if path and os.path.isfile(path):
                    h.update(file_digest(path).encode())
        return h.hexdigest()[:16]


def _checkpoint_files(checkpoint: str | None) -> tuple[str | Path | None, ...]:
    """The files behind ``checkpoint``: itself, or a transformers folder's config and weights."""
    try:
        hf = hf_clip.find_hf_checkpoint(checkpoint)
    except CheckpointError:  # a broken transformers folder: loading it says what is wrong
        hf = None
    return hf.files() if hf else (checkpoint,)


def _demo_checkpoint(folder: Path = DEMO_DIR, name: str = DEMO_MODEL_NAME) -> Path:
    for suffix in (".safetensors", ".pt"):
        path = folder / f"{name}{suffix}"
        if path.exists():
            return path
    return folder / f"{name}.safetensors"


@dataclass
class LoadedModel:
    """An open_clip model ready for inference, with what is needed to feed it."""

    spec: ModelSpec
    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    model_name: str
    #: the open_clip config it was built from (:meth:`ModelPlan.open_clip_config`; None: a hub model's)
    open_clip_config: dict | None = None

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


def read_config(config_path: str | os.PathLike, *, whole: bool = False) -> dict:
    """An open_clip model config JSON as a dict, refused in one sentence unless it is one.

    The file is read under the confinement in force, only up to :data:`MAX_CONFIG_BYTES`, and
    its nesting is measured before it is parsed (:func:`~refineclip_core.loading.confine.loads_json`),
    so a hostile file cannot exhaust the parser. Nothing is registered anywhere. ``whole``: the
    file's object as written (a hub-style file keeps its ``preprocess_cfg`` beside ``model_cfg``)."""
    path = Path(config_path)
    what = f"Model config '{config_path}'"
    if not path.is_file():
        raise RefineClipError(f"{what} does not exist; pass an open_clip config JSON file.")
    try:
        data = read_bytes(path, limit=MAX_CONFIG_BYTES)
    except OSError as exc:
        raise RefineClipError(f"{what} cannot be read ({exc.strerror or exc}).") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise RefineClipError(f"{what} is larger than {MAX_CONFIG_BYTES // 1000} kB; an open_clip "
                              "config JSON is a few kB, so this is not one.")
    cfg = loads_json(data, what, RefineClipError)
    if whole and isinstance(cfg, dict):
        return cfg
    if isinstance(cfg, dict) and isinstance(cfg.get("model_cfg"), dict):  # hub-style open_clip_config.json
        cfg = cfg["model_cfg"]
    if (not isinstance(cfg, dict) or not isinstance(cfg.get("vision_cfg"), dict)
            or not isinstance(cfg.get("text_cfg"), dict)):
        raise RefineClipError(f"{what} lacks 'vision_cfg'/'text_cfg'; use open_clip's model config schema.")
    return cfg


@dataclass(frozen=True)
class ModelPlan:
    """What :func:`resolve_model` found in a :class:`ModelSpec`: the architecture open_clip builds
    and where its weights come from. Nothing has been allocated or read beyond configs."""

    spec: ModelSpec              # resolved: the demo expanded, a ``pretrained`` file moved to ``checkpoint``
    name: str                    # the model's label
    user_config: dict | None     # a config the user handed in (a JSON file, or a transformers folder's)
    hf: hf_clip.HFCheckpoint | None = None   # a transformers folder: its weights are renamed when read
    preprocess: Mapping[str, Any] = field(default_factory=dict)  # overrides (a preprocessor_config.json)

    def open_clip_config(self) -> dict | None:
        """The config that is sized and built (None: a hub model whose config open_clip fetches)."""
        import open_clip

        return self.user_config if self.user_config is not None else open_clip.get_model_config(self.name)

    def checkpoint_bytes(self, budget: str | int | float | None = None) -> int | None:
        """Bytes the weights read next to the model take in memory, from the files' own metadata (a
        re-deflated ``.pt`` counts as large as it expands, :func:`~.checkpoints.checkpoint_memory`,
        refused above ``budget``); None: a tag open_clip downloads."""
        if self.spec.pretrained:
            return None
        files = self.hf.weights if self.hf is not None else (self.spec.checkpoint,) if self.spec.checkpoint else ()
        with self.spec.confinement().active():
            return sum(checkpoint_memory(f, budget=budget) for f in files)


def resolve_model(spec: ModelSpec) -> ModelPlan:
    """Resolve: which architecture, which config and which weights ``spec`` means, refused in one
    sentence when it means none. A Hugging Face ``transformers`` folder is one branch here (its
    config converted, :mod:`~refineclip_core.loading.hf_clip`); read and build do not care. Everything
    is checked and read under :meth:`ModelSpec.confinement`, which the plan's spec pins for the read."""
    confinement = spec.confinement()
    with confinement.active():
        return _resolve(spec, replace(spec.resolved(), roots=confinement.folders))


def _resolve(spec: ModelSpec, spec_r: ModelSpec) -> ModelPlan:
    """:func:`resolve_model` of ``spec`` (``spec_r``: resolved, pinned to the confinement in force)."""
    import open_clip

    name = spec_r.name
    # every model source is checked before anything is read; reads below are confined to the same folders
    check_spec_sources(name, spec_r.checkpoint, spec_r.model_config, spec_r.pretrained)
    if spec.name in DEMO_MODELS and not Path(spec_r.checkpoint).exists():
        recipe = " --recipe siglip --out assets/demo_siglip" if spec.name == DEMO_MAP_MODEL else " --out assets/demo"
        raise CheckpointError(
            f"The embedded demo checkpoint '{spec_r.checkpoint}' is missing; run "
            f"'python -m refineclip_core.demo.train{recipe}' to rebuild it."
        )
    if spec_r.precision not in _DTYPES:
        raise RefineClipError(f"Unknown precision '{spec_r.precision}'; use one of {sorted(_DTYPES)}.")
    if spec_r.device.startswith("cuda") and not torch.cuda.is_available():
        raise RefineClipError(f"Device '{spec_r.device}' was asked for but no CUDA GPU is available here; use --device cpu.")
    if spec_r.pretrained and spec_r.checkpoint:
        raise RefineClipError("Give either a pretrained tag or a checkpoint file, not both.")
    if spec_r.pretrained and os.path.isfile(spec_r.pretrained):  # a file path passed as the tag
        spec_r = replace(spec_r, checkpoint=spec_r.pretrained, pretrained=None)
    hf = hf_clip.find_hf_checkpoint(spec_r.checkpoint)
    if hf is not None:
        if spec_r.model_config or spec_r.pretrained:
            raise RefineClipError(f"'{spec_r.checkpoint}' is a Hugging Face CLIP checkpoint with its own config.json; "
                                  "drop --model-config and --pretrained.")
        converted = hf_clip.read_hf_config(hf)
        check_config_sources(converted.config, name=converted.label, what=f"The config of '{spec_r.checkpoint}'")
        return ModelPlan(spec_r, f"hf-{converted.label}", converted.config, hf, converted.preprocess)
    if name.startswith(LOCAL_DIR_PREFIX) and not spec_r.model_config:
        return _local_dir_plan(spec_r)
    if spec_r.model_config:
        cfg = read_config(spec_r.model_config)
        check_config_sources(cfg, name=name, what=f"The model config '{spec_r.model_config}'")
        return ModelPlan(spec_r, name, cfg)
    if not name.startswith("hf-hub:") and name not in open_clip.list_models():
        raise RefineClipError(
            f"Unknown model '{name}': not an open_clip architecture (see open_clip.list_models()) and no "
            "--model-config given."
        )
    if not name.startswith("hf-hub:"):
        check_config_sources(open_clip.get_model_config(name) or {}, name=name, what=f"The config of '{name}'")
    return ModelPlan(spec_r, name, None)


#: Weights open_clip looks for in a ``local-dir:`` folder, in its order of preference.
_LOCAL_DIR_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                      "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth", "model.safetensors",
                      "pytorch_model.bin", "pytorch_model.pth", "model.pth")


def _local_dir_files(name: str) -> tuple[Path, Path | None]:
    """The config and the weights (None: none there) of a ``local-dir:<folder>`` name."""
    folder = Path(name[len(LOCAL_DIR_PREFIX):]).expanduser()
    return folder / "open_clip_config.json", next((folder / w for w in _LOCAL_DIR_WEIGHTS if (folder / w).is_file()), None)


def _local_dir_plan(spec: ModelSpec) -> ModelPlan:
    """A ``local-dir:<folder>`` name (open_clip's ``open_clip_config.json`` plus weights) read as a
    config and a checkpoint of ours, so it is sized, confined and read like any other."""
    config, weights = _local_dir_files(spec.name)
    cfg = read_config(config)
    check_config_sources(cfg, name=spec.name, what=f"The model config '{config}'")
    preprocess = read_config(config, whole=True).get("preprocess_cfg")
    spec = replace(spec, model_config=str(config), checkpoint=str(weights) if weights else None)
    return ModelPlan(spec, spec.name, cfg, preprocess=preprocess if isinstance(preprocess, dict) else {})


def read_weights(plan: ModelPlan, budget: str | int | float | None = None) -> dict[str, torch.Tensor] | None:
    """Read: the plan's weights under open_clip's names, under the spec's confinement (None: a tag that
    open_clip loads itself, or random weights)."""
    spec = plan.spec
    with spec.confinement().active():
        if plan.hf is not None:
            converted = hf_clip.ConvertedCLIP(plan.name, plan.user_config, {}, dict(plan.preprocess))
            return hf_clip.read_hf_state_dict(plan.hf, converted)
        if spec.checkpoint:
            return read_state_dict(spec.checkpoint, budget=budget)
    return None


#: A checkpoint may take at most this many times the model's float32 weights in memory (a training
#: checkpoint keeps Adam's two moments beside them: three), plus a margin; a larger one is refused
#: from its metadata before it is read, whatever the memory budget.
CHECKPOINT_RATIO, CHECKPOINT_MARGIN = 4, 64 * 2**20


def build_model(plan: ModelPlan, memory_budget: str | int | float | None = None) -> tuple[torch.nn.Module, Callable]:
    """Build: size the plan's architecture against ``memory_budget`` (before anything is
    allocated), then let open_clip build it on the CPU; returns the model and its tokenizer. A
    user's config is known to open_clip only during the build (:func:`config_known_to_open_clip`)."""
    import open_clip

    spec = plan.spec
    cfg = plan.open_clip_config()
    if cfg is not None:  # None: a hub model whose config open_clip fetches itself
        ckpt = plan.checkpoint_bytes(memory_budget)
        est = check_model_budget(plan.name, cfg, spec.precision, ckpt, memory_budget)
        if ckpt and ckpt > CHECKPOINT_RATIO * est.weight_bytes + CHECKPOINT_MARGIN:
            raise CheckpointError(
                f"Checkpoint '{spec.checkpoint}' was refused before loading: it expands to {format_bytes(ckpt)} in "
                f"memory, more than {CHECKPOINT_RATIO} times the {format_bytes(est.weight_bytes)} of weights of model "
                f"'{plan.name}', so it is not this model's checkpoint (another model's, or a compressed file that inflates).")
    known = (config_known_to_open_clip(plan.name, plan.user_config) if plan.user_config is not None
             else contextlib.nullcontext(plan.name))
    with known as arch:
        try:
            # open_clip warns "initialized randomly" when no tag is given; our checkpoint is loaded next
            with checkpoint_follows() if spec.checkpoint else contextlib.nullcontext():
                model = open_clip.create_model(arch, pretrained=spec.pretrained, device="cpu", weights_only=True)
        except Exception as exc:
            if spec.pretrained:
                raise RefineClipError(
                    f"Could not load weights '{spec.pretrained}' for model '{plan.name}' ({_short(exc)}). This machine "
                    f"may be offline: download them where you have internet and pass the file with --checkpoint, or "
                    f"check the tag with open_clip.list_pretrained_tags_by_model('{plan.name}')."
                ) from exc
            raise RefineClipError(f"Could not build model '{plan.name}' ({_short(exc)}).") from exc
    # built when prompts are first tokenised: vision-only work needs none; a missing one is one sentence
    return model, deferred_tokenizer(plan.name, plan.user_config, config_known_to_open_clip)


def load_model(spec: ModelSpec, memory_budget: str | int | float | None = None) -> LoadedModel:
    """Build the open_clip model described by ``spec`` (eval mode, on ``spec.device``): resolve
    (:func:`resolve_model`), build (:func:`build_model`, sized first and refused above
    ``memory_budget``: bytes or a size like ``"16GB"``; default
    :func:`refineclip_core.loading.budget.memory_budget`), read the weights (:func:`read_weights`,
    only after the size check) and load them strictly."""
    from open_clip.model import set_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg, image_transform_v2

    plan = resolve_model(spec)
    model, tokenizer = build_model(plan, memory_budget)
    state = read_weights(plan, memory_budget)
    if state is not None:
        load_state_dict_checked(model, state, plan.spec.checkpoint, plan.spec.name)
    if plan.preprocess:
        set_model_preprocess_cfg(model, {**model.visual.preprocess_cfg, **plan.preprocess})
    model = model.to(device=plan.spec.device, dtype=_DTYPES[plan.spec.precision]).eval().requires_grad_(False)
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    return LoadedModel(spec=spec, model=model, preprocess=preprocess, tokenizer=tokenizer, model_name=plan.name,
                       open_clip_config=plan.open_clip_config())


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]

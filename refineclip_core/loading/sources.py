"""Every model source confined: each name or path a model spec or config uses to reach files,
checked against the allowed folders before anything is read.

A model is read from more places than its checkpoint: the spec's ``name`` (open_clip reads
``local-dir:<folder>`` and downloads ``hf-hub:<repo>``), its ``model_config`` and ``pretrained``
file, and inside a config ``text_cfg.hf_model_name`` (a Hugging Face text tower, its config and
weights), ``text_cfg.hf_tokenizer_name``, paths in ``text_cfg.tokenizer_kwargs`` and a timm tower's
``hf-hub:``/``local-dir:`` name. :func:`check_spec_sources` and :func:`check_config_sources` check
every one of them with the same rule as checkpoints (:func:`~refineclip_core.loading.confine.is_inside`
on the resolved path), before any file is opened:

* Which folders (:func:`sources_confinement`): the confinement in force
  (:func:`~refineclip_core.loading.confine.current`: a dashboard session's, else, when
  ``REFINECLIP_ALLOWED_ROOTS`` is set, the allowed roots of a CLI run by a server or a service, else
  none: a local user's CLI follows paths as typed); :func:`~.models.load_model` puts a spec's pinned
  ``roots`` in force first. The embedded demo model's folder is always among them.
* A path outside those folders is refused with one sentence that is the same whether the path
  exists, is missing, or is a file (:func:`outside_sources_error`): no existence oracle.
* A name that needs the Hugging Face hub (``hf-hub:``, a repository id such as ``org/model``,
  open_clip's SigLIP tokenizer) is refused unless the operator sets ``REFINECLIP_ALLOW_HUB=1``
  (:data:`HUB_ENV`): a server never fetches repositories its users name.
* ``trust_remote_code`` in a config is always refused: the studio never runs code from a model folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import OutsideRootsError, RefineClipError
from ..home import ASSETS_DIR
from .confine import OUTSIDE_REASON, Confinement, pinned

#: Environment variable an operator sets to ``1`` to let a confined server download named hub models.
HUB_ENV = "REFINECLIP_ALLOW_HUB"
HF_HUB_PREFIX, LOCAL_DIR_PREFIX = "hf-hub:", "local-dir:"
#: A Hugging Face repository id (``model`` or ``org/model``): no component starts with ``.`` or ``-``.
_REPO_ID = re.compile(r"[A-Za-z0-9_][\w.-]{0,95}(/[A-Za-z0-9_][\w.-]{0,95})?")
#: tokenizer_kwargs keys that name files or folders.
_PATH_KEYS = re.compile(r".*(_path|_file|_dir|_folder)$")


def hub_allowed() -> bool:
    """Whether the operator allowed downloads from the Hugging Face hub (:data:`HUB_ENV`)."""
    return os.environ.get(HUB_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def sources_confinement(pin: Sequence[str | os.PathLike] | None = None) -> Confinement:
    """The confinement every model source is checked against and read under: ``pin`` (a spec's
    ``roots``) when given, else the one in force, with the embedded demo model's folder."""
    return pinned(pin).widened(ASSETS_DIR / "demo")


def outside_sources_error(text: str, what: str) -> OutsideRootsError:
    """The one sentence for a model source outside the folders (independent of whether it exists)."""
    shown = ", ".join(str(r) for r in sources_confinement().roots or ()) or "none configured"
    return OutsideRootsError(f"{what} '{str(text)[:300]}' is not one this session may read: it lies outside the "
                             f"allowed folders ({shown}), in another session's folder, or is a {OUTSIDE_REASON}; "
                             "nothing was read.")


def check_path(path: str | os.PathLike, what: str) -> None:
    """Refuse ``path`` unless it resolves inside :func:`sources_confinement` (links resolved; existence
    never consulted; nothing is refused where nothing is confined)."""
    conf = sources_confinement()
    if not conf.confined:
        return
    try:
        real = Path(os.fspath(path)).expanduser().resolve()
    except (OSError, RuntimeError, ValueError, TypeError):  # a link loop, an embedded NUL: not readable here
        real = None
    if real is None or not conf.contains(real):
        raise outside_sources_error(os.fspath(path), what)


def check_hub(name: str, what: str) -> None:
    """Refuse a name that needs the Hugging Face hub unless the operator allowed it (:data:`HUB_ENV`)."""
    if not hub_allowed():
        raise RefineClipError(f"{what} '{str(name)[:300]}' names a model on the Hugging Face hub; this server "
                              f"does not download from the hub unless started with {HUB_ENV}=1, so nothing was "
                              "fetched (put the model's files inside the allowed folders and name that folder).")


def check_hf_name(name: Any, what: str) -> None:
    """A Hugging Face model or tokenizer name (``hf_model_name``, ``hf_tokenizer_name``): a folder
    inside :func:`sources_confinement` or, with :data:`HUB_ENV`, a hub repository id; anything else is refused."""
    if not isinstance(name, str) or not name.strip():
        raise RefineClipError(f"{what} must be a folder path or a model name, not {str(name)[:60]!r}.")
    if name.startswith(HF_HUB_PREFIX):
        return check_hub(name[len(HF_HUB_PREFIX):], what)
    if name.startswith(LOCAL_DIR_PREFIX):
        return check_path(name[len(LOCAL_DIR_PREFIX):], what)
    if _REPO_ID.fullmatch(name) and ".." not in name:
        # read as a folder relative to the working directory when one exists there, else fetched from the hub
        local = Path(name).resolve()
        conf = sources_confinement()
        if conf.contains(local) and local.is_dir():
            return None
        check_hub(name, what)  # without the opt-in: the same answer whether or not such a folder exists
        if local.exists() and not conf.contains(local):
            raise outside_sources_error(name, what)
        return None
    check_path(name, what)


def check_config_sources(cfg: Mapping[str, Any], *, name: str = "", what: str = "The model config") -> None:
    """Check every source an open_clip model config names against :func:`sources_confinement` (see the
    module docstring); ``name`` is the architecture's name (open_clip picks a hub tokenizer for names containing ``siglip``)."""
    text = cfg.get("text_cfg") if isinstance(cfg.get("text_cfg"), Mapping) else {}
    vision = cfg.get("vision_cfg") if isinstance(cfg.get("vision_cfg"), Mapping) else {}
    kwargs = text.get("tokenizer_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise RefineClipError(f"{what}'s text_cfg.tokenizer_kwargs must be a JSON object.")
    if any(k == "trust_remote_code" and v for k, v in kwargs.items()) or cfg.get("trust_remote_code"):
        raise RefineClipError(f"{what} asks to trust remote code; the studio never runs code from a model "
                              "folder, so it was refused.")
    if not sources_confinement().confined:
        return
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if text.get(key):
            check_hf_name(text[key], f"{what}'s text_cfg.{key}")
    for key, value in kwargs.items():
        if _PATH_KEYS.fullmatch(str(key)) and value is not None:
            check_path(str(value), f"{what}'s text_cfg.tokenizer_kwargs.{key}")
    timm_name = vision.get("timm_model_name")
    if isinstance(timm_name, str) and timm_name.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)):
        check_hf_name(timm_name, f"{what}'s vision_cfg.timm_model_name")
    if "siglip" in str(name).lower() and not text.get("hf_tokenizer_name") and not hub_allowed():
        raise RefineClipError(f"The model name '{str(name)[:100]}' contains 'siglip' and its config names no tokenizer, "
                              "so open_clip would download a SigLIP vocabulary from storage.googleapis.com; this "
                              f"server does not download unless started with {HUB_ENV}=1 (name a tokenizer folder "
                              "inside the allowed folders in text_cfg.hf_tokenizer_name, or give the config a name "
                              "without 'siglip' if it uses CLIP's tokenizer).")


def check_spec_sources(name: str, checkpoint: str | None, model_config: str | None, pretrained: str | None, *,
                       owner: str = "The") -> None:
    """Check the model name (``local-dir:``/``hf-hub:``), checkpoint, config and pretrained file of a
    spec against :func:`sources_confinement` (``owner`` starts each refusal: ``"The cache's"``)."""
    confined = sources_confinement().confined
    if name.startswith(HF_HUB_PREFIX):
        if confined:
            check_hub(name[len(HF_HUB_PREFIX):], f"{owner} model name")
        return
    if not confined:
        return
    if name.startswith(LOCAL_DIR_PREFIX):
        check_path(name[len(LOCAL_DIR_PREFIX):], f"{owner} model folder")
    for what, path in (("checkpoint", checkpoint), ("model config", model_config)):
        if path:
            check_path(path, f"{owner} {what}")
    if pretrained and (os.sep in pretrained or "." in pretrained or pretrained.startswith("~")):  # a file, not a tag
        check_path(pretrained, f"{owner} pretrained file")

"""Finding a transformers CLIP checkpoint: a ``save_pretrained`` folder, or a weight file with its ``config.json``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from ...errors import CheckpointError, RefineClipError
from ..confine import loads_json, read_bytes


CONFIG_FILE = "config.json"


PREPROCESSOR_FILE = "preprocessor_config.json"


WEIGHTS_FILE = "model.safetensors"


#: Weight files of a ``save_pretrained`` folder, in the order transformers prefers them.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


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


#: Largest JSON file of a checkpoint folder read (configs and shard indexes are a few kB to a few MB).
MAX_JSON_BYTES = 16_000_000


def _read_json(path: Path) -> Any:
    """A JSON file's content, read under the confinement in force (see loading/confine.py), its
    size and nesting limited before it is parsed."""
    try:
        data = read_bytes(path, limit=MAX_JSON_BYTES)
    except OSError as exc:
        raise CheckpointError(f"'{path}' is not readable JSON ({exc}).") from exc
    if len(data) > MAX_JSON_BYTES:
        raise CheckpointError(f"'{path}' is larger than {MAX_JSON_BYTES // 1_000_000} MB; not a checkpoint's JSON.")
    return loads_json(data, f"'{path}'", CheckpointError)


def _is_hf_config(path: Path) -> bool:
    try:
        cfg = _read_json(path)
    except RefineClipError:
        return False
    return isinstance(cfg, dict) and "model_type" in cfg


def _shards(index: Path) -> tuple[Path, ...]:
    data = _read_json(index)
    names = sorted(set((data.get("weight_map") or {}).values())) if isinstance(data, dict) else []
    if not names:
        raise CheckpointError(f"The shard index '{index}' names no weight files.")
    return tuple(index.parent / n for n in names)


def find_hf_checkpoint(path: str | os.PathLike | None) -> HFCheckpoint | None:
    """The transformers checkpoint at ``path``, or None when ``path`` is not one.

    ``path`` is a ``save_pretrained`` folder, or a weight file (``.safetensors``, ``.bin``, a
    shard index) with a transformers ``config.json`` (one with a ``model_type``) beside it.
    Under a confinement every file read is checked against it when opened (loading/confine.py).
    """
    from ..sources import check_path

    if not path:
        return None
    check_path(path, "The checkpoint")  # confined: containment before existence, the same answer for any path outside
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
    elif p.is_file() and (p.parent / CONFIG_FILE).is_file() and _is_hf_config(p.parent / CONFIG_FILE):
        config, weights, folder = p.parent / CONFIG_FILE, p, p.parent
    else:
        return None
    shards = _shards(weights) if weights.name.endswith(".index.json") else (weights,)
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

"""The feature cache on disk: its manifest, its record list and its shards, each written whole.

Layout of a cache folder::

    manifest.json        model/data fingerprint, scope, classes, templates, shard list, complete flag
    records.json         every dataset record (path, label, group, split) and files skipped while scanning
    text.npy             (C, d) normalised class text embeddings
    shards/00000/        one folder per shard of ``shard_size`` consecutive records:
        embedding.npy    (n, d)            E, the unnormalised image embedding
        heads.npy        (n, L_s, H, d)    c[l, h], the direct contribution of each head in scope
        remainders.npy   (n, R, d)         the other parts of Eq. (4)
        index.npy        (n,)              which records these rows are
        done.json        skipped files of the shard, array checksums

A shard is written into a temporary folder and renamed into place (:func:`write_shard`), so a reader
(or a resumed extraction after a crash) sees whole shards or none (:func:`shard_is_valid`). A cache
whose fingerprint differs from the current model, checkpoint, preprocessing, scope or file list is
invalid and is rebuilt (:mod:`~refineclip_core.features.extraction`). Reading a complete cache is
:class:`~refineclip_core.features.cache.FeatureCache`'s.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..files import check_quota, write_error
from ..loading.data import ImageRecord, SkippedFile
from .decomposition import HeadId
from .scoring import Scoring

FORMAT_VERSION = 1
ARRAYS = ("embedding", "heads", "remainders", "index")


def array_digest(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()[:32]


@dataclass
class CacheManifest:
    """What a cache holds and what it was made from."""

    fingerprint: str
    model: dict[str, Any]
    model_name: str
    layers: list[int]
    n_layers: int
    n_heads: int
    embed_dim: int
    remainder_names: list[str]
    classes: list[str]
    templates: list[str]
    logit_scale: float
    dtype: str
    data_root: str
    layout: str
    n_records: int
    shard_size: int
    complete: bool = False
    format: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    parts_dtype: str | None = None        # dtype of heads/remainders (None: ``dtype``); float16 with --store fp16
    decode_min_side: int | None = None    # reduced JPEG decoding to at least this side (None: exact decoding)
    logit_bias: float | None = None       # the sigmoid's bias of a SigLIP-family model (None: CLIP's softmax)

    @property
    def n_shards(self) -> int:
        return (self.n_records + self.shard_size - 1) // self.shard_size

    def head_ids(self) -> list[HeadId]:
        """Heads in scope, in the order of the ``heads`` array's flattened (layer, head) axes."""
        return [HeadId(l, h) for l in self.layers for h in range(self.n_heads)]

    def scoring(self) -> Scoring:
        """The model's scoring: CLIP's softmax at ``logit_scale``, or SigLIP's sigmoid with ``logit_bias``."""
        if self.logit_bias is None:
            return Scoring("softmax", float(self.logit_scale))
        return Scoring("sigmoid", float(self.logit_scale), float(self.logit_bias))


def shard_dir(root: Path, i: int) -> Path:
    return root / "shards" / f"{i:05d}"


def write_shard(root: Path, i: int, arrays: dict[str, np.ndarray], skipped: list[SkippedFile]) -> None:
    """Write shard ``i`` atomically: a temporary folder renamed into place when whole."""
    final = shard_dir(root, i)
    check_quota(final, sum(np.asarray(arrays[name]).nbytes for name in ARRAYS))  # a session folder's quota
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{i:05d}.", dir=final.parent))
    except OSError as exc:
        raise write_error(exc, final) from exc
    try:
        sums = {}
        for name in ARRAYS:
            arr = np.ascontiguousarray(arrays[name])
            np.save(tmp / f"{name}.npy", arr)
            sums[name] = {"sha256": array_digest(arr), "shape": list(arr.shape), "dtype": str(arr.dtype)}
        done = {"checksums": sums, "skipped": [asdict(s) for s in skipped]}
        (tmp / "done.json").write_text(json.dumps(done, indent=1))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise write_error(exc, final) from exc
        raise


def shard_is_valid(root: Path, i: int, verify: bool = False) -> bool:
    """A shard exists whole (and, with ``verify``, its arrays match their checksums)."""
    d = shard_dir(root, i)
    try:
        done = json.loads((d / "done.json").read_text())
        for name in ARRAYS:
            meta = done["checksums"][name]
            arr = np.load(d / f"{name}.npy", mmap_mode="r")
            if list(arr.shape) != meta["shape"]:
                return False
            if verify and array_digest(np.asarray(arr)) != meta["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return False


def read_manifest(root: str | os.PathLike) -> CacheManifest | None:
    try:
        data = json.loads((Path(root) / "manifest.json").read_text())
        return CacheManifest(**data)
    except (OSError, ValueError, TypeError, json.JSONDecodeError):
        return None


def records_to_json(records: Iterable[ImageRecord], skipped: Iterable[SkippedFile]) -> dict[str, Any]:
    return {"records": [asdict(r) for r in records], "skipped": [asdict(s) for s in skipped]}

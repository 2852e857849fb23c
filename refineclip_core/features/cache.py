"""On-disk feature cache: everything the method needs after the one forward pass.

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

A shard is written into a temporary folder and renamed into place, so a reader (or a resumed
extraction after a crash) sees whole shards or none. A cache whose fingerprint differs from
the current model, checkpoint, preprocessing, scope or file list is invalid and is rebuilt.
Arrays are memory-mapped on read.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import CacheError
from ..loading.data import ImageRecord, SkippedFile
from .decomposition import HeadId

FORMAT_VERSION = 1
ARRAYS = ("embedding", "heads", "remainders", "index")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def npy_bytes(arr: np.ndarray) -> bytes:
    """``arr`` serialised in ``.npy`` format (for :func:`atomic_write_bytes`)."""
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())


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

    @property
    def n_shards(self) -> int:
        return (self.n_records + self.shard_size - 1) // self.shard_size

    def head_ids(self) -> list[HeadId]:
        """Heads in scope, in the order of the ``heads`` array's flattened (layer, head) axes."""
        return [HeadId(l, h) for l in self.layers for h in range(self.n_heads)]


def shard_dir(root: Path, i: int) -> Path:
    return root / "shards" / f"{i:05d}"


def write_shard(root: Path, i: int, arrays: dict[str, np.ndarray], skipped: list[SkippedFile]) -> None:
    """Write shard ``i`` atomically: a temporary folder renamed into place when whole."""
    final = shard_dir(root, i)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{i:05d}.", dir=final.parent))
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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


class FeatureCache:
    """A complete cache opened for reading (arrays concatenated over shards on first use)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        manifest = read_manifest(self.root)
        if manifest is None:
            raise CacheError(f"'{root}' is not a feature cache (no readable manifest.json); run 'refineclip extract' first.")
        if manifest.format != FORMAT_VERSION:
            raise CacheError(f"Cache '{root}' has format {manifest.format}; this version reads {FORMAT_VERSION}. Re-extract.")
        if not manifest.complete:
            raise CacheError(f"Cache '{root}' is incomplete (extraction was interrupted); re-run 'refineclip extract' to resume.")
        self.manifest = manifest
        info = json.loads((self.root / "records.json").read_text())
        self.all_records = [ImageRecord(**r) for r in info["records"]]
        self._scan_skipped = [SkippedFile(**s) for s in info["skipped"]]

    # -- arrays ----------------------------------------------------------------------------
    def _concat(self, name: str) -> np.ndarray:
        parts = []
        for i in range(self.manifest.n_shards):
            path = shard_dir(self.root, i) / f"{name}.npy"
            if not path.exists():
                raise CacheError(f"Cache '{self.root}' lacks shard {i}; re-run 'refineclip extract' to complete it.")
            parts.append(np.load(path, mmap_mode="r"))
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts, axis=0)

    @cached_property
    def index(self) -> np.ndarray:
        """Row ``i`` of every array belongs to ``all_records[index[i]]``."""
        return np.asarray(self._concat("index"), dtype=np.int64)

    @cached_property
    def embeddings(self) -> np.ndarray:
        """``(N, d)`` unnormalised image embeddings E."""
        return self._concat("embedding")

    @cached_property
    def heads(self) -> np.ndarray:
        """``(N, L_s, H, d)`` per-head direct contributions c[l, h]."""
        return self._concat("heads")

    @cached_property
    def remainders(self) -> np.ndarray:
        return self._concat("remainders")

    @cached_property
    def text(self) -> np.ndarray:
        """``(C, d)`` normalised class text embeddings."""
        return np.load(self.root / "text.npy")

    # -- labels ----------------------------------------------------------------------------
    @cached_property
    def records(self) -> list[ImageRecord]:
        """The records that were decoded and embedded, in array order."""
        return [self.all_records[i] for i in self.index]

    @cached_property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.records], dtype=np.int64)

    @cached_property
    def group_names(self) -> list[str]:
        return sorted({r.group for r in self.records if r.group is not None})

    @cached_property
    def groups(self) -> np.ndarray:
        """Group id per row (``-1`` without a group)."""
        idx = {g: i for i, g in enumerate(self.group_names)}
        return np.array([idx[r.group] if r.group is not None else -1 for r in self.records], dtype=np.int64)

    @cached_property
    def splits(self) -> np.ndarray:
        return np.array([r.split or "" for r in self.records], dtype=object)

    @cached_property
    def skipped(self) -> list[SkippedFile]:
        """Files skipped while scanning plus images that failed to decode during extraction."""
        out = list(self._scan_skipped)
        for i in range(self.manifest.n_shards):
            done = json.loads((shard_dir(self.root, i) / "done.json").read_text())
            out.extend(SkippedFile(**s) for s in done["skipped"])
        return out

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.classes)

    @property
    def logit_scale(self) -> float:
        return float(self.manifest.logit_scale)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def head_ids(self) -> list[HeadId]:
        return self.manifest.head_ids()

    def restrict_layers(self, layers: list[int]) -> None:
        """Keep only ``layers`` in :attr:`heads` (e.g. the last 4 of an all-layer cache).

        The dropped heads' contributions move into one extra remainder row, so
        :meth:`reconstruct` still equals :attr:`embeddings`.
        """
        cached = list(self.manifest.layers)
        missing = [l for l in layers if l not in cached]
        if missing:
            raise CacheError(f"Layers {missing} are not in the cache (it holds {cached}); re-extract with more layers.")
        keep = [cached.index(l) for l in layers]
        drop = [i for i in range(len(cached)) if i not in keep]
        heads = np.asarray(self.heads)
        if drop:
            dropped = heads[:, drop].sum(axis=(1, 2))[:, None, :]
            self.__dict__["remainders"] = np.concatenate([np.asarray(self.remainders), dropped], axis=1)
            self.manifest.remainder_names = [*self.manifest.remainder_names, "heads_outside_scope"]
        self.__dict__["heads"] = heads[:, keep]
        self.manifest.layers = list(layers)

    def reconstruct(self) -> np.ndarray:
        """Sum of all cached parts (Eq. 4); equals :attr:`embeddings` to float precision."""
        return self.heads.sum(axis=(1, 2)) + self.remainders.sum(axis=1)


def records_to_json(records: Iterable[ImageRecord], skipped: Iterable[SkippedFile]) -> dict[str, Any]:
    return {"records": [asdict(r) for r in records], "skipped": [asdict(s) for s in skipped]}

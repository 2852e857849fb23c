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

Reading never writes: a complete cache can be opened from a read-only shared folder by several
processes at once. E and the record list are read into memory (``4·d`` bytes per image); the head
contributions and remainders (``L_s·H·d`` and ``R·d`` values per image, 200 KB and 150 KB per
image for a ViT-L/14) stay on disk as :class:`ShardedArray` s, of which each read maps only the
shards it needs and keeps nothing, so a server's resident memory does not grow with the cache.
They are stored in float32 (float64 for fp64 models) or, with ``--store fp16``, in float16
(``manifest.parts_dtype``); every consumer computes in float32 or float64.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from ..errors import CacheError, RefineClipError
from ..loading.data import ImageRecord, SkippedFile
from .decomposition import HeadId

FORMAT_VERSION = 1
ARRAYS = ("embedding", "heads", "remainders", "index")


def write_error(exc: OSError, path: str | os.PathLike) -> RefineClipError:
    """One sentence for a failed write of ``path``: a full disk (``ENOSPC``/``EDQUOT``, or numpy's
    "N requested and M written", which carries no errno), a folder where a file was asked for, or
    the system's own reason."""
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT) or re.search(r"\d+ requested and \d+ written", str(exc))
    if full:
        return RefineClipError(f"Cannot write '{path}': the disk is full (no space left on the device); free some "
                               "space or write somewhere else, then run again (finished work is kept).")
    if isinstance(exc, IsADirectoryError) or Path(path).is_dir():
        return RefineClipError(f"Cannot write '{path}': it is a folder; give a file path (e.g. "
                               f"'{Path(path) / 'report.json'}').")
    return RefineClipError(f"Cannot write '{path}' ({exc.strerror or exc}).")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename (a failure is one
    sentence, :func:`write_error`)."""
    path = Path(path)
    if path.is_dir():
        raise write_error(IsADirectoryError(errno.EISDIR, "Is a directory", str(path)), path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            raise write_error(exc, path) from exc
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
    parts_dtype: str | None = None        # dtype of heads/remainders (None: ``dtype``); float16 with --store fp16
    decode_min_side: int | None = None    # reduced JPEG decoding to at least this side (None: exact decoding)

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


class ShardedArray:
    """A read-only ``(N, ...)`` array stored as consecutive ``.npy`` files (the cache's shards).

    Supports what the method needs without loading the whole array: ``shape``/``dtype``/``len``,
    ``a[rows, *rest]`` with ``rows`` an int, slice, index array or mask and ``rest`` basic indices
    (ints, slices; e.g. ``heads[:, layer, head]`` reads one head's slab), :func:`row_blocks`
    for passes over many rows, and ``np.asarray(a)`` (everything, in memory: small caches, tests).
    Each read maps the shards it touches and drops the mapping before returning a copy.
    """

    def __init__(self, paths: list[Path]) -> None:
        self.paths = list(paths)
        self._layout = []
        for path in self.paths:
            with open(path, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(fh)
                self._layout.append((fh.tell(), tuple(shape)))
            if fortran:
                raise CacheError(f"'{path}' is stored in Fortran order; re-extract the cache.")
            self.dtype = np.dtype(dtype)
        if not self.paths:
            raise CacheError("A sharded array needs at least one shard.")
        tails = {shape[1:] for _, shape in self._layout}
        if len(tails) != 1:
            raise CacheError(f"The shards of '{self.paths[0].parent.parent}' disagree in shape; re-extract.")
        lengths = [shape[0] for _, shape in self._layout]
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.shape = (int(self.offsets[-1]), *tails.pop())

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def _map(self, i: int) -> np.ndarray:
        offset, shape = self._layout[i]
        if shape[0] == 0:
            return np.zeros(shape, dtype=self.dtype)
        return np.memmap(self.paths[i], dtype=self.dtype, mode="r", offset=offset, shape=shape)

    def read_shard(self, i: int) -> np.ndarray:
        """Shard ``i`` whole, in memory (a plain read: nothing stays mapped)."""
        return np.load(self.paths[i])

    def _rows(self, rows: Any) -> np.ndarray | slice:
        if isinstance(rows, slice):
            return rows
        rows = np.asarray(rows)
        if rows.dtype == bool:
            if rows.shape != (len(self),):
                raise IndexError(f"boolean row mask of shape {rows.shape} for {len(self)} rows")
            return np.flatnonzero(rows)
        rows = rows.astype(np.int64, copy=False)
        return np.where(rows < 0, rows + len(self), rows)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        rows, rest = key[0], key[1:]
        if any(not isinstance(k, (int, np.integer, slice)) and k is not Ellipsis for k in rest):
            raise TypeError("ShardedArray takes an index array for rows only; index further axes with ints/slices")
        if isinstance(rows, (int, np.integer)):
            r = int(rows) + (len(self) if rows < 0 else 0)
            if not 0 <= r < len(self):
                raise IndexError(f"row {rows} out of range for {len(self)} rows")
            i = int(np.searchsorted(self.offsets, r, side="right") - 1)
            return np.array(self._map(i)[(r - self.offsets[i], *rest)])
        rows = self._rows(rows)
        if isinstance(rows, slice):
            start, stop, step = rows.indices(len(self))
            if step != 1:
                rows = np.arange(start, stop, step)
            else:
                return self._contiguous(start, stop, rest)
        probe = np.zeros((1, *self.shape[1:]), dtype=self.dtype)[(slice(None), *rest)]
        out = np.empty((len(rows), *probe.shape[1:]), dtype=self.dtype)
        if len(rows) == 0:
            return out
        if rows.min() < 0 or rows.max() >= len(self):
            raise IndexError(f"row index out of range for {len(self)} rows")
        shard = np.searchsorted(self.offsets, rows, side="right") - 1
        for i in np.unique(shard):
            sel = np.flatnonzero(shard == i)
            out[sel] = self._map(int(i))[(rows[sel] - self.offsets[i], *rest)]
        return out

    def _contiguous(self, start: int, stop: int, rest: tuple) -> np.ndarray:
        probe = np.zeros((1, *self.shape[1:]), dtype=self.dtype)[(slice(None), *rest)]
        out = np.empty((max(0, stop - start), *probe.shape[1:]), dtype=self.dtype)
        for i in range(len(self.paths)):
            a, b = max(start, self.offsets[i]), min(stop, self.offsets[i + 1])
            if a < b:
                out[a - start:b - start] = self._map(i)[(slice(a - self.offsets[i], b - self.offsets[i]), *rest)]
        return out

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = np.concatenate([self.read_shard(i) for i in range(len(self.paths))], axis=0)
        return out if dtype is None else out.astype(dtype, copy=False)

    def astype(self, dtype: Any) -> np.ndarray:
        """Everything, in memory, as ``dtype`` (like ``ndarray.astype``)."""
        return np.asarray(self, dtype=dtype)

    def reshape(self, *shape: Any) -> np.ndarray:
        """Everything, in memory, reshaped (like ``ndarray.reshape``)."""
        return np.asarray(self).reshape(*shape)


def row_blocks(arr: np.ndarray | ShardedArray, rows: np.ndarray | None = None, block: int = 2048
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(positions, arr[rows[positions]])`` over ``rows`` (every row by default) in blocks: a pass over
    many rows of a cache array that holds one block in memory at a time (one shard of a
    :class:`ShardedArray`)."""
    n = len(arr)
    rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
    if isinstance(arr, ShardedArray):
        shard = np.searchsorted(arr.offsets, rows, side="right") - 1
        for i in np.unique(shard):
            pos = np.flatnonzero(shard == i)
            local = rows[pos] - arr.offsets[i]
            part_len = arr.offsets[i + 1] - arr.offsets[i]
            if len(local) == part_len and np.array_equal(local, np.arange(part_len)):
                yield pos, arr.read_shard(int(i))
            elif 2 * len(local) >= part_len:
                yield pos, arr.read_shard(int(i))[local]
            else:
                yield pos, arr[rows[pos]]
        return
    for start in range(0, len(rows), block):
        pos = np.arange(start, min(len(rows), start + block))
        yield pos, np.asarray(arr[rows[pos]])


class FeatureCache:
    """A complete cache opened for reading (nothing is written; see the module docstring)."""

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

    def with_prompts(self, classes: Sequence[str], templates: Sequence[str], text: np.ndarray) -> "FeatureCache":
        """A new cache object over the same folder whose class names, templates and ``(C, d)`` class
        texts are these (the image features do not depend on the prompts); ``self`` is unchanged."""
        text = np.asarray(text)
        if len(classes) != len(self.manifest.classes) or text.shape != (len(classes), self.manifest.embed_dim):
            raise CacheError(f"{len(classes)} class names with texts of shape {text.shape} do not fit this cache "
                             f"({len(self.manifest.classes)} classes, dimension {self.manifest.embed_dim}).")
        fresh = copy.copy(self)   # shares the image arrays already read; only the prompts differ
        fresh.manifest = replace(self.manifest, classes=list(classes), templates=list(templates))
        fresh.text = text         # the cached_property's slot: this object's own class texts
        return fresh

    # -- arrays ----------------------------------------------------------------------------
    def _paths(self, name: str) -> list[Path]:
        paths = [shard_dir(self.root, i) / f"{name}.npy" for i in range(self.manifest.n_shards)]
        for i, path in enumerate(paths):
            if not path.exists():
                raise CacheError(f"Cache '{self.root}' lacks shard {i}; re-run 'refineclip extract' to complete it.")
        return paths

    def _concat(self, name: str) -> np.ndarray:
        return np.asarray(ShardedArray(self._paths(name)))

    @cached_property
    def index(self) -> np.ndarray:
        """Row ``i`` of every array belongs to ``all_records[index[i]]``."""
        return np.asarray(self._concat("index"), dtype=np.int64)

    @cached_property
    def embeddings(self) -> np.ndarray:
        """``(N, d)`` unnormalised image embeddings E (in memory)."""
        return self._concat("embedding")

    @cached_property
    def heads(self) -> ShardedArray | np.ndarray:
        """``(N, L_s, H, d)`` per-head direct contributions c[l, h] (read from disk on demand)."""
        return ShardedArray(self._paths("heads"))

    @cached_property
    def remainders(self) -> ShardedArray | np.ndarray:
        """``(N, R, d)`` the other parts of Eq. (4) (read from disk on demand)."""
        return ShardedArray(self._paths("remainders"))

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
        heads = np.asarray(self.heads)   # in memory from here on (the CLI's scoring of a sub-scope)
        if drop:
            dropped = heads[:, drop].sum(axis=(1, 2))[:, None, :]
            self.__dict__["remainders"] = np.concatenate([np.asarray(self.remainders), dropped], axis=1)
            self.manifest.remainder_names = [*self.manifest.remainder_names, "heads_outside_scope"]
        self.__dict__["heads"] = heads[:, keep]
        self.manifest.layers = list(layers)

    def reconstruct(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Sum of all cached parts (Eq. 4) in float64, for ``rows`` (all by default); equals
        :attr:`embeddings` to the storage precision."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64)
        out = np.zeros((len(rows), self.manifest.embed_dim))
        for arr, axes in ((self.heads, (1, 2)), (self.remainders, (1,))):
            for pos, block in row_blocks(arr, rows):
                out[pos] += block.astype(np.float64).sum(axis=axes)
        return out


def records_to_json(records: Iterable[ImageRecord], skipped: Iterable[SkippedFile]) -> dict[str, Any]:
    return {"records": [asdict(r) for r in records], "skipped": [asdict(s) for s in skipped]}

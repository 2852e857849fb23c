"""An ``(N, ...)`` array stored as a feature cache's shards, read without loading it whole.

:class:`ShardedArray` maps only the shards a read touches and keeps nothing mapped, so a server's
resident memory does not grow with the cache; :func:`row_blocks` walks many rows one shard at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import CacheError


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

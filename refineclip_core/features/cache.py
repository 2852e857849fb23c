"""A complete feature cache opened for reading: everything the method needs after the one forward pass.

The folder's format (manifest, records, shards written whole) is :mod:`~refineclip_core.features.cache_format`'s.
Reading never writes: a complete cache can be opened from a read-only shared folder by several
processes at once. E and the record list are read into memory (``4·d`` bytes per image); the head
contributions and remainders (``L_s·H·d`` and ``R·d`` values per image, 200 KB and 150 KB per
image for a ViT-L/14) stay on disk as :class:`~refineclip_core.features.sharded.ShardedArray` s, of
which each read maps only the shards it needs and keeps nothing, so a server's resident memory does
not grow with the cache. They are stored in float32 (float64 for fp64 models) or, with ``--store
fp16``, in float16 (``manifest.parts_dtype``); every consumer computes in float32 or float64.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import CacheError
from ..loading.data import ImageRecord, SkippedFile
from .cache_format import FORMAT_VERSION, read_manifest, shard_dir
from .decomposition import HeadId
from .scoring import Scoring
from .sharded import ShardedArray, row_blocks


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
        """``(N, L_s, H, d)`` per-head direct contributions c[l, h] (read from disk on demand). The one array
        named ``heads`` (after its files); functions that take it call it ``contributions``, and ``heads``
        elsewhere is a list of :class:`~refineclip_core.features.decomposition.HeadId`."""
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

    @property
    def scoring(self) -> Scoring:
        """How the model scores (softmax, or sigmoid with its bias): confidences and the edit's KL terms."""
        return self.manifest.scoring()

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

"""Images to model-input batches: decoded in parallel, ahead of the model (paper §2.2's one forward pass).

A camera photo (4000×3000 JPEG, a few MB) takes a quarter of a second to decode in full on one
core, far longer than a ViT needs on a GPU for the image. So:

* **reduced decoding**: a JPEG is decoded in the DCT domain at 1/2, 1/4 or 1/8 scale, the largest
  reduction whose sides stay at least :data:`DRAFT_FACTOR` × the model's input size
  (:func:`~refineclip_core.loading.decode.reduce_on_decode`); the model's exact transform (resize,
  centre crop, normalise) then runs on that picture. ``DecodeConfig(exact=True)`` (``--exact-decode``)
  decodes every pixel instead. The decode size is recorded in the cache, so re-decoding for a
  check (decomposition, ablation against the real model) decodes the same way.
* **parallel workers**: ``workers`` threads (or processes, ``kind="process"``) decode and transform
  the images of the next ``prefetch`` batches while the model runs on the current one. Each image
  is decoded independently, so the batches do not depend on the number of workers or their kind.
* **CUDA**: batches are pinned in page-locked memory (by the worker processes' loader, or the
  calling thread) and copied with ``non_blocking=True``, so the copy overlaps the previous batch.

Measured choice of ``kind`` and ``workers``: ``benchmarks/scale.py`` (the ``photos`` table).
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Sequence

import torch

from ..errors import ImageLoadError, RefineClipError
from .confine import Confinement, carry, current
from .data import ImageRecord, SkippedFile
from .decode import load_image

#: Reduced JPEG decoding keeps both sides at least this many times the model's input size.
DRAFT_FACTOR = 2

DecoderKind = Literal["thread", "process"]


@dataclass(frozen=True)
class DecodeConfig:
    """How images are decoded for the model (see the module docstring)."""

    exact: bool = False            # True: decode every pixel (no reduced JPEG decoding)
    workers: int | None = None     # parallel decoders; None: one per usable CPU (at most 8); 0: the calling thread
    kind: DecoderKind = "thread"   # threads (Pillow and torch release the GIL) or worker processes
    prefetch: int = 2              # batches decoded ahead of the one the model is running on

    def __post_init__(self) -> None:
        if self.kind not in ("thread", "process"):
            raise RefineClipError(f"Unknown decoder kind {self.kind!r}; use thread or process.")
        if self.workers is not None and self.workers < 0:
            raise RefineClipError(f"The number of decode workers must be 0 or more, got {self.workers}.")
        if self.prefetch < 1:
            raise RefineClipError(f"Prefetch at least one batch, got {self.prefetch}.")

    def n_workers(self) -> int:
        if self.workers is not None:
            return self.workers
        try:
            usable = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            usable = os.cpu_count() or 1
        return max(1, min(8, usable))


def input_size(loaded) -> int | None:
    """The model's input side in pixels (the larger one for a non-square input; None if unknown)."""
    size = getattr(loaded.visual, "image_size", None)
    if isinstance(size, (tuple, list)):
        return int(max(size))
    return int(size) if isinstance(size, int) else None


def decode_min_side(loaded, exact: bool) -> int | None:
    """The ``min_side`` that reduced decoding uses for ``loaded`` (None: exact decoding, also when the
    model's input size is unknown)."""
    size = input_size(loaded)
    return None if exact or size is None else DRAFT_FACTOR * size


def prepare_image(path: str, preprocess: Callable, min_side: int | None) -> torch.Tensor:
    """One image as the model's input tensor: decode (reduced when ``min_side``; read under the
    confinement in force), then the exact transform."""
    return load_image(path, min_side=min_side, transform=preprocess)  # inside the decoding budget


@dataclass
class Batch:
    """A batch of model inputs, which records they are, and the files that could not be used."""

    images: torch.Tensor | None     # (n, 3, H, W) float32 on the CPU, None when no image was usable
    keep: list[int]                 # record index of each row of ``images``
    skipped: list[SkippedFile] = field(default_factory=list)

    def pin_memory(self) -> "Batch":
        """Page-locked copy for asynchronous copies to a GPU (called by torch's DataLoader too)."""
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self

    def to(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        if self.images is None:
            return None
        return self.images.to(device=device, dtype=dtype, non_blocking=self.images.is_pinned())


def _one(path: str, preprocess: Callable, min_side: int | None) -> torch.Tensor | SkippedFile:
    try:
        return prepare_image(path, preprocess, min_side)
    except ImageLoadError as exc:
        return SkippedFile(path, str(exc))
    except Exception as exc:  # a preprocessing failure on an odd image must not stop the run
        return SkippedFile(path, f"preprocessing failed ({type(exc).__name__}: {exc})")


def _collate(start: int, outputs: Sequence[torch.Tensor | SkippedFile]) -> Batch:
    tensors, keep, skipped = [], [], []
    for offset, out in enumerate(outputs):
        if isinstance(out, SkippedFile):
            skipped.append(out)
        else:
            tensors.append(out)
            keep.append(start + offset)
    return Batch(torch.stack(tensors) if tensors else None, keep, skipped)


def decode_batch(records: Sequence[ImageRecord], start: int, preprocess: Callable,
                 min_side: int | None) -> Batch:
    """Decode and transform ``records`` in the calling thread (record ``i`` has index ``start + i``)."""
    return _collate(start, [_one(r.path, preprocess, min_side) for r in records])


class _Spans(torch.utils.data.Dataset):
    """Worker-process side: item ``i`` is the whole batch ``spans[i]`` (a picklable dataset), read under
    the confinement in force where it was made (a worker process does not share the caller's context)."""

    def __init__(self, paths: Sequence[str], spans: Sequence[tuple[int, int]], preprocess: Callable,
                 min_side: int | None) -> None:
        self.paths, self.spans, self.preprocess, self.min_side = list(paths), list(spans), preprocess, min_side
        self.confinement = current()

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, i: int) -> Batch:
        a, b = self.spans[i]
        with self.confinement.active():
            return _collate(a, [_one(p, self.preprocess, self.min_side) for p in self.paths[a:b]])


def _first(items: list) -> object:
    return items[0]


def iter_batches(records: Sequence[ImageRecord], spans: Sequence[tuple[int, int]], preprocess: Callable,
                 min_side: int | None, cfg: DecodeConfig = DecodeConfig(), pin: bool = False) -> Iterator[Batch]:
    """The batches ``records[a:b]`` for each ``(a, b)`` of ``spans``, in order, decoded by ``cfg``'s
    workers up to ``cfg.prefetch`` batches ahead; ``pin`` puts them in page-locked memory (CUDA).

    Every image is read under the confinement in force at this call (taken now, not when the batches
    are drawn; each worker thread carries it, :func:`~refineclip_core.loading.confine.carry`)."""
    return _under(current(), _iter_batches(records, spans, preprocess, min_side, cfg, pin))


def _under(confinement: Confinement, batches: Iterator[Batch]) -> Iterator[Batch]:
    """``batches``, each drawn with ``confinement`` in force (whoever draws them, from whatever context)."""
    try:
        while True:
            with confinement.active():
                batch = next(batches, None)
            if batch is None:
                return
            yield batch
    finally:
        with confinement.active():
            batches.close()  # the workers stop now, not when the generator is collected


def _iter_batches(records: Sequence[ImageRecord], spans: Sequence[tuple[int, int]], preprocess: Callable,
                  min_side: int | None, cfg: DecodeConfig, pin: bool) -> Iterator[Batch]:
    workers = cfg.n_workers()
    paths = [r.path for r in records]
    if workers == 0 or len(spans) == 0:
        for a, b in spans:
            batch = decode_batch(records[a:b], a, preprocess, min_side)
            yield batch.pin_memory() if pin else batch
        return
    if cfg.kind == "process":
        loader = torch.utils.data.DataLoader(
            _Spans(paths, spans, preprocess, min_side), batch_size=1, shuffle=False, num_workers=workers,
            collate_fn=_first, pin_memory=pin, prefetch_factor=max(1, -(-cfg.prefetch // workers)))
        yield from loader
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="refineclip-decode") as pool:
        pending: deque[tuple[int, list[Future]]] = deque()
        upcoming = iter(spans)

        def submit() -> None:
            span = next(upcoming, None)
            if span is not None:
                a, b = span
                pending.append((a, [pool.submit(carry(_one), p, preprocess, min_side) for p in paths[a:b]]))

        for _ in range(cfg.prefetch + 1):
            submit()
        try:
            while pending:
                a, futures = pending.popleft()
                batch = _collate(a, [f.result() for f in futures])
                submit()
                yield batch.pin_memory() if pin else batch
        finally:
            for _, futures in pending:
                for f in futures:
                    f.cancel()

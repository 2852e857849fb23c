"""One extraction per cache folder at a time: an advisory file lock around :func:`extract`.

Two browser sessions (or a session and a CLI run) that ask for the same cache wait for each
other instead of writing the same shards; the waiting side reports it through its progress
callback and can still be cancelled.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Callable, Iterator

from ..features.cache import FeatureCache
from ..features.extraction import ExtractionCancelled, ExtractionConfig, extract
from ..loading.data import ImageDataset
from ..progress import CancelFn, Progress, never, silent


@contextlib.contextmanager
def folder_lock(path: Path, cancel: CancelFn | None = None,
                waiting: Callable[[], None] | None = None) -> Iterator[None]:
    """An exclusive advisory lock on ``path/.lock`` (two sessions never extract into one folder
    at once). While another process holds it, ``waiting()`` is called and ``cancel()`` polled."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if cancel is not None and cancel():
                    raise ExtractionCancelled("Cancelled while another session was extracting the same data.")
                if waiting is not None:
                    waiting()
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def extract_locked(loaded, dataset: ImageDataset, cache_dir: str | os.PathLike, cfg: ExtractionConfig,
                   progress: Progress | None = None, cancel: CancelFn | None = None) -> FeatureCache:
    """:func:`~refineclip_core.features.extraction.extract` under :func:`folder_lock`."""
    cache_dir = Path(cache_dir)
    progress, cancel = progress or silent, cancel or never

    def waiting() -> None:
        progress("Waiting for another session that is extracting the same images", 0, len(dataset.records))

    with folder_lock(cache_dir, cancel, waiting):
        return extract(loaded, dataset, cache_dir, cfg, progress=progress, cancel=cancel)

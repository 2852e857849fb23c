"""open_clip's process-wide state, touched only for the length of one model build (by
:func:`~refineclip_core.loading.models.build_model`): a user's config known to open_clip's registry under
a name no other build uses, and open_clip's "initialized randomly" notice dropped in the building thread
when our checkpoint is read next. Nothing here outlives the build or reaches another session's.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import threading
import uuid
from typing import Any, Iterator, Mapping


@contextlib.contextmanager
def config_known_to_open_clip(name: str, cfg: Mapping[str, Any]) -> Iterator[str]:
    """While the block runs, ``cfg`` is known to open_clip (``create_model``, ``get_tokenizer``,
    ``get_model_config``) under the name yielded; afterwards it is gone again.

    open_clip's config registry is one dict for the whole process (every dashboard session). A
    user's config enters it only for the duration of one model build, under a name no other
    build uses (``<name>-<random>``), and is removed in a ``finally``: it never changes what
    another session loads, and nothing is written to disk (``open_clip.add_model_config`` would
    keep a file path that every later registration re-reads)."""
    from open_clip import factory

    registered = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)[:80]}-{uuid.uuid4().hex[:12]}"
    factory._MODEL_CONFIGS[registered] = copy.deepcopy(dict(cfg))
    try:
        yield registered
    finally:
        factory._MODEL_CONFIGS.pop(registered, None)


class _RandomInitNotice(logging.Filter):
    """Drops open_clip's "initialized randomly" warning, and nothing else, while *this thread* builds
    a model whose weights are read from a checkpoint right after (see :func:`checkpoint_follows`).

    Installed once on the root logger (open_clip logs there); it never changes a logger's level, so
    other sessions' loads and every other message are untouched, even when loads overlap."""

    NOTICE = "No pretrained weights loaded for model"

    def __init__(self) -> None:
        super().__init__()
        self.active = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not (getattr(self.active, "depth", 0) > 0 and str(record.msg).startswith(self.NOTICE))


_RANDOM_INIT_NOTICE = _RandomInitNotice()
logging.getLogger().addFilter(_RANDOM_INIT_NOTICE)


@contextlib.contextmanager
def checkpoint_follows():
    """While open_clip builds a model in this thread, its weights come from our checkpoint next:
    its "initialized randomly" notice is dropped (in this thread only)."""
    active = _RANDOM_INIT_NOTICE.active
    active.depth = getattr(active, "depth", 0) + 1
    try:
        yield
    finally:
        active.depth -= 1

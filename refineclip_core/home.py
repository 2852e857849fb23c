"""The studio home: the folder where an interactive session keeps generated data and caches.

``$REFINECLIP_HOME`` or ``~/.cache/refineclip-studio``. Inside it::

    demo-data-s<seed>-n<n>/         images (class folders) + metadata.csv (path,label,group,split)
    caches/<key>/                   feature caches, one per (model, data, layer scope)
    text-pools/                     cached text-pool embeddings (TextSpan)
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "REFINECLIP_HOME"


def studio_home(cache_root: str | os.PathLike | None = None) -> Path:
    """The folder where the studio keeps generated data and caches (created on demand)."""
    root = Path(cache_root) if cache_root else Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "refineclip-studio")
    root = root.expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root

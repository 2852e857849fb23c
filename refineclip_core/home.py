"""Where the studio's files live: the dashboard and assets it ships (:data:`APP_DIR`), and the
home folder, where an interactive session keeps generated data and caches (:func:`home_dir`).

:data:`APP_DIR` holds ``app.py``, ``pages/``, ``dashboard/``, ``.streamlit/`` and ``assets/`` (the
demo checkpoint, the text pool): the repository root in a clone (or an editable install), the
``refineclip_studio`` package next to ``refineclip_core`` after ``pip install`` (the wheel maps the
same files there, laid out as in the clone).

The home folder is ``$REFINECLIP_HOME`` or ``~/.cache/refineclip-studio``. Inside it::

    demo-data-s<seed>-n<n>/         images (class folders) + metadata.csv (path,label,group,split)
    caches/<key>/                   feature caches, one per (model, data, layer scope)
    text-pools/                     cached text-pool embeddings (TextSpan)
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "REFINECLIP_HOME"


def _app_dir() -> Path:
    above = Path(__file__).resolve().parent.parent     # a clone's root, or site-packages
    installed = above / "refineclip_studio"
    return installed if (installed / "app.py").is_file() else above


APP_DIR = _app_dir()
"""The folder holding the dashboard (``app.py``, ``pages/``, ``dashboard/``) and ``assets/``."""

ASSETS_DIR = APP_DIR / "assets"
"""The data the studio ships (the demo checkpoint, the text pool), in a clone and when installed."""


DEMO_BENCHMARK = ASSETS_DIR / "demo" / "benchmark.json"
"""The demo benchmark's multi-draw figures per method (written by ``benchmarks/demo_world.py`` beside the
demo model it measured, shipped with it; the Refine page shows them beside one run's table)."""


def asset(*parts: str) -> Path:
    """The path of a file the studio ships, e.g. ``asset("text_pool.txt")``: the one way every module
    (library, dashboard, benchmarks) finds the app's data, so an installed wheel finds it too."""
    return ASSETS_DIR.joinpath(*parts)


def home_dir(cache_root: str | os.PathLike | None = None) -> Path:
    """The folder where the studio keeps generated data and caches (created on demand)."""
    root = Path(cache_root) if cache_root else Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "refineclip-studio")
    root = root.expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root

"""What the home folder holds, newest first: image folders, feature caches and refinement runs.

The Load page lists them (with sizes and a remove button) so that work survives a reload or a
restart: a cache under a hashed folder name is shown by its model, images and size, and opens with
one click. Only what lies directly in the home folder's own sub-folders is listed or removed
(``demo-data-*`` image folders, ``caches/<key>``, ``runs/<name>.json``); a session's private
upload folder is never listed here.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ..edit.record import read_run_report
from ..errors import DataError, RefineClipError
from ..features.cache_format import read_manifest
from ..files import atomic_write_bytes
from ..home import home_dir
from ..reporting.report_schema import RunReport

RUNS = "runs"
CACHES = "caches"


@dataclass(frozen=True)
class RecentItem:
    """One thing in the home folder: ``kind`` is ``"cache"``, ``"folder"`` or ``"run"``."""

    kind: str
    path: str
    label: str
    bytes: int
    modified: float            # seconds since the epoch

    def age(self, now: float | None = None) -> str:
        s = max(0.0, (now or time.time()) - self.modified)
        for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
            if s >= size:
                return f"{s / size:.0f} {unit} ago"
        return "just now"


def folder_size(path: str | os.PathLike) -> int:
    """Bytes of the regular files below ``path`` (links are not followed)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(root, f))
            except OSError:
                continue
            total += st.st_size if not os.path.islink(os.path.join(root, f)) else 0
    return total


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def recent_items(home: str | os.PathLike | None = None) -> list[RecentItem]:
    """Every image folder, complete feature cache and saved run of the home folder, newest first; under
    a confinement (a session's) only those whose images lie inside it: a session never sees the class
    or file names of data it may not read."""
    from ..loading.confine import current

    confinement = current()
    root = home_dir(home)
    items: list[RecentItem] = []
    caches = root / CACHES
    if caches.is_dir():
        for d in caches.iterdir():
            man = read_manifest(d) if d.is_dir() and not d.is_symlink() else None
            if man is None or not man.complete or confinement.leaves(man.data_root):
                continue
            label = f"{man.model_name} on {man.data_root} ({man.n_records:,} images, {len(man.classes)} classes)"
            items.append(RecentItem("cache", str(d), label, folder_size(d), _modified(d / "manifest.json")))
    for d in root.glob("demo-data-*"):
        if d.is_dir() and not d.is_symlink():
            items.append(RecentItem("folder", str(d), f"demo images {d.name}", folder_size(d), _modified(d)))
    runs = root / RUNS
    if runs.is_dir():
        for f in runs.glob("*.json"):
            run = _read_run(f) if f.is_file() and not f.is_symlink() else None
            if run is not None and run.data.root is not None and not confinement.leaves(run.data.root):
                items.append(RecentItem("run", str(f), _run_label(run), f.stat().st_size, _modified(f)))
    return sorted(items, key=lambda i: -i.modified)


#: Bytes of saved-run files kept parsed in memory, least recently used dropped first (a run report with
#: per-image rows of 100,000 images is about 20 MB; the Load page lists every run on each rerun).
RUN_MEMO_BYTES = 64 * 2**20
_memo: OrderedDict[tuple[str, int, int], RunReport | None] = OrderedDict()
_memo_lock = threading.Lock()


def _read_run(path: Path) -> RunReport | None:
    """A saved run through the run report's one schema (:func:`~refineclip_core.edit.record.read_run_report`);
    None when it is not one (not listed: the image folder it was made on is unknown). Parsed once per
    version of the file (its path, modification time and size) while it fits :data:`RUN_MEMO_BYTES`."""
    try:
        st = path.stat()
    except OSError:
        return None
    key = (str(path), st.st_mtime_ns, st.st_size)
    with _memo_lock:
        if key in _memo:
            _memo.move_to_end(key)
            return _memo[key]
    try:
        run = read_run_report(path)
    except RefineClipError:
        run = None
    with _memo_lock:
        _memo[key] = run
        while len(_memo) > 1 and sum(size for _, _, size in _memo) > RUN_MEMO_BYTES:
            _memo.popitem(last=False)
    return run


def saved_run(path: str | os.PathLike) -> RunReport:
    """One saved run, parsed once per version of its file; a file that is not a run raises
    :func:`~refineclip_core.edit.record.read_run_report`'s one-sentence error."""
    run = _read_run(Path(path))
    return run if run is not None else read_run_report(path)


def _run_label(run: RunReport) -> str:
    pairs = ", ".join(f"{a} → {b}" for a, b in run.pairs)
    verdict = "" if run.verdict is None else run.verdict.status
    return f"{run.exported or 'run'} of {run.model_name or '?'} on {pairs or '?'}" + (f" ({verdict})" if verdict else "")


def save_run(report_json: str, name: str, home: str | os.PathLike | None = None,
             replace: str | os.PathLike | None = None) -> Path:
    """Keep a refinement run's report (its JSON text) in the home folder's ``runs/`` folder; ``replace``:
    the record this one updates (the same run with more rows), rewritten in place when it is a run file
    of that folder."""
    runs = (home_dir(home) / RUNS).resolve()
    if replace is not None and Path(replace).resolve().parent == runs and Path(replace).suffix == ".json" \
            and not Path(replace).is_symlink():
        path = Path(replace)
    else:
        safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:80] or "run"
        path = runs / f"{time.strftime('%Y%m%d-%H%M%S')}-{safe}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, report_json.encode())
    return path


def remove_item(path: str | os.PathLike, home: str | os.PathLike | None = None) -> None:
    """Delete one listed item; anything that is not directly an image folder, cache or run of the
    home folder listed under the confinement in force (a link, a path elsewhere, the home itself) is refused."""
    root = home_dir(home).resolve()
    p = Path(path)
    listed = {Path(i.path) for i in recent_items(root)}
    if p.is_symlink() or p not in listed or p.resolve().parent not in (root, root / CACHES, root / RUNS):
        raise DataError(f"'{path}' is not an image folder, feature cache or run of the home folder; nothing removed.")
    if p.is_dir():
        shutil.rmtree(p)
    else:
        p.unlink()

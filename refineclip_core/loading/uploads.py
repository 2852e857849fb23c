"""A dashboard session's uploads: its private folder, what it keeps there, and the quotas.

* :func:`session_upload_dir` / :func:`cleanup_upload_dir` give each dashboard session its own
  private temporary folder and remove it again; :func:`touch_upload_dir` marks it as in use and
  :func:`sweep_upload_dirs` removes the folders of sessions gone for longer than :func:`upload_ttl`.
* :func:`save_upload` keeps an uploaded file and :func:`unpack_upload` an uploaded zip
  (:func:`refineclip_core.loading.unzip.extract_zip`) in that folder, once per content, after
  :func:`check_upload_quota` (one session's quota and all sessions' total).
* The quotas count *everything* a session writes into its folder, not only uploads: feature caches
  of its uploads, exported checkpoints, run records. :func:`check_session_write` is called before
  each write (:func:`refineclip_core.files.atomic_write_bytes`, a cache's shards, a Hugging Face
  export folder) and refuses, in one sentence, a write that would bring the folder over a quota.

Typed server folders are checked by :func:`refineclip_core.loading.confine.allowed_path`. Nothing
here imports Streamlit; the dashboard calls these functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

from ..errors import DataError
from ..files import WRITE_CHECKS
from .budget import format_bytes, parse_size
from .confine import UPLOAD_PREFIX, session_folder_of
from .data import SkippedFile
from .unzip import ExtractedUpload, extract_zip

#: Environment variables: one session's upload quota, all sessions' together, and how long an
#: upload folder that no session has touched is kept (seconds).
UPLOAD_QUOTA_ENV = "REFINECLIP_UPLOAD_QUOTA"
UPLOAD_TOTAL_ENV = "REFINECLIP_UPLOAD_TOTAL"
UPLOAD_TTL_ENV = "REFINECLIP_UPLOAD_TTL"
DEFAULT_UPLOAD_QUOTA = "4GB"
DEFAULT_UPLOAD_TOTAL = "16GB"
DEFAULT_UPLOAD_TTL = 3600
#: The file whose modification time says when a session last used its folder.
ALIVE_FILE = ".alive"
#: The file naming the server that made a folder (:data:`SERVER_TOKEN`): several servers may share
#: the temporary folder, and each sweeps and counts only its own sessions' folders.
OWNER_FILE = ".server"
#: This server process: its pid (to tell whether the maker of a folder still runs) and a random part
#: (a pid can be reused).
SERVER_TOKEN = f"{os.getpid()}-{os.urandom(8).hex()}"


def session_upload_dir() -> Path:
    """A new private (mode 0700) temporary folder for one dashboard session's uploads, marked as this
    server's (:data:`OWNER_FILE`); folders of sessions gone for longer than :func:`upload_ttl` are
    swept first (:func:`sweep_upload_dirs`)."""
    sweep_upload_dirs()
    path = Path(tempfile.mkdtemp(prefix=UPLOAD_PREFIX))
    (path / OWNER_FILE).write_text(SERVER_TOKEN)
    touch_upload_dir(path)
    return path


def folder_owner(folder: Path) -> str:
    """``"own"`` (made by this server), ``"other"`` (by another server that still runs) or ``"orphan"``
    (its server has stopped, or it carries no owner mark)."""
    try:
        token = (folder / OWNER_FILE).read_text()[:100]
    except OSError:
        return "orphan"
    if token == SERVER_TOKEN:
        return "own"
    try:
        os.kill(int(token.split("-", 1)[0]), 0)
    except ProcessLookupError:
        return "orphan"
    except (ValueError, OverflowError):
        return "orphan"
    except OSError:  # PermissionError: the process exists (another user's)
        pass
    return "other"


def upload_ttl() -> float:
    """Seconds an upload folder is kept after its session last used it (``REFINECLIP_UPLOAD_TTL``)."""
    text = os.environ.get(UPLOAD_TTL_ENV, "").strip()
    try:
        return float(text) if text else float(DEFAULT_UPLOAD_TTL)
    except ValueError:
        raise DataError(f"{UPLOAD_TTL_ENV} must be a number of seconds, not {text!r}.") from None


def touch_upload_dir(path: str | os.PathLike) -> None:
    """Record that the session owning ``path`` is still there (each page run of the dashboard)."""
    with contextlib.suppress(OSError):
        (Path(path) / ALIVE_FILE).touch()


def upload_dirs(owners: tuple[str, ...] = ("own",)) -> list[Path]:
    """The session folders in the temporary directory whose :func:`folder_owner` is in ``owners``
    (default: this server's own; another server's folders are never counted or removed here)."""
    tmp = Path(tempfile.gettempdir())
    with contextlib.suppress(OSError):
        return sorted(p for p in tmp.iterdir() if p.name.startswith(UPLOAD_PREFIX) and p.is_dir()
                      and not p.is_symlink() and folder_owner(p) in owners)
    return []


def sweep_upload_dirs(max_age: float | None = None, now: float | None = None) -> list[Path]:
    """Remove the upload folders no session has used for ``max_age`` seconds (default
    :func:`upload_ttl`): a browser that went away without its session being cleaned up (a
    server that kept the session's state, a hard kill). Only this server's folders and orphans
    (whose server has stopped) are swept, never another running server's. Returns the folders removed."""
    max_age = upload_ttl() if max_age is None else max_age
    now = time.time() if now is None else now
    removed = []
    for folder in upload_dirs(("own", "orphan")):
        try:
            alive = folder / ALIVE_FILE
            last = (alive if alive.exists() else folder).stat().st_mtime
        except OSError:
            continue
        if now - last > max_age and cleanup_upload_dir(folder):
            removed.append(folder)
    return removed


def folder_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the files below ``folder`` (links not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def upload_quotas() -> tuple[int, int]:
    """(one session's, all sessions') upload quota in bytes: ``REFINECLIP_UPLOAD_QUOTA`` and
    ``REFINECLIP_UPLOAD_TOTAL`` (sizes like ``4GB``)."""
    def read(env: str, default: str) -> int:
        try:
            return parse_size(os.environ.get(env, "").strip() or default)
        except DataError:
            raise
        except Exception as exc:  # parse_size's RefineClipError names the budget; say which setting
            raise DataError(f"{env} must be a size like 4GB, not {os.environ.get(env)!r}.") from exc

    return read(UPLOAD_QUOTA_ENV, DEFAULT_UPLOAD_QUOTA), read(UPLOAD_TOTAL_ENV, DEFAULT_UPLOAD_TOTAL)


def check_upload_quota(folder: str | os.PathLike, incoming: int, what: str = "This upload") -> int:
    """Refuse ``incoming`` more bytes in the session folder ``folder`` when they would bring it over
    its quota, or all sessions' folders over the total (:func:`upload_quotas`); ``what`` names the
    write in the sentence. Returns the bytes the session may still add (for the streaming check
    while unpacking)."""
    session_quota, total_quota = upload_quotas()
    own = folder_bytes(folder)
    if own + incoming > session_quota:
        raise DataError(f"{what} ({format_bytes(incoming)}) would bring this session's files to "
                        f"{format_bytes(own + incoming)}, over its quota of {format_bytes(session_quota)} "
                        f"({UPLOAD_QUOTA_ENV}: uploads, their feature caches, exports and runs together); remove "
                        "earlier uploads by reloading the page, or use a folder on the server.")
    everyone = sum(folder_bytes(d) for d in upload_dirs() if d.resolve() != Path(folder).resolve()) + own
    if everyone + incoming > total_quota:
        raise DataError(f"{what} ({format_bytes(incoming)}) would bring all sessions' files to "
                        f"{format_bytes(everyone + incoming)}, over the server's total of {format_bytes(total_quota)} "
                        f"({UPLOAD_TOTAL_ENV}); try again later or use a folder on the server.")
    return session_quota - own


def check_session_write(path: str | os.PathLike, incoming: int) -> None:
    """Before ``incoming`` bytes are written to ``path``: when ``path`` lies in a session's folder
    (:func:`~refineclip_core.loading.confine.session_folder_of`), refuse the write in one sentence if
    it would bring that folder over its quota or all folders over the total (:func:`check_upload_quota`).
    Writes anywhere else (the CLI's outputs, the home folder) are not counted."""
    try:
        folder = session_folder_of(Path(path).resolve())
    except (OSError, RuntimeError, ValueError):
        return
    if folder is not None:
        check_upload_quota(folder, incoming, what=f"Writing '{Path(path).name}'")


if check_session_write not in WRITE_CHECKS:  # every write through files.check_quota counts
    WRITE_CHECKS.append(check_session_write)


def cleanup_upload_dir(path: str | os.PathLike | None) -> bool:
    """Remove a folder made by :func:`session_upload_dir`; anything else is left alone.

    Returns True when something was removed. Refuses (returns False) for folders that are
    not directly in the temporary directory or whose name lacks the upload prefix, so a bug
    elsewhere can never make this delete a user's data.
    """
    if not path:
        return False
    p = Path(path)
    try:
        if p.is_symlink() or not p.is_dir():
            return False
        parent_ok = p.resolve().parent == Path(tempfile.gettempdir()).resolve()
    except OSError:
        return False
    if not parent_ok or not p.name.startswith(UPLOAD_PREFIX):
        return False
    shutil.rmtree(p, ignore_errors=True)
    return not p.exists()


def save_upload(data: bytes, name: str, prefix: str, folder: str | os.PathLike) -> Path:
    """Keep an uploaded file's bytes in ``folder`` under a content-addressed name
    (``<prefix>-<sha256>-<name>``; the same upload is written once, atomically)."""
    digest = hashlib.sha256(data).hexdigest()[:12]
    path = Path(folder) / f"{prefix}-{digest}-{Path(name).name.replace(' ', '_') or 'upload'}"
    if not path.exists():
        check_upload_quota(folder, len(data))
        tmp = path.with_suffix(path.suffix + ".part")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path


def _declared_bytes(data: bytes) -> int:
    """What a zip says it unpacks to (0 when it is no readable zip: :func:`extract_zip` says why)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return sum(i.file_size for i in zf.infolist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError):
        return 0


def unpack_upload(data: bytes, folder: str | os.PathLike) -> ExtractedUpload:
    """:func:`extract_zip` of an uploaded zip into ``folder/zip-<sha256>``, once: the same bytes
    uploaded again reuse the folder (its outcome is remembered in ``zip-<sha256>.json``)."""
    digest = hashlib.sha256(data).hexdigest()[:16]
    dest, record = Path(folder) / f"zip-{digest}", Path(folder) / f"zip-{digest}.json"
    if record.is_file() and dest.is_dir():
        info = json.loads(record.read_text())
        return ExtractedUpload(Path(info["root"]), info["n_files"], [SkippedFile(**s) for s in info["skipped"]],
                               info["total_bytes"], dest)
    shutil.rmtree(dest, ignore_errors=True)  # an extraction that never recorded its outcome
    room = check_upload_quota(folder, _declared_bytes(data))
    res = extract_zip(data, dest, max_total_bytes=min(2_000_000_000, room))
    record.write_text(json.dumps({"root": str(res.root), "n_files": res.n_files, "total_bytes": res.total_bytes,
                                  "skipped": [{"path": s.path, "reason": s.reason} for s in res.skipped]}))
    return res

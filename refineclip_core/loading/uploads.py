"""Safe handling of what a dashboard user hands the server: zip uploads and typed folders.

* :func:`extract_zip` unpacks an uploaded dataset zip (class folders or a ``metadata.csv``
  layout) and refuses, with one sentence naming the entry, anything that could write outside
  the target folder or exhaust the disk: ``../`` traversal, absolute or drive paths, symlink
  and other special entries, encrypted entries, too many files, too many bytes and zip bombs.
  Sizes are checked twice: the sizes the zip *declares* (before anything is written) and the
  bytes actually produced while streaming (headers can lie).
* :func:`session_upload_dir` / :func:`cleanup_upload_dir` give each dashboard session its own
  private temporary folder and remove it again.
* :func:`allowed_path` resolves a folder typed into the dashboard and refuses anything that
  is not below one of the allowed roots (the demo data folder, the demo model's assets and
  the working directory by default, or the ``REFINECLIP_ALLOWED_ROOTS`` environment variable).
  :func:`read_roots` adds a session's upload folder: the folders every file the dashboard
  then reads must lie in when it is opened (:mod:`refineclip_core.loading.confine`).

Nothing here imports Streamlit; the dashboard calls these functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, Sequence

from ..errors import DataError
from .confine import UPLOAD_PREFIX, is_inside
from .data import METADATA_NAME, SkippedFile

#: Environment variable listing the folders a typed server path may lie below (``os.pathsep``-separated).
ALLOWED_ROOTS_ENV = "REFINECLIP_ALLOWED_ROOTS"

#: Entries that archivers add and that are never data (skipped, listed with a reason).
_JUNK_NAMES = {"thumbs.db", "desktop.ini"}
_DRIVE = re.compile(r"^[A-Za-z]:")
_CHUNK = 1 << 20
#: Entries larger than this are checked one by one against the expansion limit (images and CSVs
#: barely compress; 64 kB of zeros compress about 1,000-fold); the whole archive is checked too.
ENTRY_RATIO_MIN_BYTES = 64 * 1024

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


@dataclass(frozen=True)
class ExtractedUpload:
    """Result of :func:`extract_zip`.

    ``root`` is the dataset folder to hand to :func:`refineclip_core.loading.data.load_dataset`: the
    extraction folder, or the single top-level folder the zip wraps everything in (zipping a
    folder ``birds/`` gives entries ``birds/<class>/...``). ``skipped`` lists entries that
    were left out on purpose (macOS metadata, hidden files), with the reason.
    """

    root: Path
    n_files: int
    skipped: list[SkippedFile] = field(default_factory=list)
    total_bytes: int = 0
    dest: Path | None = None


def _size(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _show(name: str) -> str:
    """An entry name short enough for a one-sentence message."""
    return name if len(name) <= 120 else name[:100] + "..." + name[-12:]


def _entry_parts(name: str) -> list[str]:
    """Path components of a zip entry name, or :class:`DataError` if it could escape."""
    if "\x00" in name:
        raise DataError(f"The zip entry {name!r} has a NUL byte in its name; the upload was refused.")
    unified = name.replace("\\", "/")
    if unified.startswith("/") or _DRIVE.match(unified):
        raise DataError(f"The zip entry '{_show(name)}' has an absolute path; the upload was refused (entries must be relative).")
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise DataError(f"The zip entry '{_show(name)}' points outside the upload folder ('..'); the upload was refused.")
    return parts


def _entry_kind(info: zipfile.ZipInfo) -> str:
    """'dir', 'file', or a refusal reason for symlinks and other special entries."""
    mode = (info.external_attr >> 16) & 0xFFFF
    fmt = stat.S_IFMT(mode)
    if fmt == stat.S_IFLNK:
        return "symlink"
    if fmt not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "special"
    if info.is_dir() or fmt == stat.S_IFDIR:
        return "dir"
    return "file"


def _is_junk(parts: Sequence[str]) -> str | None:
    if parts and parts[0] == "__MACOSX":
        return "macOS resource-fork metadata"
    if any(p.startswith(".") for p in parts):
        return "hidden file or folder (name starts with '.')"
    if parts and parts[-1].lower() in _JUNK_NAMES:
        return "operating-system thumbnail/settings file"
    return None


def _open_zip(source: str | os.PathLike | bytes | bytearray | BinaryIO) -> tuple[zipfile.ZipFile, int, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        fh: BinaryIO = io.BytesIO(bytes(source))
        label, size = "The uploaded zip", len(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise DataError(f"Zip file '{source}' does not exist.")
        label, size = f"The zip '{source}'", path.stat().st_size
        try:
            return zipfile.ZipFile(path), size, label
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
            raise DataError(f"Zip file '{source}' is not a readable zip archive ({exc}).") from exc
    elif hasattr(source, "read") and hasattr(source, "seek"):
        fh = source  # e.g. Streamlit's UploadedFile (a BytesIO)
        label = f"The zip '{getattr(source, 'name', 'upload')}'"
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(0)
    else:
        raise DataError(f"Cannot read a zip from a {type(source).__name__}; give a path, bytes or a file object.")
    try:
        return zipfile.ZipFile(fh), size, label
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise DataError(f"{label} is not a readable zip archive ({exc}).") from exc


def extract_zip(
    zip_path_or_bytes: str | os.PathLike | bytes | bytearray | BinaryIO,
    dest_dir: str | os.PathLike,
    max_files: int = 20_000,
    max_total_bytes: int = 2_000_000_000,
    max_ratio: float = 200.0,
    ratio_min_bytes: int = 1 << 20,
) -> ExtractedUpload:
    """Unpack a dataset zip into ``dest_dir`` (which must be new or empty), refusing unsafe archives.

    Every entry is checked before anything is written: no absolute/drive paths, no ``..``,
    no symlinks or device entries, no encryption, at most ``max_files`` files, at most
    ``max_total_bytes`` declared uncompressed bytes, no entry above :data:`ENTRY_RATIO_MIN_BYTES`
    and no archive unpacking to more than ``ratio_min_bytes`` in all that expands more than
    ``max_ratio`` times, and compressed sizes that fit in the archive
    (overlapping entries are a zip-bomb trick). While streaming, the bytes actually produced
    are counted against the declared sizes and ``max_total_bytes``. Files are created with
    ``O_EXCL | O_NOFOLLOW`` in a hidden temporary sibling folder that is renamed to ``dest``
    only when complete; on any refusal it is removed and :class:`DataError` is raised.
    """
    dest = Path(dest_dir)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DataError(f"Cannot extract into '{dest}': choose a new or empty folder.")
    zf, archive_size, label = _open_zip(zip_path_or_bytes)
    with zf:
        plan, skipped = _plan(zf, archive_size, label, max_files, max_total_bytes, max_ratio, ratio_min_bytes)
        n_files = sum(1 for kind, _, _ in plan if kind == "file")
        if n_files == 0:
            raise DataError(f"{label} contains no files to use.")
        # unpack into a hidden sibling and rename it into place when whole: a crash or a
        # refusal half-way never leaves a half-extracted dataset at ``dest``
        dest.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
        try:
            total = _write_all(zf, plan, work.resolve(), max_total_bytes)
            try:
                os.replace(work, dest)  # replaces an empty ``dest`` folder atomically
            except OSError as exc:
                raise DataError(f"Cannot extract into '{dest}': it was filled meanwhile ({exc.strerror or exc}).") from exc
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return ExtractedUpload(_dataset_root(dest.resolve()), n_files, skipped, total, dest)


def _plan(zf: zipfile.ZipFile, archive_size: int, label: str, max_files: int, max_total_bytes: int,
          max_ratio: float, ratio_min_bytes: int) -> tuple[list[tuple[str, list[str], zipfile.ZipInfo]], list[SkippedFile]]:
    """Validate every entry's header; the list of (kind, parts, info) to write and the skipped ones."""
    plan: list[tuple[str, list[str], zipfile.ZipInfo]] = []
    skipped: list[SkippedFile] = []
    n_files = n_dirs = 0
    declared = compressed = 0
    for info in zf.infolist():
        name = info.filename
        parts = _entry_parts(name)
        kind = _entry_kind(info)
        if kind == "symlink":
            raise DataError(f"The zip entry '{_show(name)}' is a symbolic link; the upload was refused (links could point anywhere).")
        if kind == "special":
            raise DataError(f"The zip entry '{_show(name)}' is not a regular file or folder; the upload was refused.")
        if info.flag_bits & 0x1:
            raise DataError(f"The zip entry '{_show(name)}' is encrypted; upload an unencrypted zip.")
        if not parts:
            continue  # "./" or "/"-only names carry nothing
        junk = _is_junk(parts)
        if junk:
            skipped.append(SkippedFile(name, junk))
            continue
        if kind == "dir":
            n_dirs += 1
            if n_dirs > max_files:
                raise DataError(f"{label} has more than {max_files} folders; the upload was refused.")
            plan.append((kind, parts, info))
            continue
        n_files += 1
        if n_files > max_files:
            raise DataError(f"{label} has more than {max_files} files; split the upload or use a server folder.")
        declared += info.file_size
        compressed += info.compress_size
        if declared > max_total_bytes:
            raise DataError(
                f"{label} would unpack to more than {_size(max_total_bytes)}; "
                "the upload was refused."
            )
        if info.file_size > ENTRY_RATIO_MIN_BYTES and info.file_size > max_ratio * max(info.compress_size, 1):
            raise DataError(
                f"The zip entry '{_show(name)}' expands {info.file_size / max(info.compress_size, 1):.0f}-fold "
                f"(limit {max_ratio:.0f}); this looks like a zip bomb and the upload was refused."
            )
        plan.append((kind, parts, info))
    # every entry together: many entries just under any per-entry size (1,900 x 1 MiB of zeros) expand as one
    if declared > ratio_min_bytes and declared > max_ratio * max(archive_size, 1):
        raise DataError(
            f"{label} expands {declared / max(archive_size, 1):.0f}-fold in all (limit {max_ratio:.0f}); this looks "
            "like a zip bomb and the upload was refused."
        )
    if compressed > archive_size:
        raise DataError(
            f"{label} declares more compressed data than it holds (overlapping entries); "
            "this looks like a zip bomb and the upload was refused."
        )
    return plan, skipped


def _write_all(zf: zipfile.ZipFile, plan: Iterable[tuple[str, list[str], zipfile.ZipInfo]], dest: Path,
               max_total_bytes: int) -> int:
    total = 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    for kind, parts, info in plan:
        target = dest.joinpath(*parts)
        # defence in depth: the target must stay below dest even after resolving what exists
        if dest not in target.parent.resolve().parents and target.parent.resolve() != dest:
            raise DataError(f"The zip entry '{_show(info.filename)}' points outside the upload folder; the upload was refused.")
        try:
            (target if kind == "dir" else target.parent).mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise DataError(f"The zip has a file and a folder both on the path '{_show(info.filename)}'; the upload was refused.") from exc
        except OSError as exc:
            raise DataError(f"Cannot create '{_show(info.filename)}' from the zip ({exc.strerror or exc}).") from exc
        if kind == "dir":
            continue
        try:
            fd = os.open(target, flags, 0o644)
        except FileExistsError as exc:
            raise DataError(f"The zip lists '{_show(info.filename)}' twice; the upload was refused.") from exc
        except OSError as exc:
            raise DataError(f"Cannot create '{_show(info.filename)}' from the zip ({exc.strerror or exc}).") from exc
        written = 0
        try:
            with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                while True:
                    chunk = src.read(_CHUNK)
                    if not chunk:
                        break
                    written += len(chunk)
                    total += len(chunk)
                    if written > info.file_size:
                        raise DataError(
                            f"The zip entry '{_show(info.filename)}' unpacks to more bytes than its header declares "
                            f"({info.file_size}); the upload was refused."
                        )
                    if total > max_total_bytes:
                        raise DataError(
                            f"The zip unpacks to more than {_size(max_total_bytes)}; the upload was refused."
                        )
                    out.write(chunk)
        except DataError:
            raise
        except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, RuntimeError) as exc:
            raise DataError(f"The zip entry '{_show(info.filename)}' is corrupt or uses an unsupported format ({exc}).") from exc
        except OSError as exc:
            raise DataError(f"Cannot write '{_show(info.filename)}' from the zip ({exc.strerror or exc}).") from exc
        if written != info.file_size:
            raise DataError(
                f"The zip entry '{_show(info.filename)}' unpacked to {written} bytes but declares {info.file_size}; "
                "the zip is corrupt."
            )
    return total


def _dataset_root(dest: Path) -> Path:
    """Descend through a single wrapping folder when it, not ``dest``, holds the dataset."""
    root = dest
    while True:
        children = [c for c in root.iterdir() if not c.name.startswith(".") and c.name != "__MACOSX"]
        if (root / METADATA_NAME).is_file() or len(children) != 1 or not children[0].is_dir():
            return root
        only = children[0]
        inner = list(only.iterdir())
        # a lone class folder of images stays one level up (it is a class, not a dataset root)
        if not ((only / METADATA_NAME).is_file() or any(c.is_dir() for c in inner)):
            return root
        root = only


def session_upload_dir() -> Path:
    """A new private (mode 0700) temporary folder for one dashboard session's uploads; folders of
    sessions gone for longer than :func:`upload_ttl` are swept first (:func:`sweep_upload_dirs`)."""
    sweep_upload_dirs()
    path = Path(tempfile.mkdtemp(prefix=UPLOAD_PREFIX))
    touch_upload_dir(path)
    return path


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


def upload_dirs() -> list[Path]:
    """Every session's upload folder in the temporary directory."""
    tmp = Path(tempfile.gettempdir())
    with contextlib.suppress(OSError):
        return sorted(p for p in tmp.iterdir() if p.name.startswith(UPLOAD_PREFIX) and p.is_dir()
                      and not p.is_symlink())
    return []


def sweep_upload_dirs(max_age: float | None = None, now: float | None = None) -> list[Path]:
    """Remove the upload folders no session has used for ``max_age`` seconds (default
    :func:`upload_ttl`): a browser that went away without its session being cleaned up (a
    server that kept the session's state, a hard kill). Returns the folders removed."""
    max_age = upload_ttl() if max_age is None else max_age
    now = time.time() if now is None else now
    removed = []
    for folder in upload_dirs():
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
    from .budget import parse_size

    def read(env: str, default: str) -> int:
        try:
            return parse_size(os.environ.get(env, "").strip() or default)
        except DataError:
            raise
        except Exception as exc:  # parse_size's RefineClipError names the budget; say which setting
            raise DataError(f"{env} must be a size like 4GB, not {os.environ.get(env)!r}.") from exc

    return read(UPLOAD_QUOTA_ENV, DEFAULT_UPLOAD_QUOTA), read(UPLOAD_TOTAL_ENV, DEFAULT_UPLOAD_TOTAL)


def check_upload_quota(folder: str | os.PathLike, incoming: int) -> int:
    """Refuse ``incoming`` more bytes in the session folder ``folder`` when they would bring it over
    its quota, or all sessions' folders over the total (:func:`upload_quotas`). Returns the bytes
    the session may still add (for the streaming check while unpacking)."""
    session_quota, total_quota = upload_quotas()
    own = folder_bytes(folder)
    if own + incoming > session_quota:
        raise DataError(f"This upload ({_size(incoming)}) would bring this session's uploads to "
                        f"{_size(own + incoming)}, over its quota of {_size(session_quota)} ({UPLOAD_QUOTA_ENV}); "
                        "remove earlier uploads by reloading the page, or use a folder on the server.")
    everyone = sum(folder_bytes(d) for d in upload_dirs() if d.resolve() != Path(folder).resolve()) + own
    if everyone + incoming > total_quota:
        raise DataError(f"This upload ({_size(incoming)}) would bring all sessions' uploads to "
                        f"{_size(everyone + incoming)}, over the server's total of {_size(total_quota)} "
                        f"({UPLOAD_TOTAL_ENV}); try again later or use a folder on the server.")
    return session_quota - own


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


def default_allowed_roots() -> list[Path]:
    """Folders a typed server path may lie below.

    ``REFINECLIP_ALLOWED_ROOTS`` (``os.pathsep``-separated) replaces the defaults when set.
    Otherwise: the home folder holding the generated demo data and caches
    (:func:`refineclip_core.home.home_dir`, ``$REFINECLIP_HOME``), the repository's
    ``assets`` folder (embedded demo model) and the current working directory.
    """
    env = os.environ.get(ALLOWED_ROOTS_ENV, "")
    roots = [Path(r).expanduser() for r in env.split(os.pathsep) if r.strip()]
    if roots:
        return roots
    from ..home import home_dir
    from .models import ASSETS_DIR

    return [home_dir(), ASSETS_DIR, Path.cwd()]


def read_roots(*extra: str | os.PathLike) -> tuple[str, ...]:
    """The folders a dashboard session reads files from: :func:`default_allowed_roots`, the
    home folder (the demo data it generates) and ``extra`` (the session's upload folder)."""
    from ..home import home_dir

    folders = [*default_allowed_roots(), home_dir(), *extra]
    return tuple(dict.fromkeys(str(Path(f).expanduser().resolve()) for f in folders))


def allowed_path(path: str | os.PathLike, roots: Sequence[str | os.PathLike] | None = None) -> Path:
    """Resolve a user-typed server path; refuse it unless it lies at or below an allowed root.

    Symlinks are resolved first, so a link inside an allowed root that points elsewhere is
    refused too. Containment is checked before existence, so the answer reveals nothing about
    files outside the roots. Relative paths are taken relative to the working directory.
    """
    text = os.fspath(path) if not isinstance(path, str) else path
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    text = text.strip()
    if not text:
        raise DataError("Give a folder path.")
    root_list = list(roots) if roots is not None else default_allowed_roots()
    try:
        resolved = Path(text).expanduser().resolve()
        resolved_roots = [Path(r).expanduser().resolve() for r in root_list]
    except (OSError, RuntimeError, ValueError) as exc:
        raise DataError(f"The path {text!r} cannot be resolved ({exc}).") from exc
    if not is_inside(resolved, resolved_roots):
        shown = ", ".join(str(r) for r in resolved_roots) or "none configured"
        raise DataError(
            f"'{text}' is outside the folders this dashboard may read ({shown}); move the data below one of them "
            f"or start the server with {ALLOWED_ROOTS_ENV} listing it ({os.pathsep}-separated; the list replaces "
            f"the default folders, so name those too to keep them)."
        )
    if not resolved.exists():
        raise DataError(f"'{text}' does not exist.")
    return resolved


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

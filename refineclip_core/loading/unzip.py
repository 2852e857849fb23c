"""Unpacking an uploaded dataset zip safely (class folders or a ``metadata.csv`` layout).

:func:`extract_zip` refuses, with one sentence naming the entry, anything that could write outside
the target folder or exhaust the disk: ``../`` traversal, absolute or drive paths, symlink and
other special entries, encrypted entries, too many files, too many bytes and zip bombs. Sizes are
checked twice: the sizes the zip *declares* (before anything is written) and the bytes actually
produced while streaming (headers can lie). Where an upload is kept, and how much a session may
upload, is :mod:`refineclip_core.loading.uploads`'s.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, Sequence

from ..errors import DataError
from .budget import format_bytes
from .data import METADATA_NAME, SkippedFile

#: Entries that archivers add and that are never data (skipped, listed with a reason).
_JUNK_NAMES = {"thumbs.db", "desktop.ini"}
_DRIVE = re.compile(r"^[A-Za-z]:")
_CHUNK = 1 << 20
#: Entries larger than this are checked one by one against the expansion limit (images and CSVs
#: barely compress; 64 kB of zeros compress about 1,000-fold); the whole archive is checked too.
ENTRY_RATIO_MIN_BYTES = 64 * 1024


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
                f"{label} would unpack to more than {format_bytes(max_total_bytes)}; "
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
                            f"The zip unpacks to more than {format_bytes(max_total_bytes)}; the upload was refused."
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

"""Labelled image datasets: class folders, ``metadata.csv`` and the WILDS Waterbirds layout.

:func:`load_dataset` looks at a path and returns an :class:`ImageDataset`: the list of
:class:`ImageRecord` (path, label, group, split), the class names and the files that were
left out with a reason (:class:`SkippedFile`). Layouts:

* **folder**: ``root/<class>/**/*.jpg``; classes are the sorted sub-folder names.
* **csv**: ``root/metadata.csv`` with ``path,label`` and optional ``group``, ``split``.
* **waterbirds**: ``root/metadata.csv`` with ``img_filename,y,split,place`` (WILDS); classes
  ``landbird``/``waterbird``, groups ``<bird> on <land|water>``, splits train/val/test.

Images are decoded by :func:`~refineclip_core.loading.decode.load_image` (Pillow, EXIF orientation applied, any mode to RGB,
decompression-bomb guard on). A file that cannot be decoded never stops a run: extraction
records it as skipped with the reason.

Symbolic links: class folders and the folders below them are treated alike. A folder link is
followed unless it points at the data folder, above it or at a folder already listed (a loop).
Under a confinement (the dashboard's, see :mod:`refineclip_core.loading.confine`) files and folders
whose links leave its folders are skipped with :data:`~refineclip_core.loading.confine.OUTSIDE_REASON`,
and every read checks the file actually opened again; not confined (a local user's CLI) links are
followed wherever they point.
"""

from __future__ import annotations

import csv
import io
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence


from ..errors import DataError, OutsideRootsError
from ..names import decodable
from .confine import OUTSIDE_REASON, PRIVATE_REASON, Confinement, current, open_confined

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
WATERBIRDS_CLASSES = ("landbird", "waterbird")
WATERBIRDS_PLACES = ("land", "water")
WATERBIRDS_SPLITS = {"0": "train", "1": "val", "2": "test"}
METADATA_NAME = "metadata.csv"


@dataclass(frozen=True)
class ImageRecord:
    """One labelled image. ``path`` is absolute and is the *real* file name, for opening only: a name
    that is not UTF-8 keeps its undecodable bytes as surrogate escapes (``os.fsencode(path)`` gives the
    bytes back). Everything shown or written (tables, CSV, JSON, HTML, cache keys) uses :attr:`name`;
    ``group``/``split`` are display text already (may be ``None``)."""

    path: str
    label: int
    group: str | None = None
    split: str | None = None

    @property
    def name(self) -> str:
        """The path as text that can be shown and written (:func:`refineclip_core.names.decodable`)."""
        return decodable(self.path)


@dataclass(frozen=True)
class SkippedFile:
    """A file that was left out, and why (one short sentence). Both are display text: undecodable
    bytes of a file name are marked here, where the name is read (:func:`~refineclip_core.names.decodable`)."""

    path: str
    reason: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", decodable(self.path))
        object.__setattr__(self, "reason", decodable(self.reason))


#: Longest class name accepted (characters). CLIP reads at most 77 tokens of a prompt, so a longer
#: name changes nothing, while the tokenizer's time grows about quadratically with the length
#: (a 100,000-character name took 68 s and slowed every other session).
MAX_CLASS_NAME_CHARS = 300


def _shown_names(names: Sequence[object], k: int = 5) -> str:
    """A few names for a one-sentence message (never all 10,000 of them)."""
    head = [str(x) if len(str(x)) <= 60 else str(x)[:50] + "..." for x in list(names)[:k]]
    return repr(head)[:-1] + (f", ... ({len(names)} in all)]" if len(names) > k else "]")


def check_class_name_lengths(names: Sequence[object], what: str = "class name", kind: str = "class names") -> None:
    """Refuse, in one sentence, any name longer than :data:`MAX_CLASS_NAME_CHARS` (``what`` names one,
    ``kind`` them all: "concept text", "concept texts" for a concept to remove)."""
    for name in names:
        text = str(name)
        if len(text) > MAX_CLASS_NAME_CHARS:
            raise DataError(f"The {what} '{text[:40]}...' is {len(text):,} characters long; {kind} are limited "
                            f"to {MAX_CLASS_NAME_CHARS} characters (CLIP reads at most 77 tokens of a prompt).")


def validate_class_names(names: Sequence[str], n: int) -> list[str]:
    """``names`` stripped, refused in one sentence unless they are ``n`` distinct non-empty names of at
    most :data:`MAX_CLASS_NAME_CHARS` characters (the one check for every rename: the CLI's
    --class-names and the dashboard's class name editor)."""
    if len(names) != n or any(not str(x).strip() for x in names):
        raise DataError(f"Give {n} non-empty class names (one per class, in order), got {len(names)}: "
                        f"{_shown_names(names)}.")
    out = [str(x).strip() for x in names]
    check_class_name_lengths(out)
    if len(set(out)) != len(out):
        twice = sorted(x for x, k in Counter(out).items() if k > 1)
        raise DataError(f"Class names must be distinct (identical names get identical prompts); "
                        f"{_shown_names(twice)} appear more than once.")
    return out


@dataclass
class ImageDataset:
    """Labelled images plus what was skipped while building the list."""

    root: str
    records: list[ImageRecord]
    classes: list[str]
    layout: str
    skipped: list[SkippedFile] = field(default_factory=list)
    roots: tuple[str, ...] | None = None   # the confinement it was listed under (its folders; None: follow links)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def groups(self) -> list[str]:
        """Sorted distinct group names (empty when the data has no groups)."""
        return sorted({r.group for r in self.records if r.group is not None})

    @property
    def splits(self) -> list[str]:
        return sorted({r.split for r in self.records if r.split is not None})

    def subset(self, split: str | None) -> "ImageDataset":
        """Only the images of ``split`` (all of them when ``split`` is None)."""
        if split is None:
            return self
        records = [r for r in self.records if r.split == split]
        if not records:
            raise DataError(f"No images with split '{split}' in {self.root} (splits present: {self.splits or 'none'}).")
        return replace(self, records=records)

    def renamed(self, names: Sequence[str]) -> "ImageDataset":
        """The same data with new class names (same order, same count; :func:`validate_class_names`)."""
        return replace(self, classes=validate_class_names(names, len(self.classes)))


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def detect_layout(root: Path) -> str:
    meta = root / METADATA_NAME
    if meta.is_file():
        return csv_layout(_read_csv_header(meta))
    return "folder"


def csv_layout(header: Sequence[str]) -> str:
    """``waterbirds`` for a WILDS header (``img_filename,y,split,place``), else ``csv``."""
    return "waterbirds" if {"img_filename", "y", "place"} <= {h.strip() for h in header} else "csv"


def _read_csv_header(path: Path) -> list[str]:
    with open_confined(path) as fh:
        text = io.TextIOWrapper(fh, encoding="utf-8-sig", errors="replace", newline="")
        return [h.strip() for h in next(csv.reader(text), [])]


def load_dataset(path: str | os.PathLike, layout: str = "auto", split: str | None = None,
                 columns: dict[str, str | None] | None = None) -> ImageDataset:
    """Build the list of labelled images under ``path`` (see the module docstring).

    ``columns`` renames the CSV columns read by the ``csv`` layout, e.g.
    ``{"label": "Young", "group": "Male"}`` for a CelebA-style ``metadata.csv``. The confinement in
    force (:func:`~refineclip_core.loading.confine.current`) governs every file read, now and when the
    images are decoded (the dataset records it: ``roots``); links leaving its folders are skipped with the
    reason :data:`~refineclip_core.loading.confine.OUTSIDE_REASON`.
    """
    conf = current()
    with conf.active():  # listed under one confinement, looked up once
        ds = _load_dataset(path, layout, columns, conf)
    if not ds.records:
        reasons = f" ({len(ds.skipped)} files skipped, e.g. {ds.skipped[0].reason})" if ds.skipped else ""
        raise DataError(f"No usable images found in '{path}'{reasons}.")
    return ds.subset(split)


def _load_dataset(path: str | os.PathLike, layout: str, columns: dict[str, str | None] | None,
                  conf: Confinement) -> ImageDataset:
    root = Path(path).expanduser()
    if root.is_file() and root.name.endswith(".csv"):
        meta_override, root = root, root.parent
    else:
        meta_override = None
    if not root.exists():
        raise DataError(f"Data path '{path}' does not exist.")
    if not root.is_dir():
        raise DataError(f"Data path '{path}' is not a folder (give a folder of class sub-folders or with metadata.csv).")
    root = root.resolve()
    if not conf.contains(root):
        raise OutsideRootsError(f"Data path '{path}' is outside the allowed folders "
                                f"({', '.join(conf.folders or ())}); move the data below one of them.")
    if layout == "auto":
        layout = "csv" if meta_override else detect_layout(root)
    if layout == "folder":
        ds = _load_folder(root)
    elif layout in ("csv", "waterbirds"):
        ds = _load_csv(root, meta_override or root / METADATA_NAME, waterbirds=layout == "waterbirds",
                       columns=columns)
    else:
        raise DataError(f"Unknown layout '{layout}'; use auto, folder, csv or waterbirds.")
    ds.roots = conf.folders
    return ds


def _folder_refusal(folder: Path, root: Path, visited: set[Path]) -> str | None:
    """Why ``folder`` is not listed (None: list it): a link, see :func:`_folder_link_refusal`; a
    plain folder that is another session's own (a server folder holding the temporary directory)."""
    if folder.is_symlink():
        return _folder_link_refusal(folder, root, visited)
    return PRIVATE_REASON if current().leaves(folder) else None


def _folder_link_refusal(link: Path, root: Path, visited: set[Path]) -> str | None:
    """Why the folder link ``link`` is not followed (None: follow it): it leaves the allowed folders,
    or points at the data folder, above it or at a folder already listed (a loop)."""
    if current().leaves(link):
        return OUTSIDE_REASON
    try:
        target = link.resolve()
    except (OSError, RuntimeError, ValueError):
        return "symbolic link loop, not followed"
    if target == root or target in root.parents or target in visited:
        return "symbolic link to the data folder, above it or to a folder already listed (loop), not followed"
    return None


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a link loop: listed as a file, whose read then reports the loop
        return False


def _walk_images(folder: Path, root: Path, skipped: list[SkippedFile]) -> list[Path]:
    """Image files below ``folder``, sorted, without hidden files; folder links are followed
    unless :func:`_folder_link_refusal` says why not, file links leaving the allowed folders are skipped."""
    conf = current()
    out: list[Path] = []
    visited = {folder.resolve()}
    stack = [folder]
    while stack:
        here = stack.pop()
        try:
            with os.scandir(here) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            skipped.append(SkippedFile(str(here), f"folder unreadable ({exc.strerror or exc})"))
            continue
        subdirs: list[Path] = []
        for entry in entries:
            full = Path(here) / entry.name
            if _is_dir(entry):  # follows links; a loop or a dangling link is not a folder
                if entry.name.startswith("."):
                    skipped.append(SkippedFile(str(full), "hidden folder (name starts with '.'), not searched"))
                    continue
                why = _folder_refusal(full, root, visited)
                if why:
                    skipped.append(SkippedFile(str(full), why))
                    continue
                visited.add(full.resolve())
                subdirs.append(full)
            elif entry.name.startswith("."):
                skipped.append(SkippedFile(str(full), "hidden file (name starts with '.')"))
            elif not _is_image_name(entry.name):
                if entry.name != METADATA_NAME:
                    skipped.append(SkippedFile(str(full), "not an image file extension"))
            elif entry.is_symlink() and conf.leaves(full):
                skipped.append(SkippedFile(str(full), OUTSIDE_REASON))
            else:
                out.append(full)
        stack.extend(reversed(subdirs))  # depth first, in name order
    return out


def _load_folder(root: Path) -> ImageDataset:
    skipped: list[SkippedFile] = []
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(
            f"'{root}' has no class sub-folders; put images in '<root>/<class name>/' folders or add a metadata.csv."
        )
    records: list[ImageRecord] = []
    classes: list[str] = []
    for class_dir in class_dirs:
        why = _folder_refusal(class_dir, root, set())
        if why:
            skipped.append(SkippedFile(str(class_dir), "class folder: " + why))
            continue
        files = _walk_images(class_dir, root, skipped)
        if not files:
            skipped.append(SkippedFile(str(class_dir), "class folder contains no images"))
            continue
        label = len(classes)
        classes.append(decodable(class_dir.name))  # undecodable bytes marked: the name is encodable data
        records.extend(ImageRecord(str(f), label) for f in files)
    for stray in sorted(p for p in root.iterdir() if p.is_file() and _is_image_name(p.name)):
        skipped.append(SkippedFile(str(stray), "image at the top level has no class folder"))
    return ImageDataset(str(root), records, classes, "folder", skipped)


def _load_csv(root: Path, meta: Path, waterbirds: bool, columns: dict[str, str | None] | None = None) -> ImageDataset:
    """``meta`` parsed while it is read (streamed: a file of millions of rows is never held whole),
    in any encoding (see :func:`parse_metadata`)."""
    try:
        with open_confined(meta) as fh:
            text = io.TextIOWrapper(fh, encoding="utf-8-sig", errors="surrogateescape", newline="")
            return parse_metadata(text, root, waterbirds=waterbirds, source=str(meta), columns=columns)
    except (OSError, ValueError) as exc:
        raise DataError(f"Cannot read '{meta}' ({getattr(exc, 'strerror', None) or exc}).") from exc


#: Most data rows a ``metadata.csv`` may have (``REFINECLIP_MAX_CSV_ROWS``): 10 million rows naming
#: missing files took 479 s and 3.2 GB before this limit; the count is checked while the file streams.
MAX_CSV_ROWS_ENV = "REFINECLIP_MAX_CSV_ROWS"
DEFAULT_MAX_CSV_ROWS = 1_000_000


def max_csv_rows() -> int:
    """The row limit of a ``metadata.csv`` (:data:`MAX_CSV_ROWS_ENV`, default :data:`DEFAULT_MAX_CSV_ROWS`)."""
    text = os.environ.get(MAX_CSV_ROWS_ENV, "").strip().replace("_", "")
    try:
        value = int(text) if text else DEFAULT_MAX_CSV_ROWS
    except ValueError:
        value = 0
    if value < 1:
        raise DataError(f"{MAX_CSV_ROWS_ENV} must be a positive whole number of rows, not {text!r}.")
    return value


def parse_metadata(text: str | Iterable[str], root: Path, waterbirds: bool | None = None, source: str = METADATA_NAME,
                   columns: dict[str, str | None] | None = None) -> ImageDataset:
    """Parse ``metadata.csv`` text (a string, or a text stream read row by row) into a dataset (paths
    resolved below ``root``). More than :func:`max_csv_rows` data rows are refused in one sentence as
    soon as the row after the limit is read.

    Rows whose path escapes ``root``, is missing or has an empty label are skipped with a
    reason; a header without the needed columns raises :class:`DataError`. ``columns`` maps
    ``path``/``label``/``group``/``split`` to other column names (``None`` drops one).
    ``waterbirds=None`` reads the layout from the header (:func:`csv_layout`). The confinement in
    force governs the images' reads as in :func:`load_dataset`.

    Text that is not UTF-8 is read with surrogate escapes (``errors="surrogateescape"``): a path
    then names the real file, while labels, groups and splits become display text here, through
    :func:`~refineclip_core.names.decodable` (undecodable bytes marked).
    """
    conf = current()
    col = {"path": "path", "label": "label", "group": "group", "split": "split"}
    col.update({k: v for k, v in (columns or {}).items() if k in col})
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")) if isinstance(text, str) else text)
    limit = max_csv_rows()
    try:
        header = [decodable(h).strip() for h in (reader.fieldnames or [])]
    except csv.Error as exc:
        raise DataError(f"'{source}' is not valid CSV ({exc}).") from exc
    reader.fieldnames = header
    if waterbirds is None:
        waterbirds = csv_layout(header) == "waterbirds"
    need = ("img_filename", "y", "place") if waterbirds else (col["path"], col["label"])
    if not set(need) <= set(header):
        raise DataError(f"'{source}' needs columns {', '.join(need)}; found {', '.join(header) or 'no header'}.")
    rows: list[tuple[str, str, str | None, str | None]] = []
    skipped: list[SkippedFile] = []
    root_resolved = root.resolve()
    for i, row in enumerate(_csv_rows(reader, source), start=2):
        if i - 1 > limit:
            raise DataError(f"'{source}' has more than {limit:,} rows, the most a metadata.csv may have "
                            f"({MAX_CSV_ROWS_ENV}); split the data or raise the limit.")
        try:
            if waterbirds:
                rel = (row.get("img_filename") or "").strip()
                y, place = (row.get("y") or "").strip(), (row.get("place") or "").strip()
                if y not in ("0", "1") or place not in ("0", "1"):
                    skipped.append(SkippedFile(f"{source}:{i}", f"y/place must be 0 or 1 (got {y!r}, {place!r})"))
                    continue
                label = WATERBIRDS_CLASSES[int(y)]
                group = f"{label} on {WATERBIRDS_PLACES[int(place)]}"
                sp = (row.get("split") or "").strip()
                split = WATERBIRDS_SPLITS.get(sp, decodable(sp) or None)
            else:
                rel = (row.get(col["path"]) or "").strip()
                label = decodable((row.get(col["label"]) or "").strip())
                group = decodable((row.get(col["group"]) or "").strip()) or None if col["group"] else None
                split = decodable((row.get(col["split"]) or "").strip()) or None if col["split"] else None
        except AttributeError:  # malformed row (extra columns collapse into a list)
            skipped.append(SkippedFile(f"{source}:{i}", "malformed CSV row"))
            continue
        if not rel or not label:
            skipped.append(SkippedFile(f"{source}:{i}", "empty path or label"))
            continue
        full = (root / rel)
        try:
            resolved = full.resolve()
        except (OSError, RuntimeError, ValueError):  # symlink loop, NUL byte, name too long
            skipped.append(SkippedFile(str(full), "path cannot be resolved (symlink loop, NUL byte or too long)"))
            continue
        if root_resolved not in resolved.parents:
            linked = root_resolved in Path(os.path.normpath(root_resolved / rel)).parents  # named inside, resolves outside
            outside = linked and not conf.contains(resolved)
            skipped.append(SkippedFile(rel, OUTSIDE_REASON if outside else "path points outside the data folder"))
            continue
        try:
            is_file = resolved.is_file()
        except (OSError, ValueError):
            is_file = False
        if not is_file:
            skipped.append(SkippedFile(str(full), "file listed in the CSV does not exist"))
            continue
        rows.append((str(full), label, group, split))
    if waterbirds:
        classes = [c for c in WATERBIRDS_CLASSES if any(r[1] == c for r in rows)]
    else:
        classes = sorted({r[1] for r in rows})
    index = {c: i for i, c in enumerate(classes)}
    records = [ImageRecord(p, index[l], g, s) for p, l, g, s in rows]
    check_class_name_lengths(classes, "label")
    return ImageDataset(str(root), records, classes, "waterbirds" if waterbirds else "csv", skipped, conf.folders)


def _csv_rows(reader: csv.DictReader, source: str) -> Iterable[dict]:
    """The reader's rows, with CSV syntax errors (e.g. an over-long field) as :class:`DataError`."""
    try:
        yield from reader
    except csv.Error as exc:
        raise DataError(f"'{source}' is not valid CSV (line {reader.line_num}: {exc}).") from exc


"""Reading files only from allowed folders, checked at the moment each file is opened.

The dashboard runs as the server's user, so a symbolic link placed in a folder it may read
(``a/zz_link.jpg -> /elsewhere/secret.jpg``, a class folder ``c -> /elsewhere``) would make
it read, and show, files its users must not see. Every reader of a user-named file (images,
``metadata.csv``, checkpoints, model configs) therefore takes ``roots``:

* ``roots=None`` (the library's and the CLI's default): links are followed wherever they
  point; a shell user can read those files anyway.
* ``roots=[folders]`` (what the dashboard passes, :func:`read_roots`):
  the file is opened first and the path of *the file actually opened* (``/proc/self/fd``) must
  lie at or below one of the folders; otherwise :class:`~refineclip_core.errors.OutsideRootsError`
  is raised and nothing is read. Checking the opened file, not a name listed earlier, means a
  link swapped in after a folder was listed is still refused.

Listing (:func:`refineclip_core.loading.data.load_dataset`) applies the same rule early, so
such files are skipped with the reason :data:`OUTSIDE_REASON` before any work is planned.

Which folders: :func:`allowed_path` resolves a folder typed into the dashboard and refuses anything
that is not below one of the allowed roots (the home folder, the demo model's assets and the working
directory by default, or the ``REFINECLIP_ALLOWED_ROOTS`` environment variable); :func:`read_roots`
adds a session's upload folder: the folders every file the dashboard then reads must lie in.

Model sources named by something other than a path argument (a model name ``local-dir:``/``hf-hub:``,
a config's ``hf_model_name``/``hf_tokenizer_name``, a cache manifest's model) are checked against the
same folders by :mod:`refineclip_core.loading.sources`, before anything is read.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

from ..errors import DataError, OutsideRootsError
from ..home import ASSETS_DIR, home_dir

#: Why a file or folder reached through a link that leaves the allowed folders is skipped.
OUTSIDE_REASON = "symbolic link outside the allowed folders"
#: Why another session's own folder (uploads, private caches) is not listed.
PRIVATE_REASON = "another session's private folder, not listed"

Roots = Sequence[str | os.PathLike] | None

#: Environment variable listing the folders a typed server path may lie below (``os.pathsep``-separated).
ALLOWED_ROOTS_ENV = "REFINECLIP_ALLOWED_ROOTS"


class SpecialFileError(OSError):
    """The path is a device, pipe or socket, not a regular file (reading it could block forever)."""


def resolve_roots(roots: Roots) -> tuple[Path, ...] | None:
    """The folders as absolute paths with every link resolved (None stays None: no confinement)."""
    if roots is None:
        return None
    return tuple(dict.fromkeys(Path(r).expanduser().resolve() for r in roots))


#: Prefix of every per-session folder (``<tmp>/refineclip-uploads-XXXXXXXX``): uploads, private caches, exports.
UPLOAD_PREFIX = "refineclip-uploads-"


@functools.lru_cache(maxsize=8)
def _resolved_tmp(tmp: str) -> Path:
    return Path(tmp).resolve()


def session_folder_of(path: Path) -> Path | None:
    """The per-session folder (:data:`UPLOAD_PREFIX` in the temporary directory) that the resolved
    ``path`` lies in, or None."""
    tmp = _resolved_tmp(tempfile.gettempdir())
    for folder in (path, *path.parents):
        if folder.parent == tmp and folder.name.startswith(UPLOAD_PREFIX):
            return folder
    return None


def is_inside(path: Path, roots: Sequence[Path]) -> bool:
    """Whether the resolved ``path`` is one of the resolved ``roots`` or below one.

    A session's own folder belongs to that session only: a path inside one counts as inside
    ``roots`` only through a root that is that folder (or lies in it), never through a root above
    it (a server started in ``/tmp`` has ``/tmp`` among its roots; other sessions' folders are
    still out of reach)."""
    owner = session_folder_of(path)
    return any((path == r or r in path.parents) and (owner is None or r == owner or owner in r.parents)
               for r in roots)


def leaves_roots(path: str | os.PathLike, roots: Sequence[Path] | None) -> bool:
    """For listings: True when ``path`` resolves outside the resolved ``roots``.

    A path that cannot be resolved (a link loop) counts as inside: opening it fails anyway and
    the reader reports the specific reason."""
    if roots is None:
        return False
    try:
        real = Path(path).resolve()
    except (OSError, RuntimeError, ValueError):
        return False
    return not is_inside(real, roots)


def _opened_path(fd: int, path: str) -> Path:
    """The absolute path of the file open on ``fd`` (Linux: the kernel's own answer)."""
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
        if link.startswith("/") and not link.endswith(" (deleted)"):
            return Path(link)
    except OSError:
        pass
    # no /proc: resolve the name again and make sure it still names the file that was opened
    real = Path(path).resolve(strict=True)
    if not os.path.samestat(os.fstat(fd), os.stat(real)):
        raise OutsideRootsError(f"'{path}' changed while it was being opened; it was not read.")
    return real


def _refuse(path: str | os.PathLike, roots: Sequence[Path]) -> OutsideRootsError:
    shown = ", ".join(str(r) for r in roots) or "none configured"
    return OutsideRootsError(f"'{path}' is a {OUTSIDE_REASON} ({shown}); it was not read.")


@contextlib.contextmanager
def open_confined(path: str | os.PathLike, roots: Sequence[Path] | None = None) -> Iterator[BinaryIO]:
    """Open a regular file for binary reading; with ``roots`` (resolved, see
    :func:`resolve_roots`) refuse it unless the file actually opened lies inside them.

    Raises :class:`OutsideRootsError`, :class:`SpecialFileError`, or the ``OSError`` of the
    open itself (``FileNotFoundError``, ``PermissionError``, ``IsADirectoryError``, ``ELOOP``)."""
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags)  # O_NONBLOCK: opening a FIFO must not hang; regular files ignore it
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
        if not stat.S_ISREG(mode):
            raise SpecialFileError(errno.EINVAL, "not a regular file (a device, pipe or socket)", str(path))
        if roots is not None and not is_inside(_opened_path(fd, str(path)), roots):
            raise _refuse(path, roots)
        fh = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with fh:
        yield fh


@contextlib.contextmanager
def confined_path(path: str | os.PathLike, roots: Sequence[Path] | None = None) -> Iterator[str]:
    """A name for path-based readers (safetensors, torch) that refers to the checked file.

    Without ``roots`` this is ``path`` itself. With ``roots`` the file is opened and checked as
    in :func:`open_confined` and, while the block runs, the name is ``/proc/self/fd/<fd>``: the
    very file that was checked, whatever happens to ``path`` meanwhile (elsewhere the resolved path)."""
    if roots is None:
        yield os.fspath(path)
        return
    with open_confined(path, roots) as fh:
        proc = f"/proc/self/fd/{fh.fileno()}"
        yield proc if os.path.exists(proc) else str(Path(path).resolve())


def read_bytes(path: str | os.PathLike, roots: Sequence[Path] | None = None, limit: int | None = None) -> bytes:
    """The bytes of a regular file read through :func:`open_confined` (at most ``limit + 1``
    bytes when ``limit`` is given, so callers can refuse oversized files without reading them)."""
    with open_confined(path, roots) as fh:
        return fh.read() if limit is None else fh.read(limit + 1)


#: Deepest nesting of ``[``/``{`` accepted in a JSON file a user hands the server (model configs,
#: a transformers ``config.json``, shard indexes). Real configs nest 3-4 levels; Python's own
#: parsers (``json``, ``copy.deepcopy``, open_clip's config handling) recurse once per level and
#: fail with ``RecursionError`` somewhere near 1,000, so the limit is far below that.
MAX_JSON_DEPTH = 32
_JSON_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")


def json_depth(text: str) -> int:
    """How deep ``[``/``{`` nest in the JSON ``text`` (brackets inside strings do not count);
    computed without recursion, so any input is measured, however deep."""
    depth = deepest = 0
    for ch in _NOT_BRACKETS.sub("", _JSON_STRINGS.sub("", text)):
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def loads_json(data: bytes | str, what: str, error: type[Exception] = ValueError,
               max_depth: int = MAX_JSON_DEPTH) -> object:
    """Parse JSON handed in by a user: nesting deeper than ``max_depth`` is refused *before* the
    parser runs (``error`` with one sentence naming ``what``), as is text that is not UTF-8 JSON."""
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not UTF-8 text ({exc.reason}).") from exc
    depth = json_depth(text)
    if depth > max_depth:
        raise error(f"{what} nests {depth} levels deep (at most {max_depth} are accepted); it is not a model's "
                    "config and was not read.")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise error(f"{what} is not valid JSON ({str(exc)[:200]}).") from exc


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
    return [home_dir(), ASSETS_DIR, Path.cwd()]


def read_roots(*extra: str | os.PathLike) -> tuple[str, ...]:
    """The folders a dashboard session reads files from: :func:`default_allowed_roots`, the
    home folder (the demo data it generates) and ``extra`` (the session's upload folder)."""
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

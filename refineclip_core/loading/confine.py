"""Reading files only from allowed folders, checked at the moment each file is opened.

The dashboard runs as the server's user, so a symbolic link placed in a folder it may read
(``a/zz_link.jpg -> /elsewhere/secret.jpg``, a class folder ``c -> /elsewhere``) would make
it read, and show, files its users must not see. The folders a reader may read from are one
object, a :class:`Confinement`, established once where a run starts and consulted by every
reader of a user-named file (images, ``metadata.csv``, checkpoints, model configs):

* established with ``with Confinement.of(folders).active():`` (the dashboard, per session and
  script run: :func:`dashboard.state.confinement`; a job or decoding worker started inside the
  block carries it along, :func:`carry`); :func:`current` is the one in force;
* outside any such block, :meth:`Confinement.from_env`: the ``REFINECLIP_ALLOWED_ROOTS`` folders
  when the variable is set (a CLI run by a server or a service), else none (a local user's CLI and
  library: links are followed wherever they point; a shell user can read those files anyway);
* a confined read opens the file first and the path of *the file actually opened*
  (``/proc/self/fd``) must lie at or below one of the folders; otherwise
  :class:`~refineclip_core.errors.OutsideRootsError` is raised and nothing is read. Checking the
  opened file, not a name listed earlier, means a link swapped in after a folder was listed is
  still refused.

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
import contextvars
import errno
import functools
import json
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence, TypeVar

from ..errors import DataError, OutsideRootsError
from ..home import ASSETS_DIR, home_dir

T = TypeVar("T")

#: Why a file or folder reached through a link that leaves the allowed folders is skipped.
OUTSIDE_REASON = "symbolic link outside the allowed folders"
#: Why another session's own folder (uploads, private caches) is not listed.
PRIVATE_REASON = "another session's private folder, not listed"

Roots = Sequence[str | os.PathLike]

#: Environment variable listing the folders a typed server path may lie below (``os.pathsep``-separated).
ALLOWED_ROOTS_ENV = "REFINECLIP_ALLOWED_ROOTS"


class SpecialFileError(OSError):
    """The path is a device, pipe or socket, not a regular file (reading it could block forever)."""


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


@dataclass(frozen=True)
class Confinement:
    """The folders every file read must lie in: ``roots`` (absolute, every link resolved), or
    ``None``: not confined (links are followed wherever they point).

    Made once where a run starts (:meth:`of`, :meth:`from_env`) and put in force with
    :meth:`active`; every reader consults :func:`current`."""

    roots: tuple[Path, ...] | None = None

    @classmethod
    def of(cls, folders: Roots | None) -> "Confinement":
        """The folders as absolute paths with every link resolved (None: not confined)."""
        if folders is None:
            return cls(None)
        return cls(tuple(dict.fromkeys(Path(r).expanduser().resolve() for r in folders)))

    @classmethod
    def from_env(cls) -> "Confinement":
        """What holds where nothing was made active: :func:`read_roots` when ``REFINECLIP_ALLOWED_ROOTS``
        is set (a CLI run by a server or a service), else not confined (a local user's CLI and library)."""
        if not os.environ.get(ALLOWED_ROOTS_ENV, "").strip():
            return cls(None)
        return cls.of(read_roots())

    @property
    def confined(self) -> bool:
        return self.roots is not None

    @property
    def folders(self) -> tuple[str, ...] | None:
        """The folders as text (a record's field, a cache key), or None."""
        return None if self.roots is None else tuple(map(str, self.roots))

    def widened(self, *extra: str | os.PathLike) -> "Confinement":
        """These folders and ``extra`` (not confined stays not confined)."""
        return self if self.roots is None else Confinement.of([*self.roots, *extra])

    def contains(self, path: Path) -> bool:
        """Whether the resolved ``path`` may be read (:func:`is_inside`; always, when not confined)."""
        return self.roots is None or is_inside(path, self.roots)

    def leaves(self, path: str | os.PathLike) -> bool:
        """For listings: True when ``path`` resolves outside the folders.

        A path that cannot be resolved (a link loop) counts as inside: opening it fails anyway and
        the reader reports the specific reason."""
        if self.roots is None:
            return False
        try:
            real = Path(path).resolve()
        except (OSError, RuntimeError, ValueError):
            return False
        return not is_inside(real, self.roots)

    def refusal(self, path: str | os.PathLike) -> OutsideRootsError:
        """The one sentence for a file reached outside the folders."""
        shown = ", ".join(str(r) for r in self.roots or ()) or "none configured"
        return OutsideRootsError(f"'{path}' is a {OUTSIDE_REASON} ({shown}); it was not read.")

    @contextlib.contextmanager
    def open(self, path: str | os.PathLike) -> Iterator[BinaryIO]:
        """Open a regular file for binary reading; refuse it unless the file actually opened lies
        inside the folders.

        Raises :class:`OutsideRootsError`, :class:`SpecialFileError`, or the ``OSError`` of the
        open itself (``FileNotFoundError``, ``PermissionError``, ``IsADirectoryError``, ``ELOOP``)."""
        flags = (os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
                 | getattr(os, "O_NONBLOCK", 0))
        fd = os.open(path, flags)  # O_NONBLOCK: opening a FIFO must not hang; regular files ignore it
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
            if not stat.S_ISREG(mode):
                raise SpecialFileError(errno.EINVAL, "not a regular file (a device, pipe or socket)", str(path))
            if self.roots is not None and not is_inside(_opened_path(fd, str(path)), self.roots):
                raise self.refusal(path)
            fh = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        with fh:
            yield fh

    @contextlib.contextmanager
    def path(self, path: str | os.PathLike) -> Iterator[str]:
        """A name for path-based readers (safetensors, torch) that refers to the checked file.

        Not confined, this is ``path`` itself. Confined, the file is opened and checked as in
        :meth:`open` and, while the block runs, the name is ``/proc/self/fd/<fd>``: the very file
        that was checked, whatever happens to ``path`` meanwhile (elsewhere the resolved path)."""
        if self.roots is None:
            yield os.fspath(path)
            return
        with self.open(path) as fh:
            proc = f"/proc/self/fd/{fh.fileno()}"
            yield proc if os.path.exists(proc) else str(Path(path).resolve())

    def read_bytes(self, path: str | os.PathLike, limit: int | None = None) -> bytes:
        """The bytes of a regular file read through :meth:`open` (at most ``limit + 1`` bytes when
        ``limit`` is given, so callers can refuse oversized files without reading them)."""
        with self.open(path) as fh:
            return fh.read() if limit is None else fh.read(limit + 1)

    @contextlib.contextmanager
    def active(self) -> Iterator["Confinement"]:
        """Put this confinement in force for the block (this thread, and what it starts through :func:`carry`)."""
        token = _CURRENT.set(self)
        try:
            yield self
        finally:
            _CURRENT.reset(token)


_CURRENT: contextvars.ContextVar[Confinement | None] = contextvars.ContextVar("refineclip_confinement", default=None)
_FALLBACKS: dict[str, Callable[[], Confinement | None]] = {}


def set_fallback(name: str, fn: Callable[[], Confinement | None]) -> None:
    """Register ``fn`` (once per ``name``): asked, where nothing was made active, before the environment.
    The dashboard's answers a session's confinement in that session's script thread (a fragment's rerun
    runs outside ``app.py``'s block) and None elsewhere."""
    _FALLBACKS[name] = fn


def current() -> Confinement:
    """The confinement in force: the innermost :meth:`Confinement.active`, else a registered fallback's
    (:func:`set_fallback`), else :meth:`Confinement.from_env` (never "not confined" by accident where the
    operator set the allowed roots)."""
    made = _CURRENT.get()
    if made is not None:
        return made
    for fn in tuple(_FALLBACKS.values()):
        made = fn()
        if made is not None:
            return made
    return Confinement.from_env()


def pinned(folders: Roots | None) -> Confinement:
    """The confinement a record pinned (a model spec's or a dataset's ``roots``), else :func:`current`."""
    return Confinement.of(folders) if folders is not None else current()


def carry(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` to run in another thread under the caller's confinement (a copy of the caller's context,
    taken now; one call at a time): a thread does not inherit the context of the one that starts it."""
    ctx = contextvars.copy_context()
    return functools.wraps(fn)(lambda *args, **kwargs: ctx.run(fn, *args, **kwargs))


def open_confined(path: str | os.PathLike) -> contextlib.AbstractContextManager[BinaryIO]:
    """:meth:`Confinement.open` under :func:`current`."""
    return current().open(path)


def confined_path(path: str | os.PathLike) -> contextlib.AbstractContextManager[str]:
    """:meth:`Confinement.path` under :func:`current`."""
    return current().path(path)


def read_bytes(path: str | os.PathLike, limit: int | None = None) -> bytes:
    """:meth:`Confinement.read_bytes` under :func:`current`."""
    return current().read_bytes(path, limit)


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

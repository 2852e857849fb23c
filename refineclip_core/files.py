"""Writing a file whole or not at all: through a temporary file and an atomic rename, with one sentence
for a failed write (a full disk, a folder where a file was asked for). Every module that writes a
result (feature caches, checkpoints, run records, reports, the ``--json`` output) writes through here.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import RefineClipError


def write_error(exc: OSError, path: str | os.PathLike) -> RefineClipError:
    """One sentence for a failed write of ``path``: a full disk (``ENOSPC``/``EDQUOT``, or numpy's
    "N requested and M written", which carries no errno), a folder where a file was asked for, or
    the system's own reason."""
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT) or re.search(r"\d+ requested and \d+ written", str(exc))
    if full:
        return RefineClipError(f"Cannot write '{path}': the disk is full (no space left on the device); free some "
                               "space or write somewhere else, then run again (finished work is kept).")
    if isinstance(exc, IsADirectoryError) or Path(path).is_dir():
        return RefineClipError(f"Cannot write '{path}': it is a folder; give a file path (e.g. "
                               f"'{Path(path) / 'report.json'}').")
    return RefineClipError(f"Cannot write '{path}' ({exc.strerror or exc}).")


#: Checks run before every write, ``check(path, nbytes)``, each raising one sentence to refuse it. The
#: dashboard's session-folder quotas register here when :mod:`refineclip_core.loading.uploads` is
#: imported (the module that makes session folders: a process without it has none to count).
WRITE_CHECKS: list[Callable[[Path, int], None]] = []


def check_quota(path: str | os.PathLike, nbytes: int) -> None:
    """Before ``nbytes`` are written to ``path``: every :data:`WRITE_CHECKS` (a dashboard session's
    folder has a quota over everything written into it,
    :func:`refineclip_core.loading.uploads.check_session_write`). Every writer calls this first."""
    for check in WRITE_CHECKS:
        check(Path(path), nbytes)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename (a failure is one
    sentence, :func:`write_error`), after :func:`check_quota`."""
    path = Path(path)
    if path.is_dir():
        raise write_error(IsADirectoryError(errno.EISDIR, "Is a directory", str(path)), path)
    check_quota(path, len(data))
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            raise write_error(exc, path) from exc
        raise


def npy_bytes(arr: np.ndarray) -> bytes:
    """``arr`` serialised in ``.npy`` format (for :func:`atomic_write_bytes`)."""
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

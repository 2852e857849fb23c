"""User-facing errors.

Every failure a user can cause (a wrong file, an offline download, an unsupported
architecture, an empty folder) is raised as a :class:`RefineClipError` whose message is one
plain sentence naming what failed and how to fix it. The CLI prints it on one line and the
dashboard shows it in the page; neither shows a traceback unless asked to.
"""

from __future__ import annotations


class RefineClipError(Exception):
    """An error whose message is meant for the user, not for a developer."""


class UnsupportedModelError(RefineClipError):
    """The model's architecture makes the head decomposition (paper Eq. 3-4) false."""


class CheckpointError(RefineClipError):
    """A checkpoint file is unreadable, unsafe or made for another architecture."""


class DataError(RefineClipError):
    """The image folder, CSV or zip cannot be used as a dataset."""


class OutsideRootsError(DataError):
    """A file resolves (through a symbolic link) outside the folders this process may read from."""


class ImageLoadError(RefineClipError):
    """One image cannot be decoded; the dataset skips it and records the reason."""


class CacheError(RefineClipError):
    """A feature cache is missing, incomplete or belongs to another model/data."""


class Cancelled(RefineClipError):
    """The user cancelled a long step (see :mod:`refineclip_core.progress`); finished work is kept."""

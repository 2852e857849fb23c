"""The one progress protocol of every long step: extraction, demo preparation, refinement.

A step takes ``progress`` and ``cancel`` callbacks:

* ``progress(stage, done, total, values=None)``: ``stage`` is a one-line description of what
  runs now, ``done`` of ``total`` units are finished, and ``values`` optionally carries the
  step's latest numbers (refinement: the losses of Eq. 11-13, drawn as live curves);
* ``cancel()`` is polled between units; when it returns True the step raises
  :class:`~refineclip_core.errors.Cancelled` after keeping what is finished.

The CLI draws the calls as tqdm bars, the dashboard's background jobs as a progress bar with an
ETA and live charts; the core never knows which.
"""

from __future__ import annotations

from typing import Callable, Mapping, Protocol


class Progress(Protocol):
    def __call__(self, stage: str, done: int, total: int, values: Mapping[str, float] | None = None) -> None: ...


#: Polled between units of work; True asks the step to stop.
CancelFn = Callable[[], bool]


def silent(stage: str, done: int, total: int, values: Mapping[str, float] | None = None) -> None:
    """A :class:`Progress` that reports nothing (the default of every long step)."""


def never() -> bool:
    """A :data:`CancelFn` that never cancels."""
    return False

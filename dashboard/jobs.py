"""Long steps (extraction, demo preparation, refinement) in a background thread of one browser session.

The page script starts a :class:`Job`, keeps it in ``st.session_state`` and *follows* it:
a loop redraws the progress bar (with ETA, and live curves of any ``values`` the step reports)
a few times a second. A click on "Cancel" interrupts that loop with a rerun; the rerun sets the
job's cancel flag, which the core polls between units of work (``job.progress`` and
``job.cancelled`` are the :mod:`refineclip_core.progress` callbacks), so finished work is kept
(extraction shards stay on disk and the next run resumes). The thread never calls Streamlit.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from refineclip_core.loading.confine import carry
from refineclip_core.progress import CancelFn, Progress

#: ``fn(progress, cancelled)``: the work of a job, given the two callbacks of the progress protocol.
JobFn = Callable[[Progress, CancelFn], Any]


@dataclass
class Job:
    name: str
    started: float = field(default_factory=time.monotonic)
    stage: str = "Starting"
    done: int = 0
    total: int = 0
    stage_started: float = field(default_factory=time.monotonic)
    stage_done0: int = 0
    result: Any = None
    error: BaseException | None = None
    finished: bool = False
    handled: bool = False
    _cancel: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    meta: dict = field(default_factory=dict)
    #: every ``values`` reported, per stage: ``{stage: {"done": [...], name: [...]}}`` (live curves)
    series: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    # -- called from the worker thread ---------------------------------------------------------
    def progress(self, stage: str, done: int, total: int, values: Mapping[str, float] | None = None) -> None:
        if stage != self.stage:
            self.stage, self.stage_started, self.stage_done0 = stage, time.monotonic(), done
        self.done, self.total = int(done), int(total)
        if values:
            curves = self.series.setdefault(stage, {"done": []})
            curves["done"].append(int(done))
            for name, value in values.items():
                curves.setdefault(name, []).append(float(value))

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # -- called from the page ------------------------------------------------------------------
    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0

    def eta_seconds(self) -> float | None:
        """Remaining seconds of the current stage from its rate so far (None until measurable)."""
        elapsed = time.monotonic() - self.stage_started
        progressed = self.done - self.stage_done0
        if progressed <= 0 or elapsed < 0.5 or not self.total:
            return None
        return (self.total - self.done) * elapsed / progressed

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)


def start_job(name: str, fn: JobFn, **meta) -> Job:
    """Run ``fn(progress, cancelled)`` in a daemon thread; its return value becomes ``job.result``. The
    thread reads files under the caller's confinement (the session's: :func:`~refineclip_core.loading.confine.carry`)."""
    job = Job(name=name, meta=meta)

    def runner() -> None:
        try:
            job.result = fn(job.progress, job.cancelled)
        except BaseException as exc:  # reported on the page; never lost silently
            job.error = exc
        finally:
            job.finished = True

    job._thread = threading.Thread(target=carry(runner), name=f"refineclip-job-{name}", daemon=True)
    job._thread.start()
    return job


def format_seconds(s: float | None) -> str:
    if s is None:
        return "estimating…"
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def job_panel(job: Job | None, title: str, *, cancel_key: str, what: str, on_done: Callable[[Job], None],
              cancelled_note: str = "", live: Callable[[Job], Any] | None = None, done: str | None = None) -> None:
    """The one panel of a background job on a page: follow it (progress, ETA, live curves, Cancel:
    :func:`dashboard.widgets.follow_job`) until it ends, then, once, say how it ended — cancelled (its
    message and ``cancelled_note``), failed (one line, :func:`~dashboard.widgets.show_exception`) — or
    call ``on_done(job)`` with its result. A job already handled (or none) draws nothing."""
    import streamlit as st

    from refineclip_core.errors import Cancelled

    from .widgets import follow_job, plain, show_exception

    if job is None or job.handled:
        return
    follow_job(job, title, cancel_key=cancel_key, live=live, done=done)
    job.handled = True
    if isinstance(job.error, Cancelled):
        st.info(f"{plain(job.error)} {cancelled_note}".strip(), icon=":material/pause_circle:")
    elif job.error is not None:
        show_exception(job.error, what)
    else:
        on_done(job)

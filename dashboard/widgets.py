"""Small widgets shared by the pages: readable errors, job progress, the context banner and
image galleries, and :func:`plain` for every user-supplied name shown where Markdown renders."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import pandas as pd
import streamlit as st

from refineclip_core.errors import Cancelled, RefineClipError
from refineclip_core.features.cache import FeatureCache
from refineclip_core.loading.models import LoadedModel
from refineclip_core.method.ablation import AblationEngine
from refineclip_core.method.evaluation import AccuracyReport
from refineclip_core.method.intervals import Estimate
from refineclip_core.method.protocol import Identification
from refineclip_core.names import decodable, visible
from refineclip_core.reporting.findings import accuracy_rows
from refineclip_core.reporting.tables import frame_csv
from refineclip_core.session.source import Source

from . import resources
from .jobs import Job, format_seconds
from .registry import page
from .state import get_source, protocol

log = logging.getLogger("refineclip.dashboard")

_PUNCTUATION = re.compile(r"([!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~])")
_BREAKS = re.compile(r"[\t\n\r]+")
#: Where GitHub-flavoured Markdown would autolink (``www.``, ``http://``, ``a@b.c``) even with the
#: punctuation escaped: a zero-width space goes in between.
_AUTOLINK = re.compile(r"(?i)(www|https?|ftp|mailto|xmpp)(?=\\[.:])|(?=\\@)")


def plain(text: object) -> str:
    """``text`` for a place where Streamlit renders Markdown (markdown, captions, alerts, labels,
    tooltips, image captions) so that it shows exactly as written: every ASCII punctuation mark is
    backslash-escaped (no links, emphasis, HTML, math, ``:material/…:`` icons or ``:red[…]``
    colours), a zero-width space keeps ``www.``/``http://``/``@`` from becoming links, line
    breaks and tabs become spaces, and undecodable bytes, control, bidi-override and zero-width
    characters are shown as marked code points (:func:`refineclip_core.names.visible`). Names from
    users (class folders, CSV labels, groups, file names, templates, paths) always go through it."""
    escaped = _PUNCTUATION.sub(r"\\\1", visible(_BREAKS.sub(" ", str(text))))
    return _AUTOLINK.sub(lambda m: (m.group(1) or "") + "\u200b", escaped)


#: Most rows one table sends to the browser: a table of 10,000 classes (or 100,000 error pairs)
#: shows its first rows and says how many there are; the CSV download holds them all.
MAX_TABLE_ROWS = 1_000


def _map_text(df: pd.DataFrame, fix: Callable[[str], str]) -> pd.DataFrame:
    """``df`` with ``fix`` applied to every text cell, the index and the column names."""
    def one(v: Any) -> Any:
        return fix(v) if isinstance(v, str) else v

    def texty(values: Any) -> bool:
        return pd.api.types.is_object_dtype(values.dtype) or pd.api.types.is_string_dtype(values.dtype)

    out = df.copy()
    for col in out.columns:
        if texty(out[col]):
            out[col] = out[col].map(one)
    if texty(out.index):
        out.index = out.index.map(one)
    out.columns = [one(c) for c in out.columns]
    return out


def shown_frame(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with every text cell, the index and the column names as :func:`refineclip_core.names.visible`
    shows them (undecodable bytes, control, bidi and zero-width characters marked)."""
    return _map_text(df, visible)


def table(key: str, data: pd.DataFrame, max_rows: int = MAX_TABLE_ROWS, **kwargs) -> None:
    """``st.dataframe(data, **kwargs)`` with a "Download as CSV" button below it, written by the one CSV
    writer (:func:`refineclip_core.reporting.tables.frame_csv`: cells a spreadsheet would run as
    formulas are escaped). Streamlit's own table download, which writes names as they are, is
    switched off (``client.disableDataExport``); every table of the dashboard goes through here.

    Names are shown by :func:`shown_frame` (hidden characters marked) and at most ``max_rows``
    rows are sent to the browser (a caption says how many there are; the CSV holds them all, with
    undecodable bytes marked so that it can be written)."""
    data = _map_text(data, decodable)
    if len(data) > max_rows:
        st.caption(f"The first {max_rows:,} of {len(data):,} rows (the CSV holds them all).")
    st.dataframe(shown_frame(data.iloc[:max_rows]), **kwargs)
    st.download_button("Download as CSV", data=lambda: frame_csv(data), file_name=f"{key}.csv", mime="text/csv",
                       key=f"{key}_csv", icon=":material/download:", type="tertiary", on_click="ignore")


def short_error(exc: BaseException) -> str:
    """One readable line for an unexpected exception (the traceback goes to the server log)."""
    text = str(exc).strip().splitlines()
    msg = text[0][:240] if text else ""
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def show_exception(exc: BaseException, what: str = "This step") -> None:
    if isinstance(exc, RefineClipError):  # messages name paths and names the user typed: plain text
        st.error(plain(exc), icon=":material/warning:")
        return
    log.error("%s failed", what, exc_info=exc)
    st.error(f"{what} failed unexpectedly ({plain(short_error(exc))}). The details are in the server log.",
             icon=":material/dangerous:")


@contextlib.contextmanager
def guard(what: str = "This step", stop: bool = False) -> Iterator[None]:
    """Show any error raised inside as an ``st.error`` line (never a traceback); with
    ``stop`` the page ends there."""
    try:
        yield
    except Exception as exc:  # Streamlit's rerun/stop signals are BaseExceptions and pass through
        show_exception(exc, what)
        if stop:
            st.stop()


def call(fn: Callable[..., Any], *args, what: str = "This step", **kwargs) -> Any:
    """``fn(*args, **kwargs)``, or an error message and the end of the page."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        show_exception(exc, what)
        st.stop()


@dataclass
class Ready:
    """What every analysis page needs: the source, its cache and the ablation engine."""

    source: Source
    cache: FeatureCache
    engine: AblationEngine

    def ident(self, cfg=None) -> Identification:
        return call(resources.identification, self.source, self.cache, self.engine, cfg or protocol(),
                    what="Scoring the heads")

    def loaded(self) -> LoadedModel:
        return call(resources.model, self.source.spec_json, what="Loading the model")


def require_ready() -> Ready:
    """The session's loaded data, or a pointer to the Load page and the end of this page."""
    source = get_source()
    if source is None:
        st.info("No model and images are loaded yet. Choose them on the Load page.")
        link("load", "Go to Load")
        st.stop()
    cache = call(resources.feature_cache, source, what="Opening the feature cache")
    eng = call(resources.engine, source, cache, what="Preparing the ablation engine")
    return Ready(source, cache, eng)


def follow_job(job: Job, title: str, cancel_key: str = "job_cancel",
               live: Callable[[Job], Any] | None = None, done: str | None = None) -> None:
    """Draw a running job's progress (stage, bar, counts, ETA) until it finishes.

    The Cancel button is drawn first so it can be clicked while the loop runs: the click
    reruns the page, which calls ``job.cancel()`` here and keeps following until the
    worker has stopped at its next unit of work. ``live(job)`` returns a Plotly figure of the
    job's :attr:`~dashboard.jobs.Job.series` (or None), redrawn whenever new values arrive;
    ``done`` labels the finished job (``{elapsed}`` is filled in).
    """
    slot = st.empty()
    if not job.finished and not job.cancel_requested:
        if slot.button("Cancel", key=cancel_key, icon=":material/close:"):
            job.cancel()
    state_label = "Cancelling…" if job.cancel_requested else title
    with st.status(state_label, expanded=True) as status:
        line = st.empty()
        bar = st.progress(0.0)
        chart, drawn = st.empty(), -1
        while True:
            finished = job.finished
            eta = job.eta_seconds()
            counts = f"{job.done} / {job.total}" if job.total else ""
            extra = "" if finished else f" · about {format_seconds(eta)} left"
            line.markdown(f"**{job.stage}** {counts}{extra} · elapsed {format_seconds(job.elapsed())}")
            bar.progress(job.fraction if not finished or job.error else 1.0)
            n_values = sum(len(s["done"]) for s in job.series.values())
            if live is not None and n_values != drawn:
                fig = live(job)
                if fig is not None:
                    chart.plotly_chart(fig, key=f"{cancel_key}_live_{n_values}")
                drawn = n_values
            if finished:
                break
            time.sleep(0.25)
        slot.empty()
        if isinstance(job.error, Cancelled):
            status.update(label=f"{job.name}: cancelled (finished parts are kept)", state="complete", expanded=True)
        elif job.error is not None:
            status.update(label=f"{job.name}: stopped", state="error", expanded=True)
        else:
            elapsed = format_seconds(job.elapsed())
            status.update(label=done.format(elapsed=elapsed) if done else f"{job.name}: done in {elapsed}",
                          state="complete", expanded=False)


def link(name: str, label: str | None = None, where: Any = st) -> None:
    """A link to page ``name`` of the registry (its title unless ``label`` is given)."""
    p = page(name)
    where.page_link(p.path, label=label or p.title, icon=p.icon)


def image_grid(items: Sequence[tuple[str, str]], columns: int = 6, size: int = 144) -> None:
    """Thumbnails with captions (plain text), ``columns`` per row; unreadable files show a note."""
    if not items:
        return
    for start in range(0, len(items), columns):
        cols = st.columns(columns)
        for col, (path, caption) in zip(cols, items[start:start + columns]):
            data = resources.thumbnail(os.fsencode(path), size)  # bytes: any file name is a cache key
            with col:
                if data is None:
                    st.caption(f"(unreadable) {plain(caption)}")
                else:
                    st.image(data, caption=plain(caption), width=size)


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def ci_text(est: Estimate | None) -> str:
    """``"95% CI 55.1–68.4% · n = 200"`` (how every accuracy's uncertainty is shown)."""
    return "" if est is None else f"95% CI {100 * est.low:.1f}–{100 * est.high:.1f}% · n = {est.n}"


def metric_ci(where: Any, label: str, est: Estimate | None, base: Estimate | None = None,
              help: str | None = None) -> None:
    """An accuracy as a metric (with its change from ``base`` in points) and, underneath, its 95%
    interval and the number of images behind it."""
    value = None if est is None else est.value
    where.metric(label, pct(value), delta_pts(value, None if base is None else base.value), help=help)
    if est is not None:
        where.caption(ci_text(est))


def accuracy_frame(rows: list[dict], first: str) -> pd.DataFrame:
    """A table of :func:`~refineclip_core.reporting.findings.accuracy_rows` (accuracy, 95% CI, images)."""
    return pd.DataFrame({first: [r["name"] for r in rows], "accuracy": [r["value"] for r in rows],
                         "95% CI": [f"{100 * r['low']:.1f}–{100 * r['high']:.1f}%" for r in rows],
                         "images": [r["n"] for r in rows]})


def delta_pts(new: float | None, old: float | None) -> str | None:
    if new is None or old is None:
        return None
    return f"{100 * (new - old):+.1f} pts"


def comparison_table(where, by: str, before: AccuracyReport, after: AccuracyReport) -> None:
    """Zero-shot vs ablated accuracy per group or class (each with its 95% interval), and the change."""
    acc = st.column_config.NumberColumn(format="percent")
    b, a = accuracy_rows(before, by), {r["name"]: r for r in accuracy_rows(after, by)}
    with where:
        table(f"ablated-per-{by}", pd.DataFrame({
            by: [r["name"] for r in b], "zero-shot": [r["value"] for r in b],
            "ablated": [a[r["name"]]["value"] for r in b],
            "ablated 95% CI": [f"{100 * a[r['name']]['low']:.1f}–{100 * a[r['name']]['high']:.1f}%" for r in b],
            "change (pts)": [100 * (a[r["name"]]["value"] - r["value"]) for r in b], "images": [r["n"] for r in b]}),
            hide_index=True, column_config={"zero-shot": acc, "ablated": acc,
                                            "change (pts)": st.column_config.NumberColumn(format="%+.1f")})

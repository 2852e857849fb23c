"""The Load page's Recent list: the home folder's image folders, feature caches and runs, and this
browser's own uploads' caches (kept across reloads, :func:`dashboard.state.session_dir`), newest first:
open a cache, reopen a run (its verdict and its report's downloads), remove what this browser made."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from refineclip_core.reporting.report_schema import RunReport
from refineclip_core.reporting.run_report import per_image_csv, render_html, report_json
from refineclip_core.session.caches import cache_source
from refineclip_core.session.recent import RecentItem, recent_items, remove_item, saved_run

from .state import Key, drop, get, put, session_dir, set_source, was_made_here
from .widgets import guard, plain

#: Most items listed (newest first).
MAX_ITEMS = 30
#: Largest run record reopened (a report with per-image rows of 100,000 images is about 20 MB).
MAX_RUN_BYTES = 256 * 2**20


def listed() -> list[tuple[RecentItem, str | None]]:
    """Every item this session may see, with the folder it lives under when it is the session's own
    (its upload folder: removed there), else None (the home folder)."""
    own = session_dir()
    items = [(i, None) for i in recent_items()]
    items += [(i, str(own)) for i in recent_items(own) if i.kind == "cache"]
    return sorted(items, key=lambda pair: -pair[0].modified)


def recent_panel() -> None:
    """The list, each item with Open (a cache or a run) and Remove (only for what this browser made)."""
    items = listed()
    with st.expander(f"Recent folders, caches and runs ({len(items)})", expanded=get(Key.OPENED_RUN) is not None):
        if not items:
            st.caption("Nothing yet: extracted caches, demo images and refinement runs appear here.")
        for i, (item, home) in enumerate(items[:MAX_ITEMS]):
            c = st.columns([1, 6, 1.2, 1.2, 1])
            c[0].markdown(f"**{item.kind}**" + (" (your upload)" if home else ""))
            c[1].caption(plain(f"{item.label} · {item.path}"))
            c[2].caption(f"{item.bytes / 1e6:,.1f} MB · {item.age()}")
            if item.kind in ("cache", "run") and c[3].button("Open", key=f"load_recent_open_{i}"):
                with guard("Opening it"):
                    if item.kind == "cache":
                        set_source(cache_source(item.path))
                    else:
                        put(Key.OPENED_RUN, item.path)
                    st.rerun()
            if home is None and not was_made_here(item.path):
                c[4].caption("shared", help="Made by another session (or before this one): open it, but only the "
                                            "session that made it can remove it.")
            elif c[4].button("Remove", key=f"load_recent_rm_{i}", help="Delete it"):
                with guard("Removing it"):
                    remove_item(item.path, home)
                    if get(Key.OPENED_RUN) == item.path:
                        drop(Key.OPENED_RUN)
                    st.rerun()
        opened_run()


def _read_run(path: str) -> RunReport:
    listed_paths = {i.path for i, _ in listed() if i.kind == "run"}
    if path not in listed_paths:
        raise FileNotFoundError("That run is no longer listed (removed, or not one this session may read).")
    p = Path(path)
    if p.stat().st_size > MAX_RUN_BYTES:
        raise ValueError(f"The run record is larger than {MAX_RUN_BYTES // 2**20} MB; open it from the command line.")
    return saved_run(p)             # the one schema (any version so far), parsed once per version of the file


def opened_run() -> None:
    """A run reopened from the list: its verdict, what it was run on, its report's downloads and its data."""
    path = get(Key.OPENED_RUN)
    if path is None:
        return
    with guard("Reopening the run"), st.container(border=True):
        report = _read_run(path)
        verdict = report.verdict
        pairs = ", ".join(f"{a} → {b}" for a, b in report.pairs)
        st.markdown(f"**Run of {plain(report.created or '?')}**: {plain(report.exported or '?')} on "
                    f"{plain(pairs or '?')}, model {plain(report.model_name or '?')}")
        status = "no verdict" if verdict is None else verdict.status
        show = {"verified": st.success, "harmful": st.error}.get(status, st.warning)
        show(f"**{plain(status)}** · {plain('' if verdict is None else verdict.lead)}")
        d = st.columns(4)
        d[0].download_button("Run report (JSON)", data=report_json(report), file_name="refineclip-report.json",
                             mime="application/json", key="load_run_json", on_click="ignore")
        d[1].download_button("Run report (HTML)", data=lambda rep=report: render_html(rep),
                             file_name="refineclip-report.html", mime="text/html", key="load_run_html",
                             on_click="ignore")
        d[2].download_button("Per-image predictions (CSV)", data=lambda rep=report: per_image_csv(rep),
                             file_name="refineclip-per-image.csv", mime="text/csv", key="load_run_csv",
                             on_click="ignore")
        cache = report.data.cache
        if cache and d[3].button("Open its data", key="load_run_data",
                                 help="Open the feature cache this run was made on, then run the edit again on the "
                                      "Refine page for its merged checkpoint."):
            with guard("Opening the run's feature cache"):
                set_source(cache_source(str(cache)))
                drop(Key.OPENED_RUN)
                st.rerun()
        if st.button("Close", key="load_run_close", type="tertiary"):
            drop(Key.OPENED_RUN)
            st.rerun()

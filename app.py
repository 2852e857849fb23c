"""RefineCLIP Studio: find the attention heads behind CLIP's errors and edit them away.

Run with ``bash scripts/dashboard.sh`` (= ``streamlit run app.py``). With no configuration
the first screen prepares the embedded demo model on a held-out sample of its images and
shows the findings; the Load page switches to any open_clip model and image folder.
"""

from __future__ import annotations

import streamlit as st

from dashboard.registry import DEFAULT_PAGE, PAGES
from dashboard.shell import app_icon, ensure_source, sidebar
from dashboard.state import confinement, keep_session_alive
from dashboard.urlstate import apply_link, read_link, write_link
from dashboard.widgets import show_exception

st.set_page_config(page_title="RefineCLIP Studio", page_icon=app_icon(), layout="wide")
st.set_option("client.disableDataExport", True)   # the tables' own CSV buttons escape formulas (widgets.table)
# Streamlit's uploader line shows 512 MB as "1GB per file"; the labels say the real limit (forms.uploader)
st.html("<style>[data-testid='stFileUploaderDropzoneInstructions'] {display: none}</style>")

page = st.navigation([st.Page(p.path, title=p.title, icon=p.icon, default=p.name == DEFAULT_PAGE) for p in PAGES])
keep_session_alive()  # this session's upload folder is in use; abandoned ones are swept
with confinement().active():  # every file this run reads is checked against this session's folders (loading/confine.py)
    read_link()        # a reload or a shared link: the URL's data, settings and heads (dashboard.urlstate)
    ensure_source()
    apply_link()
    sidebar()
    write_link()       # the view so far goes into the URL before the page runs (a page that ends early with st.stop,
                       # e.g. Refine before its first run, keeps its pair, samples, heads and method in the URL)
    try:
        page.run()
    except Exception as exc:  # last resort: a short message, never a traceback
        show_exception(exc, f"The {page.title} page")
    # the view stays in the URL (a reload, or the link shared, shows the same view); written only by a run
    # that completes: a page's st.rerun() skips it (a query change while a rerun is pending lost the
    # Refine page's results in Chromium), and the next run writes it
    write_link()

"""Serve the dashboard: ``streamlit run app.py`` with Streamlit's pages-folder mode off from the start.

``app.py`` lists the pages with ``st.navigation``. Until some script has called it, Streamlit serves the
``pages/`` folder by itself, so on a freshly started server the first visit to a page's address (a
bookmark, or F5 after a restart) ran that page without ``app.py``: Streamlit's plain page list, no
demo, no sidebar, no confinement of its own. This launcher tells Streamlit before the first session that
the app navigates itself. ``bash scripts/dashboard.sh`` and ``refineclip app`` start the dashboard
through it; arguments go to ``streamlit run``::

    python dashboard/serve.py --server.port 8600
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from streamlit.runtime.pages_manager import PagesManager
    from streamlit.web import cli

    PagesManager.uses_pages_directory = False   # what st.navigation sets on its first call
    sys.argv = ["streamlit", "run", str(Path(__file__).resolve().parents[1] / "app.py"), *argv]
    return cli.main()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

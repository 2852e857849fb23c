"""The dashboard's pages, listed once: ``app.py`` builds the navigation from it, the pages link
through it and ``scripts/screenshots.py`` visits it. Plain data (no Streamlit import)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PageInfo:
    name: str       # short name: links, screenshots, tests
    path: str       # the script, relative to the repository root
    title: str      # in the navigation
    icon: str       # a Material symbol
    heading: str    # the page's st.title


PAGES: tuple[PageInfo, ...] = (
    PageInfo("load", "pages/load.py", "Load", ":material/upload_file:", "RefineCLIP Studio"),
    PageInfo("errors", "pages/errors.py", "Errors", ":material/error:", "Where does the model go wrong?"),
    PageInfo("heads", "pages/heads.py", "Heads", ":material/psychology:",
             "Which heads push the model toward the wrong class?"),
    PageInfo("inspector", "pages/inspector.py", "Head inspector", ":material/search:", "Head inspector"),
    PageInfo("ablate", "pages/ablate.py", "Ablate", ":material/content_cut:", "Switch heads off"),
    PageInfo("refine", "pages/refine.py", "Refine", ":material/build:", "Refine the model"),
)
#: The page the app opens on.
DEFAULT_PAGE = "load"


def page(name: str) -> PageInfo:
    """The registry entry of page ``name``."""
    return next(p for p in PAGES if p.name == name)

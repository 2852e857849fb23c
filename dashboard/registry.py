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
    #: the prefixes of the page's widget keys (``key="abl_mode"``): each is a family of session keys
    #: (:class:`dashboard.state.Namespace`) forgotten on the events in ``resets``
    widgets: tuple[str, ...] = ()
    #: what makes the page's widgets stale: ``"source"`` (another model, images or cache), ``"head set"``
    resets: tuple[str, ...] = ()


PAGES: tuple[PageInfo, ...] = (
    PageInfo("load", "pages/load.py", "Load", ":material/upload_file:", "RefineCLIP Studio", ("load_",)),
    PageInfo("errors", "pages/errors.py", "Errors", ":material/error:", "Where does the model go wrong?", ("err_",),
             ("source",)),
    PageInfo("heads", "pages/heads.py", "Heads", ":material/psychology:",
             "Which heads push the model toward the wrong class?", ("heads_", "grid_"), ("source",)),
    PageInfo("inspector", "pages/inspector.py", "Head inspector", ":material/search:", "Head inspector", ("insp_",),
             ("source",)),
    PageInfo("ablate", "pages/ablate.py", "Ablate", ":material/content_cut:", "Switch heads off", ("abl_",),
             ("source", "head set")),
    PageInfo("refine", "pages/refine.py", "Refine", ":material/build:", "Refine the model", ("ref_",), ("source",)),
)
#: The page the app opens on.
DEFAULT_PAGE = "load"


def page(name: str) -> PageInfo:
    """The registry entry of page ``name``."""
    return next(p for p in PAGES if p.name == name)

"""Per-browser-session state, kept only in ``st.session_state`` (never in module globals).

Every key that code reads or writes is a :class:`Key` constant defined here, next to what it
holds; pages go through the accessors below and never spell a key. A widget's own ``key=``
stays with the widget unless other code reads it, in which case it is a :class:`Key` too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import streamlit as st

from refineclip_core.features.decomposition import HeadId, HeadLike, parse_heads
from refineclip_core.loading.confine import Confinement, read_roots, set_fallback
from refineclip_core.method.protocol import DEFAULT_PROTOCOL, ProtocolConfig
from refineclip_core.session.source import Source

from .registry import PAGES, page


#: What makes a session key stale (it is dropped then): another source (model + images + cache) …
SOURCE = "source"
#: … or another head set handed to Ablate and Refine.
HEAD_SET = "head set"


class SessionKey(str):
    """A session-state key and the events that make its value stale (:data:`SOURCE`,
    :data:`HEAD_SET`): when a key is forgotten is data on the key, not part of its name."""

    resets: frozenset[str]

    def __new__(cls, name: str, *resets: str) -> "SessionKey":
        key = super().__new__(cls, name)
        key.resets = frozenset(resets)
        return key


class Namespace(SessionKey):
    """A family of keys sharing a prefix (a page's widgets, the Ablate toggles), forgotten together."""

    def key(self, *parts: object) -> str:
        return "_".join([self.rstrip("_"), *map(str, parts)])

    def owns(self, key: object) -> bool:
        return str(key).startswith(self)


#: The pages' widget keys, derived from the page registry (:attr:`PageInfo.widgets`, :attr:`PageInfo.resets`):
#: each page's widgets take its prefix (``key="abl_mode"``) and are forgotten on its events (the Load
#: page's with none: its form stays as the user left it).
WIDGETS = tuple(Namespace(prefix, *p.resets) for p in PAGES for prefix in p.widgets)
_ABLATE = next(n for n in WIDGETS if n == page("ablate").widgets[0])
_GRID = next(n for n in WIDGETS if n == "grid_")


class Key:
    """Session-state keys, each defined once with what makes it stale."""

    SOURCE = SessionKey("source")                  # the Source every page works on (model + images + cache)
    PROTOCOL = SessionKey("protocol", SOURCE)      # the identification settings (a ProtocolConfig as a dict)
    INSPECT_HEAD = SessionKey("inspect_head", SOURCE)  # (layer, head) chosen on the Heads page for the inspector
    ABLATE_HEADS = SessionKey("ablate_heads", SOURCE)  # the head set handed from the Heads page to Ablate and Refine
    TICKED = SessionKey("abl_current", SOURCE, HEAD_SET)    # the heads ticked on the Ablate page ([layer, head] lists)
    VERIFIED = SessionKey("abl_verified", SOURCE, HEAD_SET)  # the last real-forward-pass check on the Ablate page
    ERROR_PAIR = SessionKey("err_pair", SOURCE)    # widget: the Errors page's pair choice
    INSPECT_LAYER = SessionKey("insp_layer", SOURCE)   # widget: the Head inspector's layer picker
    INSPECT_PICK = SessionKey("insp_head", SOURCE)     # widget: the Head inspector's head picker
    INSPECT_SYNCED = SessionKey("insp_synced", SOURCE)  # the head the inspector's pickers were last set to
    GRADCAM = SessionKey("insp_gradcam", SOURCE)   # the last Grad-CAM panels of the Head inspector
    ATTRIBUTE = SessionKey("heads_attribute", SOURCE)  # the last known-attribute head ranking (an AttributeHeads)
    REFINE = SessionKey("refine", SOURCE, HEAD_SET)    # the last refinement run of this session (an EditRun)
    REFINE_JOB = SessionKey("ref_job", SOURCE)     # a running refinement: the exported edit (a Job)
    COMPARE_JOB = SessionKey("ref_compare_job", SOURCE)  # the compared methods, fitted after it (a Job)
    COMPARE_ERROR = SessionKey("ref_compare_error", SOURCE)  # why the comparison stopped (cancelled, failed)
    REFINE_SAVED = SessionKey("ref_saved", SOURCE)  # the home-folder record of the last run (updated in place)
    REFINE_CONFIRM = SessionKey("ref_confirm", SOURCE)  # widget: "download anyway" for an edit the guard did not verify
    REFINE_METHOD = SessionKey("ref_method", SOURCE)   # widget: the Refine page's exported edit ("fit" or "paper")
    REFINE_FROM = SessionKey("ref_from", SOURCE)   # where the Refine page's heads come from, when not the default
    DEMO_JOB = SessionKey("demo_job")              # the demo being prepared on the first visit (a Job)
    LOAD_JOB = SessionKey("load_job")              # an extraction started on the Load page (a Job)
    LOAD_SCAN = SessionKey("load_scan")            # the images listed on the Load page (a ScannedImages)
    LOAD_FRESH = SessionKey("load_just_extracted")  # the Load page opens its data summary once after an extraction
    SESSION_FOLDER = SessionKey("_session_folder")  # owner of this session's private temporary folder
    URL_READ = SessionKey("url_read")              # the URL's view was read on this session's first run
    URL_PENDING = SessionKey("url_pending")        # the URL's query parameters, until a source is there to apply them to
    URL_REFUSED = SessionKey("url_refused")        # why the URL's feature cache could not be opened by this session
    OPENED_RUN = SessionKey("load_opened_run")      # a run reopened from the Load page's Recent list (its path)
    MADE_HERE = SessionKey("made_here")            # home-folder caches and runs this session wrote (it may remove them)

    @staticmethod
    def toggle(head: HeadId) -> str:
        """The Ablate page's checkbox of ``head`` (forgotten with the Ablate page's widgets)."""
        return _ABLATE.key(head.layer, head.head)

    @staticmethod
    def score_map(index: int) -> str:
        """The Heads page's score map number ``index`` (its click selection)."""
        return _GRID.key(index)


def _every_key() -> list[SessionKey]:
    return [v for v in vars(Key).values() if isinstance(v, SessionKey)] + list(WIDGETS)


def forget(event: str) -> None:
    """Drop every key and key family that ``event`` (:data:`SOURCE`, :data:`HEAD_SET`) makes stale."""
    stale = [k for k in _every_key() if event in k.resets]
    families = [k for k in stale if isinstance(k, Namespace)]
    drop(*[k for k in stale if not isinstance(k, Namespace)])
    drop(*[k for k in list(st.session_state.keys()) if any(f.owns(k) for f in families)])


def get(key: str, default: Any = None) -> Any:
    return st.session_state.get(key, default)


def put(key: str, value: Any) -> None:
    st.session_state[key] = value


def drop(*keys: str) -> None:
    for key in keys:
        st.session_state.pop(key, None)


def set_refine(run: Any, keep_confirm: bool = False) -> None:
    """Keep a new refinement run (an EditRun); a confirmation given for the previous one is dropped
    (``keep_confirm``: the same edit with its compared rows added keeps it)."""
    put(Key.REFINE, run)
    if not keep_confirm:
        drop(Key.REFINE_CONFIRM)


def made_here(path: str | Path) -> None:
    """Remember that this session (and its browser, across reloads) wrote ``path`` (a cache or a saved run)."""
    resolved = str(Path(path).resolve())
    put(Key.MADE_HERE, sorted({*get(Key.MADE_HERE, []), resolved}))
    owner = owner_id()
    if owner is not None:
        _OWNER_MADE.setdefault(owner, set()).add(resolved)


def was_made_here(path: str | Path) -> bool:
    """Whether this session, or an earlier session of the same browser (a reload), wrote ``path``: only
    then does the Load page offer to remove it (a shared cache or run of another session stays; removing
    it would take it from them)."""
    resolved = str(Path(path).resolve())
    owner = owner_id()
    return resolved in get(Key.MADE_HERE, []) or (owner is not None and resolved in _OWNER_MADE.get(owner, ()))


#: The browser cookie whose secret keys a browser's own files across reloads (Streamlit's XSRF token:
#: per browser, sent with every request, never in the URL; absent when XSRF protection is off).
OWNER_COOKIE = "_streamlit_xsrf"
#: This server's memory of each browser's upload folder and of what it wrote (owner id → …): a reload
#: opens a new session, which finds them here (``owner_id``); nothing of it is written to disk.
_OWNER_FOLDERS: dict[str, str] = {}
_OWNER_MADE: dict[str, set[str]] = {}


def owner_from_cookie(cookie: str | None) -> str | None:
    """The owner id (a hash) of a browser from its XSRF cookie: ``2|mask|masked token|time``,
    the token unmasked (the mask changes on every page load, the token does not); None when absent or
    malformed."""
    import binascii
    import hashlib

    parts = (cookie or "").strip("\"'").split("|")
    if len(parts) < 3 or parts[0] != "2":
        return None
    try:
        mask, masked = binascii.a2b_hex(parts[1]), binascii.a2b_hex(parts[2])
    except (binascii.Error, ValueError):
        return None
    if not mask or len(masked) < 16:
        return None
    token = bytes(b ^ mask[i % len(mask)] for i, b in enumerate(masked))
    return hashlib.sha256(b"refineclip-owner\0" + token).hexdigest()[:32]


def owner_id() -> str | None:
    """This browser's owner id (:func:`owner_from_cookie`), or None (no cookie: a test, XSRF off)."""
    try:
        return owner_from_cookie(st.context.cookies.get(OWNER_COOKIE))
    except Exception:   # no browser behind this session
        return None


def get_source() -> Source | None:
    return get(Key.SOURCE)


def set_source(source: Source) -> None:
    """Make ``source`` current and forget everything computed for the previous one."""
    old = get_source()
    put(Key.SOURCE, source)
    if old is None or old.key != source.key:
        forget(SOURCE)


def protocol() -> ProtocolConfig:
    """The identification settings of this session (:data:`DEFAULT_PROTOCOL` until changed)."""
    d = get(Key.PROTOCOL)
    return ProtocolConfig(**d) if d else DEFAULT_PROTOCOL


def set_protocol(**changes) -> None:
    """Change the identification settings; a head set handed on for the old ones, and the Ablate page's
    ticks made from it, are dropped (the Ablate page starts again from the new choice)."""
    put(Key.PROTOCOL, {**protocol().to_dict(), **changes})
    drop(Key.ABLATE_HEADS, Key.ATTRIBUTE, Key.TICKED)


def inspect_head() -> HeadId | None:
    h = get(Key.INSPECT_HEAD)
    return HeadId.of(h) if h else None


def set_inspect_head(head: HeadId) -> None:
    put(Key.INSPECT_HEAD, (head.layer, head.head))


def ablate_heads() -> list[HeadId] | None:
    heads = get(Key.ABLATE_HEADS)
    return None if heads is None else parse_heads(heads)


def set_ablate_heads(heads: Iterable[HeadLike]) -> None:
    """Hand ``heads`` to Ablate and Refine: the Ablate page's ticks and the last refinement are reset."""
    put(Key.ABLATE_HEADS, [(h.layer, h.head) for h in parse_heads(heads)])
    forget(HEAD_SET)


def ticked_heads() -> list[HeadId] | None:
    """The heads last ticked on the Ablate page (None before its first visit)."""
    heads = get(Key.TICKED)
    return None if heads is None else parse_heads(heads)


def set_ticked_heads(heads: Iterable[HeadId]) -> None:
    put(Key.TICKED, [h.as_list() for h in heads])


class _SessionFolder:
    """Owns one session's private temporary folder. A browser with an owner id (:func:`owner_id`) keeps
    one folder across reloads (each reload is a new session: it finds the folder again, so its uploads,
    their caches and its runs stay its own); it is removed by the sweep once no session of that browser
    has used it for ``REFINECLIP_UPLOAD_TTL`` seconds. Without an owner id the folder is removed when the
    session's state is garbage-collected (the browser session ended)."""

    def __init__(self, owner: str | None = None) -> None:
        import weakref

        from refineclip_core.loading.uploads import cleanup_upload_dir, session_upload_dir, touch_upload_dir

        known = _OWNER_FOLDERS.get(owner) if owner is not None else None
        if known is not None and Path(known).is_dir():
            self.path = Path(known)
            touch_upload_dir(self.path)
        else:
            self.path = session_upload_dir()
            if owner is not None:
                _OWNER_FOLDERS[owner] = str(self.path)
        if owner is None:
            weakref.finalize(self, cleanup_upload_dir, str(self.path))


_last_sweep = [0.0]
#: Seconds between two sweeps of abandoned upload folders (any session's page run may do one).
SWEEP_EVERY = 300.0


def keep_session_alive() -> None:
    """Each page run: mark this session's folder as in use, and now and then remove the folders
    of sessions that have not run a page for ``REFINECLIP_UPLOAD_TTL`` seconds
    (:func:`refineclip_core.loading.uploads.sweep_upload_dirs`)."""
    import time

    from refineclip_core.loading.uploads import sweep_upload_dirs, touch_upload_dir

    owner = get(Key.SESSION_FOLDER)
    if owner is not None:
        touch_upload_dir(owner.path)
    now = time.monotonic()
    if now - _last_sweep[0] > SWEEP_EVERY:
        _last_sweep[0] = now
        sweep_upload_dirs()


def session_dir() -> Path:
    """This browser session's private temporary folder (uploads, exported checkpoints)."""
    folder = get(Key.SESSION_FOLDER)
    if folder is None or not Path(folder.path).is_dir():
        folder = _SessionFolder(owner_id())
        put(Key.SESSION_FOLDER, folder)
    return Path(folder.path)


def confinement() -> Confinement:
    """What this session reads under (every file checked when it is opened): the allowed roots, the
    home folder and the session's own upload folder. ``app.py`` puts it in force for each script run;
    jobs carry it into their threads (:func:`~refineclip_core.loading.confine.carry`)."""
    return Confinement.of(read_roots(session_dir()))


def _session_confinement() -> Confinement | None:
    """:func:`confinement` in a session's script thread (None elsewhere): what is read there outside
    ``app.py``'s block (a fragment's rerun) is still confined to the session's folders."""
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    return confinement() if get_script_run_ctx(suppress_warning=True) is not None else None


set_fallback("dashboard-session", _session_confinement)


def model_confinement(uploaded: bool) -> Confinement:
    """What a model's files are read under (its spec's pinned ``roots``): this session's confinement for
    a model with an uploaded file, else the server's (without the session's folder: one loaded model
    is then shared by every session on the same files)."""
    return confinement() if uploaded else Confinement.of(read_roots())

"""Per-browser-session state, kept only in ``st.session_state`` (never in module globals).

Keys used across pages:

* ``source``        the :class:`Source` every page works on (model + images + cache);
* ``protocol``      the identification settings (pair, samples per class, seed, top-T);
* ``inspect_head``  ``(layer, head)`` chosen on the Heads page for the Head inspector;
* ``ablate_heads``  the head set handed from the Heads page to Ablate and Refine;
* ``refine``        the last refinement outcome of this session;
* ``job``           a running background job (extraction) of this session.
"""

from __future__ import annotations

import streamlit as st

from refineclip_core.features.decomposition import HeadId, parse_heads
from refineclip_core.method.protocol import ProtocolConfig
from refineclip_core.studio.source import Source

#: Session keys that depend on the source; dropped when the source changes.
DERIVED_KEYS = ("protocol", "inspect_head", "ablate_heads", "refine", "verify", "scan", "gradcam")
DERIVED_PREFIXES = ("abl_", "grid_", "insp_", "err_", "heads_", "ref_")


def get_source() -> Source | None:
    return st.session_state.get("source")


def set_source(source: Source) -> None:
    """Make ``source`` current and forget everything computed for the previous one."""
    old = st.session_state.get("source")
    st.session_state["source"] = source
    if old is None or old.key != source.key:
        for k in list(st.session_state.keys()):
            if k in DERIVED_KEYS or any(str(k).startswith(p) for p in DERIVED_PREFIXES):
                del st.session_state[k]


def protocol() -> ProtocolConfig:
    """The identification settings of this session (paper defaults until changed)."""
    d = st.session_state.get("protocol")
    return ProtocolConfig(**d) if d else ProtocolConfig()


def set_protocol(**changes) -> None:
    current = protocol().to_dict()
    current.update(changes)
    st.session_state["protocol"] = current


def pair_spec(true: int, pred: int, classes: list[str]) -> str:
    """A ``TRUE:PRED`` string that :func:`refineclip_core.method.protocol.resolve_pairs` reads back
    unambiguously (indices when a name contains ':' or looks like an index)."""
    a, b = classes[true], classes[pred]
    if any(":" in n or n.isdigit() for n in (a, b)):
        return f"{true}:{pred}"
    return f"{a}:{b}"


def inspect_head() -> HeadId | None:
    h = st.session_state.get("inspect_head")
    return HeadId.of(h) if h else None


def set_inspect_head(head: HeadId) -> None:
    st.session_state["inspect_head"] = (head.layer, head.head)


def ablate_heads() -> list[HeadId] | None:
    heads = st.session_state.get("ablate_heads")
    return None if heads is None else parse_heads(heads)


def set_ablate_heads(heads) -> None:
    st.session_state["ablate_heads"] = [(h.layer, h.head) for h in heads]


class _SessionFolder:
    """Owns one session's private temporary folder; removing it when the session's state is
    garbage-collected (the browser session ended)."""

    def __init__(self) -> None:
        import weakref

        from refineclip_core.loading.uploads import cleanup_upload_dir, session_upload_dir

        self.path = session_upload_dir()
        weakref.finalize(self, cleanup_upload_dir, str(self.path))


def session_dir():
    """This browser session's private temporary folder (uploads, exported checkpoints)."""
    from pathlib import Path

    owner = st.session_state.get("_session_folder")
    if owner is None or not Path(owner.path).is_dir():
        owner = _SessionFolder()
        st.session_state["_session_folder"] = owner
    return Path(owner.path)

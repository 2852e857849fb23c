"""The view in the URL: a reload, or the same link opened by another session, shows the same view.

The page is the URL's path (Streamlit's navigation); the rest is in ``st.query_params``:

``cache``   the feature cache folder of the data and model (absent: the embedded demo);
``pair``, ``sel``, ``n``, ``seed``, ``top_t``, ``sim``, ``abl``   the identification settings that
            differ from the defaults (error pair, selection rule, samples per class, ...);
``heads``   the head set handed to Ablate and Refine (``11.3,10.7``); ``head``   the inspected head;
``ticks``   the heads ticked on the Ablate page; ``method``, ``from``   the Refine page's exported
            edit and where its heads come from (``protocol``, ``heads`` or ``ticked``).

Everything read from the URL is untrusted text: :func:`parse_link` (pure, no Streamlit) checks each
value's form and range before anything reaches a widget, and a value that is repeated, oversized,
malformed or out of range is dropped with one line saying so (the defaults are used for it).

A link is only as strong as the session that opens it: the cache folder is opened with *that*
session's allowed folders (:func:`~refineclip_core.session.caches.cache_source`), so a session that
may not read it gets a one-sentence refusal and the demo, never the files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from refineclip_core.features.decomposition import HeadId
from refineclip_core.loading.models import DEMO_MODEL
from refineclip_core.method.ablation import MODES
from refineclip_core.method.protocol import DEFAULT_PROTOCOL, SELECTION_RULES, PairSpec
from refineclip_core.method.scores import SIMILARITIES

#: Query-parameter name of each identification setting kept in the URL.
PROTOCOL_PARAMS = {"pair": "pair", "sel": "selection", "n": "samples_per_class", "seed": "seed", "top_t": "top_t",
                   "sim": "similarity", "abl": "ablation"}
#: The range of each integer setting (what the Heads page's inputs accept).
INT_RANGES = {"samples_per_class": (1, 10_000), "seed": (0, 1_000_000), "top_t": (1, 1_024)}
#: The allowed words of each choice setting.
CHOICES = {"selection": SELECTION_RULES, "similarity": SIMILARITIES, "ablation": MODES}
#: The Refine page's choices kept in the URL: the exported edit and where its heads come from.
REFINE_METHODS = ("fit", "paper")
HEAD_SOURCES = ("protocol", "heads", "ticked")
#: Every parameter the app reads (others, e.g. Streamlit's own ``embed``, are left alone).
KNOWN = (*PROTOCOL_PARAMS, "cache", "heads", "head", "ticks", "method", "from")
#: Longest value read (a folder path); longer ones are dropped before they are looked at.
MAX_VALUE = 4_096
#: Most heads one head-set parameter may name (a ViT-H with every layer scored has 1,280).
MAX_HEADS = 2_048
_INT = re.compile(r"\d{1,7}")
_HEAD = re.compile(r"\s*[Ll]?(\d{1,4})\s*[.:]\s*[Hh]?(\d{1,4})\s*")


@dataclass(frozen=True)
class LinkView:
    """What a URL asks for, every value checked (:func:`parse_link`); ``problems`` says, one short
    phrase each, what was dropped."""

    cache: str | None = None
    protocol: dict[str, Any] = field(default_factory=dict)
    heads: tuple[HeadId, ...] | None = None
    head: HeadId | None = None
    ticks: tuple[HeadId, ...] | None = None
    method: str | None = None
    head_source: str | None = None
    problems: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return (self.cache is None and not self.protocol and self.heads is None and self.head is None
                and self.ticks is None and self.method is None and self.head_source is None)


def _head_list(text: str) -> tuple[HeadId, ...]:
    items = [t for t in text.split(",") if t.strip()]
    if len(items) > MAX_HEADS:
        raise ValueError(f"more than {MAX_HEADS:,} heads")
    out = []
    for item in items:
        m = _HEAD.fullmatch(item)
        if m is None:
            raise ValueError("not a list of LAYER.HEAD")
        out.append(HeadId(int(m.group(1)), int(m.group(2))))
    return tuple(dict.fromkeys(out))


def _protocol_value(name: str, field_name: str, text: str) -> Any:
    if field_name in INT_RANGES:
        lo, hi = INT_RANGES[field_name]
        if not _INT.fullmatch(text) or not lo <= int(text) <= hi:
            raise ValueError(f"not a whole number from {lo:,} to {hi:,}")
        return int(text)
    if field_name in CHOICES:
        if text not in CHOICES[field_name]:
            raise ValueError(f"not one of {', '.join(CHOICES[field_name])}")
        return text
    PairSpec.parse(text)             # pair: 'auto', 'both' or TRUE:PRED[,TRUE:PRED] (RefineClipError otherwise)
    if len(text) > 1_000 or text.count(",") > 16:
        raise ValueError("too long")
    return text


def parse_link(raw: Mapping[str, Sequence[str] | str]) -> LinkView:
    """Check every value a URL's query parameters give (``raw``: name → its values, as
    ``st.query_params.get_all`` returns them) and keep only well-formed ones: numbers within their
    range, words from their list, head lists of ``LAYER.HEAD``, one value per name, at most
    :data:`MAX_VALUE` characters. Never raises; whatever is dropped is named in ``problems``."""
    problems: list[str] = []
    values: dict[str, str] = {}
    for name in KNOWN:
        got = raw.get(name)
        if got is None:
            continue
        got = [got] if isinstance(got, str) else list(got)
        if not got:
            continue
        if len(got) > 1:
            problems.append(f"'{name}' given {len(got)} times")
        elif not isinstance(got[0], str) or len(got[0]) > MAX_VALUE or "\x00" in got[0]:
            problems.append(f"'{name}' too long or not text")
        else:
            values[name] = got[0]
    out: dict[str, Any] = {"protocol": {}}
    for name, field_name in PROTOCOL_PARAMS.items():
        if name in values:
            try:
                out["protocol"][field_name] = _protocol_value(name, field_name, values[name])
            except Exception as exc:   # ValueError, RefineClipError: the value is dropped, the default used
                problems.append(f"'{name}' {exc if isinstance(exc, ValueError) else 'is not a valid error pair'}")
    for name, key in (("heads", "heads"), ("ticks", "ticks"), ("head", "head")):
        if name in values:
            try:
                heads = _head_list(values[name])
                if name == "head":
                    if len(heads) != 1:
                        raise ValueError("not one LAYER.HEAD")
                    out[key] = heads[0]
                else:
                    out[key] = heads
            except ValueError as exc:
                problems.append(f"'{name}' {exc}")
    for name, key, allowed in (("method", "method", REFINE_METHODS), ("from", "head_source", HEAD_SOURCES)):
        if name in values:
            if values[name] in allowed:
                out[key] = values[name]
            else:
                problems.append(f"'{name}' not one of {', '.join(allowed)}")
    if "cache" in values:
        if values["cache"].strip():
            out["cache"] = values["cache"]
        else:
            problems.append("'cache' is empty")
    return LinkView(problems=tuple(problems), **out)


def notice(problems: Sequence[str]) -> str:
    """The one line shown when part of a link could not be restored."""
    return f"Part of this link could not be restored ({'; '.join(problems)}); the defaults are used for it."


def link_params(cache: str | None, protocol: Mapping[str, Any], heads: Sequence[HeadId] | None,
                head: HeadId | None, ticks: Sequence[HeadId] | None = None, method: str | None = None,
                head_source: str | None = None) -> dict[str, str]:
    """A view as query parameters (only what differs from a fresh session): what :func:`parse_link`
    reads back."""
    out: dict[str, str] = {}
    if cache is not None:
        out["cache"] = str(cache)
    default = DEFAULT_PROTOCOL.to_dict()
    for name, field_name in PROTOCOL_PARAMS.items():
        if protocol.get(field_name) != default.get(field_name) and protocol.get(field_name) is not None:
            out[name] = str(protocol[field_name])
    for name, hs in (("heads", heads), ("ticks", ticks)):
        if hs is not None:
            out[name] = ",".join(f"{h.layer}.{h.head}" for h in hs)
    if head is not None:
        out["head"] = f"{head.layer}.{head.head}"
    if method is not None:
        out["method"] = method
    if head_source is not None:
        out["from"] = head_source
    return out


# --- the session's side (Streamlit) ---------------------------------------------------------------

def _session_view() -> dict[str, str]:
    """This session's view as query parameters (only what differs from a fresh session)."""
    from refineclip_core.edit.config import DEFAULT_EDIT

    from .state import Key, ablate_heads, get, get_source, inspect_head, protocol, ticked_heads

    src = get_source()
    if src is None:
        return {}
    ticks = ticked_heads()
    method = get(Key.REFINE_METHOD)
    default_demo = src.is_demo and src.spec.name == DEMO_MODEL    # the SigLIP-shaped demo's link names its cache
    return link_params(None if default_demo else str(src.cache_dir), protocol().to_dict(), ablate_heads(),
                       inspect_head(), ticks if ticks is not None and ticks != ablate_heads() else None,
                       method if method in REFINE_METHODS and method != DEFAULT_EDIT.method else None,
                       get(Key.REFINE_FROM))


def view_params() -> dict[str, str]:
    """This session's view as query parameters (what :func:`write_link` puts in the URL)."""
    return _session_view()


def read_link() -> None:
    """On a session's first run: check the URL's values (:func:`parse_link`), remember the view they ask
    for (applied once a source is there) and open the link's feature cache, if any, with this
    session's allowed folders."""
    import streamlit as st

    from .state import Key, get, get_source, put, set_source

    if get(Key.URL_READ):
        return
    put(Key.URL_READ, True)
    raw = {k: st.query_params.get_all(k) for k in st.query_params.keys()}
    if not raw:
        return
    view = parse_link(raw)
    put(Key.URL_PENDING, view)
    if view.cache and get_source() is None:
        from refineclip_core.session.caches import cache_source

        try:
            set_source(cache_source(view.cache))
        except Exception as exc:   # a refusal (outside this session's folders) or a broken cache: say so
            put(Key.URL_PENDING, LinkView(problems=view.problems))
            put(Key.URL_REFUSED, f"This link's data could not be opened here, so the demo is shown instead: {exc}")


def apply_link() -> None:
    """Once a source is loaded: apply the remembered settings, head sets, inspected head and the
    Refine page's choices (heads outside the cache's scope are dropped with the same one-line note);
    then show any refusal."""
    import streamlit as st

    from refineclip_core.features.cache_format import read_manifest
    from refineclip_core.method.protocol import ProtocolConfig

    from .state import (Key, get, get_source, protocol, put, set_ablate_heads, set_inspect_head,
                        set_ticked_heads)
    from .widgets import plain

    refused = get(Key.URL_REFUSED)
    if refused:
        st.error(plain(refused), icon=":material/block:")
        put(Key.URL_REFUSED, None)
    view = get(Key.URL_PENDING)
    if not isinstance(view, LinkView) or get_source() is None:
        return
    put(Key.URL_PENDING, None)
    problems = list(view.problems)
    try:
        man = read_manifest(get_source().cache_dir)
    except Exception:
        man = None

    def in_scope(heads, name):
        if heads is None or man is None:
            return heads
        bad = [h for h in heads if h.layer not in man.layers or not 0 <= h.head < man.n_heads]
        if bad:
            problems.append(f"'{name}' names heads outside the cached layers ({bad[0]})")
            return None
        return heads

    if view.protocol:
        try:
            put(Key.PROTOCOL, ProtocolConfig(**{**protocol().to_dict(), **view.protocol}).to_dict())
        except Exception as exc:
            problems.append(f"the settings ({exc})")
    heads, ticks = in_scope(view.heads, "heads"), in_scope(view.ticks, "ticks")
    head = in_scope((view.head,) if view.head is not None else None, "head")
    if heads is not None:
        set_ablate_heads(list(heads))
    if ticks is not None:
        set_ticked_heads(list(ticks))
    if head:
        set_inspect_head(head[0])
    if view.method is not None:
        put(Key.REFINE_METHOD, view.method)
    if view.head_source is not None:
        put(Key.REFINE_FROM, view.head_source)
    if problems:
        st.warning(plain(notice(problems)), icon=":material/link_off:")


def write_link() -> None:
    """Each run: put this session's view into the URL (nothing while a link is still being applied)."""
    import streamlit as st

    from .state import Key, get, get_source

    if get(Key.URL_PENDING) or get_source() is None:
        return
    want = view_params()
    have = {k: st.query_params.get(k) for k in st.query_params.keys()}
    if want != have:
        st.query_params.from_dict(want)

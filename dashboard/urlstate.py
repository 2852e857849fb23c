"""The view in the URL: a reload, or the same link opened by another session, shows the same view.

The page is the URL's path (Streamlit's navigation); the rest is in ``st.query_params``:

``cache``   the feature cache folder of the data and model (absent: the embedded demo);
``pair``, ``sel``, ``n``, ``seed``, ``top_t``, ``sim``, ``abl``   the identification settings that
            differ from the defaults (error pair, selection rule, samples per class, ...);
``heads``   the head set handed to Ablate and Refine (``11.3,10.7``); ``head``   the inspected head.

A link is only as strong as the session that opens it: the cache folder is opened with *that*
session's allowed folders (:func:`~refineclip_core.session.caches.cache_source`), so a session that
may not read it gets a one-sentence refusal and the demo, never the files.
"""

from __future__ import annotations

import streamlit as st

from refineclip_core.features.decomposition import HeadId, parse_heads
from refineclip_core.method.protocol import DEFAULT_PROTOCOL, ProtocolConfig

from .state import (Key, ablate_heads, get, get_source, inspect_head, protocol, put, read_roots, set_ablate_heads,
                    set_inspect_head, set_source)
from .widgets import plain

#: Query-parameter name of each identification setting kept in the URL.
PROTOCOL_PARAMS = {"pair": "pair", "sel": "selection", "n": "samples_per_class", "seed": "seed", "top_t": "top_t",
                   "sim": "similarity", "abl": "ablation"}
_INT_FIELDS = {"samples_per_class", "seed", "top_t"}


def _heads_text(heads) -> str:
    return ",".join(f"{h.layer}.{h.head}" for h in heads)


def view_params() -> dict[str, str]:
    """This session's view as query parameters (only what differs from a fresh session)."""
    src = get_source()
    if src is None:
        return {}
    out: dict[str, str] = {}
    if not src.is_demo:
        out["cache"] = str(src.cache_dir)
    current, default = protocol().to_dict(), DEFAULT_PROTOCOL.to_dict()
    for name, field in PROTOCOL_PARAMS.items():
        if current.get(field) != default.get(field) and current.get(field) is not None:
            out[name] = str(current[field])
    heads = ablate_heads()
    if heads is not None:
        out["heads"] = _heads_text(heads)
    head = inspect_head()
    if head is not None:
        out["head"] = f"{head.layer}.{head.head}"
    return out


def read_link() -> None:
    """On a session's first run: remember the view its URL asks for (applied once a source is there)
    and open the link's feature cache, if any, with this session's allowed folders."""
    if get(Key.URL_READ):
        return
    put(Key.URL_READ, True)
    params = {k: st.query_params.get(k) for k in st.query_params.keys()}
    if not params:
        return
    put(Key.URL_PENDING, params)
    folder = params.get("cache")
    if folder and get_source() is None:
        from refineclip_core.session.caches import cache_source

        try:
            set_source(cache_source(folder, read_roots()))
        except Exception as exc:   # a refusal (outside this session's folders) or a broken cache: say so
            put(Key.URL_PENDING, None)
            put(Key.URL_REFUSED, f"This link's data could not be opened here, so the demo is shown instead: {exc}")


def apply_link() -> None:
    """Once a source is loaded: apply the remembered settings, head set and inspected head (bad values
    are ignored with a note); then show any refusal."""
    refused = get(Key.URL_REFUSED)
    if refused:
        st.error(plain(refused), icon=":material/block:")
        put(Key.URL_REFUSED, None)
    params = get(Key.URL_PENDING)
    if not params or get_source() is None:
        return
    put(Key.URL_PENDING, None)
    changes = {}
    for name, field in PROTOCOL_PARAMS.items():
        if params.get(name) is not None:
            changes[field] = int(params[name]) if field in _INT_FIELDS and params[name].lstrip("-").isdigit() \
                else params[name]
    try:
        from refineclip_core.features.cache_format import read_manifest

        man = read_manifest(get_source().cache_dir)
        scope = (list(man.layers), man.n_heads) if man is not None else (None, None)
        if changes:
            cfg = ProtocolConfig(**{**protocol().to_dict(), **changes})
            put(Key.PROTOCOL, cfg.to_dict())
        if params.get("heads") is not None:
            set_ablate_heads(parse_heads(params["heads"], *scope) if params["heads"] else [])
        if params.get("head"):
            set_inspect_head(HeadId.of(parse_heads(params["head"], *scope)[0]))
    except Exception as exc:
        st.warning(plain(f"Part of this link's view could not be restored ({exc}); the defaults are used."),
                   icon=":material/link_off:")


def write_link() -> None:
    """Each run: put this session's view into the URL (nothing while a link is still being applied)."""
    if get(Key.URL_PENDING) or get_source() is None:
        return
    want = view_params()
    have = {k: st.query_params.get(k) for k in st.query_params.keys()}
    if want != have:
        st.query_params.from_dict(want)

"""One definition of "the largest error pair" for every page, and the scope of every count.

The largest error pair is counted on the **labelled images** (the fitting rows of
:func:`~refineclip_core.method.protocol.evaluation_and_fit_rows`): the images whose labels the protocol
may read, where ``identify`` picks its ``auto`` pair. Load, Errors, Heads and the Head inspector rank
pairs here and say which images each count is over (:data:`LABELLED`, :data:`HELD_OUT`, :data:`ALL`).
The Head inspector's push uses the replacement the scores use (the protocol's ablation: the mean over
the adaptation rows, or zero).
"""

from __future__ import annotations

import numpy as np
import streamlit as st

from refineclip_core.features.cache import FeatureCache
from refineclip_core.features.decomposition import HeadId
from refineclip_core.method.errorsets import ErrorPair, error_pairs
from refineclip_core.method.protocol import Identification, ProtocolConfig, evaluation_and_fit_rows
from refineclip_core.method.scores import delta

from .widgets import Ready

#: The three scopes a count can be over, as every page words them.
LABELLED, HELD_OUT, ALL = "labelled images", "held-out images", "all images"


def labelled_rows(cache: FeatureCache, cfg: ProtocolConfig) -> np.ndarray:
    """The images whose labels the protocol may read (where the labelled samples are drawn from)."""
    return evaluation_and_fit_rows(cache, cfg)[1]


def ranked_pairs(ready: Ready, cfg: ProtocolConfig) -> tuple[list[ErrorPair], int]:
    """Every error pair counted on the labelled images, largest first (the first is the protocol's
    ``auto`` pair), and how many labelled images there are."""
    rows = labelled_rows(ready.cache, cfg)
    return error_pairs(ready.engine.base_predictions, ready.cache.labels, rows), len(rows)


def pair_count(pred: np.ndarray, labels: np.ndarray, rows: np.ndarray, true: int, wrong: int) -> int:
    """How many of ``rows`` are of class ``true`` and predicted ``wrong``."""
    rows = np.asarray(rows, dtype=np.int64)
    return int(np.sum((labels[rows] == true) & (pred[rows] == wrong)))


@st.cache_resource(show_spinner="Measuring where the head pushes…", max_entries=64)
def _push(key: str, layer: int, head: int, true: int, wrong: int, mode: str, similarity: str, adapt_key: int,
          _cache: FeatureCache, _adapt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = np.flatnonzero(_cache.labels == true)
    li = _cache.manifest.layers.index(layer)
    c_h = np.asarray(_cache.heads[rows, li, head], dtype=np.float64)     # one head's slab: never all heads
    if mode == "mean":
        m = np.asarray(_cache.heads[np.sort(_adapt), li, head], dtype=np.float64).mean(0)[None]
    else:
        m = np.zeros((1, c_h.shape[-1]))
    E = np.asarray(_cache.embeddings[rows], dtype=np.float64)
    text = np.asarray(_cache.text, dtype=np.float64)
    c = c_h[:, None, :]
    push = (delta(E, c, m, np.broadcast_to(text[true], E.shape), similarity)
            - delta(E, c, m, np.broadcast_to(text[wrong], E.shape), similarity))
    return rows, push[:, 0]


def head_push_values(ready: Ready, ident: Identification, head: HeadId, true: int, wrong: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The images of class ``true`` and how hard ``head`` pushes each toward ``wrong`` rather than ``true``:
    Δ(x, true, m) − Δ(x, wrong, m) of Eq. 6 with the replacement ``m`` the scores use (the protocol's
    ablation: the head's mean over the adaptation rows, or zero). Positive: removing the head moves the
    image toward ``true``, i.e. the head pushes toward ``wrong``. Computed once per head, pair and ablation."""
    adapt = np.asarray(ident.adapt_rows, dtype=np.int64)
    return _push(ready.source.resource_key(), head.layer, head.head, int(true), int(wrong), ident.config.ablation,
                 ident.config.similarity, hash(adapt.tobytes()), ready.cache, adapt)

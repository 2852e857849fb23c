"""Known-attribute mode (the paper's "TextSpan *" made usable): heads ranked by a typed text direction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ...errors import RefineClipError
from ...features.decomposition import HeadId
from ...method.ablation import AblationEngine
from ...method.protocol import Identification, make_engine
from ...method.selection import best_prefix
from ..textspan import ZERO_VARIANCE_RTOL
from .pairs import project_rows

# -- known-attribute mode (the paper's "TextSpan *" made usable) ----------------------------------

def phrase_direction(emb_a: np.ndarray, emb_b: np.ndarray) -> np.ndarray:
    """The unit text direction from the phrases ``b`` to the phrases ``a`` ("on water" vs "on land"):
    the difference of their mean normalised embeddings."""
    a, b = np.atleast_2d(np.asarray(emb_a, dtype=np.float64)), np.atleast_2d(np.asarray(emb_b, dtype=np.float64))
    if not len(a) or not len(b):
        raise RefineClipError("Give at least one phrase on each side (e.g. 'on water' and 'on land').")
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)   # noqa: E731
    d = unit(a).mean(0) - unit(b).mean(0)
    n = np.linalg.norm(d)
    if n <= 1e-6:
        raise RefineClipError("The two sides' phrases embed to the same direction; make them differ "
                              "(e.g. 'a photo on water' vs 'a photo on land').")
    return d / n


@dataclass
class AttributeHeads:
    """Heads ranked by how much of a typed attribute direction they write (known-attribute mode).

    ``shares[h]`` is head ``h``'s part of the embedding's variance along the direction,
    ``Cov(c_h·u, E·u) / Var(E·u)`` over the images (the heads in scope and the rest of Eq. 4 add
    up to 1); ``heads`` is the prefix of the ranking with the largest utility U (Eq. 10) on the
    labelled samples, as the consensus chooses its prefix, so the set goes to Ablate and Refine
    like the protocol's choice."""

    side_a: list[str]
    side_b: list[str]
    ranking: list[HeadId]
    shares: dict[str, float]
    heads: list[HeadId]
    curve: list[float]
    baseline_utility: float
    n_images: int

    def to_dict(self) -> dict[str, Any]:
        return {"side_a": list(self.side_a), "side_b": list(self.side_b), "ranking": [str(h) for h in self.ranking],
                "shares": dict(self.shares), "heads": [str(h) for h in self.heads], "curve": list(self.curve),
                "baseline_utility": self.baseline_utility, "n_images": self.n_images}


def attribute_shares(engine: AblationEngine, direction: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Each head's share of the variance of ``E·u`` over ``rows`` (flat head order of ``engine``)."""
    u = np.asarray(direction, dtype=np.float64)
    e = engine.E[rows].astype(np.float64) @ u
    scale = float(e @ e)
    e -= e.mean()
    var = float(e @ e)
    if var <= ZERO_VARIANCE_RTOL * scale:
        return np.zeros(engine.n_flat)
    c = project_rows(engine, rows, u)
    c -= c.mean(0, keepdims=True)
    return (c.T @ e) / var


def attribute_heads(cache: Any, ident: Identification, side_a: Sequence[str], side_b: Sequence[str],
                    direction: np.ndarray, engine: AblationEngine | None = None, top_t: int | None = None
                    ) -> AttributeHeads:
    """Rank every head in scope by its share of the typed attribute ``direction``
    (:func:`phrase_direction`) over the identification's non-evaluation images, and choose the
    prefix (up to ``top_t``, default the protocol's T) by utility on the labelled samples."""
    engine = engine or make_engine(cache)
    rows = np.union1d(ident.sample_rows, ident.adapt_rows)
    shares = attribute_shares(engine, direction, rows)
    ids = engine.head_ids()
    order = np.argsort(-shares, kind="stable")
    ranking = [ids[i] for i in order]
    t_max = max(1, min(top_t or ident.config.top_t, len(ranking)))
    t, _, curve, base = best_prefix(engine, ranking[:t_max], ident.sample_rows, cache.labels)
    return AttributeHeads(list(side_a), list(side_b), ranking, {str(ids[i]): float(shares[i]) for i in order},
                          ranking[:t], [float(x) for x in curve], float(base), len(rows))


def attribute_direction(loaded: Any, side_a: Sequence[str], side_b: Sequence[str]) -> np.ndarray:
    """:func:`phrase_direction` of two lists of typed phrases, embedded by ``loaded``."""
    from ...features.zeroshot import encode_texts

    a, b = [p.strip() for p in side_a if p.strip()], [p.strip() for p in side_b if p.strip()]
    if not a or not b:
        raise RefineClipError("Give at least one phrase on each side (e.g. 'on water' and 'on land').")
    return phrase_direction(encode_texts(loaded, a).numpy(), encode_texts(loaded, b).numpy())

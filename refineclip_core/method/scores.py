"""Direct-effect scores DE_A..DE_D of every head for an error pair (paper Eq. 6-9).

``Δ(x, y, m) = sim(E − c_h + m, t_y) − sim(E, t_y)`` (Eq. 6) measures how replacing head
``h``'s contribution by ``m`` moves image ``x`` towards class ``y``. With ``m_X`` the mean of
``c_h`` over set ``X`` (zero when ``X`` is empty, paper §3.2):

========  ==========  ===========  ===============================  ========
score     outer set   replacement  averaged quantity                ranking
========  ==========  ===========  ===============================  ========
DE_A      W           m_C          Δ(x, y_e) − Δ(x, ŷ_e)   (Eq. 7)  highest
DE_B      C           m_W          Δ(x, y_e) − Δ(x, ŷ_e)   (Eq. 8)  lowest
DE_C      A           m_W          Δ(x, ŷ_e) − Δ(x, y_e)   (Eq. 9)  highest
DE_D      W           m_A          Δ(x, ŷ_e) − Δ(x, y_e)   (Eq. 9)  lowest
========  ==========  ===========  ===============================  ========

A score whose outer set is empty is *unavailable* (``values is None``), never 0.
``sim`` is the cosine similarity; ``similarity="dot"`` gives the dot product, under which
Proposition 1 holds exactly: DE_A = −DE_B and DE_C = −DE_D.

Everything is vectorised over images and heads: the cosine of ``E − c + m`` is assembled
from dot products (``E·t``, ``c·t``, ``E·c``, ``|c|²``, ...) without materialising the
``(n, heads, d)`` ablated embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from ..features.decomposition import HeadId
from .errorsets import ErrorSets, TextKeyed

Similarity = Literal["cosine", "dot"]
SIMILARITIES: tuple[str, ...] = get_args(Similarity)
ScoreName = Literal["DE_A", "DE_B", "DE_C", "DE_D"]
SCORE_NAMES: tuple[ScoreName, ...] = get_args(ScoreName)

#: score -> (outer set, replacement set, sign of Δ(y_e) − Δ(ŷ_e), rank descending?)
SCORE_SPECS: dict[str, tuple[str, str, int, bool]] = {
    "DE_A": ("W", "C", +1, True),
    "DE_B": ("C", "W", +1, False),
    "DE_C": ("A", "W", -1, True),
    "DE_D": ("W", "A", -1, False),
}


@dataclass(frozen=True)
class ScoreKey:
    """Which score (Eq. 6-9) of which error pair: the key of ``Identification.scores``. ``str()`` gives the
    text records, tables and the screen show: ``"DE_A"`` when the identification has one pair (``alone``),
    else ``"DE_A[true→pred]"`` (class names as typed)."""

    score: ScoreName
    pair: tuple[str, str]
    alone: bool = False

    def __str__(self) -> str:
        return self.score if self.alone else f"{self.score}[{self.pair[0]}→{self.pair[1]}]"


class ScoreTable(TextKeyed):
    """``Identification.scores``: a dict keyed by :class:`ScoreKey` that also answers to a key's text
    (``scores["DE_A"]``, ``scores["DE_A[a→b]"]``), the names records, tables and the screen show."""


@dataclass
class HeadScores:
    """One score for every head in scope; ``values`` is ``(L_s, H)`` or ``None`` if unavailable."""

    name: str
    values: np.ndarray | None
    layers: tuple[int, ...]
    descending: bool
    reason: str = ""

    @property
    def available(self) -> bool:
        return self.values is not None

    def ranking(self) -> list[HeadId]:
        """All heads, most suspicious first (highest for DE_A/DE_C, lowest for DE_B/DE_D)."""
        if self.values is None:
            return []
        flat = self.values.reshape(-1)
        order = np.argsort(-flat if self.descending else flat, kind="stable")
        H = self.values.shape[1]
        return [HeadId(self.layers[i // H], int(i % H)) for i in order]

    def top(self, t: int) -> list[HeadId]:
        return self.ranking()[:t]

    def value(self, head: HeadId) -> float | None:
        if self.values is None:
            return None
        return float(self.values[self.layers.index(head.layer), head.head])

    def to_list(self) -> list[list] | None:
        """``[[layer, head, value], ...]`` in ranking order (the CLI's JSON form)."""
        if self.values is None:
            return None
        return [[h.layer, h.head, self.value(h)] for h in self.ranking()]


def mean_feature(contributions: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``m_X`` per head: mean of ``c_h`` over ``rows`` of ``contributions`` ``(n, K, d)``, zero when ``rows`` is
    empty. ``(K, d)``."""
    if len(rows) == 0:
        return np.zeros(contributions.shape[1:], dtype=np.float64)
    return contributions[rows].astype(np.float64).mean(axis=0)


def delta(E: np.ndarray, c: np.ndarray, m: np.ndarray, t: np.ndarray, similarity: Similarity = "cosine") -> np.ndarray:
    """Δ(x, y, m) of Eq. (6) for every image and head.

    Args:
        E: ``(n, d)`` image embeddings; c: ``(n, K, d)`` head contributions;
        m: ``(K, d)`` replacement per head; t: ``(n, d)`` normalised text of the class per image.
    Returns ``(n, K)``.
    """
    E = np.asarray(E, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    Et = np.einsum("nd,nd->n", E, t)
    ct = np.einsum("nkd,nd->nk", c, t)
    mt = np.einsum("kd,nd->nk", m, t)
    new_dot = Et[:, None] - ct + mt
    if similarity == "dot":
        return new_dot - Et[:, None]
    EE = np.einsum("nd,nd->n", E, E)
    Ec = np.einsum("nd,nkd->nk", E, c)
    Em = E @ m.T
    cc = np.einsum("nkd,nkd->nk", c, c)
    cm = np.einsum("nkd,kd->nk", c, m)
    mm = np.einsum("kd,kd->k", m, m)
    new_norm2 = EE[:, None] + cc + mm[None] - 2 * Ec + 2 * Em - 2 * cm
    new_norm = np.sqrt(np.maximum(new_norm2, 0.0))
    old = Et / np.sqrt(EE)
    with np.errstate(divide="ignore", invalid="ignore"):
        new = np.where(new_norm > 0, new_dot / new_norm, 0.0)
    return new - old[:, None]


def compute_scores(
    embeddings: np.ndarray,
    contributions: np.ndarray,
    text: np.ndarray,
    sets: ErrorSets,
    layers: tuple[int, ...] | list[int],
    similarity: Similarity = "cosine",
    names: tuple[str, ...] = SCORE_NAMES,
) -> dict[str, HeadScores]:
    """DE_A..DE_D (Eq. 7-9) for all heads. ``contributions`` is the cache's ``(N, L_s, H, d)`` array of head
    contributions (``FeatureCache.heads``, in memory or on disk: only the rows of W ∪ C ∪ A are read)."""
    N, Ls, H, d = contributions.shape
    layers = tuple(layers)
    needed = sets.rows                                     # sorted: W ∪ C ∪ A
    flat = np.asarray(contributions[needed]).reshape(len(needed), Ls * H, d)
    sets_rows = {"W": sets.W, "C": sets.C, "A": sets.A}
    at = {k: np.searchsorted(needed, v) for k, v in sets_rows.items()}   # positions in ``flat``
    means = {k: mean_feature(flat, v) for k, v in at.items()}
    out: dict[str, HeadScores] = {}
    for name in names:
        outer, repl, sign, desc = SCORE_SPECS[name]
        rows = sets_rows[outer]
        if len(rows) == 0:
            out[name] = HeadScores(name, None, layers, desc, reason=f"set {outer} is empty for {sets.description}")
            continue
        E = embeddings[rows]
        c = flat[at[outer]]
        t_true = text[sets.true_class[rows]].astype(np.float64)
        t_wrong = text[sets.wrong_class[rows]].astype(np.float64)
        m = means[repl]
        diff = delta(E, c, m, t_true, similarity) - delta(E, c, m, t_wrong, similarity)
        values = sign * diff.mean(axis=0)
        note = "" if len(sets_rows[repl]) else f"set {repl} is empty: zero replacement feature used"
        out[name] = HeadScores(name, values.reshape(Ls, H), layers, desc, reason=note)
    return out


def head_push(embeddings: np.ndarray, head_outputs: np.ndarray, text: np.ndarray, true: int, wrong: int,
              similarity: Similarity = "cosine") -> np.ndarray:
    """How hard one head pushes each image toward ``wrong`` rather than ``true``:
    ``Δ(x, y_true, 0) − Δ(x, y_wrong, 0)`` of Eq. (6) with a zero replacement, i.e. how much
    removing the head (Eq. 5) moves ``x`` toward ``true`` rather than ``wrong``. Positive: the
    head pushes toward ``wrong``.

    Args:
        embeddings: ``(n, d)`` E of the images; head_outputs: ``(n, d)`` the head's ``c_h``;
        text: ``(C, d)`` normalised class texts. Returns ``(n,)``.
    """
    c = np.asarray(head_outputs, dtype=np.float64)[:, None, :]     # converted once for both Δ
    E = np.asarray(embeddings, dtype=np.float64)
    zero = np.zeros((1, c.shape[-1]))
    t_true = np.broadcast_to(np.asarray(text, dtype=np.float64)[true], E.shape)   # one row for every image
    t_wrong = np.broadcast_to(np.asarray(text, dtype=np.float64)[wrong], E.shape)
    return (delta(E, c, zero, t_true, similarity) - delta(E, c, zero, t_wrong, similarity))[:, 0]

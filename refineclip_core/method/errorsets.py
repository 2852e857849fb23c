"""Error pairs and the sets W, C, A of paper §3.2.

For an error pair (true ``y_e``, predicted ``ŷ_e``) among the rows considered:

* ``W`` — images of class ``y_e`` predicted as ``ŷ_e`` (the errors, W_{y_e,ŷ_e});
* ``C`` — images of class ``y_e`` predicted correctly (C_{y_e});
* ``A`` — images of class ``ŷ_e`` predicted correctly (A_{ŷ_e}).

Each image carries its own pair of classes (:attr:`ErrorSets.true_class`,
:attr:`ErrorSets.wrong_class`), which is what the scores use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ErrorPair:
    """A confusion ``true -> predicted`` and how many images make it."""

    true: int
    pred: int
    count: int

    def label(self, classes: list[str]) -> str:
        return f"{classes[self.true]} → {classes[self.pred]}"


@dataclass(frozen=True)
class ClassPair:
    """An error pair by class index (true ``y_e``, predicted ``ŷ_e``): the key of ``Identification.sets``.
    ``names`` (the class names as typed; not compared, so ``ClassPair(a, b)`` finds the key) are the pair of a
    :class:`~refineclip_core.method.scores.ScoreKey`, and make ``str()`` the text records and the screen show:
    ``"true→pred"``."""

    true: int
    pred: int
    names: tuple[str, str] = field(default=("", ""), compare=False)

    def __str__(self) -> str:
        return f"{self.names[0]}→{self.names[1]}"


class TextKeyed(dict):
    """A dict keyed by typed keys (frozen dataclasses) that also answers to a key's text, ``str(key)``: the
    name records (JSON), tables and the screen show (:class:`SetTable`, :class:`~.scores.ScoreTable`)."""

    def _key(self, key):
        if isinstance(key, str):
            for k in dict.keys(self):
                if str(k) == key:
                    return k
        return key

    def __getitem__(self, key):
        return dict.__getitem__(self, self._key(key))

    def __contains__(self, key) -> bool:
        return dict.__contains__(self, self._key(key))

    def get(self, key, default=None):
        return dict.get(self, self._key(key), default)


class SetTable(TextKeyed):
    """``Identification.sets``: :class:`ErrorSets` keyed by :class:`ClassPair`; also answers to a plain
    ``(true, pred)`` index pair (``sets[(a, b)]`` for ``(a, b)`` in ``ident.pairs``) and to a key's text
    (``sets["waterbird→landbird"]``). Write ``str(key)`` where text is needed (JSON keys)."""

    def _key(self, key):
        if isinstance(key, tuple) and len(key) == 2:
            return ClassPair(int(key[0]), int(key[1]))
        return super()._key(key)


@dataclass
class ErrorSets:
    """Row indices of W, C, A, and per-row class pairs for Δ (Eq. 6).

    ``true_class[i]`` and ``wrong_class[i]`` are ``y_e`` and ``ŷ_e`` for row ``i`` of the
    cache (only meaningful for rows in W ∪ C ∪ A).
    """

    y_true: int
    y_pred: int | None
    W: np.ndarray
    C: np.ndarray
    A: np.ndarray
    true_class: np.ndarray
    wrong_class: np.ndarray
    description: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def rows(self) -> np.ndarray:
        """All rows in W ∪ C ∪ A, sorted."""
        return np.unique(np.concatenate([self.W, self.C, self.A]))

    def sizes(self) -> dict[str, int]:
        return {"W": int(len(self.W)), "C": int(len(self.C)), "A": int(len(self.A))}


def error_pairs(predictions: np.ndarray, labels: np.ndarray, rows: np.ndarray | None = None) -> list[ErrorPair]:
    """All confusions among ``rows`` (all rows by default), most frequent first."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if rows is not None:
        predictions, labels = predictions[rows], labels[rows]
    wrong = predictions != labels
    pairs: dict[tuple[int, int], int] = {}
    for t, p in zip(labels[wrong].tolist(), predictions[wrong].tolist()):
        pairs[(t, p)] = pairs.get((t, p), 0) + 1
    return [ErrorPair(t, p, n) for (t, p), n in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))]


def _select(rows: np.ndarray | None, n: int) -> np.ndarray:
    return np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)


def pair_error_sets(predictions: np.ndarray, labels: np.ndarray, y_true: int, y_pred: int,
                    rows: np.ndarray | None = None, classes: list[str] | None = None) -> ErrorSets:
    """W, C, A for the pair ``y_true -> y_pred`` among ``rows``."""
    if y_true == y_pred:
        raise ValueError("an error pair needs two different classes")
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    r = _select(rows, len(labels))
    W = r[(labels[r] == y_true) & (predictions[r] == y_pred)]
    C = r[(labels[r] == y_true) & (predictions[r] == y_true)]
    A = r[(labels[r] == y_pred) & (predictions[r] == y_pred)]
    n = len(labels)
    name = f"{classes[y_true]} → {classes[y_pred]}" if classes else f"{y_true} → {y_pred}"
    return ErrorSets(y_true, y_pred, W, C, A, np.full(n, y_true), np.full(n, y_pred), description=name)


def sample_per_class(labels: np.ndarray, k: int, seed: int, rows: np.ndarray | None = None,
                     classes_to_sample: list[int] | None = None) -> np.ndarray:
    """``k`` rows per class drawn without replacement with ``seed`` (paper: 10 per class).

    Classes with fewer than ``k`` rows contribute all their rows.
    """
    labels = np.asarray(labels)
    r = _select(rows, len(labels))
    rng = np.random.default_rng(seed)
    chosen = []
    for c in (classes_to_sample if classes_to_sample is not None else np.unique(labels[r]).tolist()):
        members = r[labels[r] == c]
        if len(members):
            chosen.append(rng.choice(members, size=min(k, len(members)), replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)

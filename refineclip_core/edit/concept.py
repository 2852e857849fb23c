"""Remove a named concept in the edit: the diagnosed (or typed) concept's text directions are
projected out of the teacher of RefineCLIP-fit (issue 27).

The diagnosis (:mod:`~refineclip_core.inspection.diagnosis`) names what the removed heads carry
("water / lake"); the ablation removes the heads, not the concept. With concept removal on, the
ablated embeddings of the success set Ŵ (the teacher of :func:`~refineclip_core.edit.fit.teacher_embeddings`)
are also projected off the span of the concept's text directions::

    E_abl' = E_abl − s · E_abl Qᵀ Q          Q (k, d): orthonormal basis of span{u_1 .. u_k}

and RefineCLIP-fit distils that teacher into ``visual.proj`` as before: the edit stays one ordinary
checkpoint, and images outside Ŵ keep the original embedding as their teacher (locality).

**Directions.** Each concept text ``c`` is embedded like a class name (the cache's prompt
templates, averaged and renormalised: :func:`~refineclip_core.features.zeroshot.class_text_embeddings`),
and its direction is taken against a reference: the mean embedding of the ``versus`` texts when given
("water" versus "land", as LTC's typed cue); else, with several words, their own mean (the
directions are their contrasts: "grassland" and "water", diagnosed for the two directions of a
pair, give the axis between them); with one word, the mean of the class texts. A raw text embedding
would not do: every prompt shares a large "a photo of …" component, and projecting that out moves
every class alike. A direction that is orthogonal to every class difference ``t_a − t_b`` changes no
prediction (the logit gaps ``E·(t_a − t_b)`` keep their sign up to the norm), so the class
directions are *not* projected out of the concept: the removal acts through the part of the concept
that the text tower places near a class ("water" near "waterbird"), which is exactly the shortcut.

``"diagnosed"`` among the texts stands for the concepts the diagnosis names (the lead concept of each
error pair and what the errors show instead): :func:`concept_texts`. A diagnosed concept is a group of
words ("open / water / rippling", its name and near-duplicates); each of its first ``words`` words gives a
direction, so the span holds the concept however the text tower spreads it over its words.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import RefineClipError

DIAGNOSED = "diagnosed"
"""The word that stands for the diagnosed concept(s) in ``remove_concept``."""

RANK_RTOL = 1e-6
"""Directions whose singular value is below this share of the largest add nothing to the span."""


@dataclass(frozen=True)
class ConceptConfig:
    """Which concept the edit removes (part of :class:`~refineclip_core.method.protocol.EditConfig`).

    ``texts``: typed concept texts, or ``"diagnosed"`` (the diagnosis' named concepts); empty: none
    removed. ``versus``: texts whose mean is the reference of every direction (default: the class
    texts' mean). ``words``: how many words of each diagnosed concept. ``strength``: ``s`` of the
    projection (1 removes the span, 0 nothing)."""

    texts: tuple[str, ...] = ()     # off by default: it made the largest group loss of the edited classes worse
    versus: tuple[str, ...] = ()     # on development worlds 7011-7013 (docs/edit.md), so the user confirms it
    words: int = 2                   # chosen there: 1 word misses the concept ("open" of "open / water"), 3 adds noise
    strength: float = 1.0            # chosen there (1, 0.75, 0.5 tried): the largest worst-group gain
    reference: str = "concepts"     # without versus: "concepts" (their own mean, from two texts on) or "classes"

    def __post_init__(self) -> None:
        object.__setattr__(self, "texts", tuple(t.strip() for t in self.texts if str(t).strip()))
        object.__setattr__(self, "versus", tuple(t.strip() for t in self.versus if str(t).strip()))
        if not 0.0 <= self.strength <= 1.0:
            raise RefineClipError(f"The concept removal's strength must be between 0 and 1, got {self.strength}.")
        if self.reference not in ("concepts", "classes"):
            raise RefineClipError(f"Unknown concept reference {self.reference!r}; use concepts or classes.")
        if self.words < 1:
            raise RefineClipError(f"Use at least one word of each diagnosed concept, got {self.words}.")
        from ..loading.data import check_class_name_lengths  # the tokenizer's limit, named for what was typed

        check_class_name_lengths(self.texts, "concept text", "concept texts")
        check_class_name_lengths(self.versus, "'versus' concept text", "concept texts")

    @property
    def active(self) -> bool:
        return bool(self.texts) and self.strength > 0

    @property
    def diagnosed(self) -> bool:
        return DIAGNOSED in self.texts

    def to_dict(self) -> dict[str, Any]:
        return {"texts": list(self.texts), "versus": list(self.versus), "words": self.words,
                "strength": self.strength, "reference": self.reference}


@dataclass
class ConceptRemoval:
    """A resolved concept removal: the texts removed, the reference they were taken against, and
    the orthonormal basis ``(k, d)`` of their directions."""

    texts: list[str]                # one per concept ("open / water / rippling" for a diagnosed one)
    versus: list[str]
    basis: np.ndarray
    strength: float = 1.0
    diagnosed: list[str] = field(default_factory=list)     # which of ``texts`` came from the diagnosis

    def project(self, X: np.ndarray) -> np.ndarray:
        """``X − s · X Qᵀ Q``: ``X`` ``(n, d)`` off the span of the concept's directions."""
        return project_off(X, self.basis, self.strength)

    def sentence(self) -> str:
        """What was removed, in words."""
        against = f"versus {', '.join(repr(t) for t in self.versus)}" if self.versus else "against the class texts' mean"
        how = "" if self.strength == 1 else f" at strength {self.strength:g}"
        src = " (diagnosed)" if self.diagnosed else ""
        return (f"Concept removed{src}: {', '.join(repr(t) for t in self.texts)} ({against}{how}; "
                f"{len(self.basis)} text direction{'s' if len(self.basis) != 1 else ''} projected out of the teacher).")

    def to_dict(self) -> dict[str, Any]:
        return {"texts": list(self.texts), "versus": list(self.versus), "strength": self.strength,
                "diagnosed": list(self.diagnosed), "rank": int(len(self.basis)), "sentence": self.sentence()}


def orthonormal_basis(directions: np.ndarray, rtol: float = RANK_RTOL) -> np.ndarray:
    """An orthonormal basis ``(k, d)`` of the rows' span (directions adding nothing dropped)."""
    D = np.atleast_2d(np.asarray(directions, dtype=np.float64))
    if D.size == 0:
        return np.zeros((0, D.shape[-1]))
    _, s, vt = np.linalg.svd(D, full_matrices=False)
    keep = s > rtol * max(float(s[0]), 1e-300) if len(s) else np.zeros(0, dtype=bool)
    return vt[keep]


def project_off(X: np.ndarray, basis: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """``X − s · X Qᵀ Q`` for an orthonormal ``basis`` ``Q`` ``(k, d)`` (float64)."""
    X = np.asarray(X, dtype=np.float64)
    Q = np.asarray(basis, dtype=np.float64)
    if not len(Q) or strength == 0:
        return X.copy()
    return X - strength * (X @ Q.T) @ Q


def concept_directions(concept_emb: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each concept embedding minus the reference (the mean of ``reference``'s rows), ``(k, d)``."""
    C = np.atleast_2d(np.asarray(concept_emb, dtype=np.float64))
    ref = np.atleast_2d(np.asarray(reference, dtype=np.float64)).mean(0)
    D = C - ref
    if np.all(np.linalg.norm(D, axis=1) <= 1e-6):
        raise RefineClipError("The concept texts embed to the same direction as their reference; type a concept "
                              "that differs from it (e.g. 'water' versus 'land').")
    return D


def concept_texts(cfg: ConceptConfig, diagnosis: Any | None) -> tuple[list[list[str]], list[str]]:
    """The concepts to remove, each a list of words: every typed text is one (words separated by "/"
    make one concept: "open / water"), and ``"diagnosed"``
    stands for the concepts the diagnosis names (every error pair's lead and what the errors show
    instead), each by its first ``cfg.words`` words. Returns ``(concepts, the diagnosed ones' names)``."""
    concepts: list[list[str]] = []
    diagnosed: list[str] = []
    for t in cfg.texts:
        if t != DIAGNOSED:
            words = [w.strip() for w in t.split("/") if w.strip()]     # "open / water": one concept of two words
            if words and words not in concepts:
                concepts.append(words)
            continue
        if diagnosis is None:
            raise RefineClipError("--remove-concept diagnosed needs the diagnosis; run it (drop --no-diagnosis) or "
                                  "type the concept.")
        found = diagnosed_concepts(diagnosis, cfg.words)
        if not found:
            raise RefineClipError("The diagnosis names no concept for these heads, so there is none to remove; "
                                  "type the concept instead.")
        for words in found:
            if words not in concepts:
                concepts.append(words)
                diagnosed.append(" / ".join(words))
    return concepts, diagnosed


def diagnosed_concepts(diagnosis: Any, words: int = 3) -> list[list[str]]:
    """The concepts the diagnosis' sentences name (pairs in order, each once), each by its first
    ``words`` words (its name, then its near-duplicates: "open / water / rippling")."""
    out: list[list[str]] = []
    for pair in diagnosis.pairs:
        for c in pair.named:
            ws = list(c.words or [c.text])[:words]
            if ws not in out:
                out.append(ws)
    return out


def resolve_concept(cfg: ConceptConfig, loaded: Any, templates: Sequence[str], class_text: np.ndarray,
                    diagnosis: Any | None = None) -> ConceptRemoval | None:
    """The :class:`ConceptRemoval` ``cfg`` asks for (None when it removes nothing): texts embedded by
    ``loaded`` through the cache's ``templates`` (as the class names were), taken against the
    ``versus`` texts' mean or, without them, the mean of ``class_text`` ``(C, d)``."""
    if not cfg.active:
        return None
    from ..features.zeroshot import class_text_embeddings

    concepts, diagnosed = concept_texts(cfg, diagnosis)
    words = list(dict.fromkeys(w for ws in concepts for w in ws))
    emb = class_text_embeddings(loaded, words, templates).astype(np.float64)     # one direction per word
    if cfg.versus:
        reference = class_text_embeddings(loaded, list(cfg.versus), templates)
    elif cfg.reference == "concepts" and len(words) > 1:
        reference = emb
    else:
        reference = class_text
    return ConceptRemoval([" / ".join(ws) for ws in concepts], list(cfg.versus),
                          orthonormal_basis(concept_directions(emb, reference)), cfg.strength, diagnosed)

"""Concepts from a text pool: content words grouped into concept directions (see the package docstring)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ...errors import RefineClipError

#: Words that name no concept: articles, prepositions, counts and the pool's photo templates.
STOPWORDS = frozenset("""
a an the of on in at to by for from with without and or but near front behind top bottom left right middle center
centre edge corner foreground background inside outside only some many few several two three four pair group lot
photo photograph picture image images pic view close up close-up shot this that it its is are there one ones
""".split())

MERGE_OVERLAP = 0.8
"""Two words whose sets of descriptions overlap this much (Jaccard index) are one concept: words
that nearly always come together ("clip art"). A modifier that always comes with a more common
noun ("flat" in "flat bill") stays a concept of its own."""


# -- concepts from a text pool ------------------------------------------------------------------

def content_words(text: str) -> list[str]:
    """Lower-case words of ``text`` that can name a concept (no stop words, no one-letter words)."""
    return [w for w in re.findall(r"[a-z][a-z'-]*[a-z]", text.lower()) if w not in STOPWORDS]


@dataclass
class ConceptVocabulary:
    """Word concepts of a text pool. ``directions[k]`` is the mean of the pool-centred unit text
    directions of the descriptions in ``members[k]`` (its length is the concept's coherence)."""

    labels: list[str]                # the concept's most frequent word
    words: list[list[str]]           # every word merged into it ("star", "stars", "five-pointed")
    members: list[np.ndarray]        # pool indices of the descriptions mentioning the concept
    directions: np.ndarray           # (K, d)
    texts: list[str]                 # the pool
    units: np.ndarray                # (M, d) pool-centred unit directions of the descriptions

    def __len__(self) -> int:
        return len(self.labels)

    def index(self, word: str) -> int:
        """The concept naming ``word`` (a word merged into another concept finds that one)."""
        for k, words in enumerate(self.words):
            if word in words:
                return k
        raise KeyError(word)


def pool_units(pool_emb: np.ndarray) -> np.ndarray:
    """Pool-centred unit directions of the descriptions (TextSpan's text directions)."""
    emb = np.asarray(pool_emb, dtype=np.float64)
    centred = emb - emb.mean(0, keepdims=True)
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    return np.divide(centred, norms, out=np.zeros_like(centred), where=norms > 0)


def concept_vocabulary(texts: Sequence[str], pool_emb: np.ndarray, min_texts: int = 3,
                       merge_overlap: float = MERGE_OVERLAP) -> ConceptVocabulary:
    """Group a pool's descriptions into word concepts (see the module docstring)."""
    texts = list(texts)
    emb = np.asarray(pool_emb)
    if emb.ndim != 2 or emb.shape[0] != len(texts):
        raise RefineClipError(f"The text pool has {len(texts)} texts but embeddings of shape {emb.shape}; "
                              "embed the same list you pass.")
    units = pool_units(emb)
    index: dict[str, set[int]] = {}
    for j, t in enumerate(texts):
        for w in set(content_words(t)):
            index.setdefault(w, set()).add(j)
    forms: dict[str, list[str]] = {w: [w] for w in index}
    for w in sorted(index, key=len, reverse=True):   # plural forms join their singular: stars -> star
        stem = next((x for x in ((w[:-1], w[:-2]) if w.endswith("s") else ()) if x in index and x != w), None)
        if stem is not None:
            index[stem] |= index.pop(w)
            forms[stem] += forms.pop(w)
    words = sorted((w for w in index if len(index[w]) >= min_texts), key=lambda w: (-len(index[w]), w))
    groups: list[list[str]] = []
    sets: list[set[int]] = []
    for w in words:                                   # most frequent first: a word joins a larger one
        s = index[w]
        for g, gs in zip(groups, sets):
            if len(s & gs) >= merge_overlap * len(s | gs):
                g.extend(forms[w])
                gs |= s
                break
        else:
            groups.append(list(forms[w]))
            sets.append(set(s))
    members = [np.array(sorted(s), dtype=np.int64) for s in sets]
    directions = np.stack([units[m].mean(0) for m in members]) if members else np.zeros((0, emb.shape[1]))
    return ConceptVocabulary([g[0] for g in groups], groups, members, directions, texts, units)


def load_vocabulary(loaded: Any, pool_path: Any = None, cache_path: Any = None) -> ConceptVocabulary:
    """The concept vocabulary of a text pool (default: the shipped one) embedded by ``loaded``;
    the pool's embeddings are cached in ``cache_path`` (default: the home folder's ``text-pools``)."""
    from ..textspan import embedded_text_pool

    return concept_vocabulary(*embedded_text_pool(loaded, pool_path, cache_path))

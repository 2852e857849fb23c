"""Say why in words: which concepts the removed part of the embedding carries (issue 17).

The paper answers its first question (§5.1, Tables 4-5, Fig. 3) by reading TextSpan
descriptions of the blamed heads and their Grad-CAM maps by hand. This module turns that reading
into a computation with a checkable answer: for an error pair ``y → ŷ`` and a head set ``S`` (by
default the protocol's choice), it names the concepts carried by what ablation removes,

    r(x) = Σ_{h∈S} c[h](x)        (Eq. 5; mean ablation removes r(x) − Σ m_h, the same up to a constant)

and ranks them by their share of the removed part's variance, next to the heads that write each.

**Concepts.** A text pool's single descriptions are noisy directions (a description mixes an
object, a scene and a style: "a goose on a lake"), so descriptions are grouped first: every
content word that at least ``min_texts`` descriptions mention is a *concept*, whose direction is
the mean of those descriptions' (pool-centred, unit) text directions. Near-duplicates are merged
before anything is measured: plural forms ("star", "stars") and words whose descriptions are
nearly the same ones ("clip" and "art" from "clip art"). A concept's mean direction is
shorter the more its descriptions disagree; that length (its *coherence*) weighs how strongly it
is picked, so a word used in descriptions of everything ("small", "robin" in a pool the model
never learned) does not outrank a word whose descriptions agree ("water").

**Ranking (TextSpan over concepts, on the push).** Over the images the error pair concerns (the
protocol's labelled samples and the unlabelled adaptation images predicted as either class; never
the evaluation images), centre ``r``: ``R`` ``(N, d)``. What makes the error is the removed part's
*push* toward the wrong class, ``p = R·(t_ŷ − t_y)``, the logit gap that ablation closes; the
concepts are ranked by how much of that push they carry. The text difference of the two classes'
prompts, ``t_y − t_ŷ``, is projected out of every concept first: a head carrying a shortcut
writes toward the wrong class by construction, so words the text tower places near a class
("pointed" near "landbird") would otherwise name every direction the prompts lean on. Then,
greedily (Gandelsman et al.'s TextSpan with concepts instead of single descriptions and the push
covariance ``g = Rᵀ(p − p̄)/N`` as the target): pick the concept whose direction, orthogonalised
against the earlier picks, carries the most of ``g`` (weighted by coherence); credit it with its
*push share* ``(u·g)²/||g||²`` and its *share* of the removed variance ``||R u||²/||R||²`` (each
adds up to at most 1 over the picks); attach to it the near-duplicates, concepts whose activation
over the images correlates with the pick's by at least ``tau`` and whose direction points its way
(cosine at least :data:`NAME_MIN`): "land / grassland / ground" is one concept; project the
pick's direction out of ``R``, ``g`` and every remaining concept. The heads carrying a pick are
an exact split of its variance: ``Cov(c̃_h·u, r̃·u) / Var(r̃·u)`` sums to 1 over ``S``.

**The sentence.** It names the first concept (by push share) whose activation goes with the push
toward ``ŷ`` (correlation at least :data:`PUSH_MIN`) and carries at least half as much of it as
any; when the strongest concepts go against the push (the errors lack them: "water" for waterbirds
misread as landbirds), the strongest of them, and what pushes toward ``ŷ`` instead. It adds whether
the misclassified images of ``W`` carry more or less of it than the correctly classified ``C``
(standardised difference of the activation among the labelled samples, shown when at least
:data:`CONTRAST_MIN`).

**What tells the classes apart.** The concepts best aligned, in text space, with ``t_y − t_ŷ``
(words naming a class left out) name what *should* separate them; their share of the removed
variance beyond the named concept (TextSpan's residual) decides "not flat / webbed (2%)".

**The control.** Every head in scope is split the same way along the gap between ``W`` and ``C``
measured in the sum of all of them (a direction that does not depend on the set; the push when
``W`` or ``C`` is empty): the verdict is *shortcut* when at most :data:`P_RANDOM_MAX` of random
sets of as many heads hold as much of it. When the protocol removes no head (no prefix beat
removing nothing), the diagnosis explains the ``top_t`` heads its ranking suspects most instead,
and says so.

**Limits.** The answer is only as good as the text pool and the model's text tower: a concept
missing from the pool cannot be named (the nearest words are, and their share is low), and a
text tower that learned the shortcut itself (the demo's "webbed" is partly "water") blurs the
names; the shares are in the image embedding's geometry, not causal effects (the ablation and its
accuracy change are that); with a handful of ``W`` images the contrast is a small-sample
estimate, and the control uses the samples that chose the heads. ``diagnose`` states what it
measured (images, set sizes, fallback orientation) in :attr:`PairDiagnosis.notes`.
docs/DIAGNOSIS.md says the same for users, next to the paper's TextSpan.

:func:`attribute_heads` is the known-attribute mode (the paper's "TextSpan *" baseline made
usable): the user types contrasting phrases and heads are ranked by the share of that text
direction's variance they write into the embedding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import RefineClipError
from ..features.decomposition import HeadId
from ..method.ablation import AblationEngine
from ..method.errorsets import ErrorSets
from ..method.protocol import Identification, make_engine
from ..method.selection import best_prefix
from .textspan import MIN_RESIDUAL, ZERO_VARIANCE_RTOL

#: Words that name no concept: articles, prepositions, counts and the pool's photo templates.
STOPWORDS = frozenset("""
a an the of on in at to by for from with without and or but near front behind top bottom left right middle center
centre edge corner foreground background inside outside only some many few several two three four pair group lot
photo photograph picture image images pic view close up close-up shot this that it its is are there one ones
""".split())

TAU = 0.9
"""Concepts whose activations over the images correlate at least this much with an earlier pick's
(and point its way, :data:`NAME_MIN`) are near-duplicates: they join the pick instead of being picked."""

MERGE_OVERLAP = 0.8
"""Two words whose sets of descriptions overlap this much (Jaccard index) are one concept: words
that nearly always come together ("clip art"). A modifier that always comes with a more common
noun ("flat" in "flat bill") stays a concept of its own."""

P_RANDOM_MAX = 0.05
"""The shortcut is pinned on the removed heads when at most this share of random head sets of the
same size (from the heads in scope) hold as much of the gap between the misclassified and the
correct images: the control built into the verdict. The gap is measured in the sum of every head
in scope, so its direction does not depend on the set being tested."""

N_RANDOM_SETS = 2000
"""Random head sets drawn (with a fixed seed) to estimate that share."""

MAX_ROWS = 2048
"""The most images a diagnosis reads: every labelled sample of the pair's classes, and a seeded random
subset of the unlabelled images predicted as them when there are more (every head's contribution is
read for these images: 2,048 × 64 heads × 768 floats is 400 MB for a ViT-L/14's last 4 layers)."""

ROW_BLOCK = 512
"""Images per block when contributions are projected in float64 (the float64 copy stays small)."""

LEAD_FROM = 5
"""The sentence names one of the first this many concepts (by their share of the push)."""

CONTRAST_MIN = 0.5
"""The sentence says the misclassified images carry more (or less) of a concept than the correct ones
when its activation differs by at least this many standard deviations."""

PUSH_MIN = 0.3
"""A concept can lead the sentence when its activation correlates with the removed part's push
toward the wrong class at least this much (in absolute value)."""

NAME_MIN = 0.5
"""A concept joins a pick (and names it) only when its direction's cosine with the pick's is at least this."""

HEAD_MIN_SHARE = 0.1
"""A head is listed as carrying a concept when it writes at least this share of its variance."""


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

    @property
    def coherence(self) -> np.ndarray:
        return np.linalg.norm(self.directions, axis=1)

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


# -- the greedy span over concepts ----------------------------------------------------------------

@dataclass
class SpanPick:
    """One step of :func:`concept_span`: a direction of the removed part, named by concepts.

    ``members`` lists ``(concept, +1)``: the pick itself first, then the near-duplicates that joined
    it (their activations correlate with the pick's by at least ``tau`` and their directions point
    its way, cosine at least :data:`NAME_MIN`)."""

    concept: int
    share: float
    direction: np.ndarray          # (d,) unit, orthogonal to the earlier picks' directions
    members: list[tuple[int, int]]
    alignment: dict[int, float] = field(default_factory=dict)   # member -> cos(its direction, ``direction``)
    target_share: float | None = None                            # (u·g)² / ||g||² when spanning a target g


def concept_span(removed: np.ndarray, directions: np.ndarray, k: int = 8, tau: float = TAU,
                 target: np.ndarray | None = None) -> tuple[list[SpanPick], float]:
    """TextSpan over concept directions on the centred ``removed`` ``(N, d)`` (module docstring).

    Without ``target`` a pick is the concept carrying the most (coherence-weighted) variance, as in
    TextSpan. With ``target`` ``g`` (a ``(d,)`` covariance vector, e.g. the removed part's covariance
    with its push toward the wrong class) it is the concept carrying the most of ``g``:
    ``coherence² · (û·g)²`` on the residuals, and :attr:`SpanPick.target_share` is ``(u·g)² / ||g||²``
    (additive over picks). Returns the picks and the removed part's total variance
    (``Σ ||r_i − r̄||² / N``)."""
    X = np.asarray(removed, dtype=np.float64)
    X = X - X.mean(0, keepdims=True)
    total = float((X * X).sum())
    D = np.asarray(directions, dtype=np.float64)
    coh2 = (D * D).sum(1)
    U = np.divide(D, np.sqrt(coh2)[:, None], out=np.zeros_like(D), where=coh2[:, None] > 0)
    units = U.copy()
    alive = coh2 > 0
    picks: list[SpanPick] = []
    explained = 0.0
    g = None if target is None else np.asarray(target, dtype=np.float64).copy()
    g_total = 0.0 if g is None else float(g @ g)
    if total <= 0 or not len(D) or (g is not None and g_total <= 0):
        return picks, 0.0 if total <= 0 else total / len(X)
    for _ in range(k):
        if total - explained <= 1e-9 * total or (g is not None and g @ g <= 1e-12 * g_total):
            break
        n2 = (U * U).sum(1)
        alive &= n2 > MIN_RESIDUAL ** 2
        if not alive.any():
            break
        P = X @ U.T                                    # (N, K): residual data on residual directions
        var = np.where(alive, (P * P).sum(0) / np.maximum(n2, 1e-300), 0.0)
        if g is not None:
            var = np.where(alive, (U @ g) ** 2 / np.maximum(n2, 1e-300), 0.0)
        score = np.where(alive, coh2 * var, -np.inf)
        p = int(np.argmax(score))
        u = U[p] / np.sqrt(n2[p])
        a = X @ u
        share = float(a @ a) / total
        explained += float(a @ a)
        pn = np.sqrt((P * P).sum(0))
        corr = np.divide(P.T @ a, pn * np.sqrt(a @ a), out=np.zeros(len(D)), where=pn > 0)
        align = units @ u
        joined = np.flatnonzero(alive & (corr >= tau) & (align >= NAME_MIN) & (np.arange(len(D)) != p))
        joined = joined[np.argsort(-score[joined], kind="stable")]
        members = [(p, 1)] + [(int(j), 1) for j in joined]
        along = None if g is None else float(g @ u)
        picks.append(SpanPick(p, share, u, members, {k: float(align[k]) for k, _ in members},
                              None if g is None else along ** 2 / g_total))
        alive[p] = False
        alive[joined] = False
        X -= np.outer(a, u)
        U -= np.outer(U @ u, u)
        if g is not None:
            g -= along * u
    return picks, total / len(X)


def head_shares(contributions: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """The split of the variance along ``direction`` of ``Σ_h contributions[:, h]`` over the heads:
    ``Cov(c_h·u, r·u) / Var(r·u)`` for each head (sums to 1; 0 everywhere when nothing varies)."""
    return head_shares_along(contributions, np.asarray(direction)[None])[0]


def head_shares_along(contributions: np.ndarray, directions: np.ndarray) -> list[np.ndarray]:
    """:func:`head_shares` for each of ``directions`` ``(k, d)``, in one pass over ``contributions``."""
    along = project_along(contributions, directions)
    return [variance_split(along[:, :, j]) for j in range(along.shape[2])]


def project_along(contributions: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """``contributions`` ``(N, S, d)`` projected on ``directions`` ``(k, d)``: ``(N, S, k)`` float64,
    converted a block of images at a time."""
    U = np.asarray(directions, dtype=np.float64).T                                            # (d, k)
    if not len(contributions):
        return np.zeros((0, contributions.shape[1], U.shape[1]))
    return np.concatenate([np.asarray(contributions[i:i + ROW_BLOCK], dtype=np.float64) @ U
                           for i in range(0, len(contributions), ROW_BLOCK)])


def variance_split(c: np.ndarray) -> np.ndarray:
    """:func:`head_shares` from the heads' projections ``c`` ``(N, S)`` (``c[:, h] = c_h·u``)."""
    c = np.asarray(c, dtype=np.float64)
    scale = float((c.sum(1) ** 2).sum())
    c = c - c.mean(0, keepdims=True)
    a = c.sum(1)
    var = float(a @ a)
    return (c.T @ a) / var if var > ZERO_VARIANCE_RTOL * scale else np.zeros(c.shape[1])


def random_set_p(shares: np.ndarray, k: int, observed: float, n: int = N_RANDOM_SETS, seed: int = 0) -> float:
    """The share of ``n`` random sets of ``k`` of the heads (``shares``: every head's split of a concept)
    whose summed share is at least ``observed``."""
    rng = np.random.default_rng(seed)
    draws = np.argsort(rng.random((n, len(shares))), axis=1)[:, :k]     # k distinct heads per draw
    return float((np.asarray(shares)[draws].sum(1) >= observed - 1e-12).mean())


def standardised_difference(values: np.ndarray, first: np.ndarray, second: np.ndarray) -> float | None:
    """``(mean(values[first]) − mean(values[second])) / std(values)``; None when a set is empty."""
    if not len(first) or not len(second):
        return None
    sd = float(np.std(values))
    return 0.0 if sd == 0 else float((values[first].mean() - values[second].mean()) / sd)


def correlation(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    d = float(np.sqrt((x @ x) * (y @ y)))
    return float(x @ y) / d if d > 0 else 0.0


# -- the diagnosis of an error pair ---------------------------------------------------------------

@dataclass
class Concept:
    """One diagnosed concept: a direction of the removed part, named by the pool's words.

    ``text`` names it (its word and near-duplicates); ``share`` is its share of the removed variance
    (additive over concepts); ``contrast`` the standardised difference of its activation between
    W and C (positive: the misclassified images carry more of it; None without both sets); ``push``
    its correlation with the removed part's push toward the wrong class; ``heads`` the heads writing at least
    :data:`HEAD_MIN_SHARE` of it (``head_shares``: every head's split, summing to 1);
    ``coverage`` the set's part of the concept's variance when the split is over all ``n_scope``
    heads in scope, and ``enrichment`` that coverage over the set's share of the heads: the split
    sums to 1 over the heads in scope, so a set of k heads drawn at random holds k / n_scope of any
    fixed concept on average (enrichment 1); ``p_random`` is the share of random sets of k heads in
    scope that hold at least as much of it (:data:`N_RANDOM_SETS` draws, a fixed seed). ``difference`` is the cosine between the concept's
    direction and the gap ``mean_W r − mean_C r`` (the covariance with the push when W or C is empty):
    its square is the concept's share of that gap (additive over concepts)."""

    text: str
    share: float
    heads: list[str]
    head_shares: dict[str, float]
    contrast: float | None
    push: float
    coverage: float | None = None    # the set's part of this concept among every head in scope
    n_scope: int = 0
    enrichment: float | None = None  # coverage / (|S| / n_scope)
    p_random: float | None = None    # share of random sets of |S| heads in scope with at least this coverage
    difference: float = 0.0          # (gap · u) / ||gap||: its part of the W − C gap (squares add up to ≤ 1)
    push_share: float = 0.0          # its share of the removed part's covariance with the push (additive)
    words: list[str] = field(default_factory=list)
    descriptions: list[str] = field(default_factory=list)
    direction: np.ndarray | None = field(default=None, repr=False)   # (d,) unit
    scope_split: np.ndarray | None = field(default=None, repr=False)  # (n_scope,) every head's split (coverage's)

    @property
    def side(self) -> str:
        """``"errors"`` when the misclassified images carry more of it (else ``"correct"``)."""
        return "errors" if (self.contrast if self.contrast is not None else self.push) >= 0 else "correct"

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "side": self.side, "share": self.share, "heads": list(self.heads),
                "head_shares": dict(self.head_shares), "contrast": self.contrast, "push": self.push,
                "coverage": self.coverage, "n_scope": self.n_scope, "enrichment": self.enrichment,
                "p_random": self.p_random,
                "difference": self.difference, "push_share": self.push_share,
                "words": list(self.words), "descriptions": list(self.descriptions)}


@dataclass
class PairDiagnosis:
    """The diagnosis of one error pair ``true → wrong`` for one head set."""

    true: str
    wrong: str
    sentence: str
    concepts: list[Concept]
    lead: list[int]                  # the concepts the sentence names
    class_concept: str               # what tells the classes apart in text space
    class_share: float               # its share of the removed variance beyond the lead concepts
    class_share_alone: float         # its share on its own
    unexplained: float               # 1 − Σ shares of the concepts listed
    sets: dict[str, int]
    notes: list[str] = field(default_factory=list)
    verdict: str = "none"            # "shortcut" (named, and the set holds the gap), "diffuse", "none"
    gap_coverage: float | None = None  # the set's part of the W − C gap among every head in scope
    gap_p_random: float | None = None  # share of random sets of as many heads holding as much of it
    n_scope: int = 0
    instead: int | None = None       # when the lead is what the errors lack: the concept they show instead

    @property
    def named(self) -> list[Concept]:
        """The concepts the sentence names (the lead, and what the errors show instead)."""
        return [self.concepts[i] for i in self.lead + ([self.instead] if self.instead is not None else [])]

    def to_dict(self) -> dict[str, Any]:
        return {"true": self.true, "wrong": self.wrong, "sentence": self.sentence, "verdict": self.verdict,
                "gap_coverage": self.gap_coverage, "gap_p_random": self.gap_p_random, "n_scope": self.n_scope,
                "instead": self.instead,
                "concepts": [c.to_dict() for c in self.concepts], "lead": list(self.lead),
                "class_concept": self.class_concept, "class_share": self.class_share,
                "class_share_alone": self.class_share_alone, "unexplained": self.unexplained,
                "sets": dict(self.sets), "notes": list(self.notes)}


@dataclass
class Diagnosis:
    """:func:`diagnose`'s answer for every error pair of an identification (first pair first)."""

    heads: list[HeadId]
    pairs: list[PairDiagnosis]
    n_images: int
    total_variance: float
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False)

    @property
    def sentence(self) -> str:
        return " ".join(p.sentence for p in self.pairs)

    @property
    def concepts(self) -> list[Concept]:
        return self.pairs[0].concepts if self.pairs else []

    def to_dict(self) -> dict[str, Any]:
        return {"sentence": self.sentence, "concepts": [c.to_dict() for c in self.concepts],
                "heads": [str(h) for h in self.heads], "n_images": self.n_images,
                "total_variance": self.total_variance, "pairs": [p.to_dict() for p in self.pairs]}


def _names(vocab: ConceptVocabulary, pick: SpanPick, n: int = 3) -> list[str]:
    """The pick's name: its own word and its near-duplicates, most prominent first."""
    return [vocab.labels[k] for k, _ in pick.members][:n]


def _descriptions(vocab: ConceptVocabulary, pole: list[str], direction: np.ndarray, n: int = 3) -> list[str]:
    """The descriptions of the pole's leading concept best aligned with the pole's direction."""
    if not pole:
        return []
    rows = vocab.members[vocab.labels.index(pole[0])]
    order = rows[np.argsort(-(vocab.units[rows] @ direction), kind="stable")]
    return [vocab.texts[j] for j in order[:n]]


def class_concepts(vocab: ConceptVocabulary, text: np.ndarray, true: int, wrong: int, classes: Sequence[str],
                   n: int = 3) -> list[int]:
    """The concepts best aligned, in text space, with ``t_true − t_wrong`` (coherence-weighted; at most
    ``n``, each at least half as aligned as the first), leaving out words that name a class: what the
    text tower says separates the two classes."""
    delta = np.asarray(text[true], dtype=np.float64) - np.asarray(text[wrong], dtype=np.float64)
    norm = np.linalg.norm(delta)
    if norm == 0 or not len(vocab):
        return []
    names = {w for c in classes for w in content_words(c)}   # every class: names are labels, not attributes
    align = vocab.directions @ (delta / norm)
    order = [int(k) for k in np.argsort(-align, kind="stable") if align[k] > 0
             and not any(w in names or any(w.startswith(x) or x.startswith(w) for x in names)
                         for w in vocab.words[k])]
    return [k for k in order[:n] if align[k] >= 0.5 * align[order[0]]]


def _residual_share(X: np.ndarray, total: float, direction: np.ndarray, basis: list[np.ndarray]) -> float:
    v = np.asarray(direction, dtype=np.float64).copy()
    for u in basis:
        v -= (v @ u) * u
    n = np.linalg.norm(v)
    if n <= MIN_RESIDUAL * np.linalg.norm(direction) or total <= 0:
        return 0.0
    a = X @ (v / n)
    return float(a @ a) / (total * len(X))


def diagnose_removed(removed: np.ndarray, contributions: np.ndarray, heads: Sequence[HeadId],
                     vocab: ConceptVocabulary, text: np.ndarray, classes: Sequence[str],
                     pairs: Sequence[tuple[int, int, np.ndarray, np.ndarray]], k: int = 8, tau: float = TAU,
                     scope: np.ndarray | None = None, in_scope: np.ndarray | None = None,
                     subject: str = "the removed heads") -> tuple[list[PairDiagnosis], float]:
    """The diagnosis from arrays: ``removed`` ``(N, d)`` the removed part on the images,
    ``contributions`` ``(N, |S|, d)`` each head's part of it, ``pairs`` ``(true, wrong, W, C)``
    with ``W``/``C`` positions in those ``N`` rows; ``scope`` ``(N, K, d)`` every head in scope and
    ``in_scope`` the set's positions among them (for the coverage). :func:`diagnose` is the
    cache-level entry point."""
    X = np.asarray(removed, dtype=np.float64)
    X = X - X.mean(0, keepdims=True)
    total = float((X * X).sum()) / max(len(X), 1)
    spans: dict[tuple[int, int], tuple] = {}
    out = []
    for true, wrong, W, C in pairs:
        key = (min(true, wrong), max(true, wrong))
        if key not in spans:            # the pair's class direction is projected out of the concepts first
            spans[key] = _span_beyond_classes(X, contributions, vocab, text, key[0], key[1], k, tau, scope, in_scope)
        picks, shares_by_pick, splits, coverage, p_random = spans[key]
        push_dir = np.asarray(text[wrong], dtype=np.float64) - np.asarray(text[true], dtype=np.float64)
        push = X @ push_dir
        W, C = np.asarray(W, dtype=np.int64), np.asarray(C, dtype=np.int64)
        # what separates the errors from the correct images in the removed part (else: what pushes to ŷ)
        gap = X[W].mean(0) - X[C].mean(0) if len(W) and len(C) else X.T @ (push - push.mean()) / len(X)
        gap_norm = float(np.linalg.norm(gap))
        concepts: list[Concept] = []
        for p, hs, split, cov, p_rand in zip(picks, shares_by_pick, splits, coverage, p_random):
            a = X @ p.direction
            names = _names(vocab, p)
            order = np.argsort(-hs, kind="stable")
            carriers = [str(heads[i]) for i in order if hs[i] >= HEAD_MIN_SHARE] or [str(heads[order[0]])]
            concepts.append(Concept(
                text=" / ".join(names), share=p.share, heads=carriers,
                head_shares={str(heads[i]): float(hs[i]) for i in order},
                contrast=standardised_difference(a, W, C), push=correlation(a, push), coverage=cov,
                n_scope=0 if scope is None else scope.shape[1],
                enrichment=None if cov is None else cov * scope.shape[1] / len(heads), p_random=p_rand,
                difference=float(p.direction @ gap) / gap_norm if gap_norm > 0 else 0.0,
                push_share=p.target_share or 0.0,
                words=names, descriptions=_descriptions(vocab, names, p.direction), direction=p.direction,
                scope_split=split))
        held = None
        if scope is not None:           # the control: the same gap in every head of the scope, split over heads
            Xs = scope.sum(1, dtype=np.float64)
            Xs -= Xs.mean(0, keepdims=True)
            push_s = Xs @ push_dir
            gap_s = Xs[W].mean(0) - Xs[C].mean(0) if len(W) and len(C) else Xs.T @ (push_s - push_s.mean())
            if np.linalg.norm(gap_s) > 0:
                split = head_shares(scope, gap_s / np.linalg.norm(gap_s))
                cov = float(split[in_scope].sum())
                held = (cov, random_set_p(split, len(in_scope), cov), scope.shape[1], len(in_scope))
        out.append(_pair_diagnosis(X, total, concepts, vocab, text, classes, true, wrong, len(W), len(C), held,
                                   subject))
    return out, total


def _span_beyond_classes(X: np.ndarray, contributions: np.ndarray, vocab: ConceptVocabulary, text: np.ndarray,
                         true: int, wrong: int, k: int, tau: float, scope: np.ndarray | None,
                         in_scope: np.ndarray | None) -> tuple:
    """:func:`concept_span` over the concept directions with the classes' text difference projected
    out, each pick's split over the set's heads and over every head in scope, its coverage in scope and
    ``p_random``."""
    delta = np.asarray(text[true], dtype=np.float64) - np.asarray(text[wrong], dtype=np.float64)
    D = np.asarray(vocab.directions, dtype=np.float64)
    if np.linalg.norm(delta) > 0:
        delta /= np.linalg.norm(delta)
        D = D - np.outer(D @ delta, delta)
    push = X @ -delta if np.linalg.norm(delta) > 0 else X[:, 0] * 0   # the removed part's push toward ``wrong``
    picks, _ = concept_span(X, D, k, tau, target=X.T @ (push - push.mean()) / len(X))
    directions = np.array([p.direction for p in picks]).reshape(len(picks), -1)
    if scope is None:
        shares_by_pick, splits = head_shares_along(contributions, directions), [None] * len(picks)
    else:                               # one projection of every head in scope serves both splits
        along = project_along(scope, directions)
        splits = [variance_split(along[:, :, j]) for j in range(len(picks))]
        shares_by_pick = [variance_split(along[:, in_scope, j]) for j in range(len(picks))]
    coverage = [None if sp is None else float(sp[in_scope].sum()) for sp in splits]
    p_random = [None if sp is None else random_set_p(sp, len(in_scope), cov) for sp, cov in zip(splits, coverage)]
    return picks, shares_by_pick, splits, coverage, p_random


def _share_text(p: float) -> str:
    return f"none of {N_RANDOM_SETS}" if p == 0 else f"{p:.1%}" if p < 0.01 else f"{p:.0%}"


def _pair_diagnosis(X: np.ndarray, total: float, concepts: list[Concept], vocab: ConceptVocabulary,
                    text: np.ndarray, classes: Sequence[str], true: int, wrong: int, n_w: int, n_c: int,
                    held: tuple[float, float, int, int] | None = None, subject: str = "the removed heads"
                    ) -> PairDiagnosis:
    y, yhat = classes[true], classes[wrong]
    notes = []
    oriented = n_w > 0 and n_c > 0
    if not oriented:
        notes.append(f"W has {n_w} and C {n_c} images among the labelled samples: no contrast between the "
                     f"misclassified and the correct images; the concepts stand on their push toward {yhat} alone.")
    # the lead: of the first concepts (ranked by their share of the push toward ŷ), one that goes with
    # that push (correlation at least PUSH_MIN) and carries at least half the push of any such concept;
    # else the strongest one going against it (the errors lack it), with what goes with the push instead
    top = [(i, c) for i, c in enumerate(concepts[:LEAD_FROM]) if abs(c.push) >= PUSH_MIN]
    best = max((c.push_share for _, c in top), default=0.0)
    toward = [i for i, c in top if c.push > 0 and c.push_share >= 0.5 * best]
    lead = (toward or [i for i, _ in top])[:1]
    instead = None
    if lead and concepts[lead[0]].push < 0:
        instead = next((i for i, c in enumerate(concepts) if c.push >= PUSH_MIN), None)
    cls = class_concepts(vocab, text, true, wrong, classes)
    cls_label = " / ".join(vocab.labels[k] for k in cls)
    cls_alone = cls_resid = 0.0
    if cls:
        d = vocab.directions[cls].sum(0)
        cls_alone = _residual_share(X, total, d, [])
        cls_resid = _residual_share(X, total, d, [concepts[i].direction for i in lead])
    unexplained = 1.0 - sum(c.share for c in concepts)
    verdict = "none"
    if not concepts:
        sentence = f"{y} → {yhat}: {subject} do not vary over these images, so there is nothing to name."
    elif lead:
        c = concepts[lead[0]]
        toward_wrong = c.push > 0
        why = (f"{c.push_share:.0%} of what pushes {y} images toward {yhat}" if toward_wrong else
               f"{c.push_share:.0%} of the push, away from {yhat}")
        if c.contrast is not None and abs(c.contrast) >= CONTRAST_MIN:
            why += (f"; the misclassified {y} images carry {'more' if c.contrast > 0 else 'less'} of it than the "
                    f"correct ones")
        if instead is not None:
            why += f"; what pushes them toward {yhat} is {concepts[instead].text}"
        sentence = f"{y} → {yhat}: {subject} carry {c.text} ({c.share:.0%} of their variance, {why})"
        if cls_label:
            sentence += (f", not {cls_label} ({cls_resid:.0%})." if cls_resid < 0.5 * c.share
                         else f", and also {cls_label} ({cls_resid:.0%}), which tells the classes apart.")
        else:
            sentence += "."
        verdict = "shortcut"
        if held is not None:
            cov, p, n_scope, k = held
            pinned = p <= P_RANDOM_MAX
            verdict = "shortcut" if pinned else "diffuse"
            what = "separates the misclassified images from the correct ones" if oriented else \
                f"pushes {y} images toward {yhat}"
            these, sets = ("this head holds", "random single heads") if k == 1 else \
                (f"these {k} hold", f"random sets of {k} heads")
            sentence += (f" Of what {what} in the {n_scope} heads in scope, {these} {cov:.0%}; "
                         + ((f"none of {N_RANDOM_SETS} {sets} holds as much." if p == 0 else
                             f"only {_share_text(p)} of {sets} hold as much.")
                            if pinned else f"{_share_text(p)} of {sets} hold as much: the set "
                                           f"does not pin the shortcut down."))
    else:
        c = concepts[0]
        sentence = (f"{y} → {yhat}: {subject} carry mostly {c.text} ({c.share:.0%} of their variance), "
                    f"which hardly goes with their push toward {yhat}: no clear shortcut in these heads.")
    return PairDiagnosis(y, yhat, sentence, concepts, lead, cls_label, cls_resid, cls_alone, unexplained,
                         {"W": n_w, "C": n_c}, notes, verdict, None if held is None else held[0],
                         None if held is None else held[1], 0 if held is None else held[2], instead)


def diagnosis_rows(cache: Any, ident: Identification, engine: AblationEngine, max_rows: int = MAX_ROWS
                   ) -> np.ndarray:
    """The images a diagnosis looks at: the labelled samples of the pair's classes and the unlabelled
    adaptation images predicted as one of them (never the evaluation images); beyond ``max_rows``,
    a random subset of the unlabelled ones (seeded by the protocol's seed)."""
    classes = ident.target_classes
    samples = ident.sample_rows[np.isin(cache.labels[ident.sample_rows], classes)]
    adapt = np.setdiff1d(ident.adapt_rows[np.isin(engine.base_predictions[ident.adapt_rows], classes)], samples)
    room = max(max_rows - len(samples), 0)
    if len(adapt) > room:
        adapt = np.random.default_rng(ident.config.seed).choice(adapt, room, replace=False)
    return np.union1d(samples, adapt)


def project_rows(engine: AblationEngine, rows: np.ndarray, direction: np.ndarray,
                 heads: Sequence[HeadId] | None = None, block: int = ROW_BLOCK) -> np.ndarray:
    """``c_h(x)·u`` in float64 for ``rows`` and ``heads`` (default every head in scope): ``(n, |heads|)``,
    or ``(n, |heads|, k)`` for ``k`` directions ``(d, k)``; read and projected ``block`` images' worth of
    every head's contributions at a time (fewer heads, more images per read)."""
    rows = np.asarray(rows, dtype=np.int64)
    u = np.asarray(direction, dtype=np.float64)
    n_heads = engine.n_flat if heads is None else len(heads)
    step = max(block, block * engine.n_flat // max(n_heads, 1))
    out = np.empty((len(rows), n_heads) + u.shape[1:])
    for i in range(0, len(rows), step):
        out[i:i + step] = engine.contributions(rows[i:i + step], heads).astype(np.float64) @ u
    return out


def diagnose(cache: Any, ident: Identification, vocab: ConceptVocabulary, heads: Sequence[HeadId] | None = None,
             engine: AblationEngine | None = None, k: int = 8, tau: float = TAU) -> Diagnosis:
    """Name what removing ``heads`` (default: the identification's) takes out of the embedding,
    for every error pair of ``ident`` (see the module docstring)."""
    engine = engine or make_engine(cache)
    subject, fallback = "the removed heads", None
    if heads is None and not ident.heads:     # no prefix beat removing nothing: explain the most suspected heads
        ranked = ident.selection.candidates.get(ident.selection.score or "") or next(
            iter(ident.selection.candidates.values()), [])
        heads = list(ranked[: ident.config.top_t])
        if heads:
            subject = f"the {len(heads)} top-ranked heads"
            fallback = (f"No head set beat removing nothing on the labelled samples, so none is removed; this explains "
                        f"the {len(heads)} heads the ranking suspects most instead.")
    heads = list(ident.heads if heads is None else heads)
    rows = diagnosis_rows(cache, ident, engine)
    if not heads or not len(rows):
        why = "no heads are removed, so there is nothing to explain" if not heads else "no images to look at"
        pairs = [PairDiagnosis(cache.classes[a], cache.classes[b], f"{cache.classes[a]} → {cache.classes[b]}: {why}.",
                               [], [], "", 0.0, 0.0, 1.0, ident.sets[_key(cache, a, b)].sizes())
                 for a, b in ident.pairs]
        return Diagnosis(heads, pairs, len(rows), 0.0, rows)
    scope = engine.contributions(rows)
    in_scope = engine.flat_index(heads)
    contributions = scope[:, in_scope]
    removed = contributions.sum(1, dtype=np.float64)
    position = {int(r): i for i, r in enumerate(rows)}
    pair_sets = []
    for a, b in ident.pairs:
        s: ErrorSets = ident.sets[_key(cache, a, b)]
        pair_sets.append((a, b, np.array([position[int(r)] for r in s.W], dtype=np.int64),
                          np.array([position[int(r)] for r in s.C], dtype=np.int64)))
    pairs, total = diagnose_removed(removed, contributions, heads, vocab, cache.text, cache.classes, pair_sets, k, tau,
                                    scope, in_scope, subject)
    for p in pairs:
        if fallback:
            p.notes.insert(0, fallback)
        p.notes.append(f"Measured on {len(rows)} images (labelled samples and unlabelled adaptation images of the "
                       f"pair's classes; no evaluation image).")
    return Diagnosis(heads, pairs, len(rows), total, rows)


def _key(cache: Any, a: int, b: int) -> str:
    return f"{cache.classes[a]}→{cache.classes[b]}"


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


# -- evidence for a head and for a known truth ----------------------------------------------------

@dataclass
class HeadEvidence:
    """What one head has to do with a diagnosis: its share of each diagnosed concept among every
    head in scope (``shares``, the first pair's concepts in order), the concept it writes most of
    (``concept``), and its contribution along that concept per image group (``profile``:
    ``{group: (mean, sd, n)}`` over every cached image of the pair's classes)."""

    head: HeadId
    in_set: bool
    shares: list[float]
    concept: Concept | None
    share: float
    profile: dict[str, tuple[float, float, int]]


def head_evidence(cache: Any, diagnosis: Diagnosis, engine: AblationEngine, head: HeadId,
                  classes: Sequence[int]) -> HeadEvidence:
    """:class:`HeadEvidence` of ``head`` for ``diagnosis`` (its shares are the concepts' splits over
    every head in scope, kept by :func:`diagnose`; the profile on every image of ``classes``)."""
    concepts = diagnosis.concepts
    k = int(engine.flat_index([head])[0])
    shares = [float(c.scope_split[k]) for c in concepts if c.scope_split is not None]
    if not shares or len(shares) < len(concepts):
        return HeadEvidence(head, head in diagnosis.heads, [], None, 0.0, {})
    best = int(np.argmax(np.asarray(shares) * np.asarray([c.share for c in concepts])))
    rows = np.flatnonzero(np.isin(cache.labels, list(classes)))
    values = project_rows(engine, rows, concepts[best].direction, [head])[:, 0]
    groups = [cache.records[r].group or cache.classes[cache.labels[r]] for r in rows]
    return HeadEvidence(head, head in diagnosis.heads, shares, concepts[best], shares[best],
                        group_profile(values, groups))


def group_profile(values: np.ndarray, groups: Sequence[str]) -> dict[str, tuple[float, float, int]]:
    """``{group: (mean, standard deviation, count)}`` of ``values`` (groups in first-seen order)."""
    values = np.asarray(values, dtype=np.float64)
    out: dict[str, tuple[float, float, int]] = {}
    for g in dict.fromkeys(groups):
        v = values[[i for i, x in enumerate(groups) if x == g]]
        out[g] = (float(v.mean()), float(v.std()), int(len(v)))
    return out


def separation_auc(values: np.ndarray, positive: np.ndarray) -> float:
    """How well ``values`` separate two kinds of images, direction-free: max(AUC, 1 − AUC) of
    the Mann-Whitney statistic (0.5 = no separation, 1 = perfect); NaN without both kinds."""
    values, positive = np.asarray(values, dtype=np.float64), np.asarray(positive, dtype=bool)
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if not n1 or not n0:
        return float("nan")
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    sorted_v = values[order]
    i = 0
    while i < len(values):                               # average ranks over ties
        j = i
        while j + 1 < len(values) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    auc = (ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)
    return float(max(auc, 1 - auc))


# -- one call for the CLI, the report and notebooks -------------------------------------------------

def load_vocabulary(loaded: Any, pool_path: Any = None, cache_path: Any = None) -> ConceptVocabulary:
    """The concept vocabulary of a text pool (default: the shipped one) embedded by ``loaded``;
    the pool's embeddings are cached in ``cache_path`` (default: the studio home's ``text-pools``)."""
    from .textspan import embedded_text_pool

    return concept_vocabulary(*embedded_text_pool(loaded, pool_path, cache_path))


def attribute_direction(loaded: Any, side_a: Sequence[str], side_b: Sequence[str]) -> np.ndarray:
    """:func:`phrase_direction` of two lists of typed phrases, embedded by ``loaded``."""
    from ..features.zeroshot import encode_texts

    a, b = [p.strip() for p in side_a if p.strip()], [p.strip() for p in side_b if p.strip()]
    if not a or not b:
        raise RefineClipError("Give at least one phrase on each side (e.g. 'on water' and 'on land').")
    return phrase_direction(encode_texts(loaded, a).numpy(), encode_texts(loaded, b).numpy())


def summary_lines(diagnosis: Diagnosis, n_concepts: int = 5) -> list[str]:
    """The diagnosis for people: each pair's sentence, then its ranked concepts (share of the removed
    variance, W-vs-C contrast, coverage, carrying heads)."""
    lines = []
    for p in diagnosis.pairs:
        lines.append(p.sentence)
        for i, c in enumerate(p.concepts[:n_concepts], start=1):
            contrast = "–" if c.contrast is None else f"{c.contrast:+.2f} sd"
            cover = "" if c.coverage is None else (f", {c.coverage:.0%} of it in scope ({_share_text(c.p_random)} of "
                                                   f"random sets hold as much)")
            lines.append(f"  {i}. {c.text}: {c.share:.0%} of the removed variance, errors vs correct "
                         f"{contrast}{cover}; heads {', '.join(c.heads)}")
        if p.class_concept:
            lines.append(f"  What tells {p.true} from {p.wrong} in text: {p.class_concept} "
                         f"({p.class_share_alone:.0%} of the removed variance alone, {p.class_share:.0%} beyond "
                         f"the lead concept)")
    return lines

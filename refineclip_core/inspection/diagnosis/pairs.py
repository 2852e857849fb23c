"""The diagnosis of an error pair: concepts of the removed part, the sentence, the random-set control."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ...features.decomposition import HeadId
from ...method.ablation import AblationEngine
from ...method.errorsets import ErrorSets
from ...method.protocol import Identification, make_engine
from ..textspan import MIN_RESIDUAL
from .concepts import ConceptVocabulary, content_words
from .span import (N_RANDOM_SETS, ROW_BLOCK, TAU, SpanPick, concept_span, correlation, head_shares, head_shares_along,
                   project_along, random_set_p, standardised_difference, variance_split)

P_RANDOM_MAX = 0.05
"""The shortcut is pinned on the removed heads when at most this share of random head sets of the
same size (from the heads in scope) hold as much of the gap between the misclassified and the
correct images: the control built into the verdict. The gap is measured in the sum of every head
in scope, so its direction does not depend on the set being tested."""

MAX_ROWS = 2048
"""The most images a diagnosis reads: every labelled sample of the pair's classes, and a seeded random
subset of the unlabelled images predicted as them when there are more (every head's contribution is
read for these images: 2,048 × 64 heads × 768 floats is 400 MB for a ViT-L/14's last 4 layers)."""

LEAD_FROM = 5
"""The sentence names one of the first this many concepts (by their share of the push)."""

CONTRAST_MIN = 0.5
"""The sentence says the misclassified images carry more (or less) of a concept than the correct ones
when its activation differs by at least this many standard deviations."""

PUSH_MIN = 0.3
"""A concept can lead the sentence when its activation correlates with the removed part's push
toward the wrong class at least this much (in absolute value)."""

HEAD_MIN_SHARE = 0.1
"""A head is listed as carrying a concept when it writes at least this share of its variance."""


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
                               [], [], "", 0.0, 0.0, 1.0, ident.sets[(a, b)].sizes())
                 for a, b in ident.pairs]
        return Diagnosis(heads, pairs, len(rows), 0.0, rows)
    scope = engine.contributions(rows)
    in_scope = engine.flat_index(heads)
    contributions = scope[:, in_scope]
    removed = contributions.sum(1, dtype=np.float64)
    position = {int(r): i for i, r in enumerate(rows)}
    pair_sets = []
    for a, b in ident.pairs:
        s: ErrorSets = ident.sets[(a, b)]
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


def summary_lines(diagnosis: Diagnosis, n_concepts: int = 5) -> list[str]:
    """The diagnosis for people: each pair's sentence, then its ranked concepts (share of the removed
    variance, W-vs-C contrast, coverage, carrying heads)."""
    lines = []
    for p in diagnosis.pairs:
        lines.append(p.sentence)
        if p.concepts:
            lines.append(f"  Concepts, ranked by their share of the push toward {p.wrong}:")
        for i, c in enumerate(p.concepts[:n_concepts], start=1):
            contrast = "–" if c.contrast is None else f"{c.contrast:+.2f} sd"
            cover = "" if c.coverage is None else (f", {c.coverage:.0%} of it in scope ({_share_text(c.p_random)} of "
                                                   f"random sets hold as much)")
            lines.append(f"  {i}. {c.text}: {c.push_share:.0%} of the push toward {p.wrong} (correlation "
                         f"{c.push:+.2f}), {c.share:.0%} of the removed variance, errors vs correct "
                         f"{contrast}{cover}; heads {', '.join(c.heads)}")
        if p.class_concept:
            lines.append(f"  What tells {p.true} from {p.wrong} in text: {p.class_concept} "
                         f"({p.class_share_alone:.0%} of the removed variance alone, {p.class_share:.0%} beyond "
                         f"the lead concept)")
    return lines

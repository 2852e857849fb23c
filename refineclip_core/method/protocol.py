"""The RefineCLIP protocol end to end on a feature cache: identify (§3.2) then refine (§3.3).

This is the one place that decides *which rows* each step sees, so the CLI, the dashboard,
the benchmark and the reproduction harness all follow the same protocol:

* **fit rows**: where the few labelled samples are drawn from (split ``val``, else ``train``,
  else every row); ``samples_per_class`` rows of each class of the error pair(s) are drawn
  with ``seed`` (the paper uses 10); ``None`` uses all fit rows of those classes.
* **evaluation rows** (held-out images): split ``test`` if present; else, *before anything is
  sampled*, a seeded ``holdout`` share of every stratum (class × group; the class alone for images
  without a group), at least one image of each stratum and, when it has two or more, at least one
  left for sampling (:func:`stratified_holdout`). The labelled samples are then drawn from the
  rest, so they never use up a group, and the guard (:mod:`refineclip_core.edit.guard`) sees every
  group of the edited classes. :func:`heldout_counts` tells which group holds fewer than
  ``min_heldout`` (say so with the numbers). Images used to choose heads or fit an edit are never
  in the reported accuracies.
* **adaptation rows**: every other row (the samples included). RefineCLIP-fit
  (:mod:`~refineclip_core.edit.fit`) learns the deployable edit on them *without their
  labels*, and mean ablation uses their mean head contributions.

The defaults (:data:`DEFAULT_PROTOCOL`, :data:`DEFAULT_EDIT`) are what the CLI, the dashboard,
the benchmark and the reproduction harness use; they were chosen by the multi-draw benchmark
on the demo world (development seeds of ``benchmarks/edit_variants.py``; ``docs/edit.md``): both
directions of the error pair, heads ranked by how often the consensus of the four scores chose them on
20 bootstrap resamples of the labelled images (top 15; issue 23 item 6) with the prefix chosen by the
utility of the ablation that is applied (mean ablation), and RefineCLIP-fit. The
paper's own choices stay one setting away (:data:`PAPER_PROTOCOL`, :data:`PAPER_EDIT`: the largest
pair, Algorithm 1 over top-15 lists, zero ablation, diag(θ) by Eq. 13).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Sequence, get_args

import numpy as np

from ..errors import RefineClipError
from ..features.cache import FeatureCache
from ..features.decomposition import HeadId
from .ablation import MODES, AblationEngine, Mode
from .errorsets import ClassPair, ErrorPair, SetTable, error_pairs, pair_error_sets, sample_per_class
from .evaluation import rows_mask
from .scores import SCORE_NAMES, ScoreKey, ScoreTable, Similarity, compute_scores
from .selection import Selection, choose_heads, select_consensus, select_heads, select_stable
from .stability import RESAMPLES, head_stability

SelectionRule = Literal["stable", "consensus", "alg1"]
SELECTION_RULES: tuple[str, ...] = get_args(SelectionRule)


@dataclass(frozen=True)
class ProtocolConfig:
    """Which rows, which error pair(s), how heads are chosen and removed; see the module docstring."""

    pair: str = "both"                 # "auto" (largest), "both" (auto pair and its reverse), "TRUE:PRED"
    samples_per_class: int | None = 10
    seed: int = 0
    top_t: int = 15                    # longest head set considered (the paper's T)
    similarity: Similarity = "cosine"
    selection: SelectionRule = "stable"      # "stable" (selection.select_stable), "consensus" or "alg1" (paper)
    ablation: Mode = "mean"            # how the chosen heads are removed: "mean" or "zero" (paper Eq. 5)
    fit_split: str | None = "auto"     # "auto": val, else train, else all rows
    eval_split: str | None = "auto"    # "auto": test, else a held-out share of every class × group
    holdout: float = 0.5               # that share (no test split); the rest adapts the edit, unlabelled
    resamples: int = RESAMPLES         # bootstrap resamples of the labelled images the choice is repeated on
    min_heldout: int = 10              # fewest held-out images per group of the edited classes (a check)

    def __post_init__(self) -> None:
        if self.selection not in SELECTION_RULES:
            raise RefineClipError(f"Unknown head selection {self.selection!r}; use stable, consensus or alg1.")
        if self.ablation not in MODES:
            raise RefineClipError(f"Unknown ablation {self.ablation!r}; use {' or '.join(MODES)}.")
        if not 0.0 < self.holdout < 1.0:
            raise RefineClipError(f"holdout must be between 0 and 1 (exclusive), got {self.holdout}.")
        if not 0 <= self.resamples <= 1000:
            raise RefineClipError(f"resamples must be between 0 and 1000, got {self.resamples}.")
        if self.min_heldout < 1:
            raise RefineClipError(f"min_heldout must be at least 1, got {self.min_heldout}.")

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_PROTOCOL = ProtocolConfig()
"""The protocol every entry point uses unless told otherwise (see the module docstring)."""

PAPER_PROTOCOL = ProtocolConfig(pair="auto", top_t=15, selection="alg1", ablation="zero", resamples=0)
"""The paper's choices: the largest error pair, Algorithm 1 over top-15 lists (T = 15), zero ablation (Eq. 5);
no resampling of the labelled images (the paper has none, and Alg. 1 on 20 resamples costs 8 consensus runs)."""


@dataclass
class Identification:
    """Phase 1's outcome: the samples, the sets, every score and Alg. 1's choice."""

    config: ProtocolConfig
    pairs: list[tuple[int, int]]
    sample_rows: np.ndarray
    eval_rows: np.ndarray
    sets: SetTable                        # by ClassPair (or (a, b), or its text "true→pred") -> sets among the samples
    scores: ScoreTable                    # by ScoreKey or its text, str(key): "DE_A" (single pair) or "DE_A[a→b]"
    selection: Selection
    base_predictions: np.ndarray
    adapt_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def heads(self) -> list[HeadId]:
        return self.selection.heads

    def ablation_engine(self, engine: AblationEngine) -> AblationEngine:
        """``engine`` with its mean-ablation features taken over the adaptation rows."""
        return engine.with_mean_rows(self.adapt_rows)

    @property
    def eval_mask(self) -> np.ndarray:
        """The evaluation rows as a mask over every cached row."""
        return rows_mask(len(self.base_predictions), self.eval_rows)

    @property
    def target_classes(self) -> list[int]:
        """The classes of the error pair(s): the edited classes (Tables 1-3), the rest is locality (Fig. 2)."""
        return pair_classes(self.pairs)


def pair_classes(pairs: Sequence[tuple[int, int]]) -> list[int]:
    """The classes the error pair(s) involve, sorted."""
    return sorted({c for p in pairs for c in p})


def _split_rows(cache: FeatureCache, split: str | None, prefer: Sequence[str]) -> np.ndarray | None:
    splits = set(cache.splits.tolist()) - {""}
    if split == "auto":
        split = next((s for s in prefer if s in splits), None)
    if split is None:
        return None
    rows = np.flatnonzero(cache.splits == split)
    if not len(rows):
        raise RefineClipError(f"No cached images in split '{split}' (splits present: {sorted(splits) or 'none'}).")
    return rows


@dataclass(frozen=True)
class PairSpec:
    """The pair grammar, read in one place for the CLI, the protocol and every page: ``auto`` (the
    largest error pair), ``both`` (it and its reverse) or ``TRUE:PRED[,TRUE:PRED...]`` (class names
    or indices; :func:`pair_spec` writes one pair back)."""

    automatic: bool                      # "auto" or "both": the pair follows the model's errors
    both_directions: bool                # "both", or several explicit pairs (as the Errors page writes both)
    items: tuple[tuple[str, str], ...]   # the explicit (true, predicted) texts; empty when automatic

    @classmethod
    def parse(cls, spec: str) -> "PairSpec":
        if spec in ("auto", "both"):
            return cls(True, spec == "both", ())
        items = []
        for item in spec.split(","):
            if ":" not in item:
                raise RefineClipError(
                    f"--pair takes TRUE:PRED (class names or indices), 'auto' or 'both'; got {spec!r}.")
            a, b = item.split(":", 1)
            items.append((a.strip(), b.strip()))
        return cls(False, len(items) > 1, tuple(items))

    def label(self) -> str:
        """``"waterbird → landbird, landbird → waterbird"`` (as typed; indices stay indices)."""
        if self.automatic:
            return "largest pair, both directions" if self.both_directions else "largest error pair"
        return ", ".join(f"{a} → {b}" for a, b in self.items)


def resolve_pairs(spec: str, pairs_ranked: list[ErrorPair], classes: list[str]) -> list[tuple[int, int]]:
    """A :class:`PairSpec` text into class-index pairs (``auto``/``both`` read ``pairs_ranked``)."""
    parsed = PairSpec.parse(spec)
    if parsed.automatic:
        if not pairs_ranked:
            raise RefineClipError("The model makes no errors on these images: there is no error pair to explain.")
        top = pairs_ranked[0]
        return [(top.true, top.pred)] + ([(top.pred, top.true)] if parsed.both_directions else [])

    def idx(x: str) -> int:
        if x in classes:
            return classes.index(x)
        if x.isdigit() and int(x) < len(classes):
            return int(x)
        raise RefineClipError(f"Unknown class {x!r}; classes are {', '.join(classes)}.")

    out = []
    for a, b in parsed.items:
        ia, ib = idx(a), idx(b)
        if ia == ib:
            raise RefineClipError("An error pair needs two different classes.")
        if (ia, ib) not in out:
            out.append((ia, ib))
    return out


def pair_spec(true: int, pred: int, classes: list[str]) -> str:
    """The ``TRUE:PRED`` text of one pair that :func:`resolve_pairs` reads back unambiguously
    (class names, or indices when a name contains ':' or ',', has outer spaces or looks like an index)."""
    a, b = classes[true], classes[pred]
    if any(":" in n or "," in n or n != n.strip() or n.isdigit() for n in (a, b)):
        return f"{true}:{pred}"
    return f"{a}:{b}"


def make_engine(cache: FeatureCache) -> AblationEngine:
    return AblationEngine(cache.embeddings, cache.heads, cache.text, cache.manifest.layers)


def identify(cache: FeatureCache, cfg: ProtocolConfig = DEFAULT_PROTOCOL, engine: AblationEngine | None = None
             ) -> Identification:
    """Phase 1: sample, build W/C/A, score every head (Eq. 6-9) and pick heads (stable, consensus or Alg. 1);
    the rule is repeated on ``cfg.resamples`` bootstrap resamples of the labelled images and how often each
    head was chosen is ``selection.stability`` (the ``stable`` rule ranks heads by it)."""
    engine = engine or make_engine(cache)
    labels = cache.labels
    pred = engine.base_predictions
    ev, fit = evaluation_and_fit_rows(cache, cfg)
    pairs = resolve_pairs(cfg.pair, error_pairs(pred, labels, fit), cache.classes)
    classes_needed = pair_classes(pairs)
    if cfg.samples_per_class is None:
        samples = fit[np.isin(labels[fit], classes_needed)]
    else:
        samples = sample_per_class(labels, cfg.samples_per_class, cfg.seed, fit, classes_needed)
    if not len(samples):
        raise RefineClipError("No labelled samples of the error pair's classes among the fitting images "
                              f"(every image of {', '.join(cache.classes[c] for c in classes_needed)} is held out "
                              "for evaluation or in another split); add images or lower --holdout.")
    ev = np.setdiff1d(ev, samples)                     # only when the fitting split overlaps the evaluation one
    adapt = np.setdiff1d(np.arange(len(labels)), ev)
    sets, scores = pair_scores(cache, pred, pairs, samples, cfg.similarity)
    # the utility (Eq. 10) measures the ablation the protocol applies: mean ablation with the means over
    # the adaptation rows, as the Ablate page and the exported edit use them (Identification.ablation_engine)
    judge = engine.with_mean_rows(selection_mean_rows(adapt, cfg.seed)) if cfg.ablation == "mean" else engine
    rule = "consensus" if cfg.selection == "stable" else cfg.selection

    on_samples, sample_labels = judge.subset(samples), labels[samples]     # one read of their contributions

    def choose(rows: np.ndarray) -> list[HeadId]:     # the rule on a resample of the labelled images
        return choose_heads(rule, on_samples, pair_scores(cache, pred, pairs, rows, cfg.similarity)[1],
                            np.searchsorted(samples, rows), sample_labels, cfg.top_t, cfg.ablation)

    stability = head_stability(choose, samples, labels, cfg.resamples, cfg.seed)
    if cfg.selection == "stable":
        selection = select_stable(judge, scores, samples, labels, stability, cfg.top_t, cfg.ablation)
    else:
        select = select_consensus if cfg.selection == "consensus" else select_heads
        selection = select(judge, scores, samples, labels, cfg.top_t, cfg.ablation)
        selection.stability = stability
    return Identification(cfg, pairs, samples, ev, sets, scores, selection, pred, adapt)


def pair_scores(cache: FeatureCache, predictions: np.ndarray, pairs: Sequence[tuple[int, int]], rows: np.ndarray,
                similarity: Similarity = "cosine") -> tuple[SetTable, ScoreTable]:
    """W/C/A among the labelled ``rows`` and DE_A..DE_D (Eq. 6-9) of every head, for each pair: sets keyed by
    :class:`~refineclip_core.method.errorsets.ClassPair`, scores by :class:`~refineclip_core.method.scores.ScoreKey` (score, pair). ``rows`` may repeat (a bootstrap
    resample): a repeated row counts as often as it appears."""
    sets, scores = SetTable(), ScoreTable()
    for a, b in pairs:
        key = ClassPair(a, b, (cache.classes[a], cache.classes[b]))
        s = pair_error_sets(predictions, cache.labels, a, b, rows, cache.classes)
        sets[key] = s
        for name, hs in compute_scores(cache.embeddings, cache.heads, cache.text, s, cache.manifest.layers,
                                       similarity, SCORE_NAMES).items():
            scores[ScoreKey(name, key.names, alone=len(pairs) == 1)] = hs
    return sets, scores


#: The head selection's mean-ablation utility reads the heads' means over at most this many adaptation
#: rows (a seeded sample beyond it): exact on small caches, and on 50,000 images it spares the scoring a
#: pass over every head contribution (the first ablation makes that pass for the exact means anyway).
SELECTION_MEAN_ROWS = 4096


def selection_mean_rows(adapt: np.ndarray, seed: int) -> np.ndarray:
    """The adaptation rows whose head means the selection's mean-ablation utility uses (all of them up to
    :data:`SELECTION_MEAN_ROWS`, else a sample seeded by the protocol's seed)."""
    if len(adapt) <= SELECTION_MEAN_ROWS:
        return adapt
    return np.sort(np.random.default_rng([seed, 4_096]).choice(adapt, SELECTION_MEAN_ROWS, replace=False))


def strata_of(cache: FeatureCache) -> np.ndarray:
    """The stratum of every row for the held-out split: class × group (class alone without a group)."""
    groups = np.asarray(cache.groups) if cache.group_names else np.full(len(cache.labels), -1)
    return cache.labels.astype(np.int64) * (len(cache.group_names) + 1) + (groups + 1)


def stratified_holdout(strata: np.ndarray, rows: np.ndarray, share: float, seed: int) -> np.ndarray:
    """A seeded ``share`` of every stratum of ``rows`` (rounded; at least one image, and at least one
    left over when the stratum has two or more), sorted."""
    rows = np.asarray(rows, dtype=np.int64)
    rng = np.random.default_rng([seed, 2_000_003])
    held = []
    for s in np.unique(strata[rows]):
        members = rng.permutation(rows[strata[rows] == s])
        m = len(members)
        k = 1 if m == 1 else min(max(int(round(share * m)), 1), m - 1)
        held.append(members[:k])
    return np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)


def evaluation_and_fit_rows(cache: FeatureCache, cfg: ProtocolConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(evaluation rows, fitting rows)``: the held-out images, and where the labelled samples may
    be drawn from (module docstring). A split that holds every image (e.g. a folder written as one
    ``test`` split) leaves nothing to adapt on, so it is treated like no split."""
    everything = np.arange(len(cache.labels))
    fit = _split_rows(cache, cfg.fit_split, ("val", "train"))
    fit = everything if fit is None else fit
    ev = _split_rows(cache, cfg.eval_split, ("test",)) if cfg.eval_split else None
    if ev is not None and len(ev) < len(everything):     # a split to evaluate on, and rows besides it
        rest = np.setdiff1d(fit, ev)
        return ev, rest if len(rest) else fit
    ev = stratified_holdout(strata_of(cache), everything, cfg.holdout, cfg.seed)
    return ev, np.setdiff1d(fit, ev)


@dataclass(frozen=True)
class HeldOut:
    """Held-out images of one group of the edited classes (of the class, without groups)."""

    name: str
    class_name: str
    n_heldout: int
    n_images: int

    def to_dict(self) -> dict:
        return asdict(self)


def heldout_counts(cache: FeatureCache, ident: "Identification") -> list[HeldOut]:
    """Held-out images per group of the edited classes (per edited class when they have no groups)."""
    labels, ev = cache.labels, ident.eval_mask
    out = []
    grouped = bool(cache.group_names) and bool(np.all(cache.groups[np.isin(labels, ident.target_classes)] >= 0))
    for c in ident.target_classes:
        in_class = labels == c
        if grouped:
            for g in np.unique(cache.groups[in_class]):
                m = in_class & (cache.groups == g)
                out.append(HeldOut(cache.group_names[g], cache.classes[c], int((m & ev).sum()), int(m.sum())))
        else:
            out.append(HeldOut(cache.classes[c], cache.classes[c], int((in_class & ev).sum()), int(in_class.sum())))
    return out


def heldout_shortfall(cache: FeatureCache, ident: "Identification") -> tuple[list[HeldOut], str | None]:
    """The groups of the edited classes holding fewer than ``min_heldout`` held-out images, and a
    sentence that says so with the numbers (``None`` when every group holds enough)."""
    minimum = ident.config.min_heldout
    short = [h for h in heldout_counts(cache, ident) if h.n_heldout < minimum]
    if not short:
        return [], None
    listed = "; ".join(f"{h.name}: {h.n_heldout} of {h.n_images} images held out" for h in short)
    return short, (f"Too few held-out images to check an edit: {listed} (at least {minimum} per group "
                   f"are needed). Add images of these groups; until then the guard cannot verify an edit there.")


#: The comparison row of RefineCLIP-fit without the concept removal the exported edit has.
CONCEPT_KEPT = "refineclip-fit (concept kept)"



"""The RefineCLIP protocol end to end on a feature cache: identify (§3.2) then refine (§3.3).

This is the one place that decides *which rows* each step sees, so the CLI, the dashboard,
the benchmark and the reproduction harness all follow the same protocol:

* **fit rows**: where the few labelled samples are drawn from (split ``val``, else ``train``,
  else every row); ``samples_per_class`` rows of each class of the error pair(s) are drawn
  with ``seed`` (the paper uses 10); ``None`` uses all fit rows of those classes.
* **evaluation rows**: split ``test`` if present, else every row not sampled. Images used to
  choose heads or fit θ are never in the reported accuracies unless asked for.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from ..errors import RefineClipError
from ..features.cache import FeatureCache
from ..features.decomposition import HeadId
from ..progress import CancelFn, Progress
from .ablation import AblationEngine
from .baselines import TipAdapter
from .errorsets import ErrorPair, ErrorSets, error_pairs, pair_error_sets, sample_per_class
from .evaluation import AccuracyReport, accuracy_report, rows_mask
from .refinement import RefineConfig, RefinementResult, refine, standard_finetune
from .scores import SCORE_NAMES, HeadScores, Similarity, compute_scores
from .selection import Selection, select_heads


@dataclass(frozen=True)
class ProtocolConfig:
    """Which rows and which error pair(s); see the module docstring."""

    pair: str = "auto"                 # "auto" (largest), "both" (auto pair and its reverse), "TRUE:PRED"
    samples_per_class: int | None = 10
    seed: int = 0
    top_t: int = 15
    similarity: Similarity = "cosine"
    fit_split: str | None = "auto"     # "auto": val, else train, else all rows
    eval_split: str | None = "auto"    # "auto": test, else rows not sampled
    include_samples_in_eval: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Identification:
    """Phase 1's outcome: the samples, the sets, every score and Alg. 1's choice."""

    config: ProtocolConfig
    pairs: list[tuple[int, int]]
    sample_rows: np.ndarray
    eval_rows: np.ndarray
    sets: dict[str, ErrorSets]            # "true:pred" -> sets among the samples
    scores: dict[str, HeadScores]         # "DE_A" (single pair) or "DE_A[a→b]"
    selection: Selection
    base_predictions: np.ndarray

    @property
    def heads(self) -> list[HeadId]:
        return self.selection.heads

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


def resolve_pairs(spec: str, pairs_ranked: list[ErrorPair], classes: list[str]) -> list[tuple[int, int]]:
    """``auto`` (largest pair), ``both`` (it and its reverse) or ``TRUE:PRED[,TRUE:PRED...]``
    (class names or indices) into class-index pairs."""
    if spec in ("auto", "both"):
        if not pairs_ranked:
            raise RefineClipError("The model makes no errors on these images: there is no error pair to explain.")
        top = pairs_ranked[0]
        return [(top.true, top.pred)] + ([(top.pred, top.true)] if spec == "both" else [])

    def idx(x: str) -> int:
        x = x.strip()
        if x in classes:
            return classes.index(x)
        if x.isdigit() and int(x) < len(classes):
            return int(x)
        raise RefineClipError(f"Unknown class {x!r}; classes are {', '.join(classes)}.")

    out = []
    for item in spec.split(","):
        if ":" not in item:
            raise RefineClipError(f"--pair takes TRUE:PRED (class names or indices), 'auto' or 'both'; got {spec!r}.")
        a, b = item.split(":", 1)
        ia, ib = idx(a), idx(b)
        if ia == ib:
            raise RefineClipError("An error pair needs two different classes.")
        if (ia, ib) not in out:
            out.append((ia, ib))
    return out


def pair_spec(true: int, pred: int, classes: list[str]) -> str:
    """The ``TRUE:PRED`` text of one pair that :func:`resolve_pairs` reads back unambiguously
    (class names, or indices when a name contains ':' or looks like an index)."""
    a, b = classes[true], classes[pred]
    if any(":" in n or n.isdigit() for n in (a, b)):
        return f"{true}:{pred}"
    return f"{a}:{b}"


def make_engine(cache: FeatureCache) -> AblationEngine:
    return AblationEngine(cache.embeddings, cache.heads, cache.text, cache.manifest.layers)


def identify(cache: FeatureCache, cfg: ProtocolConfig = ProtocolConfig(), engine: AblationEngine | None = None
             ) -> Identification:
    """Phase 1: sample, build W/C/A, score every head (Eq. 6-9) and pick heads (Alg. 1)."""
    engine = engine or make_engine(cache)
    labels = cache.labels
    pred = engine.base_predictions
    fit = _split_rows(cache, cfg.fit_split, ("val", "train"))
    fit = np.arange(len(labels)) if fit is None else fit
    pairs = resolve_pairs(cfg.pair, error_pairs(pred, labels, fit), cache.classes)
    classes_needed = pair_classes(pairs)
    if cfg.samples_per_class is None:
        samples = fit[np.isin(labels[fit], classes_needed)]
    else:
        samples = sample_per_class(labels, cfg.samples_per_class, cfg.seed, fit, classes_needed)
    if not len(samples):
        raise RefineClipError("No labelled samples of the error pair's classes among the fitting images.")
    ev = _split_rows(cache, cfg.eval_split, ("test",)) if cfg.eval_split else None
    if ev is None:
        ev = np.arange(len(labels)) if cfg.include_samples_in_eval else np.setdiff1d(np.arange(len(labels)), samples)
    elif not cfg.include_samples_in_eval:
        ev = np.setdiff1d(ev, samples)
    sets: dict[str, ErrorSets] = {}
    scores: dict[str, HeadScores] = {}
    for a, b in pairs:
        key = f"{cache.classes[a]}→{cache.classes[b]}"
        s = pair_error_sets(pred, labels, a, b, samples, cache.classes)
        sets[key] = s
        for name, hs in compute_scores(cache.embeddings, cache.heads, cache.text, s, cache.manifest.layers,
                                       cfg.similarity, SCORE_NAMES).items():
            scores[name if len(pairs) == 1 else f"{name}[{key}]"] = hs
    selection = select_heads(engine, scores, samples, labels, cfg.top_t)
    return Identification(cfg, pairs, samples, ev, sets, scores, selection, pred)


@dataclass
class MethodReport:
    """Accuracies on the evaluation rows for every method compared (paper Tables 1-3, Fig. 2)."""

    reports: dict[str, AccuracyReport]        # all evaluation rows
    target_reports: dict[str, AccuracyReport]  # only images of the edited classes (their groups: Tables 1-3)
    locality: dict[str, float | None]         # accuracy on classes outside the edited pair(s) (Fig. 2)
    target_accuracy: dict[str, float | None]
    predictions: dict[str, np.ndarray] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"reports": {k: v.to_dict() for k, v in self.reports.items()},
                "target_reports": {k: v.to_dict() for k, v in self.target_reports.items()},
                "locality": self.locality, "target_accuracy": self.target_accuracy}


def evaluate_methods(cache: FeatureCache, ident: Identification, predictions: dict[str, np.ndarray]) -> MethodReport:
    """Accuracy reports of several prediction vectors over ``ident.eval_rows``."""
    labels = cache.labels
    mask = ident.eval_mask
    target_mask = mask & np.isin(labels, ident.target_classes)
    other_mask = mask & ~np.isin(labels, ident.target_classes)
    reports, target_reports, locality, target_acc = {}, {}, {}, {}
    for name, pred in predictions.items():
        reports[name] = accuracy_report(pred, labels, cache.classes, cache.groups, cache.group_names, mask)
        target_reports[name] = accuracy_report(pred, labels, cache.classes, cache.groups, cache.group_names,
                                               target_mask)
        locality[name] = float((pred[other_mask] == labels[other_mask]).mean()) if other_mask.any() else None
        target_acc[name] = float((pred[target_mask] == labels[target_mask]).mean()) if target_mask.any() else None
    return MethodReport(reports, target_reports, locality, target_acc, predictions)


@dataclass
class RefineOutcome:
    """Phase 2's outcome: the learned map, and every compared method as data (``report``:
    name → predictions and accuracies). ``exported`` names the method whose map
    (``refinement.refined``) an exported checkpoint carries."""

    identification: Identification
    refinement: RefinementResult
    finetune: RefinementResult | None
    report: MethodReport
    heads: list[HeadId]
    exported: str


def run_refinement(cache: FeatureCache, ident: Identification, cfg: RefineConfig = RefineConfig(),
                   heads: list[HeadId] | None = None, engine: AblationEngine | None = None,
                   baselines: bool = True, progress: Progress | None = None,
                   cancel: CancelFn | None = None) -> RefineOutcome:
    """Phase 2 (Eq. 11-13) with the chosen heads, and every comparison on the evaluation rows."""
    engine = engine or make_engine(cache)
    heads = ident.heads if heads is None else heads
    labels = cache.labels
    W = np.unique(np.concatenate([s.W for s in ident.sets.values()]))
    local = np.unique(np.concatenate([np.concatenate([s.C, s.A]) for s in ident.sets.values()]))
    local = np.setdiff1d(local, W)
    ablated_W = engine.embeddings(heads, "zero", W)
    result = refine(cache.embeddings, labels, cache.text, cache.logit_scale, W, local, ablated_W, cfg,
                    train_rows=ident.sample_rows, progress=progress, cancel=cancel)
    text = cache.text.astype(np.float64)
    exported = f"refineclip-{cfg.strategy}"
    preds = {
        "zero-shot": engine.base_predictions,
        "ablated": engine.predict(heads, "zero"),
        exported: (result.refined.apply(cache.embeddings) @ text.T).argmax(1),
    }
    finetune = None
    if baselines:
        finetune = standard_finetune(cache.embeddings, labels, cache.text, cache.logit_scale, ident.sample_rows, cfg,
                                     progress=progress, cancel=cancel)
        preds["standard-finetune"] = (finetune.refined.apply(cache.embeddings) @ text.T).argmax(1)
        tip = TipAdapter.build(cache.embeddings[ident.sample_rows], labels[ident.sample_rows], cache.text,
                               cache.logit_scale)
        preds["tip-adapter"] = tip.predict(cache.embeddings)
    return RefineOutcome(ident, result, finetune, evaluate_methods(cache, ident, preds), list(heads), exported)


"""Fit the exported edit (:func:`fit_edit`) and, one at a time, every method it is compared with
(:func:`fit_compared`: the rows of :data:`~refineclip_core.edit.methods.METHODS`, each with the labels it
used, or left out with the sentence that says why), on the cached embeddings; their accuracies go into
the comparison's table (:class:`~refineclip_core.method.method_table.MethodReport`). The guard
(:mod:`~refineclip_core.edit.guard`) judges the exported edit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..errors import Cancelled, RefineClipError
from ..features.cache import FeatureCache
from ..features.decomposition import HeadId
from ..method.ablation import AblationEngine
from ..method.method_table import MethodReport, evaluate_methods
from ..method.protocol import Identification, make_engine
from ..progress import CancelFn, Progress, silent
from .concept import ConceptRemoval
from .config import DEFAULT_EDIT, EditConfig
from .methods import BY_KEY, METHODS, Context, Fitted, about, predictions_of
from .paper import RefinementResult

__all__ = ["EditOutcome", "fit_edit", "fit_compared", "predictions_of"]


@dataclass
class EditOutcome:
    """Phase 2's outcome: every fitted map by method name (``results``), every compared method as
    data (``report``: name → predictions, accuracies and the labels it used) and which one an exported
    checkpoint carries (``exported``; its map is ``refinement.refined``). The guard's verdict on it is
    :func:`refineclip_core.edit.guard.assess_edit` (``run_edit`` makes it)."""

    identification: Identification
    results: dict[str, RefinementResult]     # method name -> fitted map (exported, paper phase 2, fine-tune)
    exported: str
    report: MethodReport
    heads: list[HeadId]
    config: EditConfig = DEFAULT_EDIT
    concept: ConceptRemoval | None = None    # the concept the exported edit's teacher also removed
    left_out: dict[str, str] = field(default_factory=dict)   # method -> why it is not in the comparison

    @property
    def refinement(self) -> RefinementResult:
        """The exported edit's fitted map."""
        return self.results[self.exported]

    def add(self, cache: FeatureCache, key: str, fitted: Fitted) -> None:
        """One fitted row: its predictions and accuracies, the labels it used, its map when it has one."""
        self.report.add(cache, self.identification, key, fitted.predictions, fitted.used.to_dict(), about(key))
        if fitted.result is not None:
            self.results[key] = fitted.result


def _context(cache: FeatureCache, ident: Identification, cfg: EditConfig, heads: list[HeadId],
             engine: AblationEngine | None, loaded: Any, concept: ConceptRemoval | None,
             progress: Progress | None, cancel: CancelFn | None) -> Context:
    return Context(cache, ident, ident.ablation_engine(engine or make_engine(cache)), cfg, heads, loaded, concept,
                   progress, cancel)


def fit_edit(cache: FeatureCache, ident: Identification, cfg: EditConfig = DEFAULT_EDIT,
             heads: list[HeadId] | None = None, engine: AblationEngine | None = None,
             baselines: bool = True, progress: Progress | None = None,
             cancel: CancelFn | None = None, concept: ConceptRemoval | None = None,
             loaded: Any = None) -> EditOutcome:
    """Phase 2 with the chosen heads: zero-shot, the ablated model and the exported edit (``cfg.method``);
    with ``baselines`` also every compared method (:func:`fit_compared`, one at a time). ``concept``
    (``cfg.concept`` resolved by :func:`~refineclip_core.edit.concept.resolve_concept`) is projected out of
    RefineCLIP-fit's teacher; the same fit without it is then the compared row ``CONCEPT_KEPT``. ``loaded``:
    the model, for the rows that need its text tower (CoOp, the LTC rows; left out without it)."""
    if cfg.concept.active and concept is None:
        raise RefineClipError("The edit removes a concept but none was resolved; embed its texts first "
                              "(refineclip_core.edit.concept.resolve_concept).")
    heads = ident.heads if heads is None else list(heads)
    ctx = _context(cache, ident, cfg, heads, engine, loaded, concept, progress, cancel)
    outcome = EditOutcome(ident, {}, cfg.exported, evaluate_methods(cache, ident, {}), heads, cfg, concept)
    for key in ("zero-shot", "ablated", cfg.exported):
        outcome.add(cache, key, BY_KEY[key].fit(ctx))
    if baselines:
        fit_compared(cache, ident, outcome, engine=ctx.engine, loaded=loaded, progress=progress, cancel=cancel)
    return outcome


def fit_compared(cache: FeatureCache, ident: Identification, outcome: EditOutcome, keys: Sequence[str] | None = None,
                 *, engine: AblationEngine | None = None, loaded: Any = None, progress: Progress | None = None,
                 cancel: CancelFn | None = None,
                 on_row: Callable[[str, EditOutcome], None] | None = None) -> EditOutcome:
    """Fit the compared methods (``keys``, default every row of the registry that applies to this run) one at a
    time after the exported edit in ``outcome`` (made by :func:`fit_edit`), adding each row to ``outcome`` in
    place: its predictions, accuracies and labels used, or in ``outcome.left_out`` the sentence saying why it
    is left out (what it needs and this run lacks, or the reason it could not be fitted). Rows already in the
    outcome are not fitted again. ``on_row(key, outcome)`` is called after each row (fitted or left out);
    ``cancel`` stops between and within rows (:class:`~refineclip_core.errors.Cancelled`). Returns ``outcome``."""
    unknown = [k for k in keys or () if k not in BY_KEY]
    if unknown:
        raise RefineClipError(f"Unknown compared method {unknown[0]!r}; known: {', '.join(BY_KEY)}.")
    ctx = _context(cache, ident, outcome.config, outcome.heads, engine, loaded, outcome.concept, progress, cancel)
    todo = [m for m in METHODS if m.compared and m.key not in outcome.report.predictions
            and (keys is None or m.key in keys) and m.applies(outcome.config, outcome.concept)]
    for i, m in enumerate(todo):
        if cancel is not None and cancel():
            raise Cancelled(f"Comparison cancelled before {m.label}.")
        (progress or silent)(f"Compared method: {m.label}", i, len(todo))
        why = m.skip(ctx)
        if why is None:
            try:
                outcome.add(cache, m.key, m.fit(ctx))
                outcome.left_out.pop(m.key, None)
            except Cancelled:
                raise
            except RefineClipError as exc:
                why = f"{m.label} is left out: {exc}"
        if why is not None:
            outcome.left_out[m.key] = why
        if on_row is not None:
            on_row(m.key, outcome)
    return outcome

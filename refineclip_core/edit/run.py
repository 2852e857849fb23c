"""One edit run, as the Refine page and ``refineclip refine`` both make it, the fix first: fit the
exported edit with the chosen heads removed in the teacher, judge it with the guard
(:mod:`~refineclip_core.edit.guard`), export it and record the run (:mod:`~refineclip_core.edit.record`)
— :func:`run_edit` with ``baselines=False``, seconds on the demo — then, when wanted, fit the compared
methods one at a time (:func:`compare_run`, :func:`~refineclip_core.edit.compare.fit_compared`) and
record the run again with their rows. The verdict and the checkpoint never wait for the comparison.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..features.cache import FeatureCache
from ..features.decomposition import HeadId
from ..inspection.diagnosis import Diagnosis
from ..loading.models import LoadedModel, ModelSpec, load_model
from ..method.ablation import AblationEngine
from .concept import resolve_concept
from ..method.protocol import Identification
from ..progress import CancelFn, Progress, silent
from .compare import EditOutcome, fit_compared, fit_edit
from .config import DEFAULT_EDIT, EditConfig
from .export import ExportFormat, export_checkpoint, merged_into
from .guard import EditVerdict, GuardConfig, assess_edit
from .record import build_run_report
from ..reporting.report_schema import RunReport
from .sanity import sanity_warnings


@dataclass
class EditRun:
    """One phase-2 run as the Refine page and ``refineclip refine`` both make it: the outcome
    (the exported edit and every compared method fitted so far, the exported one named), the merged
    checkpoint when one was written, the guard's verdict on the exported edit and the run report
    built from them (the typed :class:`~refineclip_core.reporting.report_schema.RunReport`). ``compared``: whether the compared methods have been fitted (:func:`compare_run`)."""

    outcome: EditOutcome
    checkpoint: Path | None
    report: RunReport
    verdict: EditVerdict
    compared: bool = False
    #: what the run report is built from besides the outcome (rebuilt when compared rows arrive)
    record_args: dict[str, Any] = field(default_factory=dict, repr=False)


def run_edit(cache: FeatureCache, ident: Identification, engine: AblationEngine, cfg: EditConfig = DEFAULT_EDIT,
             heads: Sequence[HeadId] | None = None, *, spec: ModelSpec, export_to: str | os.PathLike | None = None,
             export_format: ExportFormat = "auto", loaded: LoadedModel | None = None,
             data_root: str | None = None, baselines: bool = True,
             progress: Progress | None = None, cancel: CancelFn | None = None,
             extra: Mapping[str, Any] | None = None, diagnosis: Diagnosis | None = None,
             demo_data: bool = False, guard: GuardConfig | None = None,
             on_row: Callable[[str, "EditRun"], None] | None = None) -> EditRun:
    """Fit the edit ``cfg`` with ``heads`` (default: the identification's) removed in the teacher, judge it
    on the evaluation rows with the guard (``guard``: its settings, e.g. the acceptable drop), export it
    merged into ``visual.proj`` to ``export_to`` (when given, in ``export_format``, see
    :func:`~refineclip_core.edit.export.export_checkpoint`; the model is loaded from ``spec`` unless
    ``loaded`` is passed) and build the run report (led by ``diagnosis`` when given, with the sanity
    warnings of :mod:`~refineclip_core.edit.sanity`; ``demo_data``: the images are a sample of the demo
    world). With ``baselines`` the compared methods follow (:func:`compare_run`, ``on_row`` after each)."""
    concept = None
    if cfg.concept.active:      # the concept's texts need the text tower
        loaded = loaded or load_model(spec)
        concept = resolve_concept(cfg.concept, loaded, cache.manifest.templates, cache.text, diagnosis)
    outcome = fit_edit(cache, ident, cfg, None if heads is None else list(heads), engine, baselines=False,
                       progress=progress, cancel=cancel, concept=concept, loaded=loaded)
    preds = outcome.report.predictions
    verdict = assess_edit(cache, ident, preds["zero-shot"], preds[outcome.exported], outcome.exported, guard)
    checkpoint = None
    if export_to is not None:
        (progress or silent)("Exporting the merged checkpoint", 0, 1)
        loaded = loaded or load_model(spec)
        with spec.confinement().active():  # the source read where the model was
            checkpoint = export_checkpoint(spec.resolved().checkpoint, loaded.model, outcome.refinement.refined,
                                           export_to, export_format, config=loaded.open_clip_config)
    args = dict(model=spec.to_dict(), data_root=data_root, checkpoint=checkpoint, extra=extra, diagnosis=diagnosis,
                verdict=verdict, warnings=sanity_warnings(cache, ident, demo_data=demo_data),
                merged_into=None if checkpoint is None else merged_into(loaded.model, loaded.open_clip_config))
    run = EditRun(outcome, checkpoint, build_run_report(cache, ident, engine, outcome, **args), verdict,
                  record_args=args)
    if baselines:
        run = compare_run(run, cache, ident, engine, spec=spec, loaded=loaded, progress=progress, cancel=cancel,
                          on_row=on_row)
    return run


def _snapshot(outcome: EditOutcome) -> EditOutcome:
    """A copy of ``outcome`` whose tables a reader may hold while another thread adds rows to the original."""
    return replace(outcome, results=dict(outcome.results), report=outcome.report.copy(),
                   left_out=dict(outcome.left_out))


def compare_run(run: EditRun, cache: FeatureCache, ident: Identification, engine: AblationEngine, *,
                spec: ModelSpec | None = None, loaded: LoadedModel | None = None, keys: Sequence[str] | None = None,
                progress: Progress | None = None, cancel: CancelFn | None = None,
                on_row: Callable[[str, EditRun], None] | None = None) -> EditRun:
    """``run`` with the compared methods (``keys``, default every applicable row of
    :data:`~refineclip_core.edit.methods.METHODS`) fitted one at a time after its exported edit, and its
    run report rebuilt with their rows. ``run`` itself is left as it is (a page may keep showing it);
    ``on_row(key, partial)`` gets, after each row, a run holding the rows so far (its report not yet
    rebuilt). The model (CoOp's and LTC's text tower) is loaded from ``spec`` unless ``loaded`` is given."""
    if loaded is None and spec is not None:
        loaded = load_model(spec)
    outcome = _snapshot(run.outcome)

    def row(key: str, out: EditOutcome) -> None:
        if on_row is not None:
            on_row(key, replace(run, outcome=_snapshot(out)))

    fit_compared(cache, ident, outcome, keys, engine=engine, loaded=loaded, progress=progress, cancel=cancel,
                 on_row=row)
    report = build_run_report(cache, ident, engine, outcome, **run.record_args)
    return replace(run, outcome=outcome, report=report, compared=True)

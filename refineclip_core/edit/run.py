"""One edit run, as the Refine page and ``refineclip refine`` both make it: fit the exported edit
(and every compared method) with the chosen heads removed in the teacher, judge it with the guard
(:mod:`~refineclip_core.edit.guard`), export it and record the run (:mod:`~refineclip_core.edit.record`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..features.cache import FeatureCache
from ..features.decomposition import HeadId
from ..inspection.diagnosis import Diagnosis
from ..loading.models import LoadedModel, ModelSpec, load_model
from ..method.ablation import AblationEngine
from .concept import resolve_concept
from ..method.protocol import Identification
from ..progress import CancelFn, Progress, silent
from .compare import EditOutcome, fit_edit
from .config import DEFAULT_EDIT, EditConfig
from .export import ExportFormat, export_checkpoint
from .guard import EditVerdict, assess_edit
from .record import build_run_report
from .sanity import sanity_warnings


@dataclass
class EditRun:
    """One phase-2 run as the Refine page and ``refineclip refine`` both make it: the outcome
    (every compared method, the exported one named), the merged checkpoint when one was
    written, and the run report built from them."""

    outcome: EditOutcome
    checkpoint: Path | None
    report: dict
    verdict: EditVerdict


def run_edit(cache: FeatureCache, ident: Identification, engine: AblationEngine, cfg: EditConfig = DEFAULT_EDIT,
             heads: Sequence[HeadId] | None = None, *, spec: ModelSpec, export_to: str | os.PathLike | None = None,
             export_format: ExportFormat = "auto", loaded: LoadedModel | None = None,
             data_root: str | None = None, baselines: bool = True,
             progress: Progress | None = None, cancel: CancelFn | None = None,
             extra: Mapping[str, Any] | None = None, diagnosis: Diagnosis | None = None,
             demo_data: bool = False) -> EditRun:
    """Fit the edit ``cfg`` with ``heads`` (default: the identification's) removed in the teacher,
    compare every method on the evaluation rows (the guard's verdict included), export the edit
    merged into ``visual.proj`` to ``export_to`` (when given, in ``export_format``, see
    :func:`~refineclip_core.edit.paper.export_checkpoint`; the model is loaded from
    ``spec`` unless ``loaded`` is passed) and build the run report (led by ``diagnosis`` when given,
    with the sanity warnings of :mod:`~refineclip_core.edit.sanity`; ``demo_data``: the images are a
    sample of the demo world)."""
    concept = None
    if cfg.concept.active or baselines:      # the concept's texts and CoOp's prompts need the text tower
        loaded = loaded or load_model(spec)
        concept = resolve_concept(cfg.concept, loaded, cache.manifest.templates, cache.text, diagnosis)
    outcome = fit_edit(cache, ident, cfg, None if heads is None else list(heads), engine,
                             baselines=baselines, progress=progress, cancel=cancel, concept=concept, loaded=loaded)
    preds = outcome.report.predictions
    verdict = assess_edit(cache, ident, preds["zero-shot"], preds[outcome.exported], outcome.exported)
    checkpoint = None
    if export_to is not None:
        (progress or silent)("Exporting the merged checkpoint", 0, 1)
        loaded = loaded or load_model(spec)
        checkpoint = export_checkpoint(spec.resolved().checkpoint, loaded.model, outcome.refinement.refined,
                                       export_to, export_format, roots=spec.roots)
    report = build_run_report(cache, ident, engine, outcome, model=spec.to_dict(), data_root=data_root,
                              checkpoint=checkpoint, extra=extra, diagnosis=diagnosis, verdict=verdict,
                              warnings=sanity_warnings(cache, ident, demo_data=demo_data))
    return EditRun(outcome, checkpoint, report, verdict)

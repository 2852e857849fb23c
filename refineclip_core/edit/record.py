"""The run's record: one edit run as JSON-safe data (model, data, protocol, scores, selection,
the edit's config and history, every method's accuracies, the guard's verdict, the per-image
predictions), and reading a record back (``refineclip eval --rows-from``), both through the one
versioned schema :class:`~refineclip_core.reporting.report_schema.RunReport`.
:mod:`~refineclip_core.reporting.run_report` renders it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import RefineClipError
from ..features.cache import FeatureCache
from ..inspection.diagnosis import Diagnosis
from ..loading.data import ImageDataset
from ..method.ablation import AblationEngine
from ..method.protocol import Identification, heldout_counts
from ..method.scores import HeadScores, ScoreKey
from ..names import decodable
from ..reporting.findings import findings, json_safe
from ..reporting.tables import PER_IMAGE_COLUMNS, per_image_rows
from .compare import EditOutcome
from .guard import EditVerdict, assess_edit
from ..reporting.report_schema import RUN_REPORT_SCHEMA, RunData, RunReport
from .sanity import SanityWarning


def scores_to_dict(scores: Mapping[ScoreKey, HeadScores]) -> dict[str, dict]:
    return {str(key): {"values": None if s.values is None else np.asarray(s.values).tolist(), "layers": list(s.layers),
                   "descending": bool(s.descending), "available": s.available, "reason": s.reason}
            for key, s in scores.items()}


def build_run_report(cache: FeatureCache, ident: Identification, engine: AblationEngine,
                     outcome: EditOutcome | None = None, *, model: Mapping[str, Any] | None = None,
                     data_root: str | None = None, checkpoint: Path | None = None,
                     extra: Mapping[str, Any] | None = None, diagnosis: Diagnosis | None = None,
                     verdict: EditVerdict | None = None, warnings: Sequence[SanityWarning] = (),
                     merged_into: str | None = None) -> RunReport:
    """Everything about one run, as the typed :class:`~refineclip_core.reporting.report_schema.RunReport`
    (read through the same :meth:`~RunReport.from_dict` as a file, so a run and its JSON agree): what was loaded, which rows, which heads, the
    scores and curves behind the choice (Eq. 6-10), the diagnosis of what removing the heads
    takes out (:mod:`~refineclip_core.inspection.diagnosis`, when given), the refinement (Eq. 11-13),
    every compared method's accuracies (``methods``, name → report) and which of them was
    ``exported`` to ``checkpoint`` (``merged_into``: the state-dict key(s) the edit was merged into,
    :func:`~refineclip_core.edit.export.merged_into`; ``visual.proj`` when not given)."""
    import torch

    from .. import __version__

    try:
        import open_clip
        oc_version = getattr(open_clip, "__version__", "?")
    except Exception:  # pragma: no cover - open_clip is a dependency
        oc_version = "?"
    man = cache.manifest
    heads = outcome.heads if outcome is not None else ident.heads
    data = RunData(data_root or man.data_root, str(cache.root), len(cache), tuple(cache.classes),
                   tuple(cache.group_names), tuple(man.templates), tuple(man.layers), man.n_heads, len(cache.skipped))
    report: dict[str, Any] = {
        "schema": RUN_REPORT_SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"refineclip_core": __version__, "torch": torch.__version__, "open_clip": oc_version},
        "model": dict(model) if model is not None else dict(man.model),
        "model_name": man.model_name,
        "scoring": cache.scoring.to_dict(),   # how confidences and the edit's KL were scored
        "protocol": ident.config.to_dict(),
        "pairs": tuple((cache.classes[a], cache.classes[b]) for a, b in ident.pairs),
        "sets": {str(k): s.sizes() for k, s in ident.sets.items()},
        "n_samples": int(len(ident.sample_rows)),
        "n_eval": int(len(ident.eval_rows)),
        "sample_rows": tuple(ident.sample_rows.tolist()),
        "eval_rows": tuple(ident.eval_rows.tolist()),
        "scores": scores_to_dict(ident.scores),
        "selection": ident.selection.to_dict(),
        "heads": tuple((h.layer, h.head) for h in heads),
        "findings": findings(cache, ident, engine).to_dict(),
        "heldout": {"min_per_group": ident.config.min_heldout,
                    "groups": [h.to_dict() for h in heldout_counts(cache, ident)]},
        "warnings": tuple(w.to_dict() for w in warnings),
    }
    stability = ident.selection.stability
    if stability is not None and stability.resamples:
        report["head_stability"] = {"summary": stability.summary(heads), "rows": stability.rows(heads),
                                    "one_off": [str(h) for h in stability.one_off(heads)], **stability.to_dict()}
    if diagnosis is not None:
        report["diagnosis"] = diagnosis.to_dict()
    if outcome is not None:
        report["refine_config"] = outcome.config.to_dict()
        report["history"] = outcome.refinement.history
        report["methods"] = outcome.report.to_dict()
        report["exported"] = outcome.exported
        report["verdict"] = (verdict or assess_edit(cache, ident, outcome.report.predictions["zero-shot"],
                                                    outcome.report.predictions[outcome.exported],
                                                    outcome.exported)).to_dict()
        report["n_adapt"] = int(len(ident.adapt_rows))
        preds = outcome.report.predictions
        rows = per_image_rows(cache.records, cache.classes, preds["zero-shot"], preds[outcome.exported],
                              ident.eval_rows, samples=ident.sample_rows, adapt=ident.adapt_rows,
                              root=data_root or man.data_root)
        report["per_image"] = {"columns": list(PER_IMAGE_COLUMNS),
                               "rows": [[r[c] for c in PER_IMAGE_COLUMNS] for r in rows]}
        if outcome.concept is not None:
            report["concept_removal"] = outcome.concept.to_dict()
        if outcome.left_out:
            report["left_out"] = dict(outcome.left_out)
    if checkpoint is not None:
        ckpt = Path(checkpoint)
        folder = ckpt.is_dir()  # a transformers folder (config.json + model.safetensors)
        report["checkpoint"] = {"file": ckpt.name, "format": "hf" if folder else "open_clip",
                                "bytes": sum(p.stat().st_size for p in ckpt.iterdir() if p.is_file()) if folder
                                else ckpt.stat().st_size,
                                "merged_into": "visual_projection.weight" if folder else (merged_into or "visual.proj")}
    if extra:
        report["extra"] = dict(extra)
    report.update(data=data.to_dict(), eval_files=row_files(cache, ident.eval_rows))
    return RunReport.from_dict(json_safe(report), "built for this run")


def row_files(cache: FeatureCache, rows: np.ndarray) -> list[str]:
    """The image files of ``rows``, relative to the data folder when inside it (what ``refineclip eval
    --rows-from`` matches a fresh scan against)."""
    root = Path(cache.manifest.data_root) if cache.manifest.data_root else None
    out = []
    for i in np.asarray(rows, dtype=np.int64).tolist():
        path = Path(cache.records[i].path)
        try:
            out.append(decodable(path.relative_to(root).as_posix() if root is not None else str(path)))
        except ValueError:
            out.append(decodable(path))
    return out


def read_run_report(path: str | os.PathLike) -> RunReport:
    """A run report written by :func:`write_report` (or ``refineclip refine --json``; any schema version
    so far), checked to name its held-out images: nesting deeper than
    :data:`~refineclip_core.loading.confine.MAX_JSON_DEPTH` is refused before the parser runs
    (:func:`~refineclip_core.loading.confine.json_depth`), and the fields read are type-checked by
    :meth:`RunReport.from_dict` (``eval_files``, ``data.classes``: lists of strings, ``data.templates``:
    absent or valid prompt templates, ...), each in one sentence."""
    from ..loading.confine import MAX_JSON_DEPTH, json_depth

    fix = "write one with refineclip refine --json, or download the Refine page's JSON"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RefineClipError(f"Cannot read the run report {path}: {exc}.") from exc
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise RefineClipError(f"{path} nests {depth:,} levels deep (a run report nests fewer than {MAX_JSON_DEPTH}); "
                              f"it is not a run report and was not read ({fix}).")
    try:
        report = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise RefineClipError(f"Cannot read the run report {path}: {str(exc)[:200]}.") from exc
    return RunReport.from_dict(report, str(path))


def held_out_only(dataset: ImageDataset, report: RunReport, name: str = "the run") -> ImageDataset:
    """``dataset`` restricted to the held-out images of a run report, matched by their path inside the
    data folder; every held-out image must be there, with the run's class names."""
    if list(report.data.classes) != list(dataset.classes):
        raise RefineClipError(f"The classes of {dataset.root} differ from those of {name}; evaluate the folder the "
                              "run was made on.")
    wanted = set(map(str, report.eval_files))
    root = Path(dataset.root)
    keep = []
    for r in dataset.records:
        path = Path(r.path)
        try:
            rel = path.relative_to(root).as_posix()
        except ValueError:
            rel = str(path)
        if decodable(rel) in wanted or decodable(path) in wanted:  # written by row_files as shown
            keep.append(r)
    if len(keep) != len(wanted):
        raise RefineClipError(f"{len(wanted) - len(keep)} of the {len(wanted)} held-out images of {name} are not in "
                              f"{dataset.root}; evaluate the folder the run was made on.")
    return replace(dataset, records=keep)

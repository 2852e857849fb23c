"""The run report's one schema: :class:`RunReport` is what :func:`~refineclip_core.edit.record.build_run_report`
returns and every writer reads (the JSON, :meth:`RunReport.to_dict`; the HTML page and the per-image CSV,
:mod:`~refineclip_core.reporting.run_report`; the CLI; the Refine page and the Recent list), and what
:func:`~refineclip_core.edit.record.read_run_report` reads back (:meth:`RunReport.from_dict`, the one place
that reads a report's JSON: every field it reads type-checked, a malformed section refused in one sentence).

Versions (``"schema"`` in the JSON): 1 is every file written before the schema had a name (no ``"schema"``
key; the same fields), 2 adds the key. Reading accepts both, and partial files (a report that only lists
its held-out images and classes, as ``refineclip eval --rows-from`` needs); a file from a newer schema is
refused rather than misread. The sections are typed records (:mod:`~refineclip_core.reporting.report_sections`:
the compared methods as a :class:`~refineclip_core.method.method_table.MethodReport`, the findings, the
verdict, ...); configuration-like sections (model, protocol, refine_config, ...) stay mappings, shown as
JSON; fields this module does not know are kept as they were (:attr:`RunReport.other`) so that reading and
writing a report loses nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from ..errors import RefineClipError
from ..features.scoring import Scoring
from ..method.method_table import MethodReport
from .findings import Findings, json_safe
from .report_sections import (CheckpointRecord, ConceptRemovalRecord, DiagnosisRecord, PerImageTable, ScoreMap,
                              SelectionRecord, StabilityRecord, VerdictRecord, WarningRecord, findings_record,
                              method_report)

RUN_REPORT_SCHEMA = 2
"""The schema :meth:`RunReport.to_dict` writes (module docstring: what each version means)."""

_FIX = "write one with refineclip refine --json, or download the Refine page's JSON"


@dataclass(frozen=True)
class RunData:
    """What the run was made on (``report["data"]``)."""

    root: str | None = None
    cache: str | None = None
    n_images: int = 0
    classes: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    templates: tuple[str, ...] | None = None
    layers: tuple[int, ...] = ()
    n_heads: int = 0
    n_skipped: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"root": self.root, "cache": self.cache, "n_images": self.n_images, "classes": list(self.classes),
                "groups": list(self.groups), "templates": None if self.templates is None else list(self.templates),
                "layers": list(self.layers), "n_heads": self.n_heads, "n_skipped": self.n_skipped}


#: Sections present only in some runs (an edit, a checkpoint, a diagnosis, ...): omitted from the JSON when None.
_OPTIONAL = ("scoring", "head_stability", "diagnosis", "refine_config", "history", "methods", "exported", "verdict",
             "n_adapt", "per_image", "concept_removal", "left_out", "checkpoint", "extra")


@dataclass(frozen=True)
class RunReport:
    """One run, typed at its top level (module docstring). Field order is the JSON's key order."""

    title: str = "RefineCLIP run report"
    schema: int = RUN_REPORT_SCHEMA
    created: str | None = None
    versions: Mapping[str, str] | None = None
    model: Mapping[str, Any] | None = None
    model_name: str | None = None
    scoring: Scoring | None = None              # the model's scoring (features/scoring.py); None: not recorded
    data: RunData = RunData()
    protocol: Mapping[str, Any] | None = None
    pairs: tuple[tuple[str, str], ...] = ()
    sets: Mapping[str, Any] | None = None
    n_samples: int | None = None
    n_eval: int | None = None
    sample_rows: tuple[int, ...] = ()
    eval_rows: tuple[int, ...] = ()
    eval_files: tuple[str, ...] = ()            # the held-out images, as row_files writes them
    scores: Mapping[str, ScoreMap] | None = None
    selection: SelectionRecord | None = None
    heads: tuple[tuple[int, int], ...] = ()
    findings: Findings | None = None
    heldout: Mapping[str, Any] | None = None
    warnings: tuple[WarningRecord, ...] = ()
    head_stability: StabilityRecord | None = None
    diagnosis: DiagnosisRecord | None = None
    refine_config: Mapping[str, Any] | None = None
    history: Mapping[str, Any] | None = None
    methods: MethodReport | None = None
    exported: str | None = None
    verdict: VerdictRecord | None = None
    n_adapt: int | None = None
    per_image: PerImageTable | None = None
    concept_removal: ConceptRemovalRecord | None = None
    left_out: Mapping[str, str] | None = None
    checkpoint: CheckpointRecord | None = None
    extra: Mapping[str, Any] | None = None
    other: Mapping[str, Any] = field(default_factory=dict)   # fields of the file this schema does not name

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: the same keys the reports always had, plus ``"schema"``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "other" or (f.name in _OPTIONAL and value is None):
                continue
            if f.name == "per_image" and value is not None:
                continue                    # JSON-safe as read; the largest section, added as it is below
            if f.name == "scores" and value is not None:
                value = {k: s.to_dict() for k, s in value.items()}
            elif hasattr(value, "to_dict"):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = [v.to_dict() if hasattr(v, "to_dict") else list(v) if isinstance(v, tuple) else v
                         for v in value]
            out[f.name] = value
        out = json_safe({**out, **self.other})
        if self.per_image is not None:
            out["per_image"] = self.per_image.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Any, source: str = "the run report") -> RunReport:
        """A report read back from its JSON form (schema 1 or 2; module docstring), each field this
        schema reads checked; a mistyped field raises :class:`~refineclip_core.errors.RefineClipError`
        in one sentence naming it."""
        from ..features.zeroshot import validate_templates

        if not isinstance(d, Mapping) or not isinstance(d.get("eval_files"), list) \
                or not isinstance(d.get("data"), Mapping):
            raise RefineClipError(f"{source} is not a run report that lists its held-out images ({_FIX}).")
        schema = d.get("schema", 1)
        if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
            raise RefineClipError(f"The run report {source} has a 'schema' that is not a positive integer ({_FIX}).")
        if schema > RUN_REPORT_SCHEMA:
            raise RefineClipError(f"The run report {source} uses schema {schema}, newer than this RefineCLIP reads "
                                  f"({RUN_REPORT_SCHEMA}); read it with a newer version.")
        raw = d["data"]
        for name, value in (("eval_files", d["eval_files"]), ("data.classes", raw.get("classes") or []),
                            ("data.groups", raw.get("groups") or [])):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise RefineClipError(f"The run report {source} has a '{name}' that is not a list of strings ({_FIX}).")
        templates = raw.get("templates")
        if templates is not None:
            if not isinstance(templates, list):
                raise RefineClipError(f"The run report {source} has 'data.templates' of type "
                                      f"{type(templates).__name__}, not a list of prompt templates ({_FIX}).")
            templates = tuple(validate_templates(templates))
        data = RunData(_text(raw.get("root")), _text(raw.get("cache")), _count(raw, "n_images", source),
                       tuple(raw.get("classes") or ()), tuple(raw.get("groups") or ()), templates,
                       tuple(_ints(raw.get("layers"), "data.layers", source)), _count(raw, "n_heads", source),
                       _count(raw, "n_skipped", source))
        known = {f.name for f in fields(cls)} - {"data", "eval_files", "schema", "other"}
        values = {k: d[k] for k in known if k in d}
        for k in ("sample_rows", "eval_rows"):
            if k in values:
                values[k] = tuple(_ints(values[k], k, source))
        for k in _MAPPINGS:
            if values.get(k) is not None and not isinstance(values[k], Mapping):
                raise RefineClipError(f"The run report {source} has a '{k}' that is not an object ({_FIX}).")
        for k in ("n_samples", "n_eval", "n_adapt"):
            if values.get(k) is not None and (not isinstance(values[k], int) or isinstance(values[k], bool)):
                raise RefineClipError(f"The run report {source} has a '{k}' that is not a whole number ({_FIX}).")
        pairs = values.get("pairs") or []
        if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise RefineClipError(f"The run report {source} has 'pairs' that are not pairs of class names ({_FIX}).")
        values["pairs"] = tuple(tuple(map(str, p)) for p in pairs)
        values["heads"] = tuple(tuple(_ints(h, "heads", source)) for h in values.get("heads") or ())
        for name, parse in _SECTIONS.items():
            if values.get(name) is not None:
                try:
                    values[name] = parse(values[name])
                except (TypeError, KeyError, ValueError, AttributeError, IndexError) as exc:
                    raise RefineClipError(f"The run report {source} has a '{name}' section this RefineCLIP cannot "
                                          f"read ({type(exc).__name__}: {str(exc)[:120]}; {_FIX}).") from exc
        if values.get("scoring") is not None:
            values["scoring"] = Scoring.from_dict(values["scoring"], f"The run report {source}")
        values["warnings"] = tuple(values.get("warnings") or ())
        other = {k: v for k, v in d.items() if k not in known | {"data", "eval_files", "schema"}}
        return cls(data=data, eval_files=tuple(d["eval_files"]), schema=schema, other=other, **values)


def _scores(d: Any) -> dict[str, ScoreMap]:
    if not isinstance(d, Mapping):
        raise TypeError("the scores are not an object")
    return {str(k): ScoreMap.from_dict(v) for k, v in d.items()}


def _warnings(d: Any) -> tuple[WarningRecord, ...]:
    if not isinstance(d, list):
        raise TypeError("the warnings are not a list")
    return tuple(WarningRecord.from_dict(w) for w in d)


#: Sections kept as mappings (configurations and plain tables, shown as JSON): checked to be objects.
_MAPPINGS = ("versions", "model", "protocol", "sets", "heldout", "refine_config", "history", "left_out", "extra")

#: The typed sections and their parsers (:mod:`~refineclip_core.reporting.report_sections`).
_SECTIONS = {"scores": _scores, "selection": SelectionRecord.from_dict, "findings": findings_record,
             "warnings": _warnings, "head_stability": StabilityRecord.from_dict, "diagnosis": DiagnosisRecord.from_dict,
             "methods": method_report, "verdict": VerdictRecord.from_dict, "per_image": PerImageTable.from_dict,
             "concept_removal": ConceptRemovalRecord.from_dict, "checkpoint": CheckpointRecord.from_dict}


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _count(raw: Mapping[str, Any], name: str, source: str) -> int:
    value = raw.get(name, 0)
    if not isinstance(value, int) or isinstance(value, bool):
        raise RefineClipError(f"The run report {source} has a 'data.{name}' that is not a whole number ({_FIX}).")
    return value


def _ints(value: Any, name: str, source: str) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise RefineClipError(f"The run report {source} has a '{name}' that is not a list of whole numbers ({_FIX}).")
    return list(value)

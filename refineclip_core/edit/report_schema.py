"""The run report's one schema: :class:`RunReport` is what :func:`~refineclip_core.edit.record.build_run_report`
writes (as JSON, :meth:`RunReport.to_dict`) and what :func:`~refineclip_core.edit.record.read_run_report`
reads back (:meth:`RunReport.from_dict`, every field it reads type-checked in one sentence).

Versions (``"schema"`` in the JSON): 1 is every file written before the schema had a name (no ``"schema"``
key; the same fields), 2 adds the key. Reading accepts both, and partial files (a report that only lists
its held-out images and classes, as ``refineclip eval --rows-from`` needs); a file from a newer schema is
refused rather than misread. Sections produced by other typed records (the selection, the findings, the
methods, the verdict, ...) stay their ``to_dict()`` form here; fields this module does not know are kept
as they were (:attr:`RunReport.other`) so that reading and writing a report loses nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from ..errors import RefineClipError

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
_OPTIONAL = ("head_stability", "diagnosis", "refine_config", "history", "methods", "exported", "verdict",
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
    data: RunData = RunData()
    protocol: Mapping[str, Any] | None = None
    pairs: tuple[tuple[str, str], ...] = ()
    sets: Mapping[str, Any] | None = None
    n_samples: int | None = None
    n_eval: int | None = None
    sample_rows: tuple[int, ...] = ()
    eval_rows: tuple[int, ...] = ()
    eval_files: tuple[str, ...] = ()            # the held-out images, as row_files writes them
    scores: Mapping[str, Any] | None = None
    selection: Mapping[str, Any] | None = None
    heads: tuple[tuple[int, int], ...] = ()
    findings: Mapping[str, Any] | None = None
    heldout: Mapping[str, Any] | None = None
    warnings: tuple[Mapping[str, Any], ...] = ()
    head_stability: Mapping[str, Any] | None = None
    diagnosis: Mapping[str, Any] | None = None
    refine_config: Mapping[str, Any] | None = None
    history: Mapping[str, Any] | None = None
    methods: Mapping[str, Any] | None = None
    exported: str | None = None
    verdict: Mapping[str, Any] | None = None
    n_adapt: int | None = None
    per_image: Mapping[str, Any] | None = None
    concept_removal: Mapping[str, Any] | None = None
    left_out: Mapping[str, str] | None = None
    checkpoint: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] | None = None
    other: Mapping[str, Any] = field(default_factory=dict)   # fields of the file this schema does not name

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: the same keys the reports always had, plus ``"schema"``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "other" or (f.name in _OPTIONAL and value is None):
                continue
            if f.name == "data":
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            out[f.name] = value
        return {**out, **self.other}

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
        values["pairs"] = tuple(tuple(map(str, p)) for p in values.get("pairs") or ())
        values["heads"] = tuple(tuple(_ints(h, "heads", source)) for h in values.get("heads") or ())
        values["warnings"] = tuple(values.get("warnings") or ())
        other = {k: v for k, v in d.items() if k not in known | {"data", "eval_files", "schema"}}
        return cls(data=data, eval_files=tuple(d["eval_files"]), schema=schema, other=other, **values)


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

"""The typed sections of a run report (:class:`~refineclip_core.reporting.report_schema.RunReport`): each
section's JSON form is read here, once, into a record the writers (HTML, CSV, the CLI, the pages) read
by attribute; each record's ``to_dict`` gives the JSON back with the same keys.

Two kinds: records rebuilt field by field from their JSON (the compared methods as a
:class:`~refineclip_core.method.method_table.MethodReport`, the findings, the score maps, the warnings,
the checkpoint, the per-image table), and views of sections written by richer records elsewhere (the
selection, the head stability, the diagnosis, the verdict, the concept removal): their typed fields are
what the report's readers use, and the section's JSON is kept whole (``raw``) so that writing it back
loses nothing. Every parser raises ``TypeError``/``KeyError``/``ValueError`` on a malformed section;
:meth:`RunReport.from_dict` turns that into one sentence naming the section.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from ..method.method_table import MethodReport
from ..method.evaluation import AccuracyReport
from ..method.intervals import Estimate
from .findings import Findings
from .tables import verdict_rows


def _map(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} is not an object")
    return value


def _estimate(value: Any) -> Estimate | None:
    if value is None:
        return None
    v = _map(value, "an accuracy")
    return Estimate(float(v["value"]), float(v["low"]), float(v["high"]), int(v["n"]))


def _pair(value: Any) -> tuple[float, float] | None:
    return None if value is None else (float(value[0]), float(value[1]))


def accuracy_report(d: Any) -> AccuracyReport:
    """An :class:`~refineclip_core.method.evaluation.AccuracyReport` from its ``to_dict()``."""
    d = _map(d, "an accuracy report")
    return AccuracyReport(
        n_images=int(d["n_images"]), accuracy=d.get("accuracy"), per_class=dict(d.get("per_class") or {}),
        per_group=dict(d.get("per_group") or {}), average_group=d.get("average_group"),
        worst_group=d.get("worst_group"), worst_group_name=d.get("worst_group_name"),
        counts={str(k): int(v) for k, v in (d.get("counts") or {}).items()},
        intervals={str(k): _pair(v) for k, v in (d.get("intervals") or {}).items()},
        accuracy_interval=_pair(d.get("accuracy_interval")), average_group_interval=_pair(d.get("average_group_interval")))


def method_report(d: Any) -> MethodReport:
    """The compared methods (``report["methods"]``) as a :class:`MethodReport` (without predictions: the
    per-image table holds the exported edit's)."""
    d = _map(d, "the methods")

    def each(key: str, parse) -> dict:
        return {str(k): parse(v) for k, v in _map(d.get(key) or {}, key).items()}

    return MethodReport(each("reports", accuracy_report), each("target_reports", accuracy_report),
                        each("locality", _estimate), each("target_accuracy", _estimate), {},
                        each("labels_used", dict), each("about", dict))


def findings_record(d: Any) -> Findings:
    """The headline :class:`~refineclip_core.reporting.findings.Findings` from its ``to_dict()``."""
    d = _map(d, "the findings")
    values = {}
    for f in fields(Findings):
        v = d.get(f.name)
        if str(f.type).startswith("Estimate"):
            v = _estimate(v)
        elif f.name in ("heads", "notes"):
            v = [str(x) for x in v or []]
        elif f.name in ("n_images", "n_eval", "pair_count"):
            v = int(v or 0)
        elif f.name == "ablation":
            v = str(v or "zero")
        values[f.name] = v
    return Findings(**values)


@dataclass(frozen=True)
class ScoreMap:
    """One score over every head (``report["scores"][name]``, paper Eq. 6-9): ``values`` per layer × head."""

    values: Any               # nested lists (layer × head) or None when the score is unavailable
    layers: tuple[int, ...]
    descending: bool
    available: bool
    reason: str | None

    @classmethod
    def from_dict(cls, d: Any) -> ScoreMap:
        d = _map(d, "a score")
        return cls(d.get("values"), tuple(int(x) for x in d.get("layers") or ()), bool(d.get("descending", True)),
                   bool(d.get("available")), d.get("reason"))

    def to_dict(self) -> dict[str, Any]:
        return {"values": self.values, "layers": list(self.layers), "descending": self.descending,
                "available": self.available, "reason": self.reason}


@dataclass(frozen=True)
class WarningRecord:
    """One sanity warning (:class:`~refineclip_core.edit.sanity.SanityWarning`'s ``to_dict()``): its kind,
    the sentence, and its numbers as data."""

    kind: str
    text: str
    numbers: Mapping[str, Any]

    @classmethod
    def from_dict(cls, d: Any) -> WarningRecord:
        d = _map(d, "a warning")
        return cls(str(d["kind"]), str(d["text"]), dict(d.get("numbers") or {}))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "text": self.text, "numbers": dict(self.numbers)}


@dataclass(frozen=True)
class CheckpointRecord:
    """The merged checkpoint the run wrote: its file name, format, size and the key the edit went into."""

    file: str
    format: str
    bytes: int
    merged_into: str

    @classmethod
    def from_dict(cls, d: Any) -> CheckpointRecord:
        d = _map(d, "the checkpoint")
        return cls(str(d["file"]), str(d["format"]), int(d["bytes"]), str(d["merged_into"]))

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "format": self.format, "bytes": self.bytes, "merged_into": self.merged_into}


@dataclass(frozen=True)
class PerImageTable:
    """Every image's predictions (:data:`~refineclip_core.reporting.tables.PER_IMAGE_COLUMNS`)."""

    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]

    @classmethod
    def from_dict(cls, d: Any) -> PerImageTable:
        d = _map(d, "the per-image table")
        columns = tuple(str(c) for c in d["columns"])
        rows = tuple(tuple(r) for r in d["rows"])
        if any(len(r) != len(columns) for r in rows):
            raise ValueError("a per-image row does not have one cell per column")
        return cls(columns, rows)

    def to_dict(self) -> dict[str, Any]:
        return {"columns": list(self.columns), "rows": [list(r) for r in self.rows]}


@dataclass(frozen=True)
class _View:
    """A section written by a richer record elsewhere: typed fields read from it, the JSON kept whole."""

    raw: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.raw)


@dataclass(frozen=True)
class SelectionRecord(_View):
    """Alg. 1's choice (``report["selection"]``): the utility curves, the chosen score and cut-off."""

    curves: Mapping[str, list] = None          # type: ignore[assignment]
    candidates: Mapping[str, list] = None      # type: ignore[assignment]
    baseline_utility: float | None = None
    score: str | None = None
    t: int = 0

    @classmethod
    def from_dict(cls, d: Any) -> SelectionRecord:
        d = _map(d, "the selection")
        sel = _map(d.get("selected") or {}, "the selected score")
        return cls(d, dict(_map(d.get("curves") or {}, "the curves")), dict(_map(d.get("candidates") or {}, "candidates")),
                   d.get("baseline_utility"), None if sel.get("score") is None else str(sel["score"]),
                   int(sel.get("t") or 0))


@dataclass(frozen=True)
class StabilityRow:
    head: str
    in_set: bool
    chosen_in: int
    resamples: int
    note: str


@dataclass(frozen=True)
class StabilityRecord(_View):
    """How stable the choice of heads is over bootstrap resamples (``report["head_stability"]``)."""

    summary: str = ""
    resamples: int = 0
    rows: tuple[StabilityRow, ...] = ()

    @classmethod
    def from_dict(cls, d: Any) -> StabilityRecord:
        d = _map(d, "the head stability")
        rows = tuple(StabilityRow(str(r["head"]), bool(r["in_set"]), int(r["chosen_in"]), int(r["resamples"]),
                                  str(r.get("note") or "")) for r in d.get("rows") or ())
        return cls(d, str(d.get("summary") or ""), int(d.get("resamples") or 0), rows)


@dataclass(frozen=True)
class ConceptRow:
    """One diagnosed concept of one error pair (``true → wrong``; empty for a record without pairs)."""

    true: str
    wrong: str
    text: str
    heads: tuple[str, ...]
    head_shares: Mapping[str, float]
    push_share: float
    share: float
    side: str
    contrast: float | None
    coverage: float | None
    p_random: float | None
    descriptions: tuple[str, ...]


@dataclass(frozen=True)
class DiagnosisRecord(_View):
    """What removing the heads takes out (``report["diagnosis"]``): the sentence and every pair's concepts."""

    sentence: str | None = None
    concepts: tuple[ConceptRow, ...] = ()

    @classmethod
    def from_dict(cls, d: Any) -> DiagnosisRecord:
        d = _map(d, "the diagnosis")
        pairs = d.get("pairs") or [{"true": "", "wrong": "", "concepts": d.get("concepts") or []}]
        rows = tuple(ConceptRow(str(p["true"]), str(p["wrong"]), str(c["text"]), tuple(map(str, c["heads"])),
                                dict(c.get("head_shares") or {}), float(c.get("push_share") or 0.0), float(c["share"]),
                                str(c.get("side") or "errors"), c.get("contrast"), c.get("coverage"),
                                c.get("p_random"), tuple(map(str, c.get("descriptions") or ())))
                     for p in pairs for c in p.get("concepts") or ())
        return cls(d, None if d.get("sentence") is None else str(d["sentence"]), rows)


@dataclass(frozen=True)
class VerdictRecord(_View):
    """The guard's verdict on the exported edit (``report["verdict"]``, an
    :class:`~refineclip_core.edit.guard.EditVerdict`'s ``to_dict()``)."""

    status: str = ""
    sentence: str | None = None
    details: tuple[str, ...] | None = None     # None in records written before the one-sentence verdict
    summary: str | None = None
    has_units: bool = False                     # every group and class was recorded (the guard's table)

    @property
    def lead(self) -> str:
        """The verdict in one sentence (a record older than the sentence: its summary)."""
        return str((self.sentence if self.details is not None else self.summary) or self.sentence or "")

    def rows(self, numeric: bool = False) -> list[dict[str, Any]]:
        """The guard's table (:func:`~refineclip_core.reporting.tables.verdict_rows`)."""
        return verdict_rows(self.raw, numeric)

    @classmethod
    def from_dict(cls, d: Any) -> VerdictRecord:
        d = _map(d, "the verdict")
        details = d.get("details")
        return cls(d, str(d.get("status") or ""), None if d.get("sentence") is None else str(d["sentence"]),
                   None if details is None else tuple(map(str, details)),
                   None if d.get("summary") is None else str(d["summary"]), d.get("groups") is not None)


@dataclass(frozen=True)
class ConceptRemovalRecord(_View):
    """The concept the edit also removed (``report["concept_removal"]``)."""

    sentence: str = ""
    texts: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: Any) -> ConceptRemovalRecord:
        d = _map(d, "the concept removal")
        return cls(d, str(d.get("sentence") or ""), tuple(map(str, d.get("texts") or ())))

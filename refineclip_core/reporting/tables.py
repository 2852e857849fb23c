"""Tables as CSV that a spreadsheet opens as data: the one CSV writer of the project.

Every "Download as CSV" of the dashboard, the run report's per-image table and ``refineclip refine
--csv`` go through :func:`csv_text`. Names come from users (class folders, CSV labels, groups, file
names): a cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is read by
spreadsheet programs as a formula (``=HYPERLINK(...)`` leaks data when clicked), so such text cells
get a leading apostrophe (OWASP's advice for CSV injection); numbers stay numbers (a table meant for
download keeps its numbers as numbers, e.g. :func:`verdict_rows` with ``numeric=True``).

:func:`per_image_rows` is the per-image table of a phase-2 run: each image's file, true class, group,
zero-shot prediction, edited prediction and whether it was held out (the rows the guard judged on).
"""

from __future__ import annotations

import csv
import io
import math
import os
from numbers import Number
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from ..method.intervals import (Estimate)
from ..names import decodable

#: Characters that make a spreadsheet read a cell as a formula (or a command) when they lead it.
FORMULA_LEAD = ("=", "+", "-", "@", "\t", "\r")

#: The columns of :func:`per_image_rows`, in order.
PER_IMAGE_COLUMNS = ("file", "true class", "group", "zero-shot prediction", "edited prediction",
                     "zero-shot correct", "edited correct", "held out", "role")


def safe_cell(value: Any) -> Any:
    """``value`` as a CSV cell a spreadsheet cannot execute: text starting with a formula character
    gets a leading ``'``; numbers (bool, int, finite float) and ``None`` (an empty cell) pass as they are."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, Number) and not isinstance(value, complex):
        v = float(value)
        return value if math.isfinite(v) else str(value)
    text = decodable(value)  # a file name's undecodable bytes marked: the CSV is UTF-8
    return "'" + text if text.startswith(FORMULA_LEAD) else text


def csv_text(rows: Iterable[Sequence[Any] | Mapping[str, Any]], columns: Sequence[str]) -> str:
    """``rows`` (sequences in ``columns`` order, or mappings keyed by them) as CSV text; every cell,
    header included, through :func:`safe_cell`."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")   # RFC 4180; a cell holding \r or \n is quoted
    writer.writerow([safe_cell(c) for c in columns])
    for row in rows:
        values = [row.get(c) for c in columns] if isinstance(row, Mapping) else list(row)
        writer.writerow([safe_cell(v) for v in values])
    return out.getvalue()


def frame_csv(frame) -> str:
    """A pandas DataFrame as safe CSV text (its index too when it is named or not a plain range)."""
    import pandas as pd

    if frame.index.name is not None or not isinstance(frame.index, pd.RangeIndex):
        frame = frame.reset_index()
    return csv_text(frame.itertuples(index=False, name=None), [str(c) for c in frame.columns])


def _relative(path: str, root: str | None) -> str:
    if root:
        try:
            return Path(os.path.relpath(path, root)).as_posix() if Path(path).is_relative_to(root) else Path(path).name
        except ValueError:
            return Path(path).name
    return Path(path).name


def per_image_rows(records: Sequence[Any], classes: Sequence[str], before: np.ndarray, after: np.ndarray,
                   held_out: np.ndarray, *, samples: np.ndarray | None = None, adapt: np.ndarray | None = None,
                   root: str | None = None) -> list[dict[str, Any]]:
    """One row per image (``records``: objects with ``path``, ``label``, ``group``): its file (relative to
    ``root``), true class, group, zero-shot (``before``) and edited (``after``) predictions, whether
    each is correct, whether it is ``held_out`` (row indices) and its role in the run: ``held-out``,
    ``labelled sample`` (``samples``: heads chosen on them), ``adaptation`` (``adapt``: the edit
    fitted on them, unlabelled) or ``unused``."""
    n = len(records)
    role = np.full(n, "unused", dtype=object)
    if adapt is not None:
        role[np.asarray(adapt, dtype=np.int64)] = "adaptation"
    if samples is not None:
        role[np.asarray(samples, dtype=np.int64)] = "labelled sample"
    role[np.asarray(held_out, dtype=np.int64)] = "held-out"
    rows = []
    for i, r in enumerate(records):
        b, a = int(before[i]), int(after[i])
        rows.append({"file": decodable(_relative(r.path, root)), "true class": classes[r.label], "group": r.group or "",
                     "zero-shot prediction": classes[b], "edited prediction": classes[a],
                     "zero-shot correct": b == r.label, "edited correct": a == r.label,
                     "held out": role[i] == "held-out", "role": role[i]})
    return rows


def verdict_rows(verdict: Mapping[str, Any], numeric: bool = False) -> list[dict[str, Any]]:
    """Every unit of a verdict's ``to_dict()`` as a row of plain strings: the one table the CLI, the
    run report and the Refine page show (edited groups first, then other groups, classes, the rest).
    ``change (pts)`` is the difference of the shown accuracies (one decimal) and ``95% interval`` its one
    interval (Newcombe, paired); ``can have lost (pts)`` is the verdict's cautious bound (all units'
    bounds holding together at 95%), blank in records written before it existed. ``numeric``: those two
    as numbers (rounded to one decimal; ``None`` for a blank), for tables a spreadsheet reads (a signed
    number as text would be escaped as a formula)."""
    units = [*(verdict.get("groups") or []), *(verdict.get("other_groups") or []),
             *(u for u in verdict.get("classes") or [] if verdict.get("strata") == "group" or not u["edited"]),
             *([verdict["others"]] if verdict.get("others") else [])]

    def acc(e: Mapping[str, Any]) -> str:
        return Estimate(**e).format(count=False)

    def row(u: Mapping[str, Any]) -> dict[str, str]:
        change, bound = u["change"], u.get("drop_bound")
        unchanged = u["fixed"] == 0 and u["broken"] == 0
        shown = shown_points(u["before"]["value"], u["after"]["value"])
        lost = None if bound is None else round(max(bound, 0.0) * 100, 1)
        return {"": f"edited {u['kind']}" if u["edited"] else u["kind"], "name": str(u["name"]), "n": str(u["n"]),
                "before": acc(u["before"]), "after": acc(u["after"]),
                "change (pts)": shown if numeric else f"{shown:+.1f}",
                "95% interval": f"[{change['low'] * 100:.1f}, {change['high'] * 100:.1f}]",
                "fixed / broken": f"{u['fixed']} / {u['broken']}" + (f" (unchanged on all {u['n']})" if unchanged else ""),
                "p (Holm)": f"{u.get('p_holm', 1.0):.3g}", "worse (Holm)": "yes" if u["worse"] else "no",
                "can have lost (pts)": lost if numeric else ("" if lost is None else f"{lost:.1f}")}

    return [row(u) for u in units]


def shown_points(before: float, after: float) -> float:
    """A change of accuracy in points as displayed: the difference of the two accuracies rounded to one
    decimal as shown (84.0% → 87.2% is +3.2, never +3.3)."""
    return round(round(100 * after, 1) - round(100 * before, 1), 1) + 0.0

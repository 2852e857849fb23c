"""The run report's one schema, read from an old file: tests/fixtures/run_report_schema1.json was written by
build_run_report at commit f8fd3a1, before the schema had a version (no "schema" key; a tiny random ViT on
tests/conftest.py's image folder, RefineCLIP-fit + Tip-Adapter, 3 stability resamples; temporary paths
replaced by /models/...). It must read into the typed record, every typed section agreeing with the raw JSON
read independently here, render as HTML and CSV, and write back the same JSON."""

from __future__ import annotations

import copy
import csv
import html
import io
import json
from pathlib import Path

import pytest

from refineclip_core.edit.record import read_run_report
from refineclip_core.reporting.report_schema import RunReport
from refineclip_core.errors import RefineClipError
from refineclip_core.method.method_table import MethodReport
from refineclip_core.reporting.findings import labels_used_column, method_summary, per_key_table
from refineclip_core.reporting.run_report import per_image_csv, render_html, report_json

OLD = Path(__file__).parent / "fixtures" / "run_report_schema1.json"


@pytest.fixture()
def raw() -> dict:
    return json.loads(OLD.read_text())


def test_a_schema_1_file_reads_into_the_typed_record(raw):
    assert "schema" not in raw                                  # written before the schema had a version
    run = read_run_report(OLD)
    assert run.schema == 1 and run.exported == raw["exported"] == "refineclip-fit"
    assert run.data.classes == tuple(raw["data"]["classes"]) and run.data.root == "/data/images"
    assert run.heads == tuple(tuple(h) for h in raw["heads"]) and run.pairs == tuple(map(tuple, raw["pairs"]))
    assert isinstance(run.methods, MethodReport)
    assert list(run.methods.reports) == list(raw["methods"]["reports"]) == ["zero-shot", "ablated",
                                                                           "refineclip-fit", "tip-adapter"]
    assert run.verdict.status == raw["verdict"]["status"] and run.verdict.sentence == raw["verdict"]["sentence"]
    assert run.verdict.details == tuple(raw["verdict"]["details"]) and run.verdict.has_units
    assert run.checkpoint.file == "x.safetensors" and run.checkpoint.bytes == 7
    assert run.per_image.columns == tuple(raw["per_image"]["columns"])
    assert [list(r) for r in run.per_image.rows] == raw["per_image"]["rows"]
    assert run.head_stability.resamples == 3 and len(run.head_stability.rows) == len(raw["head_stability"]["rows"])
    assert run.findings.worst_group.value == raw["findings"]["worst_group"]["value"]
    assert run.findings.worst_group.n == raw["findings"]["worst_group"]["n"]
    assert run.selection.score == raw["selection"]["selected"]["score"]
    assert set(run.scores) == set(raw["scores"])
    assert run.scoring is None                  # not recorded then: read as CLIP's softmax, nothing written back
    # writing it back loses nothing: the same JSON, now with its version named
    assert run.to_dict() == {**raw, "schema": 1}
    assert RunReport.from_dict(json.loads(report_json(run))) == run


def test_the_methods_read_from_json_give_the_tables_the_raw_numbers_give(raw):
    """method_summary / per_key_table on the typed MethodReport against the raw JSON read by hand."""
    run = read_run_report(OLD)
    summary = method_summary(run.methods)
    for name, r in raw["methods"]["reports"].items():
        assert summary[name]["overall"] == {"value": r["accuracy"], "low": r["accuracy_interval"][0],
                                            "high": r["accuracy_interval"][1], "n": r["n_images"]}
        key = f"group:{r['worst_group_name']}"
        assert summary[name]["worst group"] == {"value": r["per_group"][r["worst_group_name"]],
                                                "low": r["intervals"][key][0], "high": r["intervals"][key][1],
                                                "n": r["counts"][key]}
        assert summary[name]["other classes (locality)"] == raw["methods"]["locality"][name]
        assert summary[name]["error-pair classes"] == raw["methods"]["target_accuracy"][name]
        per_class = per_key_table(run.methods, "per_class")[name]
        assert {k: c["value"] for k, c in per_class.items()} == r["per_class"]
        assert [c["n"] for c in per_class.values()] == [r["counts"][k] for k in r["per_class"]]
    used = labels_used_column(run.methods)
    assert used == {k: raw["methods"]["labels_used"].get(k, {}).get("sentence", "") for k in raw["methods"]["reports"]}


def test_an_old_file_renders_as_html_and_csv(raw):
    run = read_run_report(OLD)
    page = render_html(run)
    assert html.escape(raw["verdict"]["sentence"]) in page
    assert all(html.escape(d) in page for d in raw["verdict"]["details"])
    assert all(f"<td>{name}</td>" in page for name in raw["methods"]["reports"])
    assert "How stable is the choice of heads" in page and "x.safetensors" in page
    rows = list(csv.reader(io.StringIO(per_image_csv(run))))
    assert rows[0] == raw["per_image"]["columns"] and len(rows) == 1 + len(raw["per_image"]["rows"])
    held = raw["per_image"]["columns"].index("held out")
    assert [r[held] for r in rows[1:]] == ["yes" if r[held] else "no" for r in raw["per_image"]["rows"]]


@pytest.mark.parametrize("section, value", [("methods", {"reports": {"zero-shot": "high"}}), ("verdict", [1, 2]),
                                            ("per_image", {"columns": ["a", "b"], "rows": [[1]]}),
                                            ("checkpoint", {"file": "x"}), ("warnings", {"kind": "x"}),
                                            ("versions", "x"), ("pairs", [["a"]]), ("n_eval", "7"),
                                            ("scoring", {"kind": "tanh", "scale": 1.0, "bias": 0.0})])
def test_a_malformed_section_is_refused_in_one_sentence_naming_it(raw, tmp_path, section, value):
    bad = copy.deepcopy(raw)
    bad[section] = value
    path = tmp_path / "run.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(RefineClipError, match=f"The run report .* has (a )?'{section}'") as err:
        read_run_report(path)
    assert "\n" not in str(err.value)

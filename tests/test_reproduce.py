"""The reproduction harness end to end on demo-world data, with the demo checkpoint standing in
for real weights (issue 9)."""

from __future__ import annotations

import csv
import json

import pytest

from refineclip_core.cli import main
from refineclip_core.demo.world import write_world
from refineclip_core.edit.reproduce import harness_label


@pytest.mark.slow  # the whole harness, two seeds
def test_reproduce_waterbirds_on_demo_world(tmp_path):
    data = write_world(tmp_path / "wb", "test", seed=77, n_per_group=8, layout="waterbirds")
    out = tmp_path / "run"
    assert main(["reproduce", "waterbirds", "--data", str(data), "--model", "demo", "--seeds", "0", "1",
                 "--samples-per-class", "4", "--steps", "30", "--out", str(out)]) == 0
    table = (out / "table.md").read_text()
    for key in ("zero-shot", "tip-adapter", "ablated", "refineclip-diag", "standard-finetune", "refineclip-fit",
                "paper:refineclip-diag", "paper:ablated"):       # the labels of the one registry of methods
        assert f"| {harness_label(key)} |" in table
    rows = list(csv.DictReader((out / "rows.csv").open()))
    assert {r["seed"] for r in rows} == {"0", "1"}
    for r in rows:
        for key in ("average_group", "worst_group"):
            assert 0.0 <= float(r[key]) <= 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["samples_per_class"] == [4]


def test_reproduce_locality_and_real_weight_path_offline(tmp_path, monkeypatch):
    data = write_world(tmp_path / "loc", "test", seed=78, n_per_group=6)
    out = tmp_path / "loc-run"
    assert main(["reproduce", "locality", "--data", str(data), "--model", "demo", "--targets", "waterbird,landbird",
                 "--seeds", "0", "--samples-per-class", "4", "--steps", "20", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "rows.csv").open()))
    assert all(r["other_classes"] not in ("", "None") for r in rows)

    import open_clip.factory

    def offline(*_a, **_k):
        raise OSError("connection refused (offline)")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    assert main(["reproduce", "waterbirds", "--data", str(data), "--model", "ViT-B-16", "--pretrained", "openai",
                 "--out", str(tmp_path / "x")]) == 2

"""The home folder's recent list (issue 24 item 2): image folders, caches and runs, newest first, with
sizes; only what a session may read is listed, and only listed items can be removed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from refineclip_core.errors import DataError, RefineClipError
from refineclip_core.features.cache_format import read_manifest
from refineclip_core.session.recent import CACHES, RUNS, recent_items, remove_item, save_run


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.fixture()
def home(tmp_path, tiny_model_files, image_folder):
    from refineclip_core.cli import main

    home = tmp_path / "home"
    cache = home / CACHES / "abc123"
    assert main(["extract", "--model", tiny_model_files["name"], "--model-config", str(tiny_model_files["config"]),
                 "--checkpoint", str(tiny_model_files["checkpoint"]), "--data", str(image_folder),
                 "--out", str(cache)]) == 0
    (home / "demo-data-s1-n2").mkdir(parents=True)
    (home / "demo-data-s1-n2" / "x.bin").write_bytes(b"0" * 1000)
    return home


def test_items_newest_first_with_sizes_and_roots(home, image_folder, tmp_path):
    cache = home / CACHES / "abc123"
    run = save_run(json.dumps({"exported": "refineclip-fit", "model_name": "tiny", "pairs": [["cat", "dog"]],
                               "verdict": {"status": "verified"}, "data": {"root": str(image_folder)},
                               "eval_files": []}),
                   "refineclip-fit", home)
    other = save_run(json.dumps({"data": {"root": "/somewhere/private"}, "eval_files": []}), "x/../../evil", home)
    save_run(json.dumps({"data": {"root": str(image_folder)}, "pairs": "cat"}), "not-a-run", home)   # never listed
    assert other.parent == home / RUNS and ".." not in other.name
    os.utime(home / "demo-data-s1-n2", (1_000, 1_000))
    os.utime(cache / "manifest.json", (2_000, 2_000))
    os.utime(run, (3_000, 3_000))
    os.utime(other, (4_000, 4_000))
    items = recent_items(home)
    assert [Path(i.path) for i in items] == [other, run, cache, home / "demo-data-s1-n2"]
    assert {i.kind for i in items} == {"run", "cache", "folder"}
    assert items[2].bytes == _du(cache) and items[3].bytes == 1000
    man = read_manifest(cache)
    assert man.model_name in items[2].label and f"{man.n_records:,} images" in items[2].label
    assert "cat → dog" in items[1].label and "(verified)" in items[1].label
    # a session that may read the images and the home, but not /somewhere/private, never sees that run
    from refineclip_core.loading.confine import Confinement

    with Confinement.of([home, image_folder]).active():
        assert [Path(i.path) for i in recent_items(home)] == [run, cache, home / "demo-data-s1-n2"]
        with pytest.raises(DataError):
            remove_item(other, home)
    assert other.exists()


def test_only_listed_items_are_removed(home, tmp_path):
    outside = tmp_path / "keep"
    outside.mkdir()
    (home / CACHES / "link").symlink_to(outside)
    for bad in (outside, home, home / CACHES, home / CACHES / "link", home / "text-pools"):
        with pytest.raises(DataError):
            remove_item(bad, home)
    assert outside.exists()
    remove_item(home / CACHES / "abc123", home)
    remove_item(home / "demo-data-s1-n2", home)
    assert not (home / CACHES / "abc123").exists() and not (home / "demo-data-s1-n2").exists()
    assert recent_items(home) == []


def test_a_run_updated_with_more_rows_replaces_its_record(tmp_path):
    home = tmp_path / "home"
    first = save_run(json.dumps({"methods": {"reports": {"a": 1}}}), "refineclip-fit", home)
    again = save_run(json.dumps({"methods": {"reports": {"a": 1, "b": 2}}}), "refineclip-fit", home, replace=first)
    assert again == first and json.loads(first.read_text())["methods"]["reports"] == {"a": 1, "b": 2}
    assert len(list((home / RUNS).iterdir())) == 1
    # a path that is not a run record of this home folder is never overwritten: a new record is written
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("keep")
    new = save_run("{}", "x", home, replace=elsewhere)
    assert new.parent == (home / RUNS).resolve() and elsewhere.read_text() == "keep"


def test_saved_runs_are_parsed_once_per_version_of_the_file(tmp_path, monkeypatch, image_folder):
    """The Load page lists every run on each rerun: a run file is parsed again only when it changes."""
    from refineclip_core.session import recent

    home = tmp_path / "home"
    body = {"exported": "refineclip-fit", "model_name": "tiny", "pairs": [["cat", "dog"]],
            "data": {"root": str(image_folder)}, "eval_files": []}
    run = save_run(json.dumps(body), "refineclip-fit", home)
    calls = []
    real = recent.read_run_report
    monkeypatch.setattr(recent, "read_run_report", lambda p: calls.append(p) or real(p))
    for _ in range(3):
        assert [Path(i.path) for i in recent_items(home)] == [run]
        assert recent.saved_run(run).model_name == "tiny"
    assert len(calls) == 1
    run.write_text(json.dumps(dict(body, model_name="tiny-2")))         # rewritten: read again
    os.utime(run, ns=(run.stat().st_mtime_ns + 10**9,) * 2)
    assert recent.saved_run(run).model_name == "tiny-2" and len(calls) == 2
    run.write_text(json.dumps(dict(body, pairs="cat")))                  # no longer a run: one sentence
    os.utime(run, ns=(run.stat().st_mtime_ns + 2 * 10**9,) * 2)
    with pytest.raises(RefineClipError, match="not pairs of class names"):
        recent.saved_run(run)
    assert recent_items(home) == []


def test_the_parsed_runs_kept_in_memory_are_bounded_in_bytes(tmp_path, monkeypatch, image_folder):
    """A server lists every saved run on each rerun: what it keeps parsed stays within RUN_MEMO_BYTES
    (least recently used dropped), so many large run reports are parsed again, never all held."""
    from refineclip_core.session import recent

    home = tmp_path / "home"
    body = {"exported": "refineclip-fit", "data": {"root": str(image_folder)}, "eval_files": []}
    runs = [save_run(json.dumps(dict(body, model_name=f"m{i}")), f"run-{i}", home) for i in range(3)]
    monkeypatch.setattr(recent, "RUN_MEMO_BYTES", runs[0].stat().st_size * 2)   # room for two of the three
    monkeypatch.setattr(recent, "_memo", recent.OrderedDict())
    calls = []
    real = recent.read_run_report
    monkeypatch.setattr(recent, "read_run_report", lambda p: calls.append(p) or real(p))
    assert [recent.saved_run(r).model_name for r in runs] == ["m0", "m1", "m2"] and len(calls) == 3
    assert len(recent._memo) == 2 and sum(k[2] for k in recent._memo) <= recent.RUN_MEMO_BYTES
    assert recent.saved_run(runs[2]).model_name == "m2" and len(calls) == 3     # kept: not parsed again
    assert recent.saved_run(runs[0]).model_name == "m0" and len(calls) == 4     # dropped first: parsed again

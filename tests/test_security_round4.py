"""Issue 37 (the fourth red-team round), items 4-6, 8, 9 and the "also observed" lines: names in any
encoding, quotas over everything a session writes, the ``metadata.csv`` row limit, decoding memory,
``eval --rows-from`` parsing, each server's own upload folders and the concept text's length."""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from refineclip_core.cli import main

from .conftest import make_image
from .test_app import assert_clean, demo_spec, fresh_app, home, open_page  # noqa: F401 (fixtures)

#: Class folders with undecodable bytes (and one ordinary), file names with undecodable bytes.
RAW_CLASSES = (b"cat_\xff\xfe", b"dog", b"bird\xff")
SHOWN_CLASSES = ("cat_⟨xFF⟩⟨xFE⟩", "dog", "bird⟨xFF⟩")


def _write_undecodable(root: Path, n: int = 8) -> Path:
    """Class folders and image files whose names are not UTF-8 (written through byte paths)."""
    rng = np.random.default_rng(4)
    base = os.fsencode(root)
    for c, raw in enumerate(RAW_CLASSES):
        folder = os.path.join(base, raw)
        os.makedirs(folder)
        for i in range(n):
            name = b"img%d.png" % i if raw == b"dog" else b"bad_\xff\xfe%d.png" % i
            with open(os.path.join(folder, name), "wb") as fh:
                make_image(rng, ((90 * c) % 255, 60, 200 - 80 * c), size=32).save(fh, format="PNG")
    return root


@pytest.fixture(scope="module")
def undecodable(tmp_path_factory) -> Path:
    return _write_undecodable(tmp_path_factory.mktemp("undecodable") / "data")


@pytest.fixture(scope="module")
def undecodable_cache(undecodable, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("undecodable-cache") / "cache"
    assert main(["extract", "--model", "demo", "--data", str(undecodable), "--out", str(cache), "--layers", "2"]) == 0
    return cache


def _all_text(path: Path) -> str:
    text = path.read_bytes().decode("utf-8")  # strict: a file someone opens must be valid UTF-8
    if path.suffix in (".json", ".csv"):  # (the HTML inlines plotly.js, whose regexes name surrogates)
        assert "\\udc" not in text.lower(), "a surrogate escape leaked into the file"
    return text


# ---------------------------------------------------------------------------------------------
# 4. names in any encoding: one function at the edge, every command and page

def test_names_are_decoded_and_marked_at_the_edge_the_real_path_kept(undecodable):
    from refineclip_core.loading.data import load_dataset
    from refineclip_core.names import decodable

    ds = load_dataset(undecodable)
    assert sorted(ds.classes) == sorted(SHOWN_CLASSES)
    bad = [r for r in ds.records if "bad_" in r.name]
    assert bad and all("⟨xFF⟩⟨xFE⟩" in r.name for r in bad)
    for r in ds.records:
        r.name.encode("utf-8")                       # shown anywhere
        assert r.name == decodable(r.path)           # one function
        assert os.path.isfile(os.fsencode(r.path))   # and the real file still opens


@pytest.mark.slow  # every CLI command
def test_every_cli_command_runs_on_undecodable_names(undecodable, undecodable_cache, tmp_path, capsys):
    cache = undecodable_cache
    out = tmp_path / "run"
    rc = main(["refine", "--cache", str(cache), "--out", str(out / "ckpt"), "--no-baselines", "--resamples", "2",
               "--json", str(out / "run.json"), "--html", str(out / "run.html"), "--csv", str(out / "rows.csv")])
    assert rc in (0, 3, 4), capsys.readouterr().err
    rows = list(csv.DictReader(io.StringIO(_all_text(out / "rows.csv"))))
    assert any("⟨xFF⟩⟨xFE⟩" in r["file"] for r in rows)
    assert {r["true class"] for r in rows} == set(SHOWN_CLASSES)
    assert "⟨xFF⟩" in _all_text(out / "run.html")
    report = json.loads(_all_text(out / "run.json"))
    assert any("⟨xFF⟩⟨xFE⟩" in f for f in report["eval_files"])
    for argv in (["explain", "--cache", str(cache), "--resamples", "2", "--json", str(tmp_path / "ex.json")],
                 ["describe", "--cache", str(cache), "--resamples", "2", "--k", "2", "--json", str(tmp_path / "de.json")],
                 ["eval", "--model", "demo", "--data", str(undecodable), "--rows-from", str(out / "run.json"),
                  "--json", str(tmp_path / "ev.json")],
                 ["eval", "--model", "demo", "--data", str(undecodable), "--json", str(tmp_path / "ev2.json")],
                 ["zero-shot", "--cache", str(cache)], ["score", "--cache", str(cache), "--resamples", "2"]):
        assert main(argv) == 0, (argv[0], capsys.readouterr().err)
    for name in ("ex.json", "de.json", "ev.json", "ev2.json"):
        _all_text(tmp_path / name)
    ev = json.loads(_all_text(tmp_path / "ev.json"))
    assert ev["n_images"] == len(report["eval_files"])  # --rows-from matched every held-out image by its shown name
    err = capsys.readouterr().err
    assert "unexpected error" not in err


@pytest.mark.slow  # every page (AppTest)
def test_every_page_runs_on_undecodable_names(home, demo_spec, undecodable):  # noqa: F811 (fixtures)
    at = fresh_app(demo_spec)
    at.run()
    at.radio(key="load_data_kind").set_value("Folder on the server").run()
    at.text_input(key="load_folder").input(str(undecodable)).run()
    at.button(key="load_scan_btn").click().run()
    assert_clean(at)
    at.button(key="load_extract_btn").click().run()
    assert_clean(at)
    assert not at.session_state["source"].is_demo
    for name in ("load", "errors", "heads", "inspector", "ablate", "refine"):
        page = open_page(at, name)
        if name == "ablate":  # flip predictions so the gallery shows the files
            page.button(key="abl_clear").click().run()
            for box in page.checkbox[:6]:
                box.check()
            page.run()
        if name == "refine":
            page.number_input(key="ref_steps").set_value(5)
            page.button[0].click().run()
        assert_clean(page)


# ---------------------------------------------------------------------------------------------
# 9. eval --rows-from: a bounded-depth parse and type-checked fields

def _run_report(tmp_path: Path, name: str, obj=None, text: str | None = None) -> Path:
    path = tmp_path / name
    path.write_text(text if text is not None else json.dumps(obj))
    return path


def test_rows_from_refuses_deep_json_and_mistyped_fields_in_one_sentence(undecodable, tmp_path, capsys):
    from refineclip_core.edit.record import read_run_report
    from refineclip_core.errors import RefineClipError

    deep = _run_report(tmp_path, "deep.json", text="[" * 100_000 + "]" * 100_000)
    good = {"eval_files": [], "data": {"classes": list(SHOWN_CLASSES), "templates": ["a photo of a {}."]}}
    cases = {
        deep: "nests 100,000 levels deep",
        _run_report(tmp_path, "str-templates.json", {**good, "data": {**good["data"], "templates": "a photo of {}"}}):
            "'data.templates' of type str",
        _run_report(tmp_path, "int-files.json", {**good, "eval_files": [1, 2]}): "'eval_files' that is not a list",
        _run_report(tmp_path, "str-classes.json", {**good, "data": {**good["data"], "classes": "cat"}}):
            "'data.classes' that is not a list",
        _run_report(tmp_path, "no-brace.json", {**good, "data": {**good["data"], "templates": ["a photo"]}}):
            "exactly one '{}'",
    }
    for path, words in cases.items():
        with pytest.raises(RefineClipError, match=re.escape(words)):
            read_run_report(path)
        rc = main(["eval", "--model", "demo", "--data", str(undecodable), "--rows-from", str(path)])
        err = capsys.readouterr().err
        assert rc == 2 and words in err and "unexpected error" not in err and "Recursion" not in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert read_run_report(_run_report(tmp_path, "ok.json", good)).data.templates == ("a photo of a {}.",)


# ---------------------------------------------------------------------------------------------
# 6. metadata.csv: a row limit, checked while the file streams

def test_metadata_csv_row_limit_is_checked_while_streaming(tmp_path, monkeypatch):
    from refineclip_core.errors import DataError
    from refineclip_core.loading import data as data_mod

    root = tmp_path / "rows"
    root.mkdir()
    make_image(np.random.default_rng(0), (10, 20, 30)).save(root / "a.png")
    rows = ["path,label"] + ["a.png,cat"] + [f"missing{i}.png,dog" for i in range(50)]
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.setenv("REFINECLIP_MAX_CSV_ROWS", "51")
    assert len(data_mod.load_dataset(root)) == 1            # 51 rows: at the limit, read
    monkeypatch.setenv("REFINECLIP_MAX_CSV_ROWS", "50")
    with pytest.raises(DataError, match=r"has more than 50 rows.*REFINECLIP_MAX_CSV_ROWS"):
        data_mod.load_dataset(root)
    # streamed: the refusal comes when row 51 is read, before the rest of the file (an endless one here)
    seen = []

    def endless():
        yield "path,label\n"
        for i in range(10**9):
            seen.append(i)
            yield f"missing{i}.png,dog\n"

    with pytest.raises(DataError, match="more than 50 rows"):
        data_mod.parse_metadata(endless(), root)
    assert len(seen) <= 52
    # the same limit for an uploaded metadata.csv, and in the default
    with pytest.raises(DataError, match="more than 50 rows"):
        data_mod.parse_metadata("\n".join(rows), root)
    monkeypatch.setenv("REFINECLIP_MAX_CSV_ROWS", "lots")
    with pytest.raises(DataError, match="REFINECLIP_MAX_CSV_ROWS must be a positive whole number"):
        data_mod.load_dataset(root)
    monkeypatch.delenv("REFINECLIP_MAX_CSV_ROWS")
    assert data_mod.max_csv_rows() == 1_000_000


def test_metadata_csv_in_another_encoding_names_the_real_files(tmp_path):
    """A Latin-1 metadata.csv naming a file whose name is the same Latin-1 bytes: the file is found
    (the path keeps its bytes), the label is shown marked."""
    from refineclip_core.loading.data import load_dataset

    root = tmp_path / "latin1"
    root.mkdir()
    with open(os.path.join(os.fsencode(root), b"caf\xe9.png"), "wb") as fh:
        make_image(np.random.default_rng(1), (50, 60, 70)).save(fh, format="PNG")
    (root / "metadata.csv").write_bytes(b"path,label,group\ncaf\xe9.png,na\xefve,gr\xfcn\n")
    ds = load_dataset(root)
    assert ds.classes == ["na⟨xEF⟩ve"] and ds.records[0].group == "gr⟨xFC⟩n"
    assert ds.records[0].name.endswith("caf⟨xE9⟩.png") and os.path.isfile(os.fsencode(ds.records[0].path))


# ---------------------------------------------------------------------------------------------
# 5. quotas count everything a session writes; each server counts and sweeps only its own folders

def test_caches_exports_and_runs_in_a_session_folder_count_against_its_quota(upload_tmp, undecodable, monkeypatch):
    from refineclip_core.errors import DataError
    from refineclip_core.features.extraction import ExtractionConfig, extract
    from refineclip_core.files import atomic_write_bytes
    from refineclip_core.loading.data import load_dataset
    from refineclip_core.loading.hf_clip.export import _write_folder
    from refineclip_core.loading.models import ModelSpec, load_model
    from refineclip_core.loading.uploads import folder_bytes, session_upload_dir

    monkeypatch.setenv("REFINECLIP_UPLOAD_QUOTA", "300kB")
    a = session_upload_dir()
    loaded, ds = load_model(ModelSpec("demo")), load_dataset(undecodable)
    # the cache of an upload (about 0.5 MB for these 24 images and 2 layers) is refused at its shard
    with pytest.raises(DataError, match=r"Writing '00000' \(.*\) would bring this session's files to .*over its "
                                        r"quota of 300\.0 kB \(REFINECLIP_UPLOAD_QUOTA"):
        extract(loaded, ds, a / "caches" / "c", ExtractionConfig(layers=2))
    assert folder_bytes(a) <= 300_000
    # an exported checkpoint, a run record, a Hugging Face export folder: each checked before it is written
    with pytest.raises(DataError, match="Writing 'edit.safetensors'"):
        atomic_write_bytes(a / "edit.safetensors", b"\0" * 400_000)
    with pytest.raises(DataError, match="Writing 'edit-hf'"):
        _write_folder(a / "edit-hf", {"model.safetensors": b"\0" * 400_000, "config.json": b"{}"})
    assert not (a / "edit.safetensors").exists() and not (a / "edit-hf").exists()
    atomic_write_bytes(a / "run.json", b"{}")            # small writes pass
    # the total over this server's session folders counts their caches too
    monkeypatch.setenv("REFINECLIP_UPLOAD_QUOTA", "10MB")
    monkeypatch.setenv("REFINECLIP_UPLOAD_TOTAL", "1MB")
    b = session_upload_dir()
    extract(loaded, ds, b / "caches" / "c", ExtractionConfig(layers=2))
    with pytest.raises(DataError, match="would bring all sessions' files to .* over the server's total of 1.0 MB"):
        atomic_write_bytes(a / "edit.safetensors", b"\0" * (1_000_000 - folder_bytes(b)))
    # writes outside a session folder (the CLI's outputs) are not counted
    atomic_write_bytes(upload_tmp.parent / "cli-output.bin", b"\0" * 2_000_000)


def _other_server_folder(tmp: Path, token: str) -> Path:
    import tempfile

    from refineclip_core.loading.uploads import ALIVE_FILE, OWNER_FILE, UPLOAD_PREFIX

    folder = Path(tempfile.mkdtemp(prefix=UPLOAD_PREFIX, dir=tmp))
    (folder / OWNER_FILE).write_text(token)
    (folder / "upload.pt").write_bytes(b"\0" * 500_000)
    (folder / ALIVE_FILE).touch()
    return folder


def test_each_server_counts_and_sweeps_only_its_own_upload_folders(upload_tmp, monkeypatch):
    import time

    from refineclip_core.errors import DataError
    from refineclip_core.loading.uploads import (ALIVE_FILE, folder_owner, save_upload, session_upload_dir,
                                                 sweep_upload_dirs, upload_dirs)

    running = _other_server_folder(upload_tmp, f"{os.getppid()}-0123abcd")   # a server that still runs
    stopped = _other_server_folder(upload_tmp, "999999999-0123abcd")          # its server is gone
    mine = session_upload_dir()
    assert (folder_owner(running), folder_owner(stopped), folder_owner(mine)) == ("other", "orphan", "own")
    assert upload_dirs() == [mine]
    # the total counts only this server's folders: the other servers' 1 MB does not refuse this upload
    monkeypatch.setenv("REFINECLIP_UPLOAD_TOTAL", "700kB")
    save_upload(b"\1" * 600_000, "mine.pt", "ckpt", mine)
    with pytest.raises(DataError, match="all sessions' files"):
        save_upload(b"\2" * 200_000, "more.pt", "ckpt", mine)
    # the sweep removes this server's abandoned folders and orphans, never a running server's
    old = time.time() - 10_000
    for folder in (running, stopped, mine):
        os.utime(folder / ALIVE_FILE, (old, old))
    assert sorted(sweep_upload_dirs(max_age=600)) == sorted([stopped, mine])
    assert running.is_dir() and not stopped.exists() and not mine.exists()


# ---------------------------------------------------------------------------------------------
# also observed: a 120,000-character concept is refused naming the concept text, not a class name

def test_an_overlong_concept_text_is_refused_as_a_concept_text(undecodable_cache, capsys, tmp_path):
    from refineclip_core.edit.concept import ConceptConfig
    from refineclip_core.errors import RefineClipError

    with pytest.raises(RefineClipError, match=r"The concept text 'xxxx.*' is 120,000 characters long; concept texts "
                                              r"are limited to 300 characters"):
        ConceptConfig(texts=("x" * 120_000,))
    with pytest.raises(RefineClipError, match="'versus' concept text"):
        ConceptConfig(texts=("water",), versus=("y" * 301,))
    assert ConceptConfig(texts=("w" * 300,)).texts == ("w" * 300,)
    capsys.readouterr()
    rc = main(["refine", "--cache", str(undecodable_cache), "--out", str(tmp_path / "x"), "--remove-concept",
               "x" * 120_000])
    err = capsys.readouterr().err
    assert rc == 2 and "concept text" in err and "class name" not in err and len(err) < 400, err[:300]


# ---------------------------------------------------------------------------------------------
# 8. decoding memory: no full-size float64 copy, the real cost per pixel, the transform inside the budget

def test_wide_images_scale_to_8bit_as_the_float64_formula_without_its_copies():
    import tracemalloc

    from PIL import Image

    from refineclip_core.loading.decode import _scale_to_8bit

    rng = np.random.default_rng(0)
    for arr in (rng.integers(0, 65535, (300, 4000), dtype=np.uint16), rng.integers(-5000, 90000, (700, 2000)).astype(np.int32),
                rng.normal(size=(900, 1500)).astype(np.float32), np.full((50, 60), 7, dtype=np.uint16)):
        img = Image.fromarray(arr)
        a = arr.astype(np.float64)  # the formula, computed whole (as the old code did)
        lo, hi = a.min(), a.max()
        expected = np.zeros(a.shape, np.uint8) if hi <= lo else ((a - lo) / (hi - lo) * 255.0).astype(np.uint8)
        assert np.array_equal(np.asarray(_scale_to_8bit(img)), expected), img.mode
    # memory: a 16-megapixel 16-bit image costs its own copy (2 bytes a pixel) and the 8-bit result (1),
    # not three float64 arrays (24)
    big = Image.fromarray(np.add.outer(np.arange(4000, dtype=np.uint16), np.arange(4000, dtype=np.uint16)))
    tracemalloc.start()
    _scale_to_8bit(big)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 6 * 4000 * 4000, f"{peak / 16e6:.1f} bytes per pixel"


def test_the_budget_counts_the_real_cost_and_holds_the_image_through_its_transform(tmp_path):
    from PIL import Image

    from refineclip_core.loading import decode

    rgb, grey16, rgba = tmp_path / "rgb.png", tmp_path / "grey16.png", tmp_path / "rgba.png"
    Image.new("RGB", (300, 200), (1, 2, 3)).save(rgb)
    Image.fromarray(np.arange(60_000, dtype=np.uint16).reshape(200, 300)).save(grey16)
    Image.new("RGBA", (300, 200), (1, 2, 3, 100)).save(rgba)
    seen = {}
    for path, cost in ((rgb, 1), (grey16, 2), (rgba, 4)):
        budget = decode.DECODE_BUDGET = decode.PixelBudget(limit=10**9)
        try:
            out = decode.load_image(path, transform=lambda im: (seen.setdefault(path.name, budget._in_flight), im.size))
        finally:
            decode.DECODE_BUDGET = decode.PixelBudget()
        assert out[1] == (300, 200)
        assert seen[path.name] == budget.peak == 300 * 200 * cost   # counted while the transform ran
        assert budget._in_flight == 0
    # the transform's own error passes through as it is (not an image error)
    with pytest.raises(ZeroDivisionError):
        decode.load_image(rgb, transform=lambda im: 1 / 0)


def test_waiting_decoders_hold_no_full_size_image(tmp_path):
    """Four decode workers on 16-bit images of a quarter of the budget in pixels (half, at their cost):
    the pixels in flight, counted at their cost and through the transform, never exceed the budget,
    and every batch comes out whole and in order."""
    from PIL import Image

    import torch

    from refineclip_core.loading import decode
    from refineclip_core.loading.batches import DecodeConfig, iter_batches
    from refineclip_core.loading.data import load_dataset

    root = tmp_path / "imgs" / "c"
    root.mkdir(parents=True)
    for i in range(6):
        Image.fromarray(np.full((400, 500), 1000 * i, dtype=np.uint16)).save(root / f"{i}.png")
    limit = 2 * 400 * 500 * 2   # two 16-bit images of 200,000 pixels, each counted twice
    decode.DECODE_BUDGET = budget = decode.PixelBudget(limit=limit)
    try:
        ds = load_dataset(root.parent)
        batches = list(iter_batches(ds.records, [(0, 3), (3, 6)], lambda im: torch.tensor(im.size), None,
                                    DecodeConfig(exact=True, workers=4)))
    finally:
        decode.DECODE_BUDGET = decode.PixelBudget()
    assert [b.keep for b in batches] == [[0, 1, 2], [3, 4, 5]]
    assert all(b.images.tolist() == [[500, 400]] * 3 for b in batches)
    assert 0 < budget.peak <= limit


def test_the_load_page_refuses_a_cache_over_the_session_quota(home, demo_spec, monkeypatch):  # noqa: F811
    """A zip upload well under the quota whose feature cache would not fit: the extraction stops with
    one sentence on the page, and the session's folder stays under its quota."""
    import zipfile

    from refineclip_core.loading.uploads import folder_bytes

    buf = io.BytesIO()
    rng = np.random.default_rng(2)
    with zipfile.ZipFile(buf, "w") as zf:
        for cls, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
            for i in range(6):
                img = io.BytesIO()
                make_image(rng, colour, size=32).save(img, format="PNG")
                zf.writestr(f"shapes/{cls}/{i}.png", img.getvalue())
    assert len(buf.getvalue()) < 100_000
    monkeypatch.setenv("REFINECLIP_UPLOAD_QUOTA", "250kB")
    at = fresh_app(demo_spec)
    at.run()
    at.radio(key="load_data_kind").set_value("Zip upload").run()
    at.file_uploader(key="load_zip").upload("shapes.zip", buf.getvalue(), "application/zip").run()
    at.button(key="load_scan_btn").click().run()
    assert_clean(at)
    at.button(key="load_extract_btn").click().run()   # starts the job; the rerun follows it to its end
    assert not at.exception, [e.value for e in at.exception]
    errors = [re.sub(r"\\(.)", r"\1", e.value) for e in at.error]   # shown as plain text: escapes resolved
    assert len(errors) == 1 and errors[0].startswith("Writing '00000'") and "over its quota of 250.0 kB" in errors[0]
    folder = at.session_state["_session_folder"].path
    assert folder_bytes(folder) <= 250_000

"""The CLI talks to people (issue 19): every command prints a short summary (at most 40 lines, with
accuracies' 95% intervals and image counts), ``--json PATH`` writes the full record and ``--json -``
prints the record alone; progress stays off stdout and away when stderr is not a terminal;
``--layers all`` works wherever ``--layers`` does; the exit statuses are the documented ones."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from refineclip_core.cli import EXIT_CODES, build_parser, main
from refineclip_core.cli.common import SUMMARY_LINES

INTERVAL = re.compile(r"\d+\.\d%\s+\[\d+\.\d, \d+\.\d\]")


def _model_flags(files):
    return ["--model", files["name"], "--model-config", str(files["config"]), "--checkpoint", str(files["checkpoint"])]


@pytest.fixture(scope="module")
def cache_dir(tiny_model_files, image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-output") / "cache"
    assert main([*map(str, ["extract", *_model_flags(tiny_model_files), "--data", image_folder, "--out", out,
                            "--layers", "all"])]) == 0
    return out


def _run(capsys, argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _commands(files, image_folder, cache, tmp_path):
    small = ["--samples-per-class", "3", "--top-t", "4", "--pair", "auto"]
    return {
        "extract": ["extract", *_model_flags(files), "--data", image_folder, "--out", cache, "--layers", "all"],
        "check-decomposition": ["check-decomposition", "--cache", cache, "--max-images", "4"],
        "zero-shot": ["zero-shot", "--cache", cache],
        "score": ["score", "--cache", cache, *small],
        "describe": ["describe", "--cache", cache, "--heads", "all", "--k", "3"],
        "refine": ["refine", "--cache", cache, *small, "--fit-steps", "5", "--steps", "10",
                   "--out", tmp_path / "edited.safetensors"],
        "eval": ["eval", *_model_flags(files), "--data", image_folder, "--cache-dir", tmp_path / "eval-cache"],
        "demo-data": ["demo-data", "--out", tmp_path / "demo", "--n-per-group", "1"],
    }


@pytest.mark.slow
def test_every_command_summarises_in_at_most_40_lines_and_json_dash_prints_only_the_record(
        tiny_model_files, image_folder, cache_dir, tmp_path, capsys):
    for name, argv in _commands(tiny_model_files, image_folder, cache_dir, tmp_path).items():
        rc, out, err = _run(capsys, argv)
        assert rc == 0, (name, err)
        lines = out.rstrip("\n").split("\n")
        assert 1 <= len(lines) <= SUMMARY_LINES, (name, out)
        assert "it/s" not in err and "img/s" not in err, (name, err)   # no progress bars off a terminal
        if name in ("zero-shot", "eval", "score", "refine"):
            assert INTERVAL.search(out) and ("images" in out or "(n=" in out), (name, out)
        if name in ("score", "refine"):
            assert re.search(r"L\d+\.H\d+|No head chosen|heads removed: none", out), (name, out)
        if name in ("extract", "refine", "demo-data"):
            assert "wrote " in out, (name, out)   # where the files went

        rc, piped, _ = _run(capsys, [*argv, "--json", "-"])
        assert rc == 0
        record = json.loads(piped)   # stdout holds the record and nothing else
        rc, out, _ = _run(capsys, [*argv, "--json", tmp_path / f"{name}.json"])
        assert rc == 0 and f"wrote full record (JSON): {tmp_path / f'{name}.json'}" in out
        kept = json.loads((tmp_path / f"{name}.json").read_text())
        assert set(kept) == set(record), name
        if name == "zero-shot":
            assert kept == record and {"accuracy_interval", "intervals", "counts", "worst_group_name"} <= set(kept)


@pytest.mark.slow
def test_a_pipe_gets_the_record_alone_and_no_progress(tiny_model_files, image_folder, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "refineclip_core.cli", "extract", *_model_flags(tiny_model_files),
                           "--data", str(image_folder), "--out", str(tmp_path / "c"), "--json", "-"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["n_images"] == 18
    assert "%|" not in proc.stderr and "img/s" not in proc.stderr


def test_layers_all_is_accepted_wherever_layers_is(cache_dir, capsys, tmp_path):
    parser = build_parser()
    for argv in (["score", "--cache", "C"], ["refine", "--cache", "C"], ["check-decomposition"],
                 ["extract", "--model", "demo", "--data", "D", "--out", "O"],
                 ["reproduce", "waterbirds", "--model", "demo", "--data", "D"]):
        assert parser.parse_args([*argv, "--layers", "all"]).layers == "all"
        assert parser.parse_args([*argv, "--layers", "2"]).layers == 2
    flags = ["score", "--cache", cache_dir, "--samples-per-class", "3", "--top-t", "4", "--pair", "auto", "--json", "-"]
    every = json.loads(_run(capsys, [*flags, "--layers", "all"])[1])
    default = json.loads(_run(capsys, flags)[1])
    last = json.loads(_run(capsys, [*flags, "--layers", "1"])[1])
    assert every["config"]["layers"] == default["config"]["layers"] == [0, 1, 2]
    assert last["config"]["layers"] == [2]
    assert _run(capsys, [*flags[:-2], "--layers", "9"])[0] == 2   # more layers than cached: a user error


def test_exit_statuses_are_the_documented_ones(cache_dir, capsys, monkeypatch, tmp_path):
    for code in ("0 ", "1 ", "2 ", "3 ", "4 ", "130"):
        assert f"\n  {code}" in EXIT_CODES
    assert "exit status:" in build_parser().format_help()
    argv = ["refine", "--cache", cache_dir, "--samples-per-class", "3", "--top-t", "4", "--pair", "auto",
            "--fit-steps", "5", "--steps", "10", "--no-baselines", "--no-diagnosis"]
    _exit_status_per_verdict(capsys, monkeypatch, argv)

    from refineclip_core.cli import zero_shot

    def interrupted(_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(zero_shot, "run", interrupted)
    assert _run(capsys, ["zero-shot", "--cache", cache_dir])[0] == 130
    with pytest.raises(SystemExit) as exc:   # unknown options are a user error everywhere but `app`
        main(["zero-shot", "--cache", str(cache_dir), "--server.port", "1"])
    assert exc.value.code == 2


def test_app_passes_every_further_argument_to_streamlit():
    from refineclip_core.cli import app
    from refineclip_core.home import APP_DIR

    args, extra = build_parser().parse_known_args(["app", "--server.port", "8600", "--theme.base", "dark"])
    assert args.command == "app" and args.pass_through and extra == ["--server.port", "8600", "--theme.base", "dark"]
    cmd = app.command(extra)
    assert cmd[:2] == [sys.executable, str(APP_DIR / "dashboard" / "serve.py")]
    assert cmd[2:] == extra and (APP_DIR / ".streamlit" / "config.toml").is_file()


def _constructed(kind: str, config=None):
    """A verdict of each kind from hand-built predictions: 2 edited classes x 2 groups of 200 held-out
    images, and one other class of 200 (enough to bound a 5-point drop everywhere when nothing breaks)."""
    from refineclip_core.edit import guard

    config = config or guard.GuardConfig()
    n = 200
    labels = np.repeat([0, 0, 1, 1, 2], n)
    groups = np.repeat([0, 1, 2, 3, -1], n)
    before = labels.copy()
    before[:n // 2] = 1                   # group 0 (class 0): half wrong before
    after = before.copy()
    if kind in ("verified", "harmful"):
        after[:n // 2] = 0                # the edit fixes them
    if kind == "harmful":
        after[4 * n:4 * n + 60] = 0       # ... and breaks 60 of the other class
    if kind == "not-verified":
        after[:3] = 0                     # fixes only 3
    rows = np.arange(5 * n)
    if kind == "dropped":                 # fixes them, and 3 of 20 images of the other class break: −15 points,
        after[:n // 2] = 0                # not significant (McNemar p = 0.25), more than a 5-point drop
        rows = np.arange(4 * n + 20)
        after[4 * n:4 * n + 3] = 0
    return guard.judge_edit(labels, before, after, rows, [0, 1], ["a", "b", "c"], groups,
                            ["a1", "a2", "b1", "b2"], "constructed", config)


def _exit_status_per_verdict(capsys, monkeypatch, argv):
    """``refine`` exits 3 (--fail-if-worse) on a harmful edit and 4 (--require-verified) on one not
    verified (and on a harmful one without --fail-if-worse), 0 otherwise: the guard is handed
    constructed verdicts of each kind; the tiny cache's own verdict (too few held-out images) too."""
    from refineclip_core.edit import run as edit_run

    real = _run(capsys, [*argv, "--json", "-"])
    assert json.loads(real[1])["verdict"]["status"] == "not-verified"
    assert "too few held-out images" in json.loads(real[1])["verdict"]["summary"]
    assert _run(capsys, [*argv, "--require-verified"])[0] == 4
    expected = {"harmful": (3, 4, 3, 0), "not-verified": (0, 4, 4, 0), "verified": (0, 0, 0, 0),
                "dropped": (3, 4, 3, 0)}
    for kind, codes in expected.items():
        monkeypatch.setattr(edit_run, "assess_edit", lambda *a, k=kind: _constructed(k, a[5] if len(a) > 5 else None))
        got = []
        for flags in (["--fail-if-worse"], ["--require-verified"], ["--fail-if-worse", "--require-verified"], []):
            rc, out, err = _run(capsys, [*argv, *flags])
            assert f"Guard: {'not-verified' if kind == 'dropped' else kind}" in out
            assert (err.strip().count("\n") == 0 and err.startswith("--")) if rc else "--" not in err, (kind, err)
            got.append(rc)
        assert tuple(got) == codes, (kind, got)
    # the dropped edit: the reason names the group and the margin; a wider --max-drop lets it through
    monkeypatch.setattr(edit_run, "assess_edit", lambda *a: _constructed("dropped", a[5]))
    rc, _, err = _run(capsys, [*argv, "--fail-if-worse"])
    assert rc == 3 and "c dropped -15.0 pts" in err and "more than the acceptable 5 points (--max-drop)" in err
    rc, _, err = _run(capsys, [*argv, "--fail-if-worse", "--max-drop", "20"])
    assert rc == 0 and not err.strip()
    rc, _, err = _run(capsys, [*argv, "--require-verified"])
    assert rc == 4 and err.startswith("--require-verified: Not verified:")
    assert _run(capsys, [*argv, "--max-drop", "0"])[0] == 2              # a user error, one sentence


def test_eval_rows_from_a_refine_run_gives_the_reports_numbers(cache_dir, tiny_model_files, image_folder, capsys,
                                                               tmp_path):
    """``refineclip eval --rows-from RUN.json`` evaluates exactly the run's held-out images: the original
    model gives the report's zero-shot accuracy, the exported checkpoint the edit's."""
    run, ckpt = tmp_path / "run.json", tmp_path / "edited.safetensors"
    rc, _, _ = _run(capsys, ["refine", "--cache", cache_dir, "--samples-per-class", "2", "--top-t", "4", "--pair",
                             "auto", "--fit-steps", "5", "--no-baselines", "--no-diagnosis", "--json", run,
                             "--out", ckpt])
    assert rc == 0
    report = json.loads(run.read_text())
    assert len(report["eval_files"]) == report["n_eval"] == len(report["eval_rows"])
    reports = report["methods"]["reports"]
    flags = _model_flags(tiny_model_files)
    for checkpoint, method in ((tiny_model_files["checkpoint"], "zero-shot"), (ckpt, report["exported"])):
        flags[-1] = str(checkpoint)
        rc, out, _ = _run(capsys, ["eval", *flags, "--data", image_folder, "--rows-from", run, "--json", "-"])
        assert rc == 0
        got = json.loads(out)
        assert got["n_images"] == report["n_eval"]
        assert got["accuracy"] == pytest.approx(reports[method]["accuracy"]), method
        assert got["per_group"] == pytest.approx(reports[method]["per_group"]), method
    # a report that does not list held-out images, or a folder without them: one sentence, status 2
    (tmp_path / "bad.json").write_text("{}")
    rc, _, err = _run(capsys, ["eval", *flags, "--data", image_folder, "--rows-from", tmp_path / "bad.json"])
    assert rc == 2 and "not a run report" in err


def test_a_folder_too_small_to_check_an_edit_says_so_with_the_numbers(tiny_model_files, tmp_path, capsys):
    """4 classes x 10 images (the issue's real-photo folder): every class keeps 5 held-out images, the
    guard cannot verify the edit, and the CLI and the run report say why, with the numbers."""
    from .conftest import make_image

    rng = np.random.default_rng(3)
    colours = {"dog": (180, 40, 40), "fish": (40, 180, 40), "landbird": (40, 40, 180), "waterbird": (60, 60, 170)}
    for cls, colour in colours.items():
        (tmp_path / "photos" / cls).mkdir(parents=True)
        for i in range(10):
            make_image(rng, colour).save(tmp_path / "photos" / cls / f"{i}.png")
    cache = tmp_path / "cache"
    assert main([*map(str, ["extract", *_model_flags(tiny_model_files), "--data", tmp_path / "photos", "--out", cache,
                            "--layers", "1"])]) == 0
    argv = ["refine", "--cache", cache, "--pair", "landbird:waterbird", "--fit-steps", "5", "--no-baselines",
            "--no-diagnosis"]
    rc, out, _ = _run(capsys, [*argv, "--require-verified"])
    assert rc == 4 and out.startswith("Guard: not-verified")
    assert "Warning (few-heldout): Too few held-out images to check an edit: landbird: 5 of 10 images" in out
    assert "Warning (untested-data)" in out
    report = json.loads(_run(capsys, [*argv, "--json", "-"])[1])
    assert report["verdict"]["status"] == "not-verified" and report["n_eval"] == 20
    assert [(g["name"], g["n"]) for g in report["verdict"]["groups"]] == [("landbird", 5), ("waterbird", 5)]
    assert {(h["name"], h["n_heldout"], h["n_images"]) for h in report["heldout"]["groups"]} == {
        ("landbird", 5, 10), ("waterbird", 5, 10)}
    kinds = {w["kind"] for w in report["warnings"]}
    assert {"few-heldout", "untested-data"} <= kinds
    assert "too few held-out images: landbird has 5, waterbird has 5" in report["verdict"]["summary"]
    page = tmp_path / "run.html"
    assert _run(capsys, [*argv, "--html", page])[0] == 0
    text = page.read_text()
    assert "not-verified · refineclip-fit" in text and "Warning (few-heldout)" in text
    assert "landbird: 5 of 10 images held out" in text and "worse (Holm)" in text


def test_refine_removes_a_typed_or_diagnosed_concept_and_reports_both_rows(cache_dir, capsys, tmp_path):
    from refineclip_core.cli.refine import edit_config
    from refineclip_core.method.protocol import CONCEPT_KEPT

    args = build_parser().parse_args(["refine", "--cache", "C", "--remove-concept", "diagnosed",
                                      "--remove-concept", "water", "--concept-versus", "land"])
    assert edit_config(args).concept.texts == ("diagnosed", "water") and edit_config(args).concept.versus == ("land",)
    base = ["refine", "--cache", cache_dir, "--samples-per-class", "3", "--top-t", "4", "--pair", "auto",
            "--fit-steps", "5", "--steps", "10"]
    rc, out, _ = _run(capsys, [*base, "--remove-concept", "red fur", "--remove-concept", "green grass",
                               "--json", tmp_path / "run.json", "--html", tmp_path / "run.html"])
    assert rc == 0
    assert "Concept removed: 'red fur', 'green grass'" in out
    report = json.loads((tmp_path / "run.json").read_text())
    assert report["concept_removal"]["texts"] == ["red fur", "green grass"]
    assert report["refine_config"]["concept"]["texts"] == ["red fur", "green grass"]
    assert {"refineclip-fit", CONCEPT_KEPT, "coop"} <= set(report["methods"]["reports"])
    page = (tmp_path / "run.html").read_text()
    assert "Concept removed: &#x27;red fur&#x27;" in page and CONCEPT_KEPT in page
    rc, _, err = _run(capsys, [*base, "--remove-concept", "diagnosed", "--no-diagnosis"])
    assert rc == 2 and "needs the diagnosis" in err
    rc, _, _ = _run(capsys, [*base, "--no-baselines", "--json", tmp_path / "plain.json"])
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert rc == 0 and "concept_removal" not in plain and CONCEPT_KEPT not in plain["methods"]["reports"]

"""The CLI talks to people (issue 19): every command prints a short summary (at most 40 lines, with
accuracies' 95% intervals and image counts), ``--json PATH`` writes the full record and ``--json -``
prints the record alone; progress stays off stdout and away when stderr is not a terminal;
``--layers all`` works wherever ``--layers`` does; the exit statuses are the documented ones."""

from __future__ import annotations

import json
import re
import subprocess
import sys

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
    for code in ("0 ", "1 ", "2 ", "3 ", "130"):
        assert f"\n  {code}" in EXIT_CODES
    assert "exit status:" in build_parser().format_help()

    from refineclip_core.method import protocol

    real = protocol.assess_edit

    def harmful(*a, **k):
        verdict = real(*a, **k)
        verdict.harmed.append("Accuracy on the other classes got worse: -9.0 pts [-12.0, -6.0] (n=9) held-out images.")
        return verdict

    monkeypatch.setattr(protocol, "assess_edit", harmful)
    argv = ["refine", "--cache", cache_dir, "--samples-per-class", "3", "--top-t", "4", "--pair", "auto",
            "--fit-steps", "5", "--steps", "10", "--no-baselines"]
    rc, out, _ = _run(capsys, [*argv, "--fail-if-worse"])
    assert rc == 3 and "Warning: this edit made the model worse" in out
    assert _run(capsys, argv)[0] == 0   # without --fail-if-worse the run itself succeeded

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
    assert cmd[:4] == [sys.executable, "-m", "streamlit", "run"] and cmd[4] == str(APP_DIR / "app.py")
    assert cmd[5:] == extra and (APP_DIR / ".streamlit" / "config.toml").is_file()

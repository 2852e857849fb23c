"""The installable app (issue 19): a wheel built from the repository holds the library and the
dashboard (app.py, pages, UI helpers, the demo assets, the Streamlit config), the installed
library finds them, and the installed ``refineclip app`` serves the dashboard from another folder.

The wheel is built once (pip, with build isolation, as ``pip install .`` does) from a copy of the
repository and installed with ``--target`` into a temporary folder that is put first on
``PYTHONPATH``: the heavy dependencies come from the test environment, everything of this project
from the wheel (the clone is never importable from the folder the command runs in).

End to end (issue 24): the same wheel installed into a fresh virtual environment (``pip install
--no-deps`` of the wheel; torch and the other dependencies reach it through a ``.pth`` line naming
the test environment's site-packages, whose own ``.pth`` files - an editable install of the clone
among them - are not processed), run from a temporary folder with ``PYTHONPATH`` unset:
``refineclip demo-data``, ``extract``, ``refine`` (diagnosis on), ``describe`` and ``explain`` on
the demo, then ``refineclip app`` walked page by page in Chromium (``-m browser``).
"""

from __future__ import annotations

import ast
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
JUNK = {".git", ".venv", "build", "test-artifacts", "runs", "__pycache__", ".pytest_cache", ".hypothesis"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"   # a clean copy: stale build/ folders of the working tree cannot leak into the wheel
    shutil.copytree(ROOT, src, ignore=lambda _d, names: [n for n in names if n in JUNK or n.endswith(".egg-info")])
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), str(src)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr   # no setuptools deprecation screens
    (found,) = (tmp / "dist").glob("refineclip_studio-*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    return target


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment holding the wheel; the test environment's packages (torch...) reach
    it through a ``.pth`` line, appended after its own site-packages, so the wheel's modules win."""
    env_dir = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, capture_output=True)
    python = env_dir / "bin" / "python"
    site_dir = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                   check=True, capture_output=True, text=True).stdout.strip())
    shared = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site_dir / "_test_environment.pth").write_text("\n".join(shared) + "\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                           "--no-compile", "-q", str(wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return env_dir


def _venv_env(env_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "REFINECLIP_DEMO_MODEL_DIR", "VIRTUAL_ENV")}
    return {**env, "REFINECLIP_HOME": str(env_dir.parent / "home"), "OMP_NUM_THREADS": "1",
            "PATH": f"{env_dir / 'bin'}:{env.get('PATH', '')}", "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}


def _run(env_dir: Path, cwd: Path, *args: str) -> str:
    proc = subprocess.run([str(env_dir / "bin" / "refineclip"), *args], cwd=cwd, env=_venv_env(env_dir),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"refineclip {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_the_installed_commands_run_the_demo_without_the_clone(venv, tmp_path):
    """demo-data -> extract -> refine (with the diagnosis, which reads the shipped text pool) ->
    describe -> explain, each from the wheel in a fresh virtual environment."""
    probe = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import refineclip_core, refineclip_core.inspection.textspan as t, sys;"
                            "print(refineclip_core.__file__); print(t.DEFAULT_TEXT_POOL); print(sys.path)"],
                           cwd=tmp_path, env=_venv_env(venv), capture_output=True, text=True, check=True).stdout
    module, pool, path = probe.splitlines()
    assert Path(module).is_relative_to(venv) and Path(pool).is_relative_to(venv) and Path(pool).is_file()
    entries = [Path(p).resolve() for p in ast.literal_eval(path) if p]
    # the test environment's site-packages (torch...) may sit inside the clone (.venv); the clone itself never
    leaks = [p for p in entries if p == ROOT or (p.is_relative_to(ROOT) and not p.name == "site-packages")]
    assert not leaks, f"the clone is importable from the installed environment: {leaks}"
    _run(venv, tmp_path, "demo-data", "--out", "data", "--n-per-group", "12")
    _run(venv, tmp_path, "extract", "--model", "demo", "--data", "data", "--out", "cache")
    out = _run(venv, tmp_path, "refine", "--cache", "cache", "--out", "edited", "--html", "run.html",
               "--json", "run.json", "--no-baselines")
    assert "Why:" in out and (tmp_path / "edited").is_file() and (tmp_path / "run.html").is_file()
    import json
    record = json.loads((tmp_path / "run.json").read_text())
    assert record.get("diagnosis"), "refine ran without its diagnosis"
    out = _run(venv, tmp_path, "describe", "--cache", "cache", "--heads", "auto")
    assert "TextSpan descriptions" in out
    out = _run(venv, tmp_path, "explain", "--cache", "cache")
    assert "of the removed variance" in out


@pytest.mark.browser
def test_the_installed_app_shows_every_page_in_a_browser(venv, tmp_path, browser):
    """``refineclip app`` from the fresh environment, walked in Chromium along the demo story (every page,
    Grad-CAM and TextSpan on the inspector, a refinement run): no page shows an error or exception."""
    from tests.support import browser as shots

    port = _free_port()
    log = tmp_path / "app.log"
    env = {**_venv_env(venv), "REFINECLIP_DEMO_N": "4"}
    with open(log, "wb") as sink:
        proc = subprocess.Popen([str(venv / "bin" / "refineclip"), "app", "--server.port", str(port),
                                 "--server.headless", "true", "--server.address", "127.0.0.1"],
                                cwd=tmp_path, env=env, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    if r.read() == b"ok":
                        break
            except OSError:
                time.sleep(0.5)
        assert proc.poll() is None, log.read_text(errors="replace")
        seen = []
        context = browser.new_context(viewport={"width": shots.WIDTH, "height": 1000})
        try:
            page = context.new_page()
            shots.open_app(page, f"http://127.0.0.1:{port}")
            for name in shots.SHOTS:
                if name != "load":
                    shots.goto(page, name)
                if name == "inspector":   # Grad-CAM and the TextSpan panel (the shipped text pool)
                    page.locator(".st-key-insp_cam_btn button").click()
                    page.get_by_text("whole model →").first.wait_for(timeout=180_000)
                    shots.settle(page)
                problems = shots.error_messages(page)
                assert not problems, f"the {name} page of the installed app shows errors: {problems}"
                seen.append(name)
        finally:
            context.close()
        assert seen == list(shots.SHOTS)
        text = log.read_text(errors="replace")
        assert "Traceback" not in text, text[-4000:]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _env(target: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(target), "REFINECLIP_HOME": str(target.parent / "home")}


def test_the_wheel_holds_the_library_the_dashboard_and_the_command(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    library = {p.relative_to(ROOT).as_posix() for p in (ROOT / "refineclip_core").rglob("*.py")}
    assert library <= names, f"library modules missing from the wheel: {sorted(library - names)}"
    dashboard = {"app.py", ".streamlit/config.toml", "assets/text_pool.txt",
                 *(p.relative_to(ROOT).as_posix() for d in ("pages", "dashboard", "assets/demo", "assets/demo_siglip")
                   if (ROOT / d).is_dir()      # the SigLIP-shaped demo model ships once it is committed
                   for p in (ROOT / d).iterdir() if p.is_file() and p.suffix in (".py", ".json", ".safetensors", ".md"))}
    missing = {f"refineclip_studio/{n}" for n in dashboard} - names
    assert not missing, f"dashboard files missing from the wheel: {sorted(missing)}"
    assert not any(n.startswith(("tests/", "benchmarks/", "scripts/", "refineclip_studio/tests/")) for n in names)
    dist_info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "refineclip = refineclip_core.cli:main" in zipfile.ZipFile(wheel).read(dist_info).decode()
    metadata = zipfile.ZipFile(wheel).read(dist_info.replace("entry_points.txt", "METADATA")).decode()
    assert "License-Expression: MIT" in metadata


def test_the_installed_library_finds_the_installed_dashboard_and_demo(installed, tmp_path):
    code = ("from refineclip_core.home import APP_DIR; from refineclip_core.loading.models import ModelSpec;"
            "import sys; sys.path.insert(0, str(APP_DIR)); from dashboard.registry import PAGES;"
            "print(APP_DIR); print(ModelSpec('demo').resolved().checkpoint);"
            "print(all((APP_DIR / p.path).is_file() for p in PAGES));"
            "print(ModelSpec('demo-map').resolved().checkpoint);"
            "import dashboard.refine_view as rv; print(rv.BENCHMARK_SUMMARY);"
            "print(rv.benchmark_figures(['refineclip-fit']) is not None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(installed), capture_output=True,
                         text=True, check=True).stdout.split("\n")
    assert Path(out[0]) == installed / "refineclip_studio"
    assert Path(out[1]).is_file() and Path(out[1]).is_relative_to(installed)
    assert out[2] == "True"
    if (ROOT / "assets" / "demo_siglip" / "refineclip-demo-map.safetensors").is_file():   # the SigLIP-shaped demo
        assert Path(out[3]).is_file() and Path(out[3]).is_relative_to(installed)
    # the Refine page's multi-draw figures come from the installed package's data (assets/demo/benchmark.json)
    assert Path(out[4]).is_relative_to(installed) and out[5] == "True"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_refineclip_app_serves_the_dashboard_from_another_folder(installed, tmp_path):
    port = _free_port()
    command = installed / "bin" / "refineclip"
    proc = subprocess.Popen([str(command), "app", "--server.port", str(port)], cwd=tmp_path, env=_env(installed),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        answer, deadline = None, time.monotonic() + 90
        while answer is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    answer = r.read().decode()
            except OSError:
                time.sleep(0.5)
        assert answer == "ok", f"no health answer; server said:\n{proc.stdout.read() if proc.poll() is not None else ''}"
        # the command became the Streamlit server of the installed app.py (not a clone's), through its launcher
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert str(installed / "refineclip_studio" / "dashboard" / "serve.py").encode() in cmdline
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()

"""The installable app (issue 19): a wheel built from the repository holds the library and the
dashboard (app.py, pages, UI helpers, the demo assets, the Streamlit config), the installed
library finds them, and the installed ``refineclip app`` serves the dashboard from another folder.

The wheel is built once (pip, with build isolation, as ``pip install .`` does) from a copy of the
repository and installed with ``--target`` into a temporary folder that is put first on
``PYTHONPATH``: the heavy dependencies come from the test environment, everything of this project
from the wheel (the clone is never importable from the folder the command runs in).
"""

from __future__ import annotations

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


def _env(target: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(target), "REFINECLIP_HOME": str(target.parent / "home")}


def test_the_wheel_holds_the_library_the_dashboard_and_the_command(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    library = {p.relative_to(ROOT).as_posix() for p in (ROOT / "refineclip_core").rglob("*.py")}
    assert library <= names, f"library modules missing from the wheel: {sorted(library - names)}"
    dashboard = {"app.py", ".streamlit/config.toml", "assets/text_pool.txt",
                 *(p.relative_to(ROOT).as_posix() for d in ("pages", "studio_ui", "assets/demo")
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
            "import sys; sys.path.insert(0, str(APP_DIR)); from studio_ui.registry import PAGES;"
            "print(APP_DIR); print(ModelSpec('demo').resolved().checkpoint);"
            "print(all((APP_DIR / p.path).is_file() for p in PAGES))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(installed), capture_output=True,
                         text=True, check=True).stdout.split("\n")
    assert Path(out[0]) == installed / "refineclip_studio"
    assert Path(out[1]).is_file() and Path(out[1]).is_relative_to(installed)
    assert out[2] == "True"


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
        # the command became the Streamlit server of the installed app.py (not a clone's)
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert str(installed / "refineclip_studio" / "app.py").encode() in cmdline
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()

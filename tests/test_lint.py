"""Dead code stays out: ``ruff`` with the narrow rule set of ``pyproject.toml`` ([tool.ruff.lint]:
unused imports and local variables, redefinitions of unused names, undefined names) passes on
every Python file of the repository, and ``vulture`` ([tool.vulture]: unused functions, methods,
classes, properties, attributes, fields and arguments) finds nothing in the production code. CI runs
both as part of the test suite; ``ruff`` and ``vulture`` are pinned in requirements.txt."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_finds_no_unused_or_undefined_names():
    try:
        import ruff  # noqa: F401  (the package that ships the binary)
    except ImportError:
        pytest.fail("ruff is not installed: bash scripts/setup.sh (requirements.txt pins it)", pytrace=False)
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"ruff check found dead or undefined names:\n{proc.stdout[-4000:]}{proc.stderr[-2000:]}"


def test_the_lint_catches_an_unused_import(tmp_path):
    """The rule set is live: a file with an unused import and an unused variable fails it."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\n\ndef f():\n    x = 1\n    return 2\n")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
                           "--config", str(ROOT / "pyproject.toml"), str(bad)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "F401" in proc.stdout and "F841" in proc.stdout, proc.stdout + proc.stderr


# -- dead code: vulture ---------------------------------------------------------------------------------
# `python -m vulture` reads pyproject.toml's [tool.vulture]: the production code (app, pages, dashboard,
# library, benchmarks, scripts; not tests, so code only tests call counts as dead) at 60% confidence, plus
# tests/support/vulture_whitelist.py, which lists the names used in ways vulture cannot see.
WHITELIST = ROOT / "tests" / "support" / "vulture_whitelist.py"
FINDING = re.compile(r"^(?P<where>\S+:\d+): unused (?P<kind>[\w ]+?) '(?P<name>[^']+)' \((?P<conf>\d+)% confidence")


def _vulture(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    try:
        import vulture  # noqa: F401
    except ImportError:
        pytest.fail("vulture is not installed: bash scripts/setup.sh (requirements.txt pins it)", pytrace=False)
    return subprocess.run([sys.executable, "-m", "vulture", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["vulture"]


def _whitelisted() -> list[str]:
    return re.findall(r"^_\.(\w+)", WHITELIST.read_text(), flags=re.MULTILINE)


def test_vulture_finds_no_dead_code():
    proc = _vulture()
    assert proc.returncode == 0, (
        "vulture found code nothing uses. Delete it; if it is used in a way vulture cannot see, add "
        f"'_.name  # why' to {WHITELIST.relative_to(ROOT)}:\n{proc.stdout[-4000:]}{proc.stderr[-2000:]}")


def test_every_whitelist_entry_is_still_needed():
    """An entry vulture would not report any more hides nothing but could hide a future dead name: drop it."""
    paths = [p for p in _config()["paths"] if Path(p) != WHITELIST.relative_to(ROOT)]
    proc = _vulture(*paths)
    assert proc.returncode in (0, 3), proc.stderr[-2000:]
    reported = {m["name"] for m in map(FINDING.match, proc.stdout.splitlines()) if m}
    stale = [name for name in _whitelisted() if name not in reported]
    assert not stale, f"vulture no longer reports these names: remove them from {WHITELIST.relative_to(ROOT)}: {stale}"


def test_vulture_catches_an_unused_function_and_attribute(tmp_path):
    """The check is live at the configured confidence: a module with a function and a property nobody
    uses fails it, and naming them in a whitelist passes it."""
    (tmp_path / "mod.py").write_text("class A:\n    @property\n    def size(self):\n        return 1\n\n\n"
                                     "def helper():\n    return A()\n")
    conf = str(_config()["min_confidence"])
    proc = _vulture("--min-confidence", conf, "mod.py", cwd=tmp_path)
    found = {m["name"] for m in map(FINDING.match, proc.stdout.splitlines()) if m}
    assert proc.returncode == 3 and found == {"size", "helper"}, proc.stdout + proc.stderr
    (tmp_path / "allow.py").write_text("_ = None\n_.size\n_.helper\n")
    assert _vulture("--min-confidence", conf, "mod.py", "allow.py", cwd=tmp_path).returncode == 0

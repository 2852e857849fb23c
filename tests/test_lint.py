"""Dead code stays out: ``ruff`` with the narrow rule set of ``pyproject.toml`` ([tool.ruff.lint]:
unused imports and local variables, redefinitions of unused names, undefined names) passes on
every Python file of the repository. CI runs it as part of the test suite; ``ruff`` is pinned in
requirements.txt."""

from __future__ import annotations

import subprocess
import sys
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

"""The Python API for notebooks (issue 19): docs/API.md's example runs as written, on the demo, in a
fresh interpreter; the public names resolve, are documented and load lazily."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def api_example() -> str:
    """The Python block of docs/API.md's "A complete example" section (moved there from the README)."""
    section = (ROOT / "docs" / "API.md").read_text(encoding="utf-8").split("## A complete example", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


def _fresh_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REFINECLIP_HOME": str(cwd / "home")}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_the_api_example_runs_on_the_demo(tmp_path):
    code = api_example()
    assert "refineclip_core." not in code.replace("from refineclip_core import", ""), "public names only"
    proc = _fresh_python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"zero-shot \d+\.\d% \[\d+\.\d, \d+\.\d\] \(n=\d+\) \| worst group: ", out), out
    assert re.search(r"heads: (L\d+\.H\d+)?", out) and "worst group: " in out, out
    assert re.search(r"^(verified|not-verified|harmful) - (Verified|Not verified|Harmful)", out, re.M), out
    assert (tmp_path / "edited.safetensors").stat().st_size > 0
    assert (tmp_path / "report" / "refineclip-report.html").is_file()


def test_public_names_resolve_are_documented_and_load_lazily(tmp_path):
    import refineclip_core as rc

    documented = (ROOT / "docs" / "API.md").read_text(encoding="utf-8")
    for name in rc.__all__:
        assert getattr(rc, name) is not None
        assert re.search(rf"`{re.escape(name)}\b", documented), f"{name} is public but not in docs/API.md"
    assert rc.findings.__name__ == "findings" and rc.figures.__name__.endswith("reporting.figures")
    with pytest.raises(AttributeError):
        rc.no_such_name  # noqa: B018
    proc = _fresh_python("import sys, refineclip_core; print('torch' in sys.modules, 'numpy' in sys.modules)",
                         tmp_path)
    assert proc.stdout.split() == ["False", "False"], proc.stderr

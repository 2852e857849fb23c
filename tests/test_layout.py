"""The shape of the codebase, as CONTRIBUTING.md's map draws it, kept true.

The map's layer list is the import rule: a module of ``refineclip_core`` imports only from its own
layer or the layers below it; every module is on the map; the library never imports Streamlit;
pages are thin (no page over 150 lines, no session key spelled in a page) and listed once, in
``dashboard/registry.py``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "refineclip_core"


def _map_block() -> str:
    text = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    return text.split("## The map", 1)[1].split("```", 2)[1]


def _layers() -> list[str]:
    """Bottom-up: the last map line's top-level modules, then the packages from the bottom line up."""
    lines = [l for l in _map_block().splitlines() if l.strip()]
    core = lines[[i for i, l in enumerate(lines) if "refineclip_core/" in l][0] + 1:]
    packages = [m.group(1) for l in core if (m := re.match(r"([a-z_]+)/\s", l))]
    bottom = re.findall(r"\b([a-z_]+)\.py\b", core[-1])
    return bottom + list(reversed(packages)) + ["cli"]


def _imports(path: Path) -> list[tuple[int, str]]:
    pkg = ["refineclip_core", *path.relative_to(CORE).parts[:-1]]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = pkg[: len(pkg) - (node.level - 1)]
            out.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
    return out


def test_imports_only_point_down_the_layers_of_the_map():
    order = _layers()
    assert order[:3] == ["home", "progress", "errors"] and order[-5:] == ["reporting", "edit", "demo", "session", "cli"]
    wrong = []
    for path in CORE.rglob("*.py"):
        rel = path.relative_to(CORE).parts
        layer = rel[0].removesuffix(".py")
        if layer == "__init__":
            continue
        assert layer in order, f"{path.relative_to(ROOT)} is in no layer of CONTRIBUTING.md's map"
        for line, module in _imports(path):
            assert not module.startswith("streamlit"), f"{path.relative_to(ROOT)}:{line} imports Streamlit"
            parts = module.split(".")
            if parts[0] == "refineclip_core" and len(parts) > 1 and parts[1] in order:
                if order.index(parts[1]) > order.index(layer):
                    wrong.append(f"{path.relative_to(ROOT)}:{line} ({layer}) imports {module}")
    assert not wrong, "imports pointing up the layers:\n" + "\n".join(wrong)


def test_every_module_is_on_the_map():
    block = _map_block()
    missing = [str(p.relative_to(ROOT)) for p in CORE.rglob("*.py")
               if p.stem not in ("__init__", "__main__") and p.parent.name != "cli" and p.stem not in block]
    assert not missing, f"modules missing from CONTRIBUTING.md's map: {missing}"


def test_pages_are_thin_and_listed_once():
    from dashboard.registry import PAGES

    assert sorted(p.path for p in PAGES) == sorted(f"pages/{p.name}" for p in (ROOT / "pages").glob("*.py"))
    for path in (ROOT / "pages").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert len(text.splitlines()) <= 150, f"{path.name} has {len(text.splitlines())} lines"
        assert "session_state" not in text, f"{path.name} reads session state directly (use dashboard.state)"
        assert "st.Page(" not in text and "page_link(" not in text, f"{path.name} bypasses the page registry"


def test_every_library_package_ships_in_the_wheel():
    """pyproject.toml lists the wheel's packages by name: a new sub-package of ``refineclip_core``
    missing there would be absent from ``pip install .`` (the edit/ package was, for a while)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in CORE.rglob("__init__.py")}
    assert on_disk <= listed, f"not in pyproject.toml's packages: {sorted(on_disk - listed)}"


def test_no_core_module_over_450_lines_outside_demo():
    """Modules are split by role before they grow past 450 lines (``demo/`` holds the worlds' data)."""
    long = {str(p.relative_to(ROOT)): n for p in CORE.rglob("*.py")
            if "demo" not in p.relative_to(CORE).parts[:1] and (n := len(p.read_text(encoding="utf-8").splitlines())) > 450}
    assert not long, f"modules over 450 lines (split them by role): {long}"

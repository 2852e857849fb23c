"""``benchmarks/RESULTS.md``: one marked section per benchmark, in a stated order, under a table of
contents; every script writes its section through :func:`replace_section` (and nothing else).

A section is the text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``, written whole by
one script. :func:`replace_section` replaces it in place, or inserts a new one where :data:`ORDER`
puts it; wraps its prose lines (tables, headings, code and comments are kept as they are); and
rewrites the table of contents between ``<!-- toc:start -->`` and ``<!-- toc:end -->`` from the
sections' first headings.

    python benchmarks/results_md.py     # re-order, wrap and re-index an existing RESULTS.md
"""

from __future__ import annotations

import os
import re
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "benchmarks" / "RESULTS.md"
WIDTH = 110
TITLE = "# RefineCLIP Studio benchmark results"
INTRO = ("Every section below is written whole by the script named in it, between HTML-comment markers named "
         "after the section (`python benchmarks/results_md.py` explains them); never edit it by hand. Order: "
         "what the edit does (the demo world's headline and its checks on fresh worlds, the second world, the "
         "diagnosis, the guard), then speed (performance, scale, the browser).")
#: Sections in the order they appear (a name not listed goes after those listed, in the order written).
#: ``guard-*`` sections (other worlds) go right after ``guard``.
ORDER = ("demo", "demo-siglip", "stable-check", "digits", "diagnosis", "guard", "perf", "scale-photos", "scale-caches", "scale-map",
         "scale-browser", "scale-browser-1000-classes", "browser", "browser-interactions", "tour")
TOC_START, TOC_END = "<!-- toc:start -->", "<!-- toc:end -->"
_SECTION = re.compile(r"<!-- ([\w-]+):start -->\n(.*?)\n?<!-- \1:end -->", re.S)


def _rank(name: str) -> tuple[int, str]:
    base = "guard" if name.startswith("guard-") else name
    return (ORDER.index(base) if base in ORDER else len(ORDER), name)


def wrap(body: str, width: int = WIDTH) -> str:
    """Prose lines longer than ``width`` wrapped; table rows, headings, comments and code kept."""
    out: list[str] = []
    fenced = False
    for line in body.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        keep = (fenced or len(line) <= width or line.lstrip().startswith(("|", "#", "<!--", "```", "!["))
                or line.startswith("    "))
        if keep:
            out.append(line)
            continue
        bullet = re.match(r"(\s*(?:[-*]|\d+\.)\s+)", line)
        indent = " " * len(bullet.group(1)) if bullet else re.match(r"\s*", line).group(0)
        out.append(textwrap.fill(line, width, subsequent_indent=indent, break_long_words=False,
                                 break_on_hyphens=False))
    return "\n".join(out)


def sections(text: str) -> dict[str, str]:
    """Every marked section's body (nested ``perf:NAME`` blocks stay inside ``perf``)."""
    return {m.group(1): m.group(2) for m in _SECTION.finditer(text) if m.group(1) != "toc"}


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.lstrip("#").strip().lower())
    return text.replace(" ", "-")


def _title(body: str) -> str | None:
    for line in body.splitlines():
        if line.startswith("#"):
            return line
    return None


def table_of_contents(text: str) -> str:
    lines = ["## Contents", ""]
    for name, body in sections(text).items():
        heading = _title(body)
        if heading is None:
            continue
        label = heading.lstrip("#").strip()
        indent = "  " if heading.startswith("###") and not name.startswith("scale-") else ""
        lines.append(f"{indent}- [{label}](#{_anchor(heading)}) (`{name}`)")
    return "\n".join(lines)


def assemble(blocks: dict[str, str]) -> str:
    """RESULTS.md from section bodies: title, introduction, contents, then the sections in order."""
    names = sorted(blocks, key=_rank)
    body = "\n\n".join(f"<!-- {n}:start -->\n{blocks[n].strip()}\n<!-- {n}:end -->" for n in names)
    text = f"{TITLE}\n\n{wrap(INTRO)}\n\n{TOC_START}\n{TOC_END}\n\n{body}\n"
    return text.replace(f"{TOC_START}\n{TOC_END}", f"{TOC_START}\n{table_of_contents(text)}\n{TOC_END}")


def replace_section(path: Path, marker: str, body: str) -> None:
    """Write one section of ``path`` (created when missing): replaced in place, or inserted in order."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    blocks = sections(text)
    blocks[marker] = wrap(body.strip())
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(assemble(blocks), encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    path = Path(argv[0]) if argv else DEFAULT
    blocks = {n: wrap(b.strip()) for n, b in sections(path.read_text(encoding="utf-8")).items()}
    path.write_text(assemble(blocks), encoding="utf-8")
    print(f"{path}: {len(blocks)} sections, in order: {', '.join(sorted(blocks, key=_rank))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

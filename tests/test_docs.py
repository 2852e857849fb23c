"""The documents stay generated where they hold numbers: README.md's headline table is the one
``benchmarks/headline.py`` derives from the multi-draw section ``benchmarks/demo_world.py`` writes to
RESULTS.md (never retyped), and RESULTS.md keeps a table of contents of its sections."""

from __future__ import annotations

import re
from pathlib import Path

from benchmarks import headline

ROOT = Path(__file__).resolve().parent.parent


def test_the_readme_headline_is_generated_from_results():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    assert headline.readme_block(readme) == headline.headline_block(results), (
        "README.md's headline differs from benchmarks/RESULTS.md: run python benchmarks/headline.py")


def test_the_headline_block_follows_the_benchmark_table(tmp_path):
    """A changed number in RESULTS.md changes the block, and write_readme puts it in README."""
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    section = headline.section(results)
    row = next(line for line in section.splitlines() if line.startswith("| **RefineCLIP-fit: the exported edit"))
    changed = results.replace(row, re.sub(r"\| [+-]?\d+\.\d ± ", "| +99.9 ± ", row, count=1))
    assert "+99.9 ± " in headline.headline_block(changed) and "+99.9" not in headline.headline_block(results)
    (tmp_path / "RESULTS.md").write_text(changed, encoding="utf-8")
    (tmp_path / "README.md").write_text(f"# x\n\n{headline.START}\nold\n{headline.END}\n\nrest\n", encoding="utf-8")
    assert headline.write_readme(tmp_path / "README.md", tmp_path / "RESULTS.md")
    text = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert headline.readme_block(text) == headline.headline_block(changed) and text.endswith("\n\nrest\n")
    assert not headline.write_readme(tmp_path / "README.md", tmp_path / "RESULTS.md")  # already current


def test_results_is_in_order_wrapped_and_indexed():
    """RESULTS.md is what its one writer makes of its sections: the stated order, prose wrapped, and a
    table of contents naming every section."""
    from benchmarks import results_md

    text = (ROOT / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    blocks = results_md.sections(text)
    assert {"demo", "perf", "guard", "digits"} <= set(blocks)
    assert results_md.assemble(blocks) == text, "run python benchmarks/results_md.py"
    toc = text.split(results_md.TOC_START, 1)[1].split(results_md.TOC_END, 1)[0]
    assert all(f"(`{name}`)" in toc for name in blocks)


def test_a_new_section_goes_where_the_order_puts_it(tmp_path):
    from benchmarks.results_md import replace_section, sections

    path = tmp_path / "RESULTS.md"
    replace_section(path, "perf", "## Performance\n\nfast")
    replace_section(path, "demo", "## Demo\n\n" + "word " * 60)
    replace_section(path, "guard-digits", "## Guard on digits\n\nok")
    replace_section(path, "guard", "## Guard\n\nok")
    text = path.read_text(encoding="utf-8")
    assert list(sections(text)) == ["demo", "guard", "guard-digits", "perf"]
    assert max(len(line) for line in sections(text)["demo"].splitlines()) <= 110
    replace_section(path, "demo", "## Demo\n\nagain")
    assert sections(path.read_text(encoding="utf-8"))["demo"] == "## Demo\n\nagain"
    assert "[Guard on digits](#guard-on-digits)" in path.read_text(encoding="utf-8")

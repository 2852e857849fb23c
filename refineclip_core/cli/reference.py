"""The CLI reference (docs/CLI.md) generated from the parsers' ``--help`` texts.

``python -m refineclip_core.cli.reference > docs/CLI.md`` regenerates it; a test keeps the
committed file in sync, so the reference never drifts from the code.
"""

from __future__ import annotations

import argparse
import os

from . import build_parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def render() -> str:
    os.environ["COLUMNS"] = "100"  # stable wrapping
    parser = build_parser()
    parts = ["# `refineclip` command reference", "",
             "Generated from `--help` by `python -m refineclip_core.cli.reference > docs/CLI.md`; "
             "a test keeps it in sync.", "", "```text", parser.format_help().rstrip(), "```", ""]

    def walk(p: argparse.ArgumentParser, prefix: str) -> None:
        for name, sub in _subparsers(p).items():
            parts.extend([f"## `{prefix} {name}`", "", "```text", sub.format_help().rstrip(), "```", ""])
            walk(sub, f"{prefix} {name}")

    walk(parser, "refineclip")
    return "\n".join(parts)


if __name__ == "__main__":  # pragma: no cover
    print(render(), end="")

"""The ``refineclip`` command line: a thin shell over :mod:`refineclip_core`.

Each sub-command lives in its own module exposing ``register(subparsers)``; the module sets
``func`` on its parser. Every command exits non-zero with a one-line message on stderr when it
cannot do its job (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from typing import Sequence

from ..errors import RefineClipError

#: Sub-command modules, in the order ``--help`` lists them.
COMMANDS = ("extract", "check_decomposition", "zero_shot", "score", "explain", "refine", "evaluate", "demo_data", "reproduce")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refineclip",
        description="Find the attention heads behind CLIP's errors and edit the model to fix them (RefineCLIP).",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
        return int(result or 0)
    except KeyboardInterrupt:
        print("refineclip: interrupted", file=sys.stderr)
        return 130
    except RefineClipError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"refineclip: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the CLI's promise: one line, no traceback
        if args.debug:
            traceback.print_exc()
        print(f"refineclip: unexpected error: {type(exc).__name__}: {exc} (run with --debug for details)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

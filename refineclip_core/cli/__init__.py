"""The ``refineclip`` command line: a thin shell over :mod:`refineclip_core`.

Each sub-command lives in its own module exposing ``register(subparsers)``; the module sets
``func`` on its parser. Every command prints a short human summary on stdout (``--json PATH``
keeps the full record, ``--json -`` prints only the record) and exits with one of the statuses
below, with a one-line message on stderr when it cannot do its job (``--debug`` shows the
traceback).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from typing import Sequence

from ..errors import RefineClipError

#: Sub-command modules, in the order ``--help`` lists them.
COMMANDS = ("extract", "check_decomposition", "zero_shot", "score", "explain", "describe", "refine", "evaluate", "demo_data",
            "reproduce", "app")

EXIT_OK = 0
EXIT_UNEXPECTED = 1     # a bug or an unforeseen failure (one line; --debug for the traceback)
EXIT_USAGE = 2          # a user mistake: a wrong option, file, model or data (one sentence on stderr)
EXIT_WORSE = 3          # refine --fail-if-worse: the guard called the exported edit harmful
EXIT_NOT_VERIFIED = 4   # refine --require-verified: the guard could not verify the exported edit
EXIT_INTERRUPTED = 130  # Ctrl-C

EXIT_CODES = f"""exit status:
  {EXIT_OK}    success
  {EXIT_UNEXPECTED}    unexpected error (a one-line message; --debug shows the traceback)
  {EXIT_USAGE}    user error: a wrong option, file, model or dataset (one sentence says what and how to fix it)
  {EXIT_WORSE}    refine --fail-if-worse: the guard called the exported edit 'harmful' (a group or class
       significantly worse on held-out images), or a group or class dropped by more than --max-drop
       points (the reason on stderr)
  {EXIT_NOT_VERIFIED}    refine --require-verified: the guard did not call the exported edit 'verified' (gain
       not bounded above zero, a drop not bounded within --max-drop, too few held-out images);
       also a failing edit when --fail-if-worse is not given (the reason on stderr)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); finished work such as cache shards is kept

output: every command prints a short summary (at most 40 lines) on stdout; --json PATH writes the
full record, --json - prints the record alone on stdout for piping. Progress bars go to stderr and
only when it is a terminal (REFINECLIP_PROGRESS=always puts them into logs too, =never hides them)."""


class _Parser(argparse.ArgumentParser):
    """argparse, whose own error lines ("unrecognized arguments: ...", "invalid choice: ...") quote
    what was typed: they go through :func:`~refineclip_core.cli.common.terminal` like every other
    message, so an argument holding terminal escapes is shown marked, never acted on."""

    def error(self, message: str):
        from .common import terminal

        super().error(terminal(message))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="refineclip",
        description="Find the attention heads behind CLIP's errors and edit the model to fix them (RefineCLIP).\n\n"
                    "Models that decompose into heads: CLIP ViTs, SigLIP / SigLIP 2, EVA, PE-Core, CLIPA, CoCa,\n"
                    "ViTamin and MobileCLIP-B (also as transformers CLIPModel / SiglipModel folders); ResNet,\n"
                    "ConvNeXt and FastViT towers are refused (docs/MODELS.md lists every open_clip architecture).",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    from ..loading.confine import Confinement
    from .common import terminal  # every message printed goes through it (loaded by the commands anyway)

    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "pass_through", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "pass_through", False):
        args.extra = extra
    try:
        with Confinement.from_env().active():  # one confinement for the whole command (REFINECLIP_ALLOWED_ROOTS)
            result = args.func(args)
        sys.stdout.flush()
        return int(result or 0)
    except KeyboardInterrupt:
        print("refineclip: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader of a pipe (| head) went away: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except RefineClipError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"refineclip: error: {terminal(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - the CLI's promise: one line, no traceback
        if args.debug:
            traceback.print_exc()
        print(f"refineclip: unexpected error: {type(exc).__name__}: {terminal(exc)} (run with --debug for details)",
              file=sys.stderr)
        return EXIT_UNEXPECTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``refineclip app``: serve the dashboard (RefineCLIP Studio) from any working directory.

Runs ``python <APP_DIR>/dashboard/serve.py`` (``streamlit run <APP_DIR>/app.py``, with Streamlit told that the
app navigates itself) with the installed (or cloned) dashboard;
Streamlit reads the dashboard's own ``.streamlit/config.toml`` next to ``app.py`` (loopback only,
no file watching), and any further arguments go to Streamlit and win over it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from ..errors import RefineClipError
from ..home import APP_DIR


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("app", help="start the dashboard (RefineCLIP Studio); extra arguments go to Streamlit",
                       description="Serve the RefineCLIP Studio dashboard on http://127.0.0.1:8501 (the embedded demo "
                                   "opens first) from any folder; relative paths typed in the dashboard are read from "
                                   "the current one. Every further argument goes to 'streamlit run', for example "
                                   "a port: refineclip app --server.port 8600",
                       usage="refineclip app [-h] [STREAMLIT_OPTION ...]", allow_abbrev=False)
    p.set_defaults(func=run, pass_through=True)


def command(extra: list[str]) -> list[str]:
    """The command line that serves the dashboard with ``extra`` Streamlit options."""
    script = APP_DIR / "app.py"
    if not script.is_file():
        raise RefineClipError(f"The dashboard is not installed next to the library ({script} is missing); "
                              "reinstall refineclip-studio with pip.")
    return [sys.executable, str(APP_DIR / "dashboard" / "serve.py"), *extra]   # streamlit run app.py, see there


def run(args: argparse.Namespace) -> int:
    cmd = command(list(getattr(args, "extra", [])))
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":   # become the server: signals and the exit status are Streamlit's own
        os.execv(cmd[0], cmd)
    return subprocess.call(cmd)

"""Regenerate the README's screenshots: ``docs/screenshots/{load,errors,heads,inspector,ablate,refine}.png``.

Starts the dashboard (``streamlit run app.py``) on a free local port with a private home
folder, drives Debian's Chromium through Playwright along the demo story (the demo prepares
itself; a click on a Heads score map; the Head inspector with Grad-CAM; the Ablate page;
a refinement run) and saves one 1400-px-wide PNG per page, each under 400 KB.

    .venv/bin/python scripts/screenshots.py                    # the embedded demo (assets/demo)
    .venv/bin/python scripts/screenshots.py --model-dir DIR    # a retrained demo elsewhere

Without ``assets/demo`` (and without ``--model-dir``/``$REFINECLIP_DEMO_MODEL_DIR``) a tiny
stand-in is trained in seconds (``python -m refineclip_core.demo.train --quick``) so the
script still runs, with a warning: such pictures show the layout, not the demo's findings.

The helpers it uses (starting and stopping the app, launching Chromium, waiting for Streamlit
to settle, compact PNGs) live in ``tests/support/browser.py``, shared with the browser tests.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the shared browser helpers (tests/support) and the page registry
from tests.support.browser import (NAV_TITLES, WIDTH, click_score_cell, error_messages, goto,  # noqa: E402
                                   installed_demo_dir, launch_chromium, open_app, score_map_cells, settle,
                                   shoot, start_app, train_standin)


# ------------------------------------------------------------------------------------------------
# The walk

def walk(page, url: str, out: Path, refine_steps: int | None = None) -> list[Path]:
    """The demo story, one screenshot per page (names of ``SHOTS``); stops at a page showing an error."""
    written: list[Path] = []

    def take(name: str, max_height: int) -> None:
        problems = error_messages(page)
        if problems:
            raise RuntimeError(f"the {NAV_TITLES[name]} page shows errors: {problems}")
        written.append(shoot(page, out / f"{name}.png", max_height=max_height))

    open_app(page, url)
    take("load", 1100)
    goto(page, "errors")
    take("errors", 1500)
    goto(page, "heads")
    cells = score_map_cells(page)
    chosen = [c for c in cells if c["chosen"]]
    pick = chosen[1] if len(chosen) > 1 else cells[-1]  # a head Alg. 1 blames, selected by a click
    click_score_cell(page, pick["index"])
    page.get_by_text(f"Selected head L{pick['layer']}.H{pick['head']}").wait_for()
    settle(page)
    take("heads", 1500)
    goto(page, "inspector")
    page.locator(".st-key-insp_cam_btn button").click()
    page.get_by_text("whole model →").first.wait_for(timeout=180_000)
    settle(page)
    take("inspector", 2200)
    goto(page, "ablate")
    take("ablate", 1600)
    goto(page, "refine")
    if refine_steps is not None:
        page.get_by_text("Settings of the paper's phase 2").first.click()   # closed while fit is exported
        settle(page)
        box = page.locator(".st-key-ref_steps input")
        box.fill(str(refine_steps))
        box.press("Tab")
    from dashboard.forms import RUN_LABELS

    page.get_by_role("button", name=RUN_LABELS["fit"]).click()
    page.get_by_text("Results on held-out images").wait_for(timeout=300_000)
    # the compared methods fill the table in after the exported edit: wait for the last of them
    page.wait_for_function("() => !document.body.innerText.includes('Cancel the comparison')", timeout=900_000)
    settle(page, timeout=300)
    take("refine", 1800)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "screenshots"), help="output folder")
    p.add_argument("--model-dir", default=os.environ.get("REFINECLIP_DEMO_MODEL_DIR"),
                   help="demo model folder (default: assets/demo, else a quick stand-in)")
    p.add_argument("--n", type=int, default=None, help="demo images per group and split (default: the app's)")
    p.add_argument("--refine-steps", type=int, default=None, help="refinement steps (default: the page's)")
    p.add_argument("--keep-home", action="store_true", help="keep the temporary home folder")
    args = p.parse_args(argv)

    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="refineclip-shots-"))
    model_dir = Path(args.model_dir) if args.model_dir else None
    if model_dir is None and installed_demo_dir() is None:
        print("WARNING: assets/demo is not installed: using a tiny untrained stand-in; the screenshots show the "
              "layout, not the demo's findings. Run again once the demo checkpoint is in place.", file=sys.stderr)
        model_dir = train_standin(tmp / "standin")
    out = Path(args.out)
    server = start_app(tmp / "home", model_dir, args.n, tmp / "streamlit.log")
    try:
        with sync_playwright() as pw:
            browser = launch_chromium(pw)
            try:
                page = browser.new_page(viewport={"width": WIDTH, "height": 1000})
                t0 = time.monotonic()
                written = walk(page, server.url, out, args.refine_steps)
            finally:
                browser.close()
    except Exception:
        print(server.log_tail(), file=sys.stderr)
        raise
    finally:
        server.stop()
        if not args.keep_home:
            shutil.rmtree(tmp, ignore_errors=True)
    for path in written:
        from PIL import Image

        with Image.open(path) as im:
            print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {im.width}×{im.height}, "
                  f"{path.stat().st_size / 1000:.0f} KB")
    print(f"walked the demo in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

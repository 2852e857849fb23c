"""The shared helpers that start the dashboard and drive Chromium: the browser tests
(``tests/test_browser.py``, ``tests/test_packaging.py``, ``tests/conftest.py``), the screenshots
(``scripts/screenshots.py``) and the scale benchmark (``benchmarks/scale.py``) import them from here.

Starting and stopping ``streamlit run app.py`` on a free port with a private home folder, launching
Debian's Chromium through Playwright, waiting for Streamlit to settle, reading metrics and score maps,
compact PNG screenshots.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
from dashboard.registry import PAGES

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
INSTALL_HINT = ("Debian's Chromium is needed at /usr/bin/chromium: install it with "
                "`apt-get update && apt-get install -y chromium chromium-driver` "
                "(scripts/test.sh does this when it runs as root).")
WIDTH = 1400
MAX_PNG_BYTES = 400_000
SHOTS = tuple(p.name for p in PAGES)
DEMO_READY_TEXT = "Findings at a glance"
NAV_TITLES = {p.name: p.title for p in PAGES}
PAGE_TITLES = {p.name: p.heading for p in PAGES}


# ------------------------------------------------------------------------------------------------
# The app server

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def installed_demo_dir() -> Path | None:
    """``assets/demo`` when its checkpoint and config are both there."""
    from refineclip_core.loading.models import DEMO_DIR, DEMO_MODEL_NAME

    ok = (DEMO_DIR / f"{DEMO_MODEL_NAME}.safetensors").is_file() and (DEMO_DIR / f"{DEMO_MODEL_NAME}.json").is_file()
    return DEMO_DIR if ok else None


def train_standin(out: Path) -> Path:
    """The tiny quick-mode demo model (the same stand-in tests/test_app.py uses), in seconds."""
    from refineclip_core.demo.train import main

    out.mkdir(parents=True, exist_ok=True)
    main(["--out", str(out), "--quick", "--threads", "1"])
    return out


@dataclass
class AppServer:
    """A running ``streamlit run app.py`` subprocess."""

    proc: subprocess.Popen
    port: int
    home: Path
    log_path: Path
    model_dir: Path | None  # the demo model folder given to the app (None: assets/demo)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kib(self) -> int:
        """Resident memory of the server process (VmRSS of /proc/<pid>/status), in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError(f"no VmRSS for process {self.pid}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Terminate, then kill if it has not exited after 10 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_app(home: Path, model_dir: Path | None, n_per_group: int | None, log_path: Path,
              timeout: float = 120.0) -> AppServer:
    """Start the dashboard on a free port and wait for ``/_stcore/health``.

    ``model_dir``: a demo model folder (``$REFINECLIP_DEMO_MODEL_DIR``), or None for
    ``assets/demo``; ``n_per_group``: images per group and split in the held-out demo sample.
    """
    env = dict(os.environ)
    env["REFINECLIP_HOME"] = str(home)
    env["STREAMLIT_BROWSER_GATHER_USAGE_STATS"] = "false"
    env.pop("REFINECLIP_DEMO_MODEL_DIR", None)
    env.pop("REFINECLIP_DEMO_N", None)
    if model_dir is not None:
        env["REFINECLIP_DEMO_MODEL_DIR"] = str(model_dir)
    if n_per_group is not None:
        env["REFINECLIP_DEMO_N"] = str(n_per_group)
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "wb")
    cmd = [sys.executable, "dashboard/serve.py", "--server.headless", "true",
           "--server.port", str(port), "--server.address", "127.0.0.1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    server = AppServer(proc, port, home, log_path, model_dir)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with code {proc.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.url}/_stcore/health", timeout=2) as r:
                if r.status == 200 and r.read().strip() == b"ok":
                    return server
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"streamlit did not answer /_stcore/health within {timeout:.0f} s:\n"
                               f"{server.log_tail()}")
        time.sleep(0.25)


# ------------------------------------------------------------------------------------------------
# The browser

def launch_chromium(playwright):
    """Debian's Chromium, headless; a clear error (with the install command) when it is missing."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        raise RuntimeError(INSTALL_HINT)
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


_SCRIPT_IDLE = """() => {
  const app = document.querySelector('[data-testid="stApp"]');
  return !!app && app.getAttribute('data-test-script-state') !== 'running'
         && app.getAttribute('data-test-connection-state') === 'CONNECTED'
         && !document.querySelector('[data-stale="true"]')
         && !document.querySelector('[data-testid="stSkeleton"]');
}"""


def settle(page, timeout: float = 120.0, pause_ms: int = 150) -> None:
    """Wait until the script run has finished, no element is stale (shown from the previous run)
    and none is still loading (skeletons); twice, 100 ms apart."""
    page.wait_for_timeout(pause_ms)
    page.wait_for_function(_SCRIPT_IDLE, timeout=timeout * 1000)
    page.wait_for_timeout(100)
    page.wait_for_function(_SCRIPT_IDLE, timeout=timeout * 1000)


def open_app(page, url: str, timeout: float = 240.0) -> None:
    """Open the app; on a first visit the demo prepares itself (progress shown): wait for its findings."""
    page.goto(url)
    page.get_by_text(DEMO_READY_TEXT).wait_for(timeout=timeout * 1000)
    settle(page, timeout)


def goto(page, name: str, timeout: float = 120.0) -> None:
    """Open a page from the sidebar navigation, as a user does, and wait for it to finish."""
    page.locator('[data-testid="stSidebarNav"] a', has_text=NAV_TITLES[name]).first.click()
    page.locator("h1", has_text=PAGE_TITLES[name]).first.wait_for(timeout=timeout * 1000)
    settle(page, timeout)


METRIC_JS = """(label) => {
  for (const m of document.querySelectorAll('[data-testid="stMetric"]')) {
    const l = m.querySelector('[data-testid="stMetricLabel"]');
    const v = m.querySelector('[data-testid="stMetricValue"]');
    if (l && v && l.innerText.trim() === label) return v.innerText.trim();
  }
  return null;
}"""


#: Resets ``window.__rcT`` and records the next click's time in ``window.__rcT.click`` (browser clock).
CLICK_WATCH = """() => {
  if (!window.__rcClickWatch) {
    window.__rcClickWatch = true;
    document.addEventListener('click', () => { if (window.__rcT.click === null) window.__rcT.click = performance.now(); },
                              {capture: true});
  }
  window.__rcT = {click: null, done: null};
}"""

#: ``([label, expected])``: true once the metric ``label`` shows ``expected``, whose first moment it records in
#: ``window.__rcT.done`` (poll with ``polling="raf"``: a click-to-screen latency is ``done - click``).
SHOWN_WATCH = """([label, expected]) => {
  const v = (%s)(label);
  if (v === expected) { if (window.__rcT.done === null) window.__rcT.done = performance.now(); return true; }
  return false;
}""" % METRIC_JS


def metric_value(page, label: str) -> str | None:
    """The shown value of the ``st.metric`` with this label (None if there is none)."""
    return page.evaluate(METRIC_JS, label)


def score_map_cells(page, key: str = "grid_0") -> list[dict]:
    """The clickable cells of a Heads score map: ``{"index", "layer", "head", "chosen"}`` per cell
    (``chosen``: marked by Alg. 1's white dot), read from the plotted points' data."""
    points = page.locator(f'.st-key-{key} [data-testid="stPlotlyChart"] g.points path')
    points.first.wait_for()
    return points.evaluate_all("""(els) => {
      const traceOf = (e) => { const t = e.closest('g.trace'); return Array.from(t.parentNode.children).indexOf(t); };
      const marked = new Set(els.filter(e => traceOf(e) > 0).map(e => `${e.__data__.x},${e.__data__.y}`));
      return els.map((e, i) => ({index: i, trace: traceOf(e), head: e.__data__.x, layer: e.__data__.y,
                                 chosen: marked.has(`${e.__data__.x},${e.__data__.y}`)}))
                .filter(c => c.trace === 0);
    }""")


def click_score_cell(page, index: int, key: str = "grid_0") -> None:
    """Click a score-map square with the mouse (plotly's drag layer lies on top of the points)."""
    point = page.locator(f'.st-key-{key} [data-testid="stPlotlyChart"] g.points path').nth(index)
    point.scroll_into_view_if_needed()
    page.mouse.wheel(0, 120)  # keep the square clear of the sticky header
    page.wait_for_timeout(200)
    box = point.bounding_box()
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)


def content_height(page) -> int:
    return int(page.evaluate("""() => {
      const b = document.querySelector('[data-testid="stMainBlockContainer"]');
      return b ? b.scrollHeight + 80 : document.body.scrollHeight;
    }"""))


def scroll_top(page) -> None:
    """Scroll the main area (Streamlit scrolls ``main.stMain``, not the window) back to the top."""
    page.evaluate("""() => { const m = document.querySelector('[data-testid="stMain"]') ||
                              document.querySelector('main'); if (m) m.scrollTo(0, 0); window.scrollTo(0, 0); }""")
    page.wait_for_timeout(150)


def compact_png(data: bytes, max_bytes: int = MAX_PNG_BYTES) -> bytes:
    """``data`` re-encoded as an optimised PNG; palette-quantised (then fewer colours) until it
    is smaller than ``max_bytes``."""
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    for colours in (256, 128, 64, 32):
        if buf.tell() < max_bytes:
            break
        buf = io.BytesIO()
        img.quantize(colors=colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            buf, format="PNG", optimize=True)
    return buf.getvalue()


def shoot(page, path: Path, max_height: int = 1800, min_height: int = 900) -> Path:
    """A ``WIDTH``-wide screenshot of the page, as tall as its content (clipped to ``max_height``)."""
    height = max(min_height, min(max_height, content_height(page)))
    page.set_viewport_size({"width": WIDTH, "height": height})
    page.wait_for_timeout(400)  # charts re-layout to the new size
    settle(page)
    scroll_top(page)
    page.mouse.move(5, height - 5)  # no hover effects (button shades, heading anchors) in the picture
    page.wait_for_timeout(150)
    data = page.screenshot(type="png", clip={"x": 0, "y": 0, "width": WIDTH, "height": height})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(compact_png(data))
    page.set_viewport_size({"width": WIDTH, "height": 1000})
    return path


def error_messages(page) -> list[str]:
    """Error boxes and exceptions currently on the page."""
    return page.locator('[data-testid="stException"], [data-testid="stAlertContentError"]').all_inner_texts()

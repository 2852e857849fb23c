#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Browser end-to-end tests drive Debian's Chromium; install it where we can (root + apt).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[test] installing chromium for the browser tests" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
    || echo "[test] could not install chromium; browser tests will report why they cannot run" >&2
fi
# The suite writes a few hundred MB of temporary files (worlds, caches, checkpoints); say so plainly
# before a full disk turns into dozens of unrelated "No space left on device" failures.
tmp_dir="${TMPDIR:-/tmp}"
free_mb=$(df -Pm "$tmp_dir" 2>/dev/null | awk 'NR==2 {print $4}')
if [ -n "$free_mb" ] && [ "$free_mb" -lt 1024 ]; then
  echo "[test] only ${free_mb} MB free in $tmp_dir; the suite needs about 1 GB there (set TMPDIR to another folder)" >&2
fi
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "[test] pytest collected no tests: treating as failure" >&2
  exit 1
fi
exit "$rc"

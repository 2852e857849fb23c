#!/usr/bin/env bash
# Create .venv/ in the repository root and install everything the project needs.
# Idempotent: re-running after the first install costs a second unless requirements changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.refineclip-installed
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing requirements (torch is large: a few minutes the first time)" >&2
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
  echo "[setup] installing refineclip_core in editable mode (the refineclip command)" >&2
  # setuptools announces how an editable install is wired with an informational warning; nothing to act on
  PYTHONWARNINGS="ignore:Editable installation" \
    .venv/bin/python -m pip install -q --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import torch, open_clip, streamlit, plotly, pytorch_grad_cam, PIL, numpy"
  echo "$want" > "$stamp"
  echo "[setup] ready: .venv/bin/refineclip, .venv/bin/streamlit" >&2
fi

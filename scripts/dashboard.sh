#!/usr/bin/env bash
# Set up (first run only) and start RefineCLIP Studio on the embedded demo model and images.
# Extra arguments go to streamlit (e.g. --server.port 8600).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python dashboard/serve.py "$@"   # = streamlit run app.py (see dashboard/serve.py)

#!/usr/bin/env bash
# Reproduce the embedded demo from scratch: regenerate the world, retrain the demo model with
# the committed recipe (seed 0) and re-run the demo-world benchmark on the new model.
#
#   bash scripts/reproduce_demo.sh [OUT_DIR]      (default runs/demo-reproduced)
#
# Writes OUT_DIR/refineclip-demo.{json,safetensors}, OUT_DIR/metadata.json (training log, test
# metrics) and OUT_DIR/RESULTS.md (the benchmark table; compare it with benchmarks/RESULTS.md).
# One CPU thread, as the committed model was trained: floating-point sums in another order (more
# threads) give a different, equally valid model, not the committed one (assets/demo/README.md).
# About 25 minutes of training plus 1 minute of benchmark; THREADS=2 trains in about 15 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/demo-reproduced}"
bash scripts/setup.sh
.venv/bin/python -m refineclip_core.demo.train --out "$OUT" --seed 0 --threads "${THREADS:-1}"
.venv/bin/python benchmarks/demo_world.py --model-dir "$OUT" --out "$OUT/RESULTS.md"
echo "[reproduce] model, metadata and benchmark in $OUT" >&2

#!/usr/bin/env bash
# Recreate the handwritten-digits model (issue 23): train it on the digits world's model half with the
# committed recipe (python -m refineclip_core.demo.train --world digits, seed 0, one CPU thread), then,
# unless NO_BENCH=1, run the digits benchmark on it.
#
#   bash scripts/train_digits.sh [OUT_DIR]      (default assets/digits, where the benchmark looks)
#
# Writes OUT_DIR/refineclip-digits.{json,safetensors} and OUT_DIR/metadata.json (command, recipe,
# learning curve, test metrics). The data ship inside scikit-learn (requirements.txt): nothing is
# downloaded. The benchmark writes OUT_DIR/RESULTS.md unless OUT_DIR is assets/digits, where it
# rewrites the digits section of benchmarks/RESULTS.md. THREADS=2 trains faster, but floating-point
# sums in another order give a different, equally valid model.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-assets/digits}"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
OMP_NUM_THREADS="${THREADS:-1}" "$PY" -m refineclip_core.demo.train --world digits --out "$OUT" --seed 0 \
    --threads "${THREADS:-1}"
if [ "${NO_BENCH:-0}" != "1" ]; then
    if [ "$(cd "$OUT" && pwd)" = "$(pwd)/assets/digits" ]; then
        "$PY" benchmarks/digits_world.py --model-dir "$OUT"
    else
        "$PY" benchmarks/digits_world.py --model-dir "$OUT" --out "$OUT/RESULTS.md"
    fi
fi
echo "[train_digits] model and metadata in $OUT" >&2

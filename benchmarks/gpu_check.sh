#!/usr/bin/env bash
# The ready GPU check (< 8 minutes on one GPU): NFNet-F0 at 192 px and ViT-B/16 at 224 px, bf16
# compute; non-private (plain jax.grad) vs book-keeping vs vmap DP steps; batch sweep until out of
# memory; examples/s, ratios, peak device memory -> OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md.
#
#   benchmarks/gpu_check.sh [OUT_DIR] [extra args of python -m benchmarks.gpu_check]
#
# Needs only jax (with CUDA), flax and numpy (see benchmarks/README.md, "GPU check").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check_out}"
shift || true
PY="${PYTHON:-python3}"
# Allocate on demand, so that an out-of-memory error marks the real limit and peak_bytes_in_use
# counts what a step needs (not a preallocated pool).
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import jax, flax, numpy; print("jax", jax.__version__, "flax", flax.__version__, "devices", jax.devices())'
# 420 s for the runs themselves + start-up and reporting; the hard limit is 8 minutes.
exec timeout 470 "$PY" -m benchmarks.gpu_check --out "$OUT" --budget-s 420 "$@"

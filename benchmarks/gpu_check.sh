#!/usr/bin/env bash
# The ready GPU check (< 8 minutes on one GPU): NFNet-F0 at 192 px and ViT-B/16 at 224 px, bf16
# compute; non-private (plain jax.grad) vs book-keeping vs vmap DP steps at batch sizes 128, 512,
# 2048: every (model, method) compiles at once (330 s deadline), then they are timed one at a time;
# examples/s, ratios, predicted and peak device memory, estimated largest microbatch
# -> OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md (rewritten after every timed worker).
#
#   benchmarks/gpu_check.sh [OUT_DIR] [extra args of python -m benchmarks.gpu_check]
#
# Needs only jax (with CUDA), flax and numpy (see benchmarks/README.md, "GPU check").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check_out}"
shift || true
PY="${PYTHON:-python3}"
# Allocate on demand (no preallocated pool): six worker processes share the GPU, and
# peak_bytes_in_use then counts what a step needs.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import jax, flax, numpy; print("jax", jax.__version__, "flax", flax.__version__, "numpy", numpy.__version__)'
# Hard limit 465 s (+ 5 s to die after SIGTERM) < 8 minutes: 450 s budget = 330 s compile deadline
# + the timing phase; the driver rewrites the reports after every timed worker.
exec timeout --kill-after=5 465 "$PY" -m benchmarks.gpu_check --out "$OUT" --budget-s 450 --compile-s 330 "$@"

#!/usr/bin/env bash
# The GPU benchmark in one prepared run for a lent GPU machine (H100/H200, no network): prints the table of
# bench/gpu_bench.py and saves gpu_bench.log + gpu_results.json in $OUT (else bench/out).
#
#   bash bench/gpu.sh            # full sizes, needs CUDA; stops itself after GPU_BENCH_TIMEOUT s (default 480)
#   bash bench/gpu.sh --smoke    # toy sizes on any device (what the tests run on CPU)
#
# Python: $PYTHON if set; else .venv/bin/python when its torch sees a GPU (or for --smoke); else python3 (the
# CUDA image's python3 holds torch, timm, pyarrow, safetensors but not ray or mlflow: the sweep section then
# reports "not run"). Wheels for missing packages can be carried in bench/wheels/ (matching the machine's
# Python): they are installed into a throw-away venv that sees the system's packages.
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/out}"
mkdir -p "$OUT_DIR"
TIMEOUT="${GPU_BENCH_TIMEOUT:-480}"
smoke=0
for a in "$@"; do [ "$a" = "--smoke" ] && smoke=1; done

has_cuda() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
has_pkgs() { "$1" -c 'import torch, timm, safetensors, pyarrow, yaml, PIL' 2>/dev/null; }

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    for c in .venv/bin/python python3; do
        command -v "$c" >/dev/null 2>&1 || [ -x "$c" ] || continue
        has_pkgs "$c" || continue
        if [ "$smoke" = 1 ] || has_cuda "$c"; then PY="$c"; break; fi
    done
fi
if [ -z "$PY" ]; then
    need="torch, timm, pyarrow, safetensors, yaml, PIL"; [ "$smoke" = 1 ] || need="$need and a visible GPU"
    echo "gpu.sh: no Python found with $need (set PYTHON=...)" >&2
    exit 2
fi

if ls bench/wheels/*.whl >/dev/null 2>&1 && ! "$PY" -c 'import ray, mlflow' 2>/dev/null; then
    VENV="${TMPDIR:-/tmp}/ich-gpu-bench-venv"
    "$PY" -m venv --system-site-packages "$VENV" \
        && "$VENV/bin/python" -m pip install -q --no-index --find-links bench/wheels ray mlflow \
        && PY="$VENV/bin/python" \
        || echo "gpu.sh: installing bench/wheels failed; the sweep section will report 'not run'" >&2
fi

echo "# gpu.sh: $PY, timeout ${TIMEOUT}s, output in $OUT_DIR"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Sections that would not fit are skipped inside (budget = timeout - 30 s); the hard timeout is the backstop.
timeout -k 15 "$TIMEOUT" "$PY" bench/gpu_bench.py --out "$OUT_DIR" --budget-s "$((TIMEOUT - 30))" "$@" 2>&1 \
    | tee "$OUT_DIR/gpu_bench.log"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "gpu.sh: stopped at the ${TIMEOUT}s timeout; partial results in $OUT_DIR/gpu_results.json"
exit "$rc"

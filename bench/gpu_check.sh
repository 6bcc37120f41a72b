#!/usr/bin/env bash
# One prepared check of training on a machine with one CUDA GPU (under 8 minutes): see bench/gpu_check.py.
#   bench/gpu_check.sh [--out DIR] [--peak-tflops N]    on the GPU machine
#   bench/gpu_check.sh --dry-run [--out DIR]            the same code paths on the tiny kit, on the CPU
# Prints one table and writes it as DIR/gpu_check.json (default bench_out/gpu_check). PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" bench/gpu_check.py "$@"

#!/usr/bin/env bash
# The device check in one command (see benchmarks/gpu.py): memory and speed of E2E, DGL, InfoPro and
# MAN++ on three settings, eager / fast path / bf16, then a short accuracy run. No network needed.
#   benchmarks/gpu.sh                        # on a GPU machine (PYTHONPATH=src, no install needed)
#   benchmarks/gpu.sh --device cpu --quick   # the same code path in under a minute (a test runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" benchmarks/gpu.py "$@"

#!/usr/bin/env bash
# The first GPU run in one command: every CUDA path once on generated data, then training and search
# throughput, as one table (scripts/gpu_check.py). Exits 1 if a path failed; without a GPU it says so
# and exits 0. Run from anywhere after ./setup.sh; extra arguments go to gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  echo "gpu_check.sh: no .venv here; run ./setup.sh first" >&2
  exit 2
fi
exec .venv/bin/python scripts/gpu_check.py "$@"

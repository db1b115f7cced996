#!/usr/bin/env bash
# Create .venv and install the project with its test extras. CPU torch first: a plain `torch`
# requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if ls /opt/wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
    python -m pip install -q torch==2.13.0            # the CPU wheel on this machine's disk
  else
    python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
python -m pip install -q -e ".[dev]"

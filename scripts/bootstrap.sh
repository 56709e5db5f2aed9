#!/usr/bin/env bash
# Create (or reuse) .venv and install megalm with pinned dependencies. Idempotent; safe to re-run.
# The right torch build goes in first: CPU-only machines get torch==2.13.0+cpu, machines with an
# NVIDIA driver get the CUDA build torch==2.13.0. Override with MEGALM_TORCH="torch==...".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
stamp=.venv/.megalm-installed
want=$(cat requirements.txt setup.py | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  if [ -n "${MEGALM_TORCH:-}" ]; then torch_req=$MEGALM_TORCH
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then torch_req="torch==2.13.0"
  else torch_req="torch==2.13.0+cpu"; fi
  python -m pip install -q --disable-pip-version-check "$torch_req"
  python -m pip install -q --disable-pip-version-check -r requirements.txt
  python -c "import setuptools" 2>/dev/null || python -m pip install -q setuptools
  python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
fi

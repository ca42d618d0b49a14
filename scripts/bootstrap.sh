#!/usr/bin/env bash
# Create ./.venv if needed and install the project into it with the extras given as $1 (e.g. "dev,examples").
# Torch: when the venv has none, ask for the CPU build torch==2.13.0 first (it lies on disk on the project's
# machines and installs in seconds); elsewhere fall back to PyTorch's CPU index, then to PyPI.
# Source it: `. scripts/bootstrap.sh dev` leaves the venv activated.
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_extras="${1:-dev,examples}"
cd "$_root"
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "[bootstrap] installing torch (CPU build)" >&2
  pip install -q "torch==2.13.0" 2>/dev/null \
    || pip install -q torch --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
    || pip install -q torch
fi
_stamp=".venv/.lc-installed-$(cat pyproject.toml | sha1sum | cut -c1-12)-${_extras//,/_}"
if [ ! -f "$_stamp" ]; then
  echo "[bootstrap] installing lightning-curvature[${_extras}]" >&2
  pip install -q -e ".[${_extras}]"
  # PyPI's torchvision does not match the local torch build and breaks `import lightning`; nothing here needs it.
  if python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('torchvision') is None)"; then
    python -c "import lightning" >/dev/null 2>&1 || pip uninstall -q -y torchvision
  fi
  touch "$_stamp"
fi

#!/usr/bin/env bash
# The main job: train the Hydra-configured digits example with CurvatureMonitor, writing TensorBoard logs.
# Any arguments are Hydra overrides, e.g. `scripts/train.sh callbacks.curvature.top_k=5`.
# The venv is activated for this script only, so the commands printed at the end are the wrappers
# scripts/tensorboard.sh and scripts/plot.sh (they run the venv's tools from any shell), with paths relative to the
# folder this script was started from.
set -euo pipefail
export LIGHTNING_CURVATURE_CWD="$PWD"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export LIGHTNING_CURVATURE_SCRIPTS="$PWD/scripts"
. scripts/bootstrap.sh examples
exec python examples/train.py "$@"

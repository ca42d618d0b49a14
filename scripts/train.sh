#!/usr/bin/env bash
# The main job: train the Hydra-configured digits example with CurvatureMonitor, writing TensorBoard logs.
# Any arguments are Hydra overrides, e.g. `scripts/train.sh callbacks.curvature.top_k=5`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/bootstrap.sh examples
exec python examples/train.py "$@"

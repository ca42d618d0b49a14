#!/usr/bin/env bash
# `lightning-curvature plot` from the project's venv, from any shell (the venv need not be activated).
# Arguments go to the plot command and paths are relative to the folder you run it from:
#   scripts/plot.sh outputs/<date>/<time> -o curves.png --smooth 0.6
#   scripts/plot.sh multirun/<date>/<time> -o sweep.png --tags train/loss 'curvature/eig_1' --logy train/loss
#   scripts/plot.sh --help
set -euo pipefail
_cwd="$PWD"
. "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh" examples
cd "$_cwd"
exec lightning-curvature plot "$@"

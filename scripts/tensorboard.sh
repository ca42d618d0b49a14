#!/usr/bin/env bash
# TensorBoard from the project's venv, from any shell (the venv need not be activated; it is created on first use).
# Arguments go to tensorboard and paths are relative to the folder you run it from:
#   scripts/tensorboard.sh --logdir outputs/            then open http://localhost:6006
set -euo pipefail
_cwd="$PWD"
. "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh" examples
cd "$_cwd"
exec tensorboard "$@"

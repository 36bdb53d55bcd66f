#!/usr/bin/env bash
# The main job of README.md: sets up .venv and runs the digits demo.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
python examples/digits/demo.py "$@"

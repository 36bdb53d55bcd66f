#!/usr/bin/env bash
# Creates .venv (once) with the CPU build of torch and the package with its test / demo extras.
# Source it: `. scripts/setup.sh`. Re-running is cheap: pip skips what is installed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Pin torch first: an unpinned torch would pull several GB of CUDA packages; 2.13.0 has a CPU build on this kind of
# machine, and with it installed the package's `torch>=2.4` range installs nothing more.
if ! python -c "import torch" 2>/dev/null; then
  pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
fi
pip install --quiet -e ".[test,demo,training]"

#!/usr/bin/env bash
# Create .venv with the CPU build of torch first (so pip never pulls a multi-GB CUDA build), then the
# project in editable mode. `--test` adds the extras [test,eval,plots] and megatron-core as a test-only oracle,
# installed into its own folder: megatron-core's `megatron` package would shadow ours in the same
# site-packages, so the byte-compatibility tests load it in a subprocess from .venv/megatron-core-oracle.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  # Never a bare `pip install torch`: PyPI's default is the CUDA build. First a local wheel, if pip can
  # find one (PIP_FIND_LINKS / find-links), without touching any index; its own dependencies (sympy,
  # networkx, ...) come with the project below. Else the CPU build from PyTorch's index (PyPI only for
  # the dependencies).
  "$VPY" -m pip install -q --no-index --no-deps "torch==2.13.0" 2>/dev/null \
    || "$VPY" -m pip install -q "torch>=2.4,<2.15" --index-url https://download.pytorch.org/whl/cpu \
         --extra-index-url https://pypi.org/simple
fi
if [ "${1:-}" = "--test" ]; then
  "$VPY" -m pip install -q -e ".[test,eval,plots]"  # plots: matplotlib, for tools/plot_runs.py and its test
  if [ ! -d .venv/megatron-core-oracle/megatron ]; then
    "$VPY" -m pip install -q --no-deps --target .venv/megatron-core-oracle "megatron-core==0.16.1"
  fi
else
  "$VPY" -m pip install -q -e .
fi
echo "venv ready: .venv (activate with: . .venv/bin/activate)"

#!/usr/bin/env bash
# Create .venv with the CPU build of torch first (so pip never pulls a multi-GB CUDA build), then the
# project in editable mode. `--test` adds the test extras and megatron-core as a test-only oracle,
# installed into its own folder: megatron-core's `megatron` package would shadow ours in the same
# site-packages, so the byte-compatibility tests load it in a subprocess from .venv/megatron-core-oracle.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  # A local CPU wheel where the machine has one, else PyTorch's CPU index.
  "$VPY" -m pip install -q "torch==2.13.0" 2>/dev/null \
    || "$VPY" -m pip install -q "torch>=2.4,<2.15" --index-url https://download.pytorch.org/whl/cpu
fi
if [ "${1:-}" = "--test" ]; then
  "$VPY" -m pip install -q -e ".[test,eval]"
  if [ ! -d .venv/megatron-core-oracle/megatron ]; then
    "$VPY" -m pip install -q --no-deps --target .venv/megatron-core-oracle "megatron-core==0.16.1"
  fi
else
  "$VPY" -m pip install -q -e .
fi
echo "venv ready: .venv (activate with: . .venv/bin/activate)"

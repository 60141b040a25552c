#!/usr/bin/env bash
# The Triton kernels under Triton 3.6's interpreter (the lent GPU machines run Triton 3.6; .venv pins
# a newer one). Makes ./.venv-triton36 on first use: torch 2.13.0 (the CPU wheel on this machine's disk)
# plus triton==3.6.0, numpy and pytest. This checkout is used in place through PYTHONPATH (its
# asag_kernels/triton_kernels link finds the kernels; no install, no C++ build), then a small subset
# of the Triton tests runs under TRITON_INTERPRET=1. Extra arguments go to pytest.
#   bash scripts/test_triton36.sh            # about two minutes once the venv exists
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=.venv-triton36
TRITON_SPEC="triton==${ASAG_TRITON36_VERSION:-3.6.0}"
TORCH_SPEC="torch==${ASAG_TORCH_VERSION:-2.13.0}"
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
want_triton="${TRITON_SPEC#triton==}"
if ! python -c "import sys, torch, triton, numpy, pytest; sys.exit(triton.__version__ != '$want_triton')" 2>/dev/null; then
  python -m pip install -q "$TORCH_SPEC" "$TRITON_SPEC" numpy pytest
fi
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=1
# A subset that reaches every kernel variant: potential and attention passes with and without bias,
# masked tails, padded head dims, each dtype, the building blocks (LSE outputs, -inf biases), the
# normalised accumulation, and a forced non-default tile.
python -m pytest -q -p no:cacheprovider tests/test_triton_backend.py \
  -k "padding_and_tails or blocks_excluded or composed or huge_values or (each_config and 128-32)" "$@"

#!/usr/bin/env bash
# The test command (what CI runs): sets up ./.venv if needed, compile-checks the CUDA sources (where
# nvcc exists), runs the whole test suite, then the suites that need other environments: the Triton
# kernels under Triton 3.6's interpreter (./.venv-triton36), the package built and smoke-tested against
# the newest installable torch, and the ComfyUI node pack against the vendored ComfyUI (both in
# ./.venv-latest). Extra arguments go to the main pytest run. ASAG_TEST_MAIN_ONLY=1 runs only the
# main suite (a quicker local loop).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup_env.sh

# Backends that must be usable on any Linux machine with a compiler; a missing one fails, never skips.
# ':-' so that an empty value cannot switch the guard off.
export ASAG_REQUIRE_BACKENDS="${ASAG_REQUIRE_BACKENDS:-reference,torch,cpu,triton}"
export HF_HUB_OFFLINE=1

step() { printf '\n== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

if [ -f scripts/check_cuda_compile.sh ]; then
  step "CUDA compile check"
  bash scripts/check_cuda_compile.sh
fi

step "main test suite (.venv)"
set +e
python -m pytest tests/ -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing rather than passing vacuously" >&2
  exit 1
fi
[ "$rc" -eq 0 ] || exit "$rc"
[ "${ASAG_TEST_MAIN_ONLY:-0}" = 1 ] && exit 0

step "guidance-quality lab, quick run (benchmarks/guidance_quality.py --quick; checks its JSON schema)"
quality_json="$(mktemp)"
python benchmarks/guidance_quality.py --quick --json "$quality_json"
rm -f "$quality_json"

step "Triton kernels under Triton 3.6's interpreter (.venv-triton36)"
bash scripts/test_triton36.sh
step "wheel built and smoke-tested against the newest installable torch (.venv-latest)"
bash scripts/test_latest_torch.sh
step "ComfyUI node pack against the vendored ComfyUI (.venv-latest)"
bash scripts/test_comfyui.sh
step "all suites passed"

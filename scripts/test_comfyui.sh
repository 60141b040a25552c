#!/usr/bin/env bash
# The ComfyUI node-pack tests (tests_comfyui/) against the vendored ComfyUI tree, CPU only.
# Sets up ./.venv-latest (scripts/setup_env_latest.sh: the newest torch, ComfyUI's dependencies, this
# checkout installed non-editable), then runs pytest with that venv's python from a temporary working
# directory, so `import asag_kernels` is the installed package, not the checkout. Extra arguments go
# to pytest. ASAG_COMFYUI_DIR overrides the ComfyUI tree (default ../shared/vendor/ComfyUI).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup_env_latest.sh

repo="$PWD"
export ASAG_COMFYUI_DIR="${ASAG_COMFYUI_DIR:-$repo/../shared/vendor/ComfyUI}"
export ASAG_COMFYUI_VENV="$repo/.venv-latest"
export PYTHONDONTWRITEBYTECODE=1   # the vendored tree is read-only in CI; write nothing into it
export HF_HUB_OFFLINE=1
workdir="$(mktemp -d "${TMPDIR:-/tmp}/asag-comfyui-tests.XXXXXX")"
trap 'rm -rf "$workdir"' EXIT

set +e
(cd "$workdir" && "$repo/.venv-latest/bin/python" -m pytest -q -p no:cacheprovider \
   -c "$repo/tests_comfyui/pytest.ini" --rootdir "$repo/tests_comfyui" "$repo/tests_comfyui" "$@")
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no ComfyUI tests: failing rather than passing vacuously" >&2
  exit 1
fi
exit "$rc"

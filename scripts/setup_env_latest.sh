#!/usr/bin/env bash
# Makes ./.venv-latest: "the newest installable torch" beside the main ./.venv, with ComfyUI's Python
# dependencies, pytest, and THIS checkout installed non-editable (built against that torch).
# Sourced by scripts/test_comfyui.sh; reusable by anything that must test against the newest torch.
#
# Why a second venv: the index's torchvision (which ComfyUI's comfy.sd imports) is built against the
# index's default torch and does not load next to the CPU-only torch of ./.venv. Why non-editable: an
# editable install would rebuild the C++ extension in place (asag_kernels/*.so) and clobber the one
# ./.venv uses; the build runs in a staging copy of the checkout for the same reason (build/ is shared).
#
# Safe to rerun: the dependencies are reinstalled only when their list changed, asag_kernels only when
# its build inputs or Python sources changed (the tests must see the current checkout).
#   ASAG_LATEST_TORCH_VERSION (2.14.1), ASAG_LATEST_TORCHVISION_VERSION (0.29.1): the pins
#   ASAG_COMFYUI_DIR (../shared/vendor/ComfyUI): the ComfyUI tree whose requirements.txt is installed
#   ASAG_SKIP_CUDA_BUILD (1 here): set it empty to also build the CUDA extension against this torch
#   ASAG_REINSTALL=1: reinstall asag_kernels regardless of the stamp
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

LATEST_VENV="$PWD/.venv-latest"
TORCH_SPEC="torch==${ASAG_LATEST_TORCH_VERSION:-2.14.1}"
TORCHVISION_SPEC="torchvision==${ASAG_LATEST_TORCHVISION_VERSION:-0.29.1}"
COMFYUI_DIR="${ASAG_COMFYUI_DIR:-$PWD/../shared/vendor/ComfyUI}"
if [ ! -f "$COMFYUI_DIR/requirements.txt" ]; then
  echo "setup_env_latest.sh: no ComfyUI tree at $COMFYUI_DIR (set ASAG_COMFYUI_DIR)" >&2
  exit 1
fi
COMFYUI_DIR="$(cd "$COMFYUI_DIR" && pwd)"
# shellcheck source=scripts/steps.sh
. scripts/steps.sh

if [ ! -x "$LATEST_VENV/bin/python" ]; then
  asag_step "creating the virtual environment ./.venv-latest"
  "${PYTHON:-python3}" -m venv "$LATEST_VENV"
  asag_step_done
fi
# shellcheck disable=SC1091
. "$LATEST_VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip, less its warnings about local index folders that lack a package (one per package; noise).
_asag_latest_pip() { python -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

# ComfyUI's requirements less what a headless test run does not need (the web frontend, workflow
# templates, embedded docs) and less torch/torchvision/torchaudio, which are pinned here instead.
reqs="$LATEST_VENV/comfyui-requirements.txt"
grep -v -i -E '^[[:space:]]*(comfyui-frontend-package|comfyui-workflow-templates|comfyui-embedded-docs|torch|torchvision|torchaudio)([^a-z0-9_.-]|$)' \
  "$COMFYUI_DIR/requirements.txt" > "$reqs"
deps_stamp=$( { echo "$TORCH_SPEC $TORCHVISION_SPEC comfy-cli"; cat "$reqs"; } | sha256sum | cut -c1-16)
if [ "$(cat "$LATEST_VENV/.asag_deps_stamp" 2>/dev/null)" != "$deps_stamp" ]; then
  asag_step "installing $TORCH_SPEC, $TORCHVISION_SPEC and ComfyUI's dependencies into ./.venv-latest (pip, quiet)"
  # comfy-cli: its registry-metadata parser checks comfyui_asag/pyproject.toml (tests_comfyui).
  _asag_latest_pip "setuptools>=77" ninja pytest comfy-cli "$TORCH_SPEC" "$TORCHVISION_SPEC" -r "$reqs"
  # The newest torchaudio on the index is pinned to an older torch; ComfyUI only needs it to import.
  _asag_latest_pip --no-deps torchaudio
  asag_step_done
  echo "$deps_stamp" > "$LATEST_VENV/.asag_deps_stamp"
else
  printf '==> ./.venv-latest dependencies up to date: not reinstalled\n'
fi

# This checkout's build inputs and Python sources: tracked files plus untracked ones git does not ignore.
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  mapfile -t pkg_files < <(git ls-files -co --exclude-standard -- setup.py pyproject.toml MANIFEST.in LICENSE README.md \
    asag_kernels csrc triton | while read -r f; do [ -f "$f" ] && printf '%s\n' "$f"; done | LC_ALL=C sort)
else
  mapfile -t pkg_files < <(find setup.py pyproject.toml MANIFEST.in LICENSE README.md asag_kernels csrc triton -type f \
    ! -name '*.so' ! -name '*.pyc' 2>/dev/null | LC_ALL=C sort)
fi
pkg_stamp=$( { python -c "import torch; print(torch.__version__)"; echo "${ASAG_SKIP_CUDA_BUILD-1}"; \
  printf '%s\n' "${pkg_files[@]}"; cat "${pkg_files[@]}"; } | sha256sum | cut -c1-16)
if [ "$(cat "$LATEST_VENV/.asag_build_stamp" 2>/dev/null)" != "$pkg_stamp" ] || [ "${ASAG_REINSTALL:-0}" = 1 ] \
   || ! (cd / && python -c "import asag_kernels._C_cpu") 2>/dev/null; then
  # A persistent staging copy: files whose content did not change keep their time stamps, so the
  # extension's ninja build in $stage/build can reuse objects (seen for the torch-free row kernels;
  # the translation units that include torch/extension.h were recompiled on every reinstall).
  asag_step "building the asag_kernels wheel (C++ extension) against $TORCH_SPEC and installing it"
  stage="$LATEST_VENV/.asag-build-src"
  mkdir -p "$stage"
  for f in "${pkg_files[@]}"; do
    if ! cmp -s "$f" "$stage/$f"; then mkdir -p "$stage/$(dirname "$f")" && cp "$f" "$stage/$f"; fi
  done
  (cd "$stage" && find setup.py pyproject.toml MANIFEST.in LICENSE README.md asag_kernels csrc triton -type f \
     ! -path '*/__pycache__/*' 2>/dev/null | LC_ALL=C sort) | LC_ALL=C comm -23 - <(printf '%s\n' "${pkg_files[@]}") \
    | while read -r gone; do rm -f "$stage/$gone"; done
  # No build isolation: build against the torch installed above (an isolated build would fetch another).
  # Built as a wheel kept in $LATEST_VENV/dist, then installed: scripts/test_latest_torch.sh tests that
  # same wheel in a clean venv instead of compiling the extension a second time.
  rm -rf "$LATEST_VENV/dist"
  (cd "$stage" && ASAG_SKIP_CUDA_BUILD="${ASAG_SKIP_CUDA_BUILD-1}" MAX_JOBS="${MAX_JOBS:-2}" \
     python -m pip wheel -q --no-build-isolation --no-deps -w "$LATEST_VENV/dist" .)
  _asag_latest_pip --no-deps --force-reinstall "$LATEST_VENV"/dist/*.whl
  asag_step_done
  echo "$pkg_stamp" > "$LATEST_VENV/.asag_build_stamp"
else
  printf '==> ./.venv-latest asag_kernels up to date: no rebuild\n'
fi
(cd / && python -c "import torch, asag_kernels as a; print('.venv-latest: torch', torch.__version__, '| asag_kernels', a.__version__, 'from', a.__file__, a.backend_status())")

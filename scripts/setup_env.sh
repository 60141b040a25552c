#!/usr/bin/env bash
# Makes ./.venv with torch (the pinned CPU wheel by default) and asag_kernels installed editable with
# every extra, which builds the C++ CPU extension (flags from asag_kernels/build_spec.py). Safe to
# rerun: it skips what is already there.
# Sourced by scripts/test.sh and scripts/bench.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# shellcheck source=scripts/steps.sh
. scripts/steps.sh

TORCH_SPEC="torch==${ASAG_TORCH_VERSION:-2.13.0}"   # pinned here (a CPU wheel on this machine), never in the package
if [ ! -x .venv/bin/python ]; then
  asag_step "creating the virtual environment ./.venv"
  "${PYTHON:-python3}" -m venv .venv
  asag_step_done
else
  printf '==> ./.venv exists: reusing it\n'
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
asag_step "installing $TORCH_SPEC, setuptools and ninja (pip, quiet; already installed ones are kept)"
python -m pip install -q "setuptools>=77" ninja "$TORCH_SPEC"
asag_step_done
# Reinstall (rebuilding the extension) when the build inputs changed since the last install.
stamp=$(cat setup.py pyproject.toml asag_kernels/build_spec.py $(find csrc -type f | LC_ALL=C sort) | sha256sum | cut -c1-16)
if [ "$(cat .venv/.asag_build_stamp 2>/dev/null)" != "$stamp" ] || [ "${ASAG_REINSTALL:-0}" = 1 ] \
   || ! python -c "import asag_kernels._C_cpu" 2>/dev/null; then
  # No build isolation: the extension must build against the torch installed above, and an isolated
  # build environment would fetch another (multi-gigabyte CUDA) torch.
  asag_step "installing asag_kernels (editable) with its extras' dependencies and building the C++ extension (MAX_JOBS=${MAX_JOBS:-2}; a few minutes)"
  MAX_JOBS="${MAX_JOBS:-2}" python -m pip install -q --no-build-isolation -e ".[test,triton,diffusers,bench,quality]"
  asag_step_done
  echo "$stamp" > .venv/.asag_build_stamp
else
  printf '==> asag_kernels and its C++ extension are up to date (build inputs unchanged): no rebuild\n'
fi
asag_step "checking the install"
python -c "import asag_kernels as a; print('asag_kernels', a.__version__, a.backend_status())"
asag_step_done

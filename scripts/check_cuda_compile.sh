#!/usr/bin/env bash
# Compile-checks the CUDA backend without a GPU, with the flags of the one build spec
# (asag_kernels/build_spec.py, which setup.py and the just-in-time build use too):
#   1. every kernel translation unit (csrc/cuda/*.cu, PyTorch-free) with `nvcc -c` for each arch
#      (default: the spec's check archs, sm_80 and sm_90a), with ptxas -v: fails on any compile error
#      or any register spill (non-zero spill stores/loads);
#   2. the PyTorch binding (csrc/cuda/*.cpp) once, with the host compiler against torch's headers,
#      as setup.py's CUDAExtension would compile it.
# Prints "SKIPPED: nvcc not found" and exits 0 where nvcc is absent.
# Usage: scripts/check_cuda_compile.sh [--print-flags]
#   --print-flags: print the nvcc flags per arch and the binding's flags, compile nothing
#   env: ASAG_CHECK_ARCHS="80 90a", JOBS=<parallel nvcc jobs>, PYTHON=<python with torch, for the binding>
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ "${1:-}" != "--print-flags" ]] && ! command -v nvcc >/dev/null 2>&1; then
  echo "SKIPPED: nvcc not found (CUDA kernels not compile-checked)"
  exit 0
fi
SPEC=(python3 "$ROOT/asag_kernels/build_spec.py")  # PyTorch-free: runs with any python3

ARCHS="${ASAG_CHECK_ARCHS:-$("${SPEC[@]}" check-archs | tr '\n' ' ')}"
mapfile -t INCLUDE_DIRS < <("${SPEC[@]}" include-dirs)
mapfile -t CXX_FLAGS < <("${SPEC[@]}" cxx-flags)
INCLUDE_ARGS=()
for inc in "${INCLUDE_DIRS[@]}"; do INCLUDE_ARGS+=(-I "$inc"); done

# nvcc flags for one arch: the spec's, plus those torch's CUDAExtension adds itself (we call nvcc
# directly), plus the include dirs.
nvcc_flags_for() {  # <arch> -> one flag per line
  "${SPEC[@]}" nvcc-flags --torch-implicit --archs "$1"
  printf '%s\n' "${INCLUDE_ARGS[@]}"
}

if [[ "${1:-}" == "--print-flags" ]]; then
  for arch in $ARCHS; do
    echo "nvcc flags sm_${arch}: $(nvcc_flags_for "$arch" | tr '\n' ' ')"
  done
  echo "binding flags: ${CXX_FLAGS[*]} ${INCLUDE_ARGS[*]}"
  exit 0
fi

JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

mapfile -t KERNEL_SOURCES < <("${SPEC[@]}" kernel-sources)
# A failing or empty listing must fail the check, not compile nothing and pass ('<(...)' hides its status).
if [ "${#KERNEL_SOURCES[@]}" -eq 0 ]; then
  echo "check_cuda_compile.sh: build_spec.py listed no kernel sources" >&2
  exit 1
fi
echo "nvcc: $(nvcc --version | tail -1)"
echo "kernel sources: ${KERNEL_SOURCES[*]:-none}; archs: $ARCHS; jobs: $JOBS"
for arch in $ARCHS; do
  nvcc_flags_for "$arch" >"$WORK/flags.$arch"
  echo "nvcc flags sm_${arch}: $(tr '\n' ' ' <"$WORK/flags.$arch")"
done

compile_one() {  # <arch> <source>
  local arch="$1" src="$2"
  local rel="${src#"$ROOT"/}"
  local tag="${rel//\//_}.sm_${arch}"
  local -a flags
  mapfile -t flags <"$WORK/flags.$arch"
  if nvcc "${flags[@]}" -Xptxas -v -c "$src" -o "$WORK/$tag.o" >"$WORK/$tag.log" 2>&1; then
    echo "ok $tag"
  else
    echo "FAILED $tag"
  fi
}
export -f compile_one
export WORK ROOT

start=$SECONDS
status=0
results="$WORK/results.txt"
for arch in $ARCHS; do
  for src in "${KERNEL_SOURCES[@]}"; do
    printf '%s %s\n' "$arch" "$src"
  done
done | xargs -r -P "$JOBS" -L 1 bash -c 'compile_one "$0" "$1"' >"$results"

while read -r verdict tag; do
  log="$WORK/$tag.log"
  if [[ "$verdict" != ok ]]; then
    echo "=== compile error: $tag"
    cat "$log"
    status=1
    continue
  fi
  kernels=$(grep -c "Compiling entry function" "$log" || true)
  max_regs=$(grep -o "Used [0-9]* registers" "$log" | awk '{print $2}' | sort -n | tail -1 || true)
  spills=$(grep -E "bytes spill (stores|loads)" "$log" | grep -Ev " 0 bytes spill stores, 0 bytes spill loads" || true)
  if [[ -n "$spills" ]]; then
    echo "=== register spills: $tag"
    grep -B2 -E "bytes spill" "$log" | grep -E "entry function|spill" | grep -Ev "^\s*0 bytes spill stores, 0 bytes spill loads" || true
    echo "$spills"
    status=1
  else
    echo "ok   $tag: $kernels kernels, max ${max_regs:-0} registers, no spills"
  fi
done <"$results"
echo "kernels: $((SECONDS - start)) s"

# The binding includes torch/extension.h; torch here may be a CPU build whose headers lack the
# generated c10/cuda/impl/cuda_cmake_macros.h (it only defines C10_CUDA_BUILD_SHARED_LIBS for
# Windows DLL exports), so skip that one include. -fsyntax-only: every template is still instantiated.
start=$SECONDS
BINDING_SOURCES=$("${SPEC[@]}" binding-sources)
if [[ -n "$BINDING_SOURCES" ]]; then
  PY=${PYTHON:-python}
  if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "=== the binding check needs a python with torch: '$PY' has none (activate the venv or set PYTHON)"
    exit 1
  fi
  mapfile -t TORCH_INCLUDES < <("$PY" -c "import torch.utils.cpp_extension as c; print('\n'.join(c.include_paths()))")
  PY_INCLUDE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
  CUDA_HOME_DIR=$("${SPEC[@]}" cuda-home || echo /usr/local/cuda)  # the toolkit setup.py hands to torch
  CUDA_INCLUDE="$CUDA_HOME_DIR/include"
  CXX_BIN=${CXX:-c++}
  for src in $BINDING_SOURCES; do
    args=("${CXX_FLAGS[@]}" -fsyntax-only -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DTORCH_EXTENSION_NAME=_C_cuda
      -DTORCH_API_INCLUDE_EXTENSION_H "${INCLUDE_ARGS[@]}" -I "$PY_INCLUDE" -I "$CUDA_INCLUDE")
    for inc in "${TORCH_INCLUDES[@]}"; do args+=(-isystem "$inc"); done
    if "$CXX_BIN" "${args[@]}" "$src" >"$WORK/binding.log" 2>&1; then
      echo "ok   $src (host compiler against torch headers)"
    else
      echo "=== compile error: $src"
      cat "$WORK/binding.log"
      status=1
    fi
  done
fi
echo "binding: $((SECONDS - start)) s"

if [[ $status -ne 0 ]]; then
  echo "CUDA compile check FAILED"
else
  echo "CUDA compile check passed"
fi
exit $status

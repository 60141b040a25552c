#!/usr/bin/env bash
# Builds a WHEEL of this checkout against the newest installable torch (./.venv-latest, made by
# scripts/setup_env_latest.sh: torch 2.14.1 here, whose headers require C++20), installs it into a
# throwaway venv and smoke-tests it there: the C++ CPU extension must have built (a failed optional
# build would install quietly, so "cpu" must be "ok"), cpu and torch backends against the float64
# reference on a small problem, backend_status() printed.
#   ASAG_SKIP_CUDA_BUILD (1 here): set it empty to also build the CUDA extension into the wheel
#     (where a CUDA toolkit matching the torch's CUDA exists; minutes more), which must then be in it
#   MAX_JOBS (2): parallel compiles
# Usage: bash scripts/test_latest_torch.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
start=$SECONDS

skip_cuda="${ASAG_SKIP_CUDA_BUILD-1}"
# setup_env_latest.sh builds this checkout's wheel against that torch (once per change of the build
# inputs, with the same ASAG_SKIP_CUDA_BUILD) and keeps it in .venv-latest/dist: the wheel tested here.
ASAG_SKIP_CUDA_BUILD="$skip_cuda" bash scripts/setup_env_latest.sh >/dev/null
PY="$ROOT/.venv-latest/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1

work="$(mktemp -d "${TMPDIR:-/tmp}/asag-latest-wheel.XXXXXX")"
trap 'rm -rf "$work"' EXIT
wheel=$(ls "$ROOT"/.venv-latest/dist/*.whl)
echo "== the wheel built against $("$PY" -c 'import torch; print("torch", torch.__version__)')"
echo "wheel: $(basename "$wheel")"

# A throwaway venv: the wheel in its own site-packages, .venv-latest's packages (torch, Triton) on a
# path entry behind it (a path entry, so .venv-latest's own asag_kernels install is shadowed; pip sees
# that install too, hence --force-reinstall).
"$PY" -m venv --without-pip "$work/venv"
site=$(ls -d "$work"/venv/lib/python3*/site-packages)
"$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" >"$site/latest_torch.pth"
"$PY" -m pip --python "$work/venv/bin/python" install -q --no-deps --no-index --force-reinstall "$wheel"

cd "$work"
ASAG_WANT_CUDA_EXT=$([ -z "$skip_cuda" ] || [ "$skip_cuda" = 0 ] && echo 1 || echo 0) \
"$work/venv/bin/python" - "$wheel" <<'EOF'
import os, sys, zipfile
import torch, asag_kernels
from asag_kernels._spec import out_tolerance

names = zipfile.ZipFile(sys.argv[1]).namelist()
site = os.path.realpath(os.path.dirname(os.path.dirname(asag_kernels.__file__)))
assert site.startswith(os.path.realpath(os.getcwd())), f"imported {asag_kernels.__file__}, not the wheel"
assert any(n.startswith("asag_kernels/_C_cpu") for n in names), "the CPU extension is not in the wheel"
for sub in ("backends", "benchmarking", "diffusers", "distributed", "triton_kernels", "csrc"):
    assert any(n.startswith(f"asag_kernels/{sub}/") for n in names), f"asag_kernels.{sub} is not in the wheel"
if os.environ["ASAG_WANT_CUDA_EXT"] == "1":
    assert any(n.startswith("asag_kernels/_C_cuda") for n in names), "the CUDA extension is not in the wheel"
status = asag_kernels.backend_status()
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) | asag_kernels {asag_kernels.__version__} from {asag_kernels.__file__}")
for name, why in status.items():
    print(f"  {name:9s} {why}")
assert status["cpu"] == "ok", status["cpu"]
tol = out_tolerance(torch.float32)
gen = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(2, 3, 70, 40, generator=gen) for _ in range(3))
for cost, iters in (("adversarial", 2), ("standard", 0)):
    ref = asag_kernels.sinkhorn_attention(q.double(), k.double(), v.double(), num_iters=iters, cost=cost, backend="reference")
    for name in ("cpu", "torch"):
        out = asag_kernels.sinkhorn_attention(q, k, v, num_iters=iters, cost=cost, backend=name)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err <= tol, (name, cost, err, tol)
        print(f"  {name} {cost} T={iters}: rel err {err:.2e} vs float64 reference")
print("latest-torch wheel smoke test passed")
EOF
echo "test_latest_torch.sh: $((SECONDS - start)) s"

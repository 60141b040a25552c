"""The sdist and wheel build, and the wheel gives the same backends from a clean virtual environment
as an editable checkout: the CPU extension, the Triton kernels through ``asag_kernels.triton_kernels``
(with Triton installed in the same site-packages, where a path guess would find Triton itself), and
the CUDA sources a just-in-time build needs (``asag_kernels/csrc``)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from asag_kernels import build_spec

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("build") is None, reason="the 'build' package is not installed (pip install asag-kernels[test])"
)


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # No isolation: the extension builds against this torch (an isolated build would fetch another).
    run = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(out), str(ROOT)],
        capture_output=True, text=True, env={**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", "2")},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out


def test_sdist_ships_sources(dist):
    (sdist,) = dist.glob("*.tar.gz")
    names = tarfile.open(sdist).getnames()
    for needed in ("LICENSE", "setup.py", "pyproject.toml", "asag_kernels/build_spec.py", "csrc/include/asag/online_lse.h",
                   "csrc/include/asag/sinkhorn_kernels.cuh", "csrc/cuda/binding.cpp", "csrc/cuda/sinkhorn_dispatch.cu"):
        assert any(n.endswith(needed) for n in names), f"{needed} missing from the sdist"
    assert any("/triton/" in n and n.endswith(".py") for n in names), "the Triton kernels are missing from the sdist"
    assert not any(n.endswith("triton/__init__.py") for n in names)


def test_wheel_ships_extension_and_kernels(dist):
    (wheel,) = dist.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("asag_kernels/_C_cpu") and n.endswith(".so") for n in names), names
    assert any(n.startswith("asag_kernels/triton_kernels/") and n.endswith(".py") for n in names), names
    # Every subpackage of the checkout is in the wheel (an editable install would hide a missing one).
    subpackages = {p.parent.name for p in (ROOT / "asag_kernels").glob("*/__init__.py")}
    assert {"backends", "benchmarking", "diffusers", "distributed"} <= subpackages, subpackages
    for sub in subpackages:
        assert f"asag_kernels/{sub}/__init__.py" in names, f"asag_kernels.{sub} is missing from the wheel"
    assert any(n.endswith("LICENSE") for n in names)
    # What a just-in-time CUDA build compiles, as the build spec lists it, ships as package data.
    csrc = ROOT / "csrc"
    shipped = {f"asag_kernels/csrc/{p.relative_to(csrc)}" for pattern in build_spec.SHIPPED_SOURCES for p in csrc.glob(pattern)}
    assert any(n.endswith(".cu") for n in shipped) and any(n.endswith(".cpp") for n in shipped)
    assert shipped <= set(names), sorted(shipped - set(names))


def _venv_with_torch_and_triton(cache_root: Path) -> Path:
    """A venv holding only this process's torch and Triton versions (from pip's cache / the local
    wheels) and numpy, kept between runs under pytest's cache: Triton then sits in the same
    site-packages as the installed wheel, as in a user's environment. numpy: Triton's interpreter
    (TRITON_INTERPRET=1) imports it, and Triton does not declare it."""
    import triton

    requirements = [f"torch=={torch.__version__}", f"triton=={triton.__version__}", "numpy"]
    env_dir = cache_root / f"py{sys.version_info[0]}{sys.version_info[1]}"
    py = env_dir / "bin" / "python"
    ready = env_dir / ".installed"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(env_dir)], check=True)
    if not ready.exists() or ready.read_text() != " ".join(requirements):
        subprocess.run(
            [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--disable-pip-version-check", *requirements],
            check=True, timeout=1800,
        )
        ready.write_text(" ".join(requirements))
    return py


SMOKE = """
import os, sys, torch, asag_kernels
from asag_kernels import build_spec
from asag_kernels.backends import cuda_backend
site = os.path.realpath(%(site)r)
assert os.path.realpath(asag_kernels.__file__).startswith(site), asag_kernels.__file__
status = asag_kernels.backend_status()
print(status)
assert status["cpu"] == "ok", status
interpreting = os.environ.get("TRITON_INTERPRET") == "1"
if interpreting:
    assert status["triton"] == "ok", status["triton"]
else:  # Triton is installed: the only thing missing is the GPU
    assert "no CUDA GPU" in status["triton"] and "not installed" not in status["triton"], status["triton"]
# cuda: names the missing GPU / CUDA torch, never missing sources ...
assert status["cuda"].startswith("no CUDA GPU"), status["cuda"]
# ... and on a GPU machine its just-in-time build would find every source in the installed package.
csrc = cuda_backend._csrc()
assert csrc is not None and os.path.realpath(csrc).startswith(site), csrc
spec = build_spec.cuda_extension(csrc, ["90"], name=build_spec.JIT_EXTENSION)
assert spec.sources and all(os.path.isfile(s) and os.path.realpath(s).startswith(site) for s in spec.sources), spec.sources
started = []
cuda_backend._device_reason = lambda: None
cuda_backend._prebuilt = None
cuda_backend._cuda_home = lambda: "/usr/local/cuda"
cuda_backend._ninja_available = lambda: True
cuda_backend._JitBuild._build = lambda self: started.append(1)
os.environ["ASAG_CUDA_JIT"] = "wait"
jit = cuda_backend.status()
assert started and "sources" not in jit, jit
q, k, v = (torch.randn(1, 2, 33, 16) for _ in range(3))
ref = asag_kernels.sinkhorn_attention(q.double(), k.double(), v.double(), backend="reference")
for name in ("torch", "cpu", "triton"):
    if status[name] != "ok":
        continue
    out = asag_kernels.sinkhorn_attention(q, k, v, backend=name)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < 1e-5, (name, err)
    print(name, "ok", err)
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed here (pip install triton)")
def test_wheel_in_clean_venv_with_triton(dist, request, tmp_path_factory):
    """The issue's defect: in a regular install with Triton beside it, a path guess for the kernels
    found site-packages/triton (Triton itself) and the triton backend said Triton was missing."""
    (wheel,) = dist.glob("*.whl")
    # Kept under pytest's cache between runs; with the cache plugin off (-p no:cacheprovider) there
    # is no config.cache, so a fresh venv in this run's temporary directory instead.
    cache = getattr(request.config, "cache", None)
    root = cache.mkdir("asag-clean-venv") if cache is not None else tmp_path_factory.mktemp("asag-clean-venv")
    py = _venv_with_torch_and_triton(root)
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", "--force-reinstall", str(wheel)],
        check=True,
    )
    (site,) = (py.parents[1] / "lib").glob("python3*/site-packages")
    assert (site / "triton" / "__init__.py").is_file(), "Triton must share the wheel's site-packages"
    smoke = SMOKE % {"site": str(site)}
    for interpret in ("1", ""):
        run = subprocess.run(
            [str(py), "-c", smoke], cwd=py.parents[1], capture_output=True, text=True, timeout=600,
            env={**os.environ, "TRITON_INTERPRET": interpret, "PYTHONPATH": "", "ASAG_CUDA_JIT": ""},
        )
        assert run.returncode == 0, f"TRITON_INTERPRET={interpret!r}\n" + run.stdout + run.stderr
        assert "cpu ok" in run.stdout
        assert ("triton ok" in run.stdout) == (interpret == "1"), run.stdout

"""Builds the optional native extensions of asag_kernels.

- ``asag_kernels._C_cpu`` from ``csrc/cpu/*.cpp`` (C++17, OpenMP), always when the sources exist.
- ``asag_kernels._C_cuda`` from ``csrc/cuda/*`` only when torch has CUDA and ``ASAG_SKIP_CUDA_BUILD``
  is unset; architectures from ``ASAG_CUDA_ARCHS`` (default "80;90"), parallelism from ``MAX_JOBS``.

A failed optional build is reported and skipped: the package still installs, and
``asag_kernels.backend_status()`` says the backend is not built.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
INCLUDE = [os.path.join(ROOT, "csrc", "include")]


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("asag_kernels: torch is not importable at build time; building no native extension", file=sys.stderr)
        return [], {}

    exts = []
    cpu_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    if cpu_sources:
        openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
        exts.append(
            CppExtension(
                "asag_kernels._C_cpu",
                cpu_sources,
                include_dirs=INCLUDE,
                extra_compile_args={"cxx": ["-O3", "-std=c++17", *openmp]},
                extra_link_args=openmp,
            )
        )

    cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
    want_cuda = cuda_sources and torch.version.cuda is not None and not os.environ.get("ASAG_SKIP_CUDA_BUILD")
    if want_cuda:
        # Kernel translation units (*.cu) are PyTorch-free; the binding (*.cpp) includes torch/extension.h.
        archs = [a.strip() for a in os.environ.get("ASAG_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a.strip()]
        gencode = []
        for arch in archs:
            code = arch.replace(".", "").replace("sm_", "")  # "90a" stays "90a" (arch-specific features)
            gencode += ["-gencode", f"arch=compute_{code},code=sm_{code}"]
        if archs:  # portable PTX of the newest arch too ("90a" PTX would run on sm_90a only), for later GPUs
            newest = max(int(a.replace(".", "").replace("sm_", "").rstrip("a")) for a in archs)
            gencode += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
        exts.append(
            CUDAExtension(
                "asag_kernels._C_cuda",
                cuda_sources,
                include_dirs=INCLUDE,
                extra_compile_args={
                    "cxx": ["-O3", "-std=c++20"],
                    "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "--expt-relaxed-constexpr", *gencode],
                },
            )
        )

    class OptionalBuildExtension(BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # optional: the package stays importable without it
                print(f"asag_kernels: building {ext.name} failed, skipping it: {exc}", file=sys.stderr)

    return exts, {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    packages=["asag_kernels", "asag_kernels.backends", "asag_kernels.triton_kernels"],
    package_dir={"asag_kernels.triton_kernels": "triton"},
    package_data={"asag_kernels.triton_kernels": ["*.py"]},
)

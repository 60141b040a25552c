"""Builds the optional native extensions of asag_kernels from the one build spec
(``asag_kernels/build_spec.py``: sources, include dirs, C++20, flags, gencode, CUDA_HOME).

- ``asag_kernels._C_cpu`` from ``csrc/cpu/*.cpp`` (OpenMP), always when the sources exist.
- ``asag_kernels._C_cuda`` from ``csrc/cuda/*`` only when torch has CUDA, a CUDA toolkit is found and
  ``ASAG_SKIP_CUDA_BUILD`` is unset; architectures from ``ASAG_CUDA_ARCHS`` (default "80;90"),
  parallelism from ``MAX_JOBS``.
- The CUDA sources also ship as package data (``asag_kernels/csrc``), so an installed package
  whose wheel has no ``_C_cuda`` can still build it just in time on a GPU machine.

A failed optional build is reported and dropped from the build: the package still installs (also
``pip install -e .``, whose copy step would otherwise look for the missing library), and
``asag_kernels.backend_status()`` says the backend is not built.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_spec():
    # By path: importing the package would import torch (and needs the package built).
    spec = importlib.util.spec_from_file_location("_asag_build_spec", os.path.join(ROOT, "asag_kernels", "build_spec.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


build_spec = _load_build_spec()
CSRC = build_spec.csrc_dir()


def _log(message: str) -> None:
    print(f"asag_kernels: {message}", file=sys.stderr)


def _extensions():
    if CSRC is None:
        _log("no csrc/ sources found; building no native extension")
        return [], {}
    # torch.utils.cpp_extension fixes its CUDA_HOME at import; give it the checked toolkit first
    # (its own guess from an nvcc in /usr/local/bin is /usr/local, which has no CUDA headers).
    cuda_home = build_spec.find_cuda_home()
    if cuda_home is not None and not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _log("torch is not importable at build time; building no native extension")
        return [], {}

    exts = []
    cpu = build_spec.cpu_extension(CSRC)
    if cpu.sources:
        exts.append(CppExtension(**cpu.setuptools_kwargs(ROOT)))

    skip_cuda = build_spec._env.env_flag("ASAG_SKIP_CUDA_BUILD", False)
    if torch.version.cuda is None or skip_cuda:
        _log("CUDA extension not built: " + ("ASAG_SKIP_CUDA_BUILD is set" if skip_cuda else "torch is a CPU build"))
    elif cuda_home is None:
        _log("CUDA extension not built: no CUDA toolkit found (bin/nvcc and include/cuda_runtime.h; set CUDA_HOME)")
    else:
        cuda = build_spec.cuda_extension(CSRC, build_spec.cuda_archs_from_env())
        exts.append(CUDAExtension(**cuda.setuptools_kwargs(ROOT)))

    forced = build_spec.forced_failures()

    class OptionalBuildExtension(BuildExtension):
        """Builds what it can: an extension that fails is reported and removed from the command's
        list, so the later steps (the in-place copy of an editable install, the wheel's file list)
        never look for its library."""

        def build_extensions(self):
            self.failed = []
            try:
                super().build_extensions()
            except Exception as exc:  # torch's set-up checks before any extension compiles
                cuda = [ext for ext in self.extensions if ext.name == build_spec.CUDA_EXTENSION]
                if not cuda:  # e.g. no working C++ compiler: nothing can build
                    _log(f"native build failed before compiling, skipping every extension: {type(exc).__name__}: {exc}")
                    self.failed = list(self.extensions)
                else:  # e.g. nvcc's CUDA version does not match torch's: the CPU extension can still build
                    _log(f"CUDA build set-up failed, skipping {cuda[0].name}: {type(exc).__name__}: {exc}")
                    self.failed = cuda
                    self.extensions = [ext for ext in self.extensions if ext not in self.failed]
                    self.build_extensions()
                    return
            self.extensions = [ext for ext in self.extensions if ext not in self.failed]

        def build_extension(self, ext):
            try:
                short = ext.name.rsplit("_", 1)[-1]  # asag_kernels._C_cpu -> cpu
                if short in forced:
                    raise RuntimeError(f"forced by ASAG_FORCE_BUILD_FAILURE={os.environ['ASAG_FORCE_BUILD_FAILURE']}")
                super().build_extension(ext)
            except Exception as exc:  # optional: the package stays importable without it
                _log(f"building {ext.name} failed, skipping it: {type(exc).__name__}: {exc}")
                self.failed.append(ext)

    return exts, {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # Every subpackage of asag_kernels (diffusers, distributed, benchmarking, ...) plus the two mapped
    # folders; asag_kernels/triton_kernels in a checkout is a link to triton/, not a package of its own.
    packages=find_packages(include=["asag_kernels", "asag_kernels.*"], exclude=["asag_kernels.triton_kernels*"])
    + ["asag_kernels.triton_kernels", "asag_kernels.csrc"],
    package_dir={"asag_kernels.triton_kernels": "triton", "asag_kernels.csrc": "csrc"},
    package_data={"asag_kernels.triton_kernels": ["*.py"], "asag_kernels.csrc": list(build_spec.SHIPPED_SOURCES)},
)

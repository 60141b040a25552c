"""The one build spec of the native extensions: sources, include dirs, C++ standard, compiler flags,
CUDA architectures -> ``-gencode`` flags and CUDA_HOME discovery.

Three builds consume it and nothing else defines a flag:

- ``setup.py`` (ahead of time: ``asag_kernels._C_cpu`` and, with a CUDA torch, ``asag_kernels._C_cuda``)
  through :meth:`ExtensionSpec.setuptools_kwargs`;
- the just-in-time CUDA build in ``asag_kernels/backends/cuda_backend.py`` through
  :meth:`ExtensionSpec.jit_kwargs` (``torch.utils.cpp_extension.load``);
- ``scripts/check_cuda_compile.sh`` (nvcc without torch) through this file's command line::

      python asag_kernels/build_spec.py nvcc-flags --archs 80     # one flag per line
      python asag_kernels/build_spec.py {cxx-flags,check-archs,kernel-sources,binding-sources,include-dirs,cuda-home}

PyTorch-free and importable by path (setup.py loads it before it asks torch anything, and the
script runs it without importing the package), so it imports only the standard library and ``_env``.

Where the sources are: a wheel or sdist install ships them as package data in ``asag_kernels/csrc``
(setup.py maps that folder to the checkout's ``csrc/``); a checkout has them in ``<repo>/csrc``.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__:
    from . import _env
else:  # loaded by path (setup.py, the compile-check script): _env is a plain sibling module
    _spec = importlib.util.spec_from_file_location("_asag_env", Path(__file__).with_name("_env.py"))
    _env = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_env)

CXX_STANDARD = "c++20"  # torch >= 2.14 headers refuse anything older ("#error C++20 or later ...")
CPU_EXTENSION = "asag_kernels._C_cpu"
CUDA_EXTENSION = "asag_kernels._C_cuda"
JIT_EXTENSION = "asag_kernels_C_cuda_jit"  # torch caches JIT builds by name, apart from the installed one

# Source layout, relative to the csrc folder. Kernel translation units (*.cu) are PyTorch-free;
# the binding (*.cpp) includes torch/extension.h.
CPU_SOURCES = ("cpu/*.cpp",)
CUDA_KERNEL_SOURCES = ("cuda/*.cu",)
CUDA_BINDING_SOURCES = ("cuda/*.cpp",)
HEADERS = ("include/asag/*.h", "include/asag/*.cuh")
INCLUDE_DIRS = ("include",)
# What the wheel ships under asag_kernels/csrc: what a just-in-time CUDA build compiles.
SHIPPED_SOURCES = CUDA_KERNEL_SOURCES + CUDA_BINDING_SOURCES + HEADERS
MARKER = "include/asag/sinkhorn_launch.h"  # tells our csrc folder from any other folder of that name

CXX_FLAGS = ("-O3", f"-std={CXX_STANDARD}")
NVCC_FLAGS = ("-O3", f"-std={CXX_STANDARD}", "--use_fast_math", "--expt-relaxed-constexpr")
# torch's CUDAExtension and load() add these to every nvcc command themselves
# (torch.utils.cpp_extension.COMMON_NVCC_FLAGS); a bare nvcc run must pass them to compile the same code.
TORCH_IMPLICIT_NVCC_FLAGS = (
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
)

DEFAULT_CUDA_ARCHS = "80;90"  # ASAG_CUDA_ARCHS: what setup.py builds (sm_80+: mma.sync bf16/tf32)
CHECK_CUDA_ARCHS = "80;90a"  # what the compile check proves (90a: Hopper's arch-specific target)
FAILURE_TARGETS = ("cpu", "cuda")  # ASAG_FORCE_BUILD_FAILURE: tests of the optional-build path


@dataclass(frozen=True)
class ExtensionSpec:
    """One extension: absolute source and include paths, and the flags for each compiler."""

    name: str
    sources: tuple[str, ...]
    include_dirs: tuple[str, ...]
    cxx_flags: tuple[str, ...]
    nvcc_flags: tuple[str, ...] = ()
    link_flags: tuple[str, ...] = ()

    def setuptools_kwargs(self, root: str | os.PathLike) -> dict:
        """Keyword arguments of torch's CppExtension/CUDAExtension (setuptools wants sources relative
        to the project root)."""
        extra = {"cxx": list(self.cxx_flags)}
        if self.nvcc_flags:
            extra["nvcc"] = list(self.nvcc_flags)
        return {
            "name": self.name,
            "sources": [os.path.relpath(s, root) for s in self.sources],
            "include_dirs": list(self.include_dirs),
            "extra_compile_args": extra,
            "extra_link_args": list(self.link_flags),
        }

    def jit_kwargs(self) -> dict:
        """Keyword arguments of ``torch.utils.cpp_extension.load`` (name and verbosity aside)."""
        return {
            "sources": list(self.sources),
            "extra_include_paths": list(self.include_dirs),
            "extra_cflags": list(self.cxx_flags),
            "extra_cuda_cflags": list(self.nvcc_flags),
            "extra_ldflags": list(self.link_flags),
        }


def csrc_dir() -> Path | None:
    """The C++/CUDA sources: ``asag_kernels/csrc`` of an installed wheel, else ``<repo>/csrc`` of a
    checkout (each only if it holds our marker header), else None."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / MARKER).is_file():
            return candidate
    return None


def _glob(csrc: Path, patterns: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sorted(p for pattern in patterns for p in glob.glob(str(csrc / pattern))))


def kernel_sources(csrc: Path) -> tuple[str, ...]:
    return _glob(csrc, CUDA_KERNEL_SOURCES)


def binding_sources(csrc: Path) -> tuple[str, ...]:
    return _glob(csrc, CUDA_BINDING_SOURCES)


def include_dirs(csrc: Path) -> tuple[str, ...]:
    return tuple(str(csrc / d) for d in INCLUDE_DIRS)


def cpu_extension(csrc: Path, platform: str = sys.platform) -> ExtensionSpec:
    openmp = ("-fopenmp",) if platform.startswith("linux") else ()  # Apple clang has no -fopenmp
    return ExtensionSpec(
        name=CPU_EXTENSION,
        sources=_glob(csrc, CPU_SOURCES),
        include_dirs=include_dirs(csrc),
        cxx_flags=CXX_FLAGS + openmp,
        link_flags=openmp,
    )


def cuda_extension(csrc: Path, archs: list[str], name: str = CUDA_EXTENSION) -> ExtensionSpec:
    return ExtensionSpec(
        name=name,
        sources=kernel_sources(csrc) + binding_sources(csrc),
        include_dirs=include_dirs(csrc),
        cxx_flags=CXX_FLAGS,
        nvcc_flags=nvcc_flags(archs),
    )


def nvcc_flags(archs: list[str]) -> tuple[str, ...]:
    """The nvcc flags of setup.py and the JIT build for these architectures (torch adds
    TORCH_IMPLICIT_NVCC_FLAGS itself, and no arch flags of its own once -gencode is given)."""
    return NVCC_FLAGS + tuple(gencode_flags(archs))


def parse_archs(text: str, name: str = "ASAG_CUDA_ARCHS") -> list[str]:
    """"80;90", "8.0, 9.0a", "sm_86 sm_90a" -> ["80", "90", ...]; a ValueError naming `name` otherwise."""
    archs = []
    for item in text.replace(",", " ").replace(";", " ").split():
        code = item.strip().lower().removeprefix("sm_").removeprefix("compute_").replace(".", "")
        digits = code.removesuffix("a").removesuffix("f")
        if not digits.isdigit() or len(digits) < 2:
            raise ValueError(f"{name} must list CUDA architectures such as '80;90' or '8.0;9.0a', got {item!r} in {text!r}")
        archs.append(code)
    if not archs:
        raise ValueError(f"{name} must list at least one CUDA architecture such as '80;90', got {text!r}")
    return archs


def cuda_archs_from_env() -> list[str]:
    raw = _env._raw("ASAG_CUDA_ARCHS")  # the _env rule: unset or blank -> the default
    return parse_archs(DEFAULT_CUDA_ARCHS if raw is None else raw)


def gencode_flags(archs: list[str]) -> list[str]:
    """SASS for every arch, plus PTX of the newest plain (portable) arch listed so later GPUs can
    JIT it. PTX of an arch-specific target such as 90a runs on that arch only, so it is never added."""
    flags = []
    for code in archs:
        flags += ["-gencode", f"arch=compute_{code},code=sm_{code}"]
    plain = [int(code) for code in archs if code.isdigit()]
    if plain:
        flags += ["-gencode", f"arch=compute_{max(plain)},code=compute_{max(plain)}"]
    return flags


def forced_failures() -> tuple[str, ...]:
    """ASAG_FORCE_BUILD_FAILURE="cpu", "cuda" or "cpu,cuda": those extensions fail on purpose (the
    tests' way to prove a failed optional build still installs the package)."""
    raw = _env._raw("ASAG_FORCE_BUILD_FAILURE")
    if raw is None:
        return ()
    names = tuple(n for n in raw.replace(",", " ").lower().split())
    bad = [n for n in names if n not in FAILURE_TARGETS]
    if bad:
        raise ValueError(f"environment variable ASAG_FORCE_BUILD_FAILURE must list names from {FAILURE_TARGETS}, got {raw!r}")
    return names


def cuda_home_problem(home: str | os.PathLike) -> str | None:
    """None if `home` is a CUDA toolkit (bin/nvcc and cuda_runtime.h), else what is missing."""
    home = Path(home)
    if not (home / "bin" / "nvcc").is_file():
        return f"{home}/bin/nvcc does not exist"
    headers = [home / "include" / "cuda_runtime.h", *home.glob("targets/*/include/cuda_runtime.h")]
    if not any(h.is_file() for h in headers):
        return f"{home} has no include/cuda_runtime.h"
    return None


def find_cuda_home(environ=os.environ, which=shutil.which) -> str | None:
    """The CUDA toolkit to build with: CUDA_HOME or CUDA_PATH when set (taken as given), else the
    toolkit of the nvcc on PATH (following links), else /usr/local/cuda; only a folder that has
    bin/nvcc and cuda_runtime.h counts. (torch's own guess takes dirname(dirname(nvcc)) unchecked,
    which is /usr/local for an nvcc linked or copied into /usr/local/bin: no headers there.)"""
    given = environ.get("CUDA_HOME") or environ.get("CUDA_PATH")
    if given:
        return given if cuda_home_problem(given) is None else None
    candidates = []
    nvcc = which("nvcc")
    if nvcc:
        candidates += [Path(nvcc).parent.parent, Path(os.path.realpath(nvcc)).parent.parent]
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if cuda_home_problem(home) is None:
            return str(home)
    return None


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="build_spec.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "what",
        choices=("nvcc-flags", "cxx-flags", "check-archs", "kernel-sources", "binding-sources", "include-dirs", "cuda-home"),
    )
    parser.add_argument("--archs", help="for nvcc-flags: CUDA architectures, e.g. '80' or '80;90a'")
    parser.add_argument("--torch-implicit", action="store_true", help="nvcc-flags: also the flags torch adds itself")
    args = parser.parse_args(argv)
    csrc = csrc_dir()
    if args.what in ("kernel-sources", "binding-sources", "include-dirs") and csrc is None:
        print(f"no csrc folder with {MARKER} next to {Path(__file__).parent}", file=sys.stderr)
        return 1
    if args.what == "nvcc-flags":
        archs = parse_archs(args.archs, "--archs") if args.archs else cuda_archs_from_env()
        lines = list(nvcc_flags(archs))
        if args.torch_implicit:
            lines = list(TORCH_IMPLICIT_NVCC_FLAGS) + [f for f in lines if f not in TORCH_IMPLICIT_NVCC_FLAGS]
    elif args.what == "cxx-flags":
        lines = list(CXX_FLAGS)
    elif args.what == "check-archs":
        lines = parse_archs(CHECK_CUDA_ARCHS)
    elif args.what == "kernel-sources":
        lines = list(kernel_sources(csrc))
    elif args.what == "binding-sources":
        lines = list(binding_sources(csrc))
    elif args.what == "include-dirs":
        lines = list(include_dirs(csrc))
    else:
        home = find_cuda_home()
        if home is None:
            print("no CUDA toolkit found (set CUDA_HOME)", file=sys.stderr)
            return 1
        lines = [home]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(_main())

"""The CUDA C++ backend (``csrc/cuda/``, kernels in ``csrc/include/asag/sinkhorn_kernels.cuh``).

Uses the prebuilt ``asag_kernels._C_cuda`` (built by setup.py when torch has CUDA). Without it, on a
machine with a CUDA torch, a GPU and a CUDA toolkit, the first ``status()`` call starts a
just-in-time build with ``torch.utils.cpp_extension.load`` (ninja, cached by torch in its extensions
directory) on a background thread, for this GPU's architecture, from the sources and flags of the
one build spec (``asag_kernels.build_spec``; an installed wheel ships the sources in
``asag_kernels/csrc``). Until it finishes ``status()`` says "building…", afterwards "ok" or why the
build failed. ``wait_for_build()`` blocks until then. Env ``ASAG_CUDA_JIT``: ``"background"``
(default), ``"wait"`` (build synchronously inside ``status()``) or ``"off"`` (never build);
``ASAG_CUDA_JIT_VERBOSE=1`` shows the compiler output.

float32 inputs run on TF32 tensor cores only when torch allows TF32 for matmuls
(``torch.backends.cuda.matmul.fp32_precision == "tf32"`` or the legacy ``allow_tf32``), else on
exact float32 FMAs.
"""

from __future__ import annotations

import os
import threading
import time

import torch

from .. import build_spec
from .._env import env_choice, env_flag
from . import tf32_allowed

try:
    from asag_kernels import _C_cuda as _prebuilt

    _PREBUILT_ERROR = None
except ImportError as exc:  # not built: CPU torch at install time, or a failed optional build
    _prebuilt = None
    _PREBUILT_ERROR = exc

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FP32_WIDE_HEAD_SMEM_BYTES = 133_248  # AttentionConfig<kFloat32|kTf32, 256, 256, 32> in sinkhorn_kernels.cuh
MAX_HEAD_DIM = 256  # read by the registry: larger head dims go to another backend under "auto"


class _JitBuild:
    """State of the just-in-time build (one per process)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.started = 0.0
        self.ext = None
        self.error: str | None = None

    def _build(self) -> None:
        from torch.utils import cpp_extension

        try:
            cuda_home = _cuda_home()
            # torch fixed its CUDA_HOME when cpp_extension was first imported, by a guess it does not
            # check (an nvcc in /usr/local/bin gives /usr/local, which has no CUDA headers); hand it the
            # toolkit found and checked by the build spec when its own is unusable.
            if cpp_extension.CUDA_HOME is None or build_spec.cuda_home_problem(cpp_extension.CUDA_HOME) is not None:
                cpp_extension.CUDA_HOME = cuda_home
            major, minor = torch.cuda.get_device_capability()
            spec = build_spec.cuda_extension(_csrc(), [f"{major}{minor}"], name=build_spec.JIT_EXTENSION)
            self.ext = cpp_extension.load(
                name=spec.name, verbose=env_flag("ASAG_CUDA_JIT_VERBOSE", False), **spec.jit_kwargs()
            )
        except Exception as exc:  # reported through status(), never swallowed
            self.error = f"{type(exc).__name__}: {exc}"

    def start(self, wait: bool) -> None:
        with self.lock:
            if self.thread is None:
                self.started = time.monotonic()
                self.thread = threading.Thread(target=self._build, name="asag-cuda-jit", daemon=True)
                self.thread.start()
            thread = self.thread
        if wait:
            thread.join()

    def status(self) -> str:
        if self.ext is not None:
            return "ok"
        if self.error is not None:
            return f"just-in-time build of the CUDA extension failed: {self.error}"
        return (
            f"building… the CUDA extension is being compiled just in time "
            f"({time.monotonic() - self.started:.0f} s so far; asag_kernels.backends.cuda_backend.wait_for_build() waits)"
        )


_jit = _JitBuild()


def _cuda_home() -> str | None:
    """The CUDA toolkit a just-in-time build uses (bin/nvcc and cuda_runtime.h checked), or None."""
    return build_spec.find_cuda_home()


def _csrc():
    """The C++/CUDA sources: package data of an installed wheel, or the checkout's csrc/; or None."""
    return build_spec.csrc_dir()


def _ninja_available() -> bool:
    from torch.utils.cpp_extension import is_ninja_available

    return is_ninja_available()


def _device_reason() -> str | None:
    """Why no usable CUDA device exists here, or None."""
    if torch.version.cuda is None:
        return "no CUDA GPU: torch is a CPU build (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return "no CUDA GPU: torch.cuda.is_available() is False"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"the cuda backend needs a GPU of compute capability 8.0 or newer (mma.sync bf16/tf32), got {major}.{minor}"
    return None


def _extension():
    return _prebuilt if _prebuilt is not None else _jit.ext


def status() -> str:
    reason = _device_reason()
    if reason is not None:
        return reason
    if _prebuilt is not None:
        return "ok"
    mode = env_choice("ASAG_CUDA_JIT", ("background", "wait", "off"), "background")
    not_built = f"not built: asag_kernels._C_cuda is missing ({_PREBUILT_ERROR})"
    if _jit.thread is None:
        if mode == "off":
            return f"{not_built}; just-in-time build disabled by ASAG_CUDA_JIT=off"
        if _cuda_home() is None:
            return (
                f"{not_built}, and no CUDA toolkit was found for a just-in-time build (a folder with bin/nvcc and "
                "include/cuda_runtime.h: set CUDA_HOME, or put the toolkit's nvcc on PATH)"
            )
        if not _ninja_available():
            return f"{not_built}, and ninja is missing for a just-in-time build (pip install ninja)"
        csrc = _csrc()
        if csrc is None or not build_spec.kernel_sources(csrc):
            return (
                f"{not_built}, and the CUDA sources are not available for a just-in-time build (neither "
                f"{os.path.dirname(build_spec.__file__)}/csrc nor a checkout's csrc/ holds {build_spec.MARKER} "
                "and cuda/*.cu; reinstall asag-kernels from a wheel or sdist that ships them)"
            )
        _jit.start(wait=mode == "wait")
    return _jit.status()


def wait_for_build() -> str:
    """Blocks until a just-in-time build started by status() ends; returns the new status()."""
    if _jit.thread is not None:
        _jit.thread.join()
    return status()


def supports(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cuda":
        return f"the cuda backend takes CUDA tensors, got {device.type} tensors"
    if dtype == torch.float64:
        return "the cuda backend computes in float32 and takes float16/bfloat16/float32; use backend='torch' for float64"
    if dtype not in _SUPPORTED_DTYPES:
        return f"the cuda backend takes float16/bfloat16/float32, got {dtype}"
    return None


def run(q, k, v, *, num_iters, cost_sign, scale, epsilon):
    ext = _extension()
    if ext is None:
        raise RuntimeError(f"asag cuda backend is not usable: {status()}")
    d, dv = q.shape[-1], v.shape[-1]
    if q.dtype == torch.float32 and max(d, dv) > 128:
        # The float32/TF32 attention tiles at head dims 129..256 need this much shared memory per
        # block: A100/H100 have it, sm_86/sm_89 cards (about 99 KiB) do not.
        optin = getattr(torch.cuda.get_device_properties(q.device), "shared_memory_per_block_optin", None)
        if optin is not None and optin < _FP32_WIDE_HEAD_SMEM_BYTES:
            raise ValueError(
                f"the cuda backend's float32 kernels at head dims above 128 need {_FP32_WIDE_HEAD_SMEM_BYTES} bytes "
                f"of shared memory per block; this GPU offers {optin}. Use float16/bfloat16 or backend='triton'/'torch'"
            )
    logit_scale = cost_sign * scale / epsilon
    return ext.sinkhorn_attention(q, k, v, int(num_iters), float(logit_scale), tf32_allowed())

"""SPEC numbers defined once: benchmark shapes (§7) and tolerances (§4).

Imported by the benchmark core, the benchmark scripts and the tests; nothing else defines them.
"""

from __future__ import annotations

import torch

# name -> (heads, tokens Nq = Nk, head dim), batch 1 (SPEC §7)
SHAPES: dict[str, tuple[int, int, int]] = {
    "sd15-64": (8, 4096, 40),
    "sdxl-mid": (20, 1024, 64),
    "sdxl-64": (10, 4096, 64),
    "flux-1k": (24, 4608, 128),
    "video-32k": (12, 32760, 128),
}
CPU_SHAPES: tuple[str, ...] = ("sd15-64", "sdxl-mid", "sdxl-64")
GPU_SHAPES: tuple[str, ...] = tuple(SHAPES)
# Tiny, odd-sized problems (tails of every tile loop) for smoke tests.
QUICK_SHAPES: dict[str, tuple[int, int, int]] = {
    "tiny-96": (3, 96, 16),
    "tiny-160": (2, 160, 32),
}
ALL_SHAPES: dict[str, tuple[int, int, int]] = {**SHAPES, **QUICK_SHAPES}
# Head dims the SPEC's shapes use (compile sweeps check these for vectorised loads).
SPEC_HEAD_DIMS: tuple[int, ...] = tuple(sorted({d for _, _, d in SHAPES.values()}))

# SPEC §4: (out relative Frobenius error, f/g max abs error) against the float64 reference.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (5e-3, 2e-2),
    torch.bfloat16: (2e-2, 5e-2),
}
# float32 where TF32 is explicitly allowed (SPEC §4): out bound; f/g keep the float32 bound.
TF32_OUT_TOLERANCE = 5e-4


def out_tolerance(dtype: torch.dtype, tf32: bool = False) -> float:
    """SPEC §4 bound on ||out - ref||_F / ||ref||_F for inputs of `dtype`."""
    if tf32 and dtype == torch.float32:
        return TF32_OUT_TOLERANCE
    return TOLERANCES[dtype][0]


def potential_tolerance(dtype: torch.dtype) -> float:
    """SPEC §4 bound on max |f - f_ref|, |g - g_ref| for inputs of `dtype`."""
    return TOLERANCES[dtype][1]

# Benchmark goals (docs/PERF.md; issues 3-5), checked by asag-bench's verdict and benchmarks/gpu_check.py.
# CPU, float32, at CPU_GOAL_SHAPE and num_iters=GOAL_ITERS, the cpu backend:
GOAL_ITERS = 2
CPU_GOAL_SHAPE = "sdxl-64"
CPU_MAX_VS_SDPA = 1.5  # time / SDPA's time in the same process
CPU_STRETCH_VS_SDPA = 1.2  # reported, not required
CPU_MIN_VS_NAIVE = 8.0  # materialising time / cpu time
CPU_MAX_EXTRA_PEAK_MIB = 300.0  # peak over the inputs, output included
# GPU, bfloat16, at every GPU_GOAL_SHAPES and measured num_iters: triton <= GPU_MAX_BUDGET * (2T+1) x SDPA
# (flash), stretch GPU_STRETCH_BUDGET (reported, not required); cuda at least as fast as triton.
GPU_GOAL_SHAPES: tuple[str, ...] = ("sdxl-64", "flux-1k")
GPU_MAX_BUDGET = 1.0
GPU_STRETCH_BUDGET = 0.75

"""One command for a lent GPU: run the test suite on CUDA tensors, then time the GPU backends.

    python benchmarks/gpu_check.py              # CUDA: pytest over tests/, then the timing table
    python benchmarks/gpu_check.py --tiny       # CPU, Triton interpreter, tiny size (keeps it from rotting)
    python benchmarks/gpu_check.py --compile-only 90   # no GPU needed: compile the kernels for sm_90

Timing rows: the SPEC §7 shapes sdxl-64 (H=10, N=4096, D=64), flux-1k (H=24, N=4608, D=128) and
video-32k (H=12, N=32760, D=128), B = 1, bfloat16, num_iters ∈ {1, 2, 3}, for the "triton", "cuda"
(when usable) and "torch" backends, each against scaled_dot_product_attention on the same inputs
(flash backend forced through torch.nn.attention.sdpa_kernel). Columns:

- ms: median of --repeat calls after --warmup calls (CUDA events; perf_counter on the CPU);
- xSDPA: ms over SDPA's ms; budget: xSDPA / (2T + 1), the issue's goal is <= 1 (stretch 0.75);
- TFLOP/s: (2T + 1) QKᵀ passes plus one PV product, 2·H·Nq·Nk·D flops each (4·H·N²·D for SDPA);
- peak MiB: torch.cuda.max_memory_allocated over the row's calls, reset per row; extra MiB: that
  peak minus what was allocated before the row (inputs), i.e. the call's own footprint;
- err: ‖out − out_torch‖/‖out_torch‖ against the "torch" backend on the same inputs (a GPU-scale
  sanity check; the tolerances themselves are the test suite's job).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPES = {  # name: (H, N, D), SPEC §7
    "sdxl-64": (10, 4096, 64),
    "flux-1k": (24, 4608, 128),
    "video-32k": (12, 32760, 128),
}
TINY_SHAPE = {"tiny": (2, 96, 32)}
BACKENDS = ("triton", "cuda", "torch")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU under TRITON_INTERPRET=1 at a tiny size (the default without CUDA)")
    p.add_argument("--no-tests", action="store_true", help="skip the pytest run")
    p.add_argument("--tests", action="store_true", help="in tiny mode, also run a small subset of the triton tests")
    p.add_argument("--shapes", default=None, help=f"comma-separated subset of {','.join(SHAPES)}")
    p.add_argument("--iters", default="1,2,3", help="num_iters values")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per row (default 2 on a GPU, 1 tiny)")
    p.add_argument("--repeat", type=int, default=None, help="timed calls per row (default 5 on a GPU, 2 tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile-only", type=int, metavar="SM", default=None,
                   help="compile every autotuning config of the Triton kernels for sm_SM (e.g. 90) with "
                        "ptxas, no GPU needed, and print shared memory per config; then exit")
    p.add_argument("--compile-dtypes", default="bf16,fp16,fp32", help="dtypes for --compile-only")
    p.add_argument("--compile-dims", default="64,128", help="head dims for --compile-only")
    return p.parse_args(argv)


def on_gpu(args) -> bool:
    return not args.tiny and torch.cuda.is_available()


def run_tests(args) -> int:
    if on_gpu(args):
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"]
    else:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_triton_backend.py",
               "-k", "padding_and_tails and 65-130"]
    env = dict(os.environ)
    if on_gpu(args):
        # On a GPU both GPU backends must run: a missing one fails the suite instead of skipping.
        env.setdefault("ASAG_REQUIRE_BACKENDS", "reference,torch,triton,cuda")
        env.setdefault("ASAG_CUDA_JIT", "wait")
    print("$ " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=REPO, env=env)
    print(f"pytest exit status: {rc}", flush=True)
    return rc


class Timer:
    """Median wall time of a callable: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def median_ms(self, fn, warmup: int, repeat: int) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeat):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def sdpa_call(q, k, v, cuda: bool):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.FLASH_ATTENTION if cuda else SDPBackend.MATH

    def call():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return call

def compile_only(args) -> int:
    """Compile the kernels as a GPU launch would specialise them (unit D strides, 16-divisible
    pointers and strides) for one CUDA architecture; catches compile errors and shared-memory
    overruns without a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sys.path.insert(0, REPO)
    from asag_kernels.backends import triton_backend

    kernels = triton_backend._kernel_module()
    if kernels is None:
        print(f"triton backend unusable: {triton_backend.status()}")
        return 1
    target = GPUTarget("cuda", args.compile_only, 32)
    torch_dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    float_args = ("logit_scale2", "log2_marginal", "log2_row_marginal")
    potential_args = ("col_bias_ptr", "potential_ptr", "key_bias_ptr", "row_potential_ptr")
    failures = 0
    for dtype in args.compile_dtypes.split(","):
        for dim in (int(d) for d in args.compile_dims.split(",")):
            precisions = ("ieee", "tf32") if dtype == "fp32" else ("ieee",)
            for precision in precisions:
                base = dict(HEAD_DIM=dim, D_PAD=triton_backend._padded_dim(dim), UPCAST_DOT=False, DOT_PRECISION=precision)
                variants = [(kernels.potential_pass_kernel, dict(base, HAS_BIAS=bias)) for bias in (False, True)]
                variants += [(kernels.attention_pass_kernel,
                              dict(base, VALUE_DIM=dim, DV_PAD=base["D_PAD"], HAS_BIAS=bias, WRITE_ROW_POTENTIAL=not bias))
                             for bias in (False, True)]
                for kernel, constexprs in variants:
                    named = {"x": torch.empty(1, dtype=torch_dtypes[dtype]), "rows_bucket": 4096, "cols_bucket": 4096}
                    for config in kernels._prune_configs(kernel.configs, named, **constexprs):
                        fn = kernel.fn
                        cx = dict(constexprs, **config.kwargs)
                        cx.update({n: 1 for n in fn.arg_names if n.startswith("stride_") and n.endswith("d")})
                        signature = {}
                        for n in fn.arg_names:
                            if n in cx:
                                signature[n] = "constexpr"
                            elif n.endswith("_ptr"):
                                signature[n] = "*fp32" if n in potential_args else "*" + dtype
                            else:
                                signature[n] = "fp32" if n in float_args else "i32"
                        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                                 if signature[n] != "constexpr" and (n.endswith("_ptr") or n.startswith("stride_"))}
                        src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                                        constexprs={(fn.arg_names.index(n),): v for n, v in cx.items()})
                        label = (f"{fn.__name__:<22} {dtype} {precision} D={dim:<3} bias={int(constexprs['HAS_BIAS'])} "
                                 f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']} w{config.num_warps} s{config.num_stages}")
                        t0 = time.perf_counter()
                        try:
                            compiled = triton.compile(src, target=target, options={
                                "num_warps": config.num_warps, "num_stages": config.num_stages})
                        except Exception as exc:
                            failures += 1
                            print(f"{label}  FAILED {type(exc).__name__}: {str(exc)[-400:]}", flush=True)
                            continue
                        print(f"{label}  shared {compiled.metadata.shared / 1024:6.1f} KiB  "
                              f"compile {time.perf_counter() - t0:5.1f} s", flush=True)
    print(f"{failures} compile failure(s) for sm_{args.compile_only}")
    return 1 if failures else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compile_only is not None:
        return compile_only(args)
    cuda = on_gpu(args)
    if args.warmup is None:
        args.warmup = 2 if cuda else 1
    if args.repeat is None:
        args.repeat = 5 if cuda else 2
    if not cuda:
        # Must precede the first use of the triton backend: the kernels are decorated at load.
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, REPO)
    import asag_kernels
    from asag_kernels import sinkhorn_attention

    device = torch.device("cuda" if cuda else "cpu")
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu (Triton interpreter, tiny size)'}; "
          f"torch {torch.__version__}", flush=True)
    for name, why in asag_kernels.backend_status().items():
        print(f"  backend {name}: {why}")

    test_rc = 0
    if not args.no_tests and (cuda or args.tests):
        test_rc = run_tests(args)

    shapes = SHAPES if cuda else TINY_SHAPE
    if args.shapes and cuda:
        shapes = {n: SHAPES[n] for n in args.shapes.split(",")}
    iters = [int(t) for t in args.iters.split(",")]
    dtype = torch.bfloat16
    timer = Timer(cuda)
    usable = [b for b in args.backends.split(",") if asag_kernels.backends.unsupported_reason(b, device, dtype) is None]
    skipped = [b for b in args.backends.split(",") if b not in usable]
    for b in skipped:
        print(f"skipping backend {b}: {asag_kernels.backends.unsupported_reason(b, device, dtype)}")

    header = f"{'shape':<10} {'T':>2} {'backend':<8} {'ms':>10} {'xSDPA':>7} {'budget':>7} {'TFLOP/s':>8} {'peak MiB':>9} {'extra MiB':>9} {'err':>9}"
    print("\n" + header + "\n" + "-" * len(header), flush=True)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    failures = 0
    for shape_name, (heads, n, d) in shapes.items():
        q, k, v = (torch.randn(1, heads, n, d, generator=gen).to(device, dtype) for _ in range(3))
        qk_flops = 2.0 * heads * n * n * d
        with torch.inference_mode():
            sdpa_ms = timer.median_ms(sdpa_call(q, k, v, cuda), args.warmup, args.repeat)
            print(f"{shape_name:<10} {'-':>2} {'sdpa':<8} {sdpa_ms:>10.3f} {1.0:>7.2f} {'':>7} "
                  f"{2 * qk_flops / sdpa_ms / 1e9:>8.1f} {'':>9} {'':>9} {'':>9}", flush=True)
            for num_iters in iters:
                torch_out = None
                for backend in sorted(usable, key=lambda b: b != "torch"):  # torch first: the err oracle

                    def call(backend=backend):
                        return sinkhorn_attention(q, k, v, num_iters=num_iters, backend=backend)

                    if cuda:
                        torch.cuda.synchronize()
                        before = torch.cuda.memory_allocated()
                        torch.cuda.reset_peak_memory_stats()
                    try:
                        ms = timer.median_ms(call, args.warmup, args.repeat)
                        out = call()
                    except Exception as exc:  # one failing row (e.g. out of memory) must not hide the rest
                        print(f"{shape_name:<10} {num_iters:>2} {backend:<8} FAILED: {type(exc).__name__}: {exc}", flush=True)
                        failures += 1
                        if cuda:
                            torch.cuda.empty_cache()
                        continue
                    peak = extra = float("nan")
                    if cuda:
                        torch.cuda.synchronize()
                        peak = torch.cuda.max_memory_allocated() / 2**20
                        extra = peak - before / 2**20
                    if backend == "torch":
                        torch_out = out.float()
                        err = 0.0
                    else:
                        err = float("nan") if torch_out is None else (
                            (out.float() - torch_out).norm() / torch_out.norm()).item()
                    del out
                    passes = 2 * num_iters + 1
                    flops = passes * qk_flops + 2.0 * heads * n * n * v.shape[-1]
                    ratio = ms / sdpa_ms
                    print(f"{shape_name:<10} {num_iters:>2} {backend:<8} {ms:>10.3f} {ratio:>7.2f} {ratio / passes:>7.2f} "
                          f"{flops / ms / 1e9:>8.1f} {peak:>9.1f} {extra:>9.1f} {err:>9.2e}", flush=True)
                del torch_out
        del q, k, v
        if cuda:
            torch.cuda.empty_cache()
    if failures:
        print(f"{failures} timing row(s) failed")
    return test_rc or (1 if failures else 0)


if __name__ == "__main__":
    sys.exit(main())

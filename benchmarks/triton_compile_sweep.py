"""Compile-time evidence for the Triton kernels, without a GPU (compile-only, not speed).

    python benchmarks/triton_compile_sweep.py --ci                  # bounded subset, sm_80 and sm_90
    python benchmarks/triton_compile_sweep.py --arch 80 --arch 90   # every launchable variant (slow)
    python benchmarks/triton_compile_sweep.py --arch 86 --arch 89 --arch 120   # other targets (opt-in)

Every launch the triton backend can make is compiled for ``GPUTarget("cuda", SM, 32)`` with
``triton.compile`` (what a launch would compile, specialised the way Triton specialises a real
launch at the SPEC shapes: the launcher's own arguments are captured from ``triton_backend`` with
the kernels' ``launch`` replaced, so constexprs, alignment hints and strides are exactly the
launcher's). Variants: each kernel a Sinkhorn call or a building block launches (potential pass with
and without bias, attention pass after iterations, attention pass writing f for num_iters = 0,
the blocks' LSE outputs), for each head dim D ∈ {40, 64, 80, 96, 128, 256} and dtype mode
(bf16, fp16, fp32 IEEE, fp32 TF32), with every configuration ``choose_configs`` can return on that
architecture (the pinned one first, then every autotuning candidate after the shared-memory fit).

Per compiled configuration it reports, from ``cuobjdump -res-usage`` on the cubin and the PTX:
registers, stack bytes (spills), shared memory, global load instructions by width per thread
(ld16: ``cp.async`` of 16 bytes or ``ld.global.v4``; ld8; ld4-: 4 bytes or less) and tensor-core
instructions (``mma.sync``/``wgmma``). It exits non-zero on a compile failure, a spill (stack > 0)
in any configuration that can be chosen, shared memory above the architecture's limit, or a
scalar-load fallback for a head dim of ``asag_kernels._spec.SPEC_HEAD_DIMS``: no 16-byte loads, or
more loads of 4 bytes or less than 16-byte ones (the float32 bias vectors account for a few narrow
loads; a tile read element by element, as D = 40 was before its alignment hint, for dozens).

``--ci`` is the bounded subset CI runs (a few minutes on two cores): sm_80 and sm_90, bfloat16, the
SPEC head dims, the Sinkhorn kernels (potential pass with bias, attention pass after iterations),
the pinned configuration of each plus, at D = 128 (the most register-hungry), every candidate; the
pinned configuration at D = 256 in TF32 (``CI_WIDE``: potential pass with bias, ``biased_attention``); and
one kernel compiled with and without fp fusion, whose SASS opcode sequence must be identical (every
multiply-add in the kernels is an explicit ``tl.fma``). ``--json PATH`` writes every row. ``main(argv)`` is the
entry point that ``benchmarks/gpu_check.py --compile-only SM`` calls.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

# The sweep compiles for a GPU target: the kernels must not load in interpreter mode.
os.environ.pop("TRITON_INTERPRET", None)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_DIMS = (40, 64, 80, 96, 128, 256)
# mode -> (torch dtype name, allow TF32)
MODES = {"bf16": ("bfloat16", False), "fp16": ("float16", False), "fp32": ("float32", False), "tf32": ("float32", True)}
# Variant name -> how the launcher is driven to produce it (see _capture).
VARIANTS = ("potential", "potential_bias", "attention_bias", "attention_row", "row_lse", "biased_attention")
CI_VARIANTS = ("potential_bias", "attention_bias")
# Also in --ci, pinned only: head dim 256 in TF32 (the widest float32 tiles, whose WIDE_HEAD_SHAPES
# sit at 204-255 registers), the potential pass and the attention pass that also writes the LSE
# (its most register-hungry variant): 4 compiles, a few seconds.
CI_WIDE = (("tf32", 256, ("potential_bias", "biased_attention")),)
DEFAULT_ARCHS = (80, 90)
# Sequence length and heads of the captured launches (SPEC §7 sizes: autotuning is on there).
SEQ, HEADS = 4096, 8


def _import_backend():
    sys.path.insert(0, REPO)
    from asag_kernels.backends import triton_backend

    return triton_backend


def _capture(variant: str, dim: int, mode: str):
    """(kernel name, kind, positional args, kwargs) the launcher passes for this variant.

    Tensors are small CPU stand-ins with the real strides (only their dtype, strides and data
    pointer alignment matter to the compile), built by as_strided over a tiny buffer."""
    import torch

    triton_backend = _import_backend()
    kernels = triton_backend.kernels()
    dtype_name, tf32 = MODES[mode]
    dtype = getattr(torch, dtype_name)
    calls = []
    saved_launch, saved_tf32 = kernels.launch, torch.backends.cuda.matmul.allow_tf32
    kernels.launch = lambda kernel, grid, *args, **kwargs: calls.append((kernel, args, kwargs))
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        q, k, v = (torch.empty(1, HEADS, SEQ, dim, dtype=dtype) for _ in range(3))
        bias = torch.zeros(1, HEADS, SEQ)
        kw = dict(cost_sign=-1.0, scale=dim ** -0.5, epsilon=1.0)
        if variant in ("potential", "potential_bias", "attention_bias"):
            triton_backend.run(q, k, v, num_iters=2, **kw)
            pick = {"potential": 0, "potential_bias": 1, "attention_bias": -1}[variant]
        elif variant == "attention_row":
            triton_backend.run(q, k, v, num_iters=0, **kw)
            pick = -1
        elif variant == "row_lse":
            triton_backend.row_lse(q, k, bias, **kw)
            pick = -1
        else:
            triton_backend.biased_attention(q, k, v, bias, **kw)
            pick = -1
    finally:
        kernels.launch, torch.backends.cuda.matmul.allow_tf32 = saved_launch, saved_tf32
    kernel, args, kwargs = calls[pick]
    kind = "attention" if "DV_PAD" in kwargs else "potential"
    return kernel.fn.__name__, kind, args, kwargs


def launchable_configs(kind, kwargs, elem_bytes, arch):
    kernels = _import_backend().kernels()
    return kernels.choose_configs(kind, arch=arch, max_shared_mem=kernels.ARCH_SHARED_MEMORY[arch],
                                  elem_bytes=elem_bytes, precision=kwargs["DOT_PRECISION"], d_pad=kwargs["D_PAD"],
                                  dv_pad=kwargs.get("DV_PAD", 0), pinned_only=False)


def _source(kernel_name, args, kwargs, shape):
    """The ASTSource a launch with these arguments compiles (Triton's own argument specialisation)."""
    from triton.backends.compiler import BaseBackend
    from triton.compiler import ASTSource
    from triton.runtime import jit

    kernels = _import_backend().kernels()
    fn = getattr(kernels, kernel_name).fn
    block_m, block_n, _, _ = shape
    constexprs = dict(kwargs, BLOCK_M=block_m, BLOCK_N=block_n)
    named = dict(zip(fn.arg_names, args))
    signature, attrs, consts = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name], consts[(i,)] = "constexpr", constexprs[name]
            continue
        ty, key = jit.native_specialize_impl(BaseBackend, named[name], False, True, True)
        if ty == "constexpr":  # an integer equal to 1 (a unit stride) is specialised away
            signature[name], consts[(i,)] = "constexpr", named[name]
            continue
        signature[name] = ty
        if key == "D":  # divisible by 16 (integers) or 16-byte aligned (pointers)
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=signature, attrs=attrs, constexprs=consts)


def _nvidia_tool(name):
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


_LOAD_RE = re.compile(r"\b(cp\.async\.c[ag]\.shared\.global(?:\.L2::\w+)?)\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(\w+)|"
                      r"\b(ld\.global(?:\.[a-zA-Z0-9:_]+)*)")


def _load_widths(ptx: str) -> dict:
    """Global load instructions by bytes per thread: {16: n, 8: n, 4: n, 2: n, ...}."""
    widths: dict[int, int] = {}
    for cp, size, ld in _LOAD_RE.findall(ptx):
        if cp:
            nbytes = int(size, 0)
        else:
            parts = ld.split(".")
            vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
            bits = next((int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bsuf]\d+", p)), 32)
            nbytes = vec * bits // 8
        widths[nbytes] = widths.get(nbytes, 0) + 1
    return widths


def compile_one(job: dict) -> dict:
    """Compile one (variant, D, mode, arch, configuration); returns the report row."""
    import triton
    from triton.backends.compiler import GPUTarget

    row = dict(job)
    kernel_name, kind, args, kwargs = _capture(job["variant"], job["dim"], job["mode"])
    shape = tuple(job["config"])
    src = _source(kernel_name, args, kwargs, shape)
    options = {"num_warps": shape[2], "num_stages": shape[3], "enable_fp_fusion": job.get("fp_fusion", False)}
    t0 = time.perf_counter()
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32), options=options)
    except Exception as exc:  # reported, and fails the sweep
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[-600:]}")
        return row
    row["compile_s"] = round(time.perf_counter() - t0, 1)
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([_nvidia_tool("cuobjdump"), "-res-usage", cubin.name], capture_output=True,
                               text=True, check=True).stdout
        if "fp_fusion" in job:  # the machine code's opcode sequence, for the fusion check
            sass = subprocess.run([_nvidia_tool("cuobjdump"), "-sass", cubin.name], capture_output=True,
                                  text=True, check=True).stdout
            opcodes = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
            row["sass_opcodes"] = len(opcodes)
            row["sass_ffma"] = sum(op.startswith("FFMA") for op in opcodes)
            row["sass_hash"] = hashlib.sha256(" ".join(opcodes).encode()).hexdigest()
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    widths = _load_widths(ptx)
    body = ptx.split(".entry", 1)[-1]
    row.update(
        ok=True,
        kernel=kernel_name,
        registers=int(found.get("REG", -1)),
        stack=int(found.get("STACK", 0)) + int(found.get("LOCAL", 0)),
        shared=int(compiled.metadata.shared),
        loads16=widths.get(16, 0),
        loads8=widths.get(8, 0),
        loads_narrow=sum(n for b, n in widths.items() if b <= 4),
        tensor_cores=len(re.findall(r"\b(?:mma\.sync|wgmma\.mma_async)", body)),
    )
    return row


def problems(row: dict, spec_dims) -> list[str]:
    """Why a row fails the sweep's rules (empty when it passes)."""
    if not row["ok"]:
        return [f"compile failed: {row['error']}"]
    from asag_kernels.backends.triton_backend import kernels

    found = []
    if row["stack"] > 0:
        found.append(f"spills ({row['stack']} B stack)")
    limit = kernels().ARCH_SHARED_MEMORY.get(row["arch"])
    if limit is not None and row["shared"] > limit:
        found.append(f"shared memory {row['shared']} B > the sm_{row['arch']} limit {limit} B")
    if row["dim"] in spec_dims and (row["loads16"] == 0 or row["loads_narrow"] > row["loads16"]):
        found.append(f"scalar-load fallback ({row['loads16']} 16-byte loads, {row['loads_narrow']} of 4 bytes or less)")
    return found


def plan(args) -> list[dict]:
    """The jobs: every (arch, mode, dim, variant, launchable config), or the --ci subset."""
    jobs = []
    for arch in args.arch:
        for mode in args.modes:
            dtype_bytes = 2 if mode in ("bf16", "fp16") else 4
            for dim in args.dims:
                for variant in args.variants:
                    _, kind, _, kwargs = _capture(variant, dim, mode)
                    configs = launchable_configs(kind, kwargs, dtype_bytes, arch)
                    if args.pinned_only and not (args.ci and dim == max(args.dims)):
                        configs = configs[:1]
                    for index, config in enumerate(configs):
                        jobs.append(dict(arch=arch, mode=mode, dim=dim, variant=variant, config=list(config),
                                         pinned=index == 0))
        for mode, dim, variants in CI_WIDE if args.ci else ():
            for variant in variants:
                _, kind, _, kwargs = _capture(variant, dim, mode)
                config = launchable_configs(kind, kwargs, 2 if mode in ("bf16", "fp16") else 4, arch)[0]
                jobs.append(dict(arch=arch, mode=mode, dim=dim, variant=variant, config=list(config), pinned=True))
    return jobs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, action="append", help="SM to compile for (repeatable); default 80 and 90")
    p.add_argument("--dims", default=None, help=f"head dims (default {','.join(map(str, ALL_DIMS))})")
    p.add_argument("--modes", default=None, help=f"dtype modes (default {','.join(MODES)})")
    p.add_argument("--variants", default=None, help=f"kernel variants (default {','.join(VARIANTS)})")
    p.add_argument("--pinned-only", action="store_true", help="only the pinned configuration of each variant")
    p.add_argument("--ci", action="store_true", help="the bounded subset CI runs (see the module docstring)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    p.add_argument("--json", default=None, help="write every row to this file")
    p.add_argument("--markdown", default=None, help="write the rows as a markdown table to this file")
    args = p.parse_args(argv)
    from asag_kernels._spec import SPEC_HEAD_DIMS

    if args.ci:
        args.arch = args.arch or list(DEFAULT_ARCHS)
        args.dims = args.dims or ",".join(map(str, SPEC_HEAD_DIMS))
        args.modes = args.modes or "bf16"
        args.variants = args.variants or ",".join(CI_VARIANTS)
        args.pinned_only = True
    args.arch = args.arch or list(DEFAULT_ARCHS)
    args.dims = [int(d) for d in (args.dims or ",".join(map(str, ALL_DIMS))).split(",")]
    args.modes = (args.modes or ",".join(MODES)).split(",")
    args.variants = (args.variants or ",".join(VARIANTS)).split(",")
    for mode in args.modes:
        if mode not in MODES:
            p.error(f"--modes: unknown mode {mode!r} (choose from {', '.join(MODES)})")
    for variant in args.variants:
        if variant not in VARIANTS:
            p.error(f"--variants: unknown variant {variant!r} (choose from {', '.join(VARIANTS)})")
    return args


def _fusion_check(arch: int, pool) -> list[str]:
    """One kernel with fp fusion on and off: the same machine code (SASS opcode sequence), as every
    multiply-add is explicit. (The PTX differs only in spelling: with fusion off Triton writes
    add.rn/sub.rn, which forbid ptxas to contract them; no add follows a multiply it could fuse.)"""
    job = dict(arch=arch, mode="bf16", dim=64, variant="attention_bias", pinned=True)
    _, kind, _, kwargs = _capture(job["variant"], 64, "bf16")
    job["config"] = list(launchable_configs(kind, kwargs, 2, arch)[0])
    on, off = pool.map(compile_one, [dict(job, fp_fusion=True), dict(job, fp_fusion=False)])
    if not (on["ok"] and off["ok"]):
        return [f"fp-fusion check: compile failed ({on.get('error') or off.get('error')})"]
    if on["sass_hash"] != off["sass_hash"]:
        return [f"fp-fusion check sm_{arch}: the SASS differs with fusion on and off ({on['sass_ffma']} vs "
                f"{off['sass_ffma']} FFMA): an implicit multiply-add"]
    print(f"fp-fusion check sm_{arch}: attention pass bf16 D=64 compiles to the same SASS with fusion on and off "
          f"({on['sass_opcodes']} instructions, {on['sass_ffma']} FFMA)")
    return []


def markdown(rows) -> str:
    """The rows as the markdown table docs/PERF.md shows."""
    lines = ["| sm | dtype | D | kernel variant | BLOCK_M×N | warps | stages | pinned | registers | stack B | "
             "shared KiB | 16-B loads | 8-B | ≤4-B | mma | verdict |",
             "| ---: | --- | ---: | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        m, n, w, st = r["config"]
        if not r["ok"]:
            lines.append(f"| {r['arch']} | {r['mode']} | {r['dim']} | {r['variant']} | {m}×{n} | {w} | {st} | "
                         f"{'yes' if r['pinned'] else ''} | | | | | | | | compile failed |")
            continue
        lines.append(f"| {r['arch']} | {r['mode']} | {r['dim']} | {r['variant']} | {m}×{n} | {w} | {st} | "
                     f"{'yes' if r['pinned'] else ''} | {r['registers']} | {r['stack']} | {r['shared'] / 1024:.1f} | "
                     f"{r['loads16']} | {r['loads8']} | {r['loads_narrow']} | {r['tensor_cores']} | "
                     f"{'; '.join(r.get('problems', [])) or 'ok'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    from asag_kernels._spec import SPEC_HEAD_DIMS

    import triton

    t_start = time.perf_counter()
    jobs = plan(args)
    print(f"triton {triton.__version__}: {len(jobs)} compiles for sm_{', sm_'.join(map(str, args.arch))} "
          f"({args.jobs} at a time); compile-only evidence, no GPU", flush=True)
    header = (f"{'sm':>3} {'mode':<4} {'D':>3} {'variant':<16} {'BMxBN':>7} {'w':>2} {'s':>1} {'pin':>3} "
              f"{'regs':>4} {'stack':>5} {'smem KiB':>8} {'ld16':>4} {'ld8':>4} {'ld4-':>4} {'mma':>4}  verdict")
    print(header + "\n" + "-" * len(header), flush=True)
    rows, failures = [], []
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=context) as pool:
        for row in pool.map(compile_one, jobs):
            rows.append(row)
            found = problems(row, SPEC_HEAD_DIMS)
            m, n, w, s = row["config"]
            label = (f"{row['arch']:>3} {row['mode']:<4} {row['dim']:>3} {row['variant']:<16} {f'{m}x{n}':>7} {w:>2} "
                     f"{s:>1} {'*' if row['pinned'] else '':>3}")
            if row["ok"]:
                print(f"{label} {row['registers']:>4} {row['stack']:>5} {row['shared'] / 1024:>8.1f} {row['loads16']:>4} "
                      f"{row['loads8']:>4} {row['loads_narrow']:>4} {row['tensor_cores']:>4}  {'; '.join(found) or 'ok'}", flush=True)
            else:
                print(f"{label}  {found[0]}", flush=True)
            row["problems"] = found
            failures += [f"{label.split()} {p}" for p in found]
        if args.ci:
            for arch in args.arch:
                failures += _fusion_check(arch, pool)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"triton": triton.__version__, "rows": rows}, fh, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(markdown(rows))
    print(f"{len(rows)} compiles in {time.perf_counter() - t_start:.0f} s; {len(failures)} problem(s)")
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""One command for a lent GPU: install this checkout in place, run the tests on CUDA tensors, time the
GPU backends against SDPA on the SPEC §7 shapes in bfloat16, and say PASS/FAIL per SPEC goal.

    python benchmarks/gpu_check.py --out DIR              # on the GPU machine: the whole check (< 8 min on an H100)
    python benchmarks/gpu_check.py --dry-run              # print every step's command and row; run nothing
    python benchmarks/gpu_check.py --tiny                 # CPU, Triton interpreter, tiny shape (keeps this from rotting)
    python benchmarks/gpu_check.py --setup-only --tiny    # only the install step, on a CPU
    python benchmarks/gpu_check.py --compile-only 90 ...  # no GPU: benchmarks/triton_compile_sweep.py --arch 90 ...

Steps (each bounded in time; what a step could not finish is reported, never hidden):

1. set-up: ``python -m pip install --no-index --no-build-isolation --no-deps -e .`` with the machine's
   own torch (no package index there), ``ASAG_CUDA_ARCHS=90`` so only sm_90 builds, ``MAX_JOBS`` = the
   cores; then, from outside the checkout, ``import asag_kernels`` and its ``backend_status()``.
   ``--no-install`` skips it (the checkout is then imported from its folder).
2. tests: pytest over a bounded selection of tests/ (the shared suite and the GPU backends' own
   tests) on CUDA tensors, with ``ASAG_REQUIRE_BACKENDS`` naming every GPU backend so a missing one
   fails instead of skipping, and ``ASAG_CUDA_JIT=wait``.
3. timings: the benchmarks' one measurement (``asag_kernels.benchmarking.measure``) on ``[1, H, N, D]`` bfloat16 inputs,
   the goal shapes (sdxl-64, flux-1k) first. Per row: ``ms`` is the median of ``--repeat`` calls
   timed with CUDA events after an L2 flush, interleaved with SDPA's (flash kernel) calls in the same
   process; ``xSDPA`` = ms / SDPA ms; ``budget`` = xSDPA / (2T+1); ``TFLOP/s`` counts (2T+1) QKᵀ
   passes plus one PV product; ``extra MiB``: the allocator's peak over one call after warm-up beyond
   what was allocated before it (inputs), output included; ``det``: two calls bitwise equal;
   ``err``: ‖out − ref‖/‖ref‖ on heads {0, H−1} against the float64 oracle.
4. goals, each PASS / FAIL / NOT RUN (the exit status is non-zero unless every required goal passes):
   install; tests; SPEC §4 accuracy (err ≤ the bfloat16 bound) and determinism on every row; SPEC §6
   memory (extra beyond the output below one [H, N, N] tensor: no backend holds every head's plan);
   issue 4: triton ≤ (2T+1)× SDPA at sdxl-64 and flux-1k (stretch 0.75·(2T+1)×, reported, not
   required); issue 5: cuda at least as fast as triton there.

``--out DIR`` gets ``gpu_check.json`` (provenance, steps, rows, goals), ``pytest.xml``, ``pytest.log``
and ``install.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # the checkout's package, also before (or without) the install step
    sys.path.insert(0, str(REPO))

from asag_kernels._spec import GPU_GOAL_SHAPES as GOAL_SHAPES  # noqa: E402  (the goals, defined once)
from asag_kernels._spec import GPU_MAX_BUDGET, GPU_STRETCH_BUDGET as STRETCH  # noqa: E402

# Backends that must work on a GPU machine (the tests fail, not skip, without them).
REQUIRED_ON_GPU = ("reference", "torch", "triton", "cuda")
GPU_BACKENDS = ("triton", "cuda")
# The bounded test selection: the shared suite and every backend's CUDA-facing tests. Integration
# tests (diffusers, ComfyUI, packaging, distributed on gloo) need packages or a network the lent
# machine lacks, and run in CI.
TEST_FILES = ("test_sinkhorn_attention.py", "test_triton_backend.py", "test_cuda_backend.py",
              "test_blocks.py", "test_input_errors.py")
TINY_SHAPE = "tiny-96"
DEFAULT_DEADLINE_S = 450  # the whole check, install included: 8 minutes with margin
TIMING_RESERVE_S = 150  # the pytest step stops early enough to leave the timings this much


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, metavar="DIR", help="folder for gpu_check.json and the step logs")
    p.add_argument("--tiny", action="store_true", help="CPU under TRITON_INTERPRET=1 at a tiny size (the default without CUDA)")
    p.add_argument("--dry-run", action="store_true", help="print what each step would run, run nothing")
    p.add_argument("--setup-only", action="store_true", help="run the set-up (install) step only")
    p.add_argument("--no-install", action="store_true", help="skip the set-up step (use the checkout as it is)")
    p.add_argument("--cuda-archs", default="90", help="ASAG_CUDA_ARCHS for the install step (default 90: sm_90 only)")
    p.add_argument("--no-tests", action="store_true", help="skip the pytest step")
    p.add_argument("--tests", action="store_true", help="in tiny mode, also run a small subset of the triton tests")
    p.add_argument("--test-timeout-s", type=int, default=180, help=(
        f"wall-clock bound of the pytest step (default 180; less where the deadline leaves the timings under "
        f"{TIMING_RESERVE_S} s)"))
    p.add_argument("--deadline-s", type=float, default=DEFAULT_DEADLINE_S,
                   help=f"rows not started by this many seconds after the start are reported NOT RUN (default {DEFAULT_DEADLINE_S})")
    p.add_argument("--shapes", default=None, help="comma-separated SPEC shape names (default: all, goal shapes first)")
    p.add_argument("--iters", default="1,2,3", help="num_iters values (default 1,2,3)")
    p.add_argument("--backends", default=",".join(GPU_BACKENDS), help="backends to time (default triton,cuda; torch allowed)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per row (default 2 on a GPU, 1 tiny)")
    p.add_argument("--repeat", type=int, default=None, help="timed calls per row (default 10 on a GPU, 2 tiny)")
    p.add_argument("--compile-only", type=int, metavar="SM", default=None,
                   help="no GPU needed: run benchmarks/triton_compile_sweep.py --arch SM (further arguments go to it)")
    args, extra = p.parse_known_args(argv)
    if extra and args.compile_only is None:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    args.sweep_args = extra
    for name in ("warmup", "repeat", "test_timeout_s"):
        value = getattr(args, name)
        if value is not None and not (0 if name == "warmup" else 1) <= value <= 10_000:
            p.error(f"argument --{name.replace('_', '-')}: expected an integer in [{0 if name == 'warmup' else 1}, 10000], got {value}")
    return args, p


def compile_only(sm: int, extra: list[str]) -> int:
    """Delegate to the Triton compile sweep (no GPU needed)."""
    if str(HERE) not in sys.path:
        sys.path.append(str(HERE))  # appended: a caller's own `conftest`/modules keep precedence
    import triton_compile_sweep

    return triton_compile_sweep.main(["--arch", str(sm), *extra])


def on_gpu(args) -> bool:
    import torch

    return not args.tiny and torch.cuda.is_available()


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _run_logged(cmd: list[str], *, timeout_s: float, **kwargs) -> tuple[int | None, str]:
    """(exit status or None on timeout, stdout + stderr) of a bounded subprocess."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, **kwargs)
        return proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:  # its captured output is bytes whatever text= says
        text = b"".join(part if isinstance(part, bytes) else part.encode() for part in (exc.stdout, exc.stderr) if part)
        return None, text.decode(errors="replace") + f"\nstopped after {timeout_s:.0f} s"


# ---------------------------------------------------------------------------------------------
# Step 1: set-up


def install_command(python: str = sys.executable) -> list[str]:
    # --no-index: the lent machines reach no index (fail at once instead of waiting on the network);
    # --no-build-isolation --no-deps: build against, and keep, the machine's own torch.
    return [python, "-m", "pip", "install", "--no-index", "--no-build-isolation", "--no-deps", "-e", str(REPO)]


def install_env(cuda_archs: str) -> dict:
    env = dict(os.environ, ASAG_CUDA_ARCHS=cuda_archs)
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    return env


VERIFY_SNIPPET = (
    "import json, asag_kernels; "
    "print(json.dumps({'file': asag_kernels.__file__, 'version': asag_kernels.__version__, "
    "'status': asag_kernels.backend_status()}))"
)


def setup_step(args, out: Path | None) -> dict:
    """Install the checkout in place and import it from outside the checkout."""
    cmd = install_command()
    step = {"command": " ".join(cmd), "env": {"ASAG_CUDA_ARCHS": args.cuda_archs}}
    t0 = time.perf_counter()
    rc, log = _run_logged(cmd, timeout_s=420, env=install_env(args.cuda_archs))
    step.update(returncode=rc, seconds=round(time.perf_counter() - t0, 1))
    if out is not None:
        (out / "install.log").write_text(log)
    if rc != 0:
        step.update(ok=False, log_tail=_tail(log))
        return step
    with tempfile.TemporaryDirectory() as elsewhere:  # outside the checkout: the installed package
        rc, log = _run_logged([sys.executable, "-c", VERIFY_SNIPPET], timeout_s=300, cwd=elsewhere,
                              env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    if rc != 0:
        step.update(ok=False, log_tail=_tail(log))
        return step
    found = json.loads(log.strip().splitlines()[-1])
    in_place = Path(found["file"]).resolve().is_relative_to(REPO)
    step.update(installed=found, in_place=in_place)
    required = REQUIRED_ON_GPU if on_gpu(args) else ("reference", "torch")
    missing = {b: found["status"].get(b) for b in required if found["status"].get(b) != "ok"}
    step["missing_backends"] = missing
    step["ok"] = in_place and not missing
    return step


# ---------------------------------------------------------------------------------------------
# Step 2: tests


def test_command(args, out: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"]
    if on_gpu(args):
        cmd += [str(Path("tests") / name) for name in TEST_FILES if (REPO / "tests" / name).exists()]
        try:
            import pytest_timeout  # noqa: F401

            cmd += ["--timeout", "120"]  # one hung kernel must not take the step's whole budget
        except ImportError:
            pass
    else:
        cmd += ["tests/test_triton_backend.py", "-k", "padding_and_tails and 65-130"]
    if out is not None:
        cmd += ["--junitxml", str(out / "pytest.xml")]
    return cmd


def test_env(args) -> dict:
    env = dict(os.environ)
    if on_gpu(args):
        # On a GPU every backend must run: an inherited CPU list (scripts/test.sh exports one) would
        # let the GPU backends skip.
        env["ASAG_REQUIRE_BACKENDS"] = ",".join(REQUIRED_ON_GPU)
        env.setdefault("ASAG_CUDA_JIT", "wait")
    return env


def _junit_counts(path: Path) -> dict | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}


def tests_step(args, out: Path | None, timeout_s: float) -> dict:
    cmd = test_command(args, out)
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    rc, log = _run_logged(cmd, timeout_s=timeout_s, cwd=REPO, env=test_env(args))
    if out is not None:
        (out / "pytest.log").write_text(log)
    print(_tail(log, 15), flush=True)
    step = {"command": " ".join(cmd), "returncode": rc, "seconds": round(time.perf_counter() - t0, 1),
            "ok": rc == 0, "log_tail": _tail(log)}
    if out is not None:
        step["counts"] = _junit_counts(out / "pytest.xml")
    return step


# ---------------------------------------------------------------------------------------------
# Step 3: timings


def timing_plan(args) -> tuple[list[str], list[int], list[str]]:
    from asag_kernels._spec import GPU_SHAPES, QUICK_SHAPES

    if not on_gpu(args):
        shapes = [TINY_SHAPE]
    elif args.shapes:
        shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
        unknown = [s for s in shapes if s not in GPU_SHAPES]
        if unknown or not shapes:
            raise SystemExit(f"gpu_check.py: error: argument --shapes: expected names from {', '.join(GPU_SHAPES)}, "
                             f"got {args.shapes!r}")
    else:
        shapes = list(GOAL_SHAPES) + [s for s in GPU_SHAPES if s not in GOAL_SHAPES]
    assert TINY_SHAPE in QUICK_SHAPES
    try:
        iters = [int(t) for t in args.iters.split(",")]
    except ValueError:
        iters = []
    if not iters or any(not 0 <= t <= 100 for t in iters):
        raise SystemExit(f"gpu_check.py: error: argument --iters: expected integers in [0, 100], got {args.iters!r}")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    return shapes, iters, backends


ROW_COLUMNS = (("shape", "<10", ""), ("T", ">2", ""), ("backend", "<8", ""), ("ms", ">10", ".3f"),
               ("xSDPA", ">7", ".2f"), ("budget", ">7", ".2f"), ("TFLOP/s", ">8", ".1f"), ("extra MiB", ">9", ".1f"),
               ("det", ">4", ""), ("err", ">9", ".2e"))


def _row_line(*cells) -> str:
    """One table line; None prints as '-'. The first three cells are shape, T, backend; err is last."""
    return " ".join(format("-" if c is None else c, align + ("" if c is None else kind))
                    for c, (_, align, kind) in zip(cells, ROW_COLUMNS))


def timing_step(args, started: float) -> list[dict]:
    import torch

    from asag_kernels import backends as registry
    from asag_kernels.benchmarking import core
    from asag_kernels.benchmarking.measure import measure
    from asag_kernels._spec import ALL_SHAPES

    cuda = on_gpu(args)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16
    shapes, iters, wanted = timing_plan(args)
    warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    repeat = args.repeat if args.repeat is not None else (10 if cuda else 2)
    mem_budget = core.free_memory_bytes(device) // 2
    rows: list[dict] = []
    header = " ".join(format(name, align) for name, align, _ in ROW_COLUMNS)
    print("\n" + header + "\n" + "-" * len(header), flush=True)
    for shape in shapes:
        heads, n, d = ALL_SHAPES[shape]
        usable = []
        for backend in wanted:
            reason = registry.unsupported_reason(backend, device, dtype, d)
            if reason is None:
                usable.append(backend)
            else:
                rows.append({"shape": shape, "backend": backend, "skipped": reason})
                print(f"{shape:<10}    {backend:<8} skipped: {reason}", flush=True)
        q, k, v = core.make_inputs(shape, dtype, device)
        qk_flops = 2.0 * heads * n * n * d
        out_bytes = v.numel() * v.element_size()
        plan_bytes = heads * n * n * v.element_size()  # one [H, N, N] tensor: what SPEC §6 forbids holding
        index = core.error_heads(heads)
        with torch.inference_mode():
            sdpa_row = measure("sdpa", q, k, v, num_iters=0, warmup=warmup, repeat=repeat, heads=index, name=shape,
                               memory_after_warmup=True)
            sdpa_ref, _ = core.oracle_output(q, k, v, backend="sdpa", num_iters=0, heads=index, mem_budget=mem_budget)
            sdpa_err = core.relative_error(sdpa_row.out_heads, sdpa_ref)
            del sdpa_ref
        rows.append({"shape": shape, "backend": "sdpa", "num_iters": 0, "median_ms": sdpa_row.median_ms,
                     "times_ms": sdpa_row.times_ms, "rel_err": sdpa_err})
        print(_row_line(shape, "-", "sdpa", sdpa_row.median_ms, 1.0, None, 2 * qk_flops / sdpa_row.median_ms / 1e9,
                        None, "", sdpa_err), flush=True)
        for num_iters in iters:
            if time.monotonic() - started > args.deadline_s:
                for backend in usable:
                    rows.append({"shape": shape, "backend": backend, "num_iters": num_iters,
                                 "not_run": f"past the {args.deadline_s:.0f} s deadline"})
                print(f"{shape:<10} {num_iters:>2} NOT RUN: past the {args.deadline_s:.0f} s deadline", flush=True)
                continue
            ref = None
            for backend in usable:
                row = {"shape": shape, "backend": backend, "num_iters": num_iters, "heads": heads, "tokens": n,
                       "head_dim": d, "dtype": "bfloat16"}
                try:
                    # The memory after the warm-up: a first full-size call may autotune (not the kernel's memory).
                    measured = measure(backend, q, k, v, num_iters=num_iters, warmup=warmup, repeat=repeat,
                                       heads=index, name=shape, memory_after_warmup=True)
                    if ref is None:
                        ref, oracle = core.oracle_output(q, k, v, backend=backend, num_iters=num_iters,
                                                         heads=index, mem_budget=mem_budget)
                    err = core.relative_error(measured.out_heads, ref)
                except Exception as exc:  # one failing row (e.g. out of memory) must not hide the rest
                    row["error"] = f"{type(exc).__name__}: {exc}"
                    rows.append(row)
                    print(f"{shape:<10} {num_iters:>2} {backend:<8} FAILED: {row['error']}", flush=True)
                    if cuda:
                        torch.cuda.empty_cache()
                    continue
                passes, ratio = measured.passes, measured.vs_sdpa
                flops = passes * qk_flops + 2.0 * heads * n * n * v.shape[-1]
                row.update(
                    median_ms=measured.median_ms, times_ms=measured.times_ms, sdpa_median_ms=measured.sdpa_median_ms,
                    vs_sdpa=ratio, budget=ratio / passes, passes=passes, tflops=flops / measured.median_ms / 1e9,
                    extra_bytes=measured.extra_bytes, out_bytes=out_bytes, plan_bytes=plan_bytes,
                    deterministic=measured.deterministic, rel_err=err, rel_err_oracle=oracle,
                )
                rows.append(row)
                extra_mib = measured.peak_mem_mib
                print(_row_line(shape, num_iters, backend, measured.median_ms, ratio, ratio / passes, row["tflops"],
                                extra_mib, "yes" if row["deterministic"] else "NO", err), flush=True)
            del ref
        del q, k, v
        if cuda:
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------
# Step 4: goals


def _goal(name: str, status: str, detail: str, required: bool = True) -> dict:
    return {"goal": name, "status": status, "detail": detail, "required": required}


def evaluate_goals(steps: dict, rows: list[dict], *, gpu: bool) -> list[dict]:
    from asag_kernels._spec import out_tolerance

    import torch

    goals = []
    setup = steps.get("setup")
    if setup is None:
        goals.append(_goal("install (--no-build-isolation --no-deps, in place)", "NOT RUN", "skipped (--no-install)",
                           required=False))
    else:
        detail = f"{setup['seconds']} s" + (f"; not ok: {setup.get('missing_backends') or setup.get('log_tail', '')}"
                                            if not setup["ok"] else "")
        goals.append(_goal("install (--no-build-isolation --no-deps, in place)", "PASS" if setup["ok"] else "FAIL", detail))
    tests = steps.get("tests")
    if tests is None:
        goals.append(_goal("tests on CUDA tensors" if gpu else "tests", "NOT RUN", "skipped", required=gpu))
    else:
        goals.append(_goal("tests on CUDA tensors" if gpu else "tests", "PASS" if tests["ok"] else "FAIL",
                           f"pytest exit {tests['returncode']}, {tests.get('counts')}, {tests['seconds']} s"))
    dist_step = steps.get("distributed")
    if dist_step is not None:  # only with several GPUs
        goals.append(_goal("issue 13: sequence-parallel op over NCCL (distributed_bench.py)",
                           "PASS" if dist_step["ok"] else "FAIL", dist_step.get("detail") or dist_step["command"]))
    if steps.get("timings") is None:
        return goals
    kernel_rows = [r for r in rows if r["backend"] != "sdpa" and "skipped" not in r]
    measured = [r for r in kernel_rows if "median_ms" in r]
    missing = [f"{r['shape']} T={r['num_iters']} {r['backend']}: {r.get('error') or r.get('not_run')}"
               for r in kernel_rows if "median_ms" not in r]

    def all_rows(name, bad, what, required=True):
        if not measured:
            goals.append(_goal(name, "NOT RUN", "no row measured", required))
            return
        detail = f"{len(measured)} rows" + (f"; {what}: {bad}" if bad else "") + (f"; not measured: {missing}" if missing else "")
        goals.append(_goal(name, "FAIL" if bad or missing else "PASS", detail, required))

    tol = out_tolerance(torch.bfloat16)
    all_rows(f"SPEC §4 accuracy: bf16 rel err <= {tol:g} vs float64",
             [f"{r['shape']} T={r['num_iters']} {r['backend']} {r['rel_err']:.2e}" for r in measured if not r["rel_err"] <= tol],
             "over")
    all_rows("SPEC §4 determinism: bitwise-equal reruns",
             [f"{r['shape']} T={r['num_iters']} {r['backend']}" for r in measured if not r["deterministic"]], "differ")
    all_rows("SPEC §6 memory: extra beyond the output < one [H, N, N] tensor",
             [f"{r['shape']} T={r['num_iters']} {r['backend']} {(r['extra_bytes'] - r['out_bytes']) / 2**20:.0f} MiB"
              for r in measured if r["extra_bytes"] is None or r["extra_bytes"] - r["out_bytes"] >= r["plan_bytes"]],
             "over", required=gpu)  # RSS pages on a CPU cannot resolve a tiny shape's plan
    if not gpu:
        return goals

    def speed(name, backend, test, required=True):
        cases = [(s, t) for s in GOAL_SHAPES for t in sorted({r["num_iters"] for r in kernel_rows})]
        bad, unmeasured, seen = [], [], []
        for shape, t in cases:
            row = next((r for r in measured if (r["shape"], r["num_iters"], r["backend"]) == (shape, t, backend)), None)
            verdict = None if row is None else test(row, shape, t)
            if verdict is None:
                unmeasured.append(f"{shape} T={t}")
                continue
            ok, text = verdict
            seen.append(text)
            if not ok:
                bad.append(text)
        status = "FAIL" if bad else ("NOT RUN" if unmeasured else "PASS")
        detail = "; ".join(seen) + (f"; not measured: {unmeasured}" if unmeasured else "")
        goals.append(_goal(name, status, detail, required))

    speed("issue 4: triton <= (2T+1) x SDPA (flash) at sdxl-64, flux-1k", "triton",
          lambda r, s, t: (r["budget"] <= GPU_MAX_BUDGET, f"{s} T={t}: {r['vs_sdpa']:.2f}x = {r['budget']:.2f} of 2T+1"))
    speed(f"issue 4 stretch: triton <= {STRETCH}(2T+1) x SDPA", "triton",
          lambda r, s, t: (r["budget"] <= STRETCH, f"{s} T={t}: {r['budget']:.2f}"), required=False)

    def cuda_vs_triton(r, s, t):
        tri = next((x for x in measured if (x["shape"], x["num_iters"], x["backend"]) == (s, t, "triton")), None)
        if tri is None:
            return None
        return r["median_ms"] <= tri["median_ms"], f"{s} T={t}: cuda {r['median_ms']:.3f} ms, triton {tri['median_ms']:.3f} ms"

    speed("issue 5: cuda at least as fast as triton at sdxl-64, flux-1k", "cuda", cuda_vs_triton)
    return goals


# ---------------------------------------------------------------------------------------------


def dry_run(args) -> int:
    gpu = on_gpu(args)
    print(f"mode: {'GPU' if gpu else 'CPU (Triton interpreter, tiny)'}")
    if args.setup_only or (gpu and not args.no_install):
        print(f"set-up: ASAG_CUDA_ARCHS={args.cuda_archs} MAX_JOBS={install_env(args.cuda_archs)['MAX_JOBS']} "
              + " ".join(install_command()))
        print(f"        then, outside the checkout: {sys.executable} -c {VERIFY_SNIPPET!r}")
    if args.setup_only:
        return 0
    if not args.no_tests and (gpu or args.tests):
        env = test_env(args)
        print(f"tests: ASAG_REQUIRE_BACKENDS={env.get('ASAG_REQUIRE_BACKENDS', '')} " + " ".join(test_command(args, args.out)))
    shapes, iters, backends = timing_plan(args)
    print(f"timings (bfloat16): shapes {shapes}, num_iters {iters}, backends {backends} against sdpa")
    return 0


def distributed_step(args, out, started: float) -> dict:
    """Several GPUs: the sequence-parallel op over NCCL (benchmarks/distributed_bench.py), bounded by
    what is left of the deadline; its table goes to the log and, with --out, distributed.json."""
    import torch

    remaining = args.deadline_s - (time.monotonic() - started)
    ranks = "1,2" + (",4" if torch.cuda.device_count() >= 4 else "")
    cmd = [sys.executable, str(Path(__file__).with_name("distributed_bench.py")), "--device", "cuda",
           "--dtype", "bfloat16", "--shape", "video-32k", "--ranks", ranks]
    if out is not None:
        cmd += ["--json", str(out / "distributed.json")]
    if remaining < 60:
        return {"ok": False, "command": shlex.join(cmd), "detail": "not run: the deadline was reached"}
    code, log = _run_logged(cmd, timeout_s=remaining)
    print(log, flush=True)
    return {"ok": code == 0, "command": shlex.join(cmd), "log_tail": _tail(log)}


def main(argv=None) -> int:
    started = time.monotonic()
    args, parser = parse_args(argv)
    if args.compile_only is not None:
        return compile_only(args.compile_only, args.sweep_args)
    gpu = on_gpu(args)
    if not gpu:
        # Must precede the first use of the triton backend: the kernels are decorated at load.
        os.environ["TRITON_INTERPRET"] = "1"
    if args.dry_run:
        return dry_run(args)
    out = None if args.out is None else args.out.resolve()  # pytest runs in the checkout: no relative paths
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / ".write-test").write_text("")
            (out / ".write-test").unlink()
        except OSError as exc:
            parser.error(f"argument --out: cannot write to {str(out)!r}: {exc.strerror or exc}")
    steps: dict = {}
    if args.setup_only or (gpu and not args.no_install):
        print("set-up: " + " ".join(install_command()), flush=True)
        steps["setup"] = setup_step(args, out)
        print(f"set-up: {'ok' if steps['setup']['ok'] else 'FAILED'} in {steps['setup']['seconds']} s", flush=True)
        if not steps["setup"]["ok"]:
            print(steps["setup"].get("log_tail") or steps["setup"].get("missing_backends"), flush=True)
    rows: list[dict] = []
    if not args.setup_only:
        import torch

        import asag_kernels
        from asag_kernels.benchmarking import core

        print(f"device: {core.device_description('cuda' if gpu else 'cpu')}"
              f"{'' if gpu else ' (Triton interpreter, tiny size)'}; torch {torch.__version__}", flush=True)
        for name, why in asag_kernels.backend_status().items():
            print(f"  backend {name}: {why}")
        if not args.no_tests and (gpu or args.tests):
            remaining = args.deadline_s - (time.monotonic() - started)
            steps["tests"] = tests_step(args, out, max(30.0, min(args.test_timeout_s, remaining - TIMING_RESERVE_S)))
        rows = timing_step(args, started)
        steps["timings"] = {"rows": len(rows)}
        if gpu and torch.cuda.device_count() > 1:
            steps["distributed"] = distributed_step(args, out, started)
    goals = evaluate_goals(steps, rows, gpu=gpu)
    print("\nSPEC goals:")
    for goal in goals:
        print(f"  {goal['status']:<7} {goal['goal']}{'' if goal['required'] else ' (not required)'}: {goal['detail']}")
    failed = [g for g in goals if g["required"] and g["status"] != "PASS"]
    wall = round(time.monotonic() - started, 1)
    print(f"{'all required goals pass' if not failed else f'{len(failed)} required goal(s) not passed'}; "
          f"wall {wall} s", flush=True)
    if out is not None:
        from asag_kernels.benchmarking import core

        report = {"provenance": core.provenance("cuda" if gpu else "cpu"), "mode": "gpu" if gpu else "tiny",
                  "wall_s": wall, "steps": steps, "rows": rows, "goals": goals}
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out / 'gpu_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

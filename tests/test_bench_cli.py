"""The benchmark CLI keeps working: `asag-bench --quick` end to end, its JSON schema and values, every
bad option rejected before anything runs, and the pieces of the benchmark core its numbers rest on
(the materialising baseline, the timer, the peak-memory probe, the head-sliced error, provenance)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import asag_kernels
from asag_kernels import sinkhorn_attention
from asag_kernels._spec import out_tolerance
from asag_kernels.benchmarking import cli, core, measure, report

REPO = Path(__file__).resolve().parents[1]
REQUIRED_TOP = {"device": str, "torch": str, "asag_kernels": str, "results": list}
REQUIRED_ROW = ("shape", "backend", "dtype", "num_iters", "median_ms", "vs_sdpa", "peak_mem_mib", "rel_err")


def _env() -> dict:
    # The subprocess must import this checkout's package even when it is not installed.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _run(cmd: list[str], tmp_path: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def check_report(report: dict, *, shapes: set[str], must_time: set[str]) -> None:
    for key, kind in REQUIRED_TOP.items():
        assert isinstance(report.get(key), kind), f"top-level {key!r} missing or not {kind.__name__}: {report.get(key)!r}"
    assert report["asag_kernels"] == asag_kernels.__version__
    rows = report["results"]
    assert rows, "no result rows"
    for row in rows:
        for key in REQUIRED_ROW:
            assert key in row, f"row lacks {key!r}: {row}"
        assert row["shape"] in shapes
        assert isinstance(row["num_iters"], int) and row["num_iters"] >= 0
    timed = [r for r in rows if not r.get("skipped") and not r.get("error")]
    assert not [r for r in rows if r.get("error")], [r["error"] for r in rows if r.get("error")]
    assert must_time <= {r["backend"] for r in timed}, f"expected timed rows for {must_time}: {rows}"
    for row in timed:
        assert math.isfinite(row["median_ms"]) and row["median_ms"] > 0, row
        assert math.isfinite(row["vs_sdpa"]) and row["vs_sdpa"] > 0, row
        assert row["peak_mem_mib"] is None or (math.isfinite(row["peak_mem_mib"]) and row["peak_mem_mib"] >= 0), row
        # SPEC §4 bounds every backend, and sdpa against float64 softmax attention (the default dtype is
        # float32 on a CPU, bfloat16 on a GPU). Naive runs its logsumexps in the input dtype: in half
        # precision it is only held to being roughly right.
        tolerance = out_tolerance(core.DTYPES[row["dtype"]])
        if row["backend"] == "naive" and row["dtype"] in ("float16", "bfloat16"):
            tolerance = 0.1
        assert 0 <= row["rel_err"] <= tolerance, row
        assert row["within_tolerance"] is (row["rel_err"] <= out_tolerance(core.DTYPES[row["dtype"]]))
        assert row["passes"] == (1 if row["backend"] == "sdpa" else 2 * row["num_iters"] + 1)
        if row["backend"] not in core.BASELINES:
            assert row["deterministic"] is True, row  # SPEC §4: bitwise-identical reruns
        if row["backend"] == "sdpa":
            assert row["vs_sdpa"] == 1.0 and row["num_iters"] == 0


@pytest.mark.slow
def test_console_script_quick_json(tmp_path):
    exe = shutil.which("asag-bench")
    cmd = [exe] if exe else [sys.executable, "-c", "import sys; from asag_kernels.bench import main; sys.exit(main())"]
    out_json = tmp_path / "bench.json"
    proc = _run(cmd + ["--quick", "--json", str(out_json), "--no-progress"], tmp_path)
    report = json.loads(out_json.read_text())
    check_report(report, shapes={"tiny-96"}, must_time={"sdpa", "naive", "torch"})
    assert {r["backend"] for r in report["results"]} >= {"sdpa", "naive", "torch"}
    # The readable table and the provenance header are on stdout.
    assert "median ms" in proc.stdout and "vs sdpa" in proc.stdout
    assert report["device"] in proc.stdout and "command:" in proc.stdout


@pytest.mark.slow
def test_module_entry_quick(tmp_path):
    proc = _run([sys.executable, "-m", "asag_kernels.bench", "--quick"], tmp_path)
    table = proc.stdout.split("median ms", 1)[1]
    for backend in ("sdpa", "naive", "torch"):
        assert f" {backend} " in table


@pytest.mark.slow
def test_subprocess_rows_csv_and_plot(tmp_path):
    """The CPU default: each row in a fresh subprocess, its peak memory probed there; CSV and PNG out."""
    out_json, out_csv, out_png = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png"
    cmd = [sys.executable, "-m", "asag_kernels.bench", "--isolation", "subprocess", "--shapes", "4x64x8",
           "--backends", "torch", "--iters", "0,3", "--repeat", "2", "--no-progress",
           "--json", str(out_json), "--csv", str(out_csv)]
    try:
        import matplotlib  # noqa: F401

        cmd += ["--plot", str(out_png)]
    except ImportError:
        out_png = None
    _run(cmd, tmp_path)
    report = json.loads(out_json.read_text())
    check_report(report, shapes={"4x64x8"}, must_time={"sdpa", "torch"})
    rows = report["results"]
    assert sorted((r["backend"], r["num_iters"]) for r in rows) == [("sdpa", 0), ("torch", 0), ("torch", 3)]
    assert all(r["peak_mem_mib"] is not None for r in rows)
    assert "fresh subprocess" in report["provenance"]["peak_mem_method"]
    lines = out_csv.read_text().splitlines()
    assert lines[0].startswith("shape,backend,dtype,num_iters,median_ms,vs_sdpa,peak_mem_mib,rel_err")
    assert len(lines) == 1 + len(rows)
    if out_png is not None:
        assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_naive_skipped_over_memory_budget(tmp_path, capsys):
    out_json = tmp_path / "r.json"
    # naive's temporaries: 4 x 3 x 96 x 96 float32 = 0.42 MiB for tiny-96, 4 x 2 x 48 x 48 = 0.07 MiB for 2x48x8.
    rc = cli.main(["--quick", "--shapes", "tiny-96,2x48x8", "--backends", "naive", "--repeat", "1",
                     "--mem-budget-mib", "0.3", "--no-progress", "--json", str(out_json)])
    assert rc == 0
    rows = {(r["shape"], r["backend"]): r for r in json.loads(out_json.read_text())["results"]}
    assert set(rows) == {("tiny-96", "sdpa"), ("tiny-96", "naive"), ("2x48x8", "sdpa"), ("2x48x8", "naive")}
    skipped = rows[("tiny-96", "naive")]
    assert "0.4 MiB, over the 0.3 MiB budget" in skipped["skipped"]
    assert skipped["median_ms"] is None and skipped["rel_err"] is None
    assert rows[("2x48x8", "naive")].get("skipped") is None and rows[("2x48x8", "naive")]["median_ms"] > 0
    assert "skipped: its [H, N, N] temporaries" in capsys.readouterr().out


def _unwritable_paths(tmp_path: Path) -> dict[str, Path]:
    # The tests run as root, for whom permission bits do not stop a write: use paths no one can create.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return {"missing-dir": tmp_path / "no-such-dir" / "out", "under-a-file": blocker / "out", "a-dir": tmp_path}


# (argv, option the message must name, text of the rejected value it must quote).
BAD_ARGUMENTS = [
    (["--shapes", "nope"], "--shapes", "'nope'"),
    (["--shapes", ""], "--shapes", "''"),  # issue 11 item 9: was accepted silently (default shapes ran)
    (["--shapes", "tiny-96,,2x8x8"], "--shapes", "'tiny-96,,2x8x8'"),
    (["--shapes", "0x64x8"], "--shapes", "'0x64x8'"),
    (["--backends", "sdpa,fast"], "--backends", "['fast']"),
    (["--backends", ""], "--backends", "''"),
    (["--iters", "-1"], "--iters", "'-1'"),
    (["--iters", ""], "--iters", "''"),  # issue 11 item 9: was accepted silently (nothing timed)
    (["--iters", "1e30"], "--iters", "'1e30'"),  # issue 11 item 9: hung
    (["--iters", str(10**30)], "--iters", str(10**30)),
    (["--iters", str(cli.MAX_ITERS + 1)], "--iters", str(cli.MAX_ITERS + 1)),
    (["--warmup", "0"], "--warmup", "'0'"),
    (["--repeat", "0"], "--repeat", "'0'"),
    (["--repeat", str(10**12)], "--repeat", str(10**12)),
    (["--mem-budget-mib", "nan"], "--mem-budget-mib", "'nan'"),  # issue 11 item 9: traceback
    (["--mem-budget-mib", "inf"], "--mem-budget-mib", "'inf'"),
    (["--mem-budget-mib", "0"], "--mem-budget-mib", "'0'"),
    (["--mem-budget-mib", "-5"], "--mem-budget-mib", "'-5'"),
    (["--threads", "100000"], "--threads", "'100000'"),  # issue 11 item 9: segfault
    (["--threads", str((os.cpu_count() or 1) + 1)], "--threads", f"'{(os.cpu_count() or 1) + 1}'"),
    (["--threads", "0"], "--threads", "'0'"),
    (["--device", "meta"], "--device", "'meta'"),
    (["--json", ""], "--json", "''"),
]


@pytest.mark.parametrize("argv,option,got", BAD_ARGUMENTS, ids=[" ".join(a[0]) or "empty" for a in BAD_ARGUMENTS])
def test_bad_arguments_exit_2_before_anything_runs(argv, option, got, capsys, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the benchmark ran despite a bad option")

    monkeypatch.setattr(cli, "run_benchmark", must_not_run)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv + ["--quick", "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and got in err, err


@pytest.mark.parametrize("option", ["--json", "--csv", "--plot"])
@pytest.mark.parametrize("kind", ["missing-dir", "under-a-file", "a-dir"])
def test_unwritable_output_fails_before_the_benchmark(option, kind, tmp_path, capsys, monkeypatch):
    """Issue 11 item 9: the whole benchmark ran, then the result was lost on the write."""
    if option == "--plot":
        pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the bench extra)")
    path = _unwritable_paths(tmp_path)[kind]
    calls = []
    monkeypatch.setattr(cli, "run_benchmark", lambda *a, **k: calls.append(a) or [])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--quick", "--no-progress", option, str(path)])
    assert exit_info.value.code == 2 and not calls
    err = capsys.readouterr().err
    assert f"argument {option}" in err and str(path) in err, err
    assert not (tmp_path / "no-such-dir").exists()


def test_writable_output_check_leaves_no_file_behind(tmp_path, monkeypatch):
    """The early writability check creates nothing that a failed run would leave behind."""
    monkeypatch.setattr(cli, "run_benchmark", lambda *a, **k: [])
    out_json, out_csv = tmp_path / "r.json", tmp_path / "r.csv"
    args = cli.build_parser().parse_args(["--json", str(out_json), "--csv", str(out_csv)])
    assert args.json == out_json and not out_json.exists() and not out_csv.exists()


def test_threads_up_to_the_machine_accepted():
    args = cli.build_parser().parse_args(["--threads", str(os.cpu_count() or 1), "--iters", "0, 3,1000"])
    assert args.threads == (os.cpu_count() or 1) and args.iters == [0, 3, 1000]


@pytest.mark.parametrize("num_iters", [0, 1, 3])
def test_naive_baseline_matches_reference(num_iters):
    q, k, v = core.make_inputs((2, 37, 8), torch.float64, torch.device("cpu"), seed=torch.seed() % 2**31)
    scale = 1 / math.sqrt(8)
    ours = core.materialising_baseline(q, k, v, num_iters=num_iters, scale=scale)
    ref = sinkhorn_attention(q, k, v, num_iters=num_iters, cost="adversarial", backend="reference")
    assert core.relative_error(ours, ref) <= out_tolerance(torch.float64)


def test_oracle_on_head_slice_equals_full_problem_heads():
    """Heads are independent: the oracle on heads {0, H-1} is those heads of the full problem."""
    q, k, v = core.make_inputs((5, 40, 8), torch.float32, torch.device("cpu"), seed=torch.seed() % 2**31)
    heads = core.error_heads(5)
    assert heads == [0, 4]
    sliced, name = core.oracle_output(q, k, v, backend="naive", num_iters=2, heads=heads, mem_budget=2**30)
    assert "reference" in name
    full = sinkhorn_attention(q.double(), k.double(), v.double(), num_iters=2, backend="reference")
    # Two heads against five: batched GEMMs of another shape may round differently, so SPEC §4's
    # float64 bound rather than bitwise equality.
    assert core.relative_error(sliced, full[:, heads]) <= out_tolerance(torch.float64)
    # Over the budget the float64 torch backend stands in for the materialising reference.
    streamed, name = core.oracle_output(q, k, v, backend="naive", num_iters=2, heads=heads, mem_budget=1)
    assert "torch" in name and core.relative_error(streamed, sliced) <= out_tolerance(torch.float64)
    softmax, _ = core.oracle_output(q, k, v, backend="sdpa", num_iters=2, heads=heads, mem_budget=2**30)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())[:, heads]
    assert core.relative_error(softmax, sdpa) <= out_tolerance(torch.float64)


def test_relative_error_detects_a_wrong_head():
    q, k, v = core.make_inputs((3, 32, 8), torch.float32, torch.device("cpu"), seed=torch.seed() % 2**31)
    ref, _ = core.oracle_output(q, k, v, backend="torch", num_iters=2, heads=[0, 2], mem_budget=2**30)
    out = sinkhorn_attention(q, k, v, num_iters=2, backend="torch")
    assert core.relative_error(out[:, [0, 2]], ref) <= out_tolerance(torch.float32)
    assert core.relative_error(out[:, [0, 1]], ref) > 1e-2


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_cpu_peak_memory_probe_sees_an_allocation_and_not_earlier_ones():
    device = torch.device("cpu")
    earlier = torch.ones(48 * 2**20 // 4)  # touched before the probe: must not count
    with core.PeakMemory(device) as probe:
        held = torch.ones(32 * 2**20 // 4)
        del held
    assert probe.mib is not None and 30 <= probe.mib < 45, probe.mib
    with core.PeakMemory(device) as probe:
        pass
    assert probe.mib is not None and probe.mib < 8, probe.mib
    del earlier


def test_measure_row_in_process_reports_interleaved_sdpa_and_determinism():
    q, k, v = core.make_inputs((2, 50, 8), torch.float32, torch.device("cpu"))
    row = measure.measure("torch", q, k, v, num_iters=2, warmup=1, repeat=3, heads=[0, 1])
    assert len(row.times_ms) == 3 and len(row.sdpa_times_ms) == 3
    assert all(t > 0 for t in row.times_ms + row.sdpa_times_ms)
    assert row.out_heads.shape == (1, 2, 50, 8)
    assert row.deterministic is True
    full = sinkhorn_attention(q, k, v, num_iters=2, backend="torch")
    assert torch.equal(row.out_heads, full[:, [0, 1]])


def test_format_table_marks_skips_errors_and_tolerance():
    base = dict(median_ms=1.0, vs_sdpa=2.0, peak_mem_mib=3.0, rel_err=1e-3, within_tolerance=False, deterministic=True)
    rows = [
        measure.new_row("tiny-96", (3, 96, 16), "torch", torch.float32, 2, **base),
        measure.new_row("tiny-96", (3, 96, 16), "naive", torch.float32, 2, skipped="too big"),
        measure.new_row("tiny-96", (3, 96, 16), "cpu", torch.float32, 2, error="RuntimeError: boom"),
    ]
    table = report.format_table(rows).splitlines()
    assert "over SPEC" in table[2] and "skipped: too big" in table[3] and "ERROR RuntimeError: boom" in table[4]
    assert "3x96x16" in table[2] and " 5 " in table[2]  # passes = 2T + 1


def test_time_fns_interleaves_calls_and_times_each():
    calls = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b")]
    stats = core.time_fns(fns, device="cpu", warmup=1, reps=3)
    assert calls == ["a", "b"] * 4  # one warm-up round, then three timed rounds, alternating
    assert [len(s.times_ms) for s in stats] == [3, 3]
    assert all(t >= 0 for s in stats for t in s.times_ms) and "perf_counter" in stats[0].method
    single = core.time_fn(lambda: sum(range(20000)), device="cpu", warmup=0, reps=5)
    assert len(single.times_ms) == 5 and single.min_ms <= single.median_ms <= single.max_ms > 0
    with pytest.raises(ValueError, match="reps"):
        core.time_fn(lambda: None, device="cpu", reps=0)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_function_counts_the_call():
    nbytes = core.peak_memory(lambda: torch.ones(24 * 2**20 // 4), "cpu")
    assert nbytes is not None and 22 * 2**20 <= nbytes < 36 * 2**20, nbytes


def test_provenance_names_machine_versions_commit_and_time():
    prov = core.provenance("cpu")
    for key in ("utc", "device", "host", "cpu_count", "python", "torch", "triton", "asag_kernels", "git_commit", "command"):
        assert prov.get(key) not in (None, ""), key
    assert prov["torch"] == torch.__version__ and prov["asag_kernels"] == asag_kernels.__version__
    assert prov["utc"].endswith("Z") and prov["device"].startswith("CPU")
    if (REPO / ".git").exists():
        commit = prov["git_commit"].removesuffix("+dirty")
        assert len(commit) == 40 and all(c in "0123456789abcdef" for c in commit), prov["git_commit"]


def test_bench_module_is_the_cli():
    from asag_kernels import bench

    assert bench.main is cli.main


@pytest.mark.slow
def test_cpu_scaling_script_runs_on_the_core(tmp_path, monkeypatch, capsys):
    """benchmarks/cpu_scaling.py at tiny sizes: its three tables come from asag-bench rows."""
    if "cpu" not in asag_kernels.available_backends():
        pytest.skip(f"cpu backend unusable here: {asag_kernels.backend_status()['cpu']}")
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import cpu_scaling

    monkeypatch.setattr(cpu_scaling, "CPU_SHAPES", ("tiny-96",))
    monkeypatch.setattr(cpu_scaling, "SHAPES", {"tiny-96": (3, 96, 16), "video-32k": (2, 80, 8)})
    out_json = tmp_path / "scaling.json"
    assert cpu_scaling.main(["--repeats", "1", "--scaling-tokens", "64", "--scaling-dim", "8", "--json", str(out_json)]) == 0
    report = json.loads(out_json.read_text())
    assert report["provenance"]["git_commit"] and report["provenance"]["device"].startswith("CPU")
    assert sorted(r["backend"] for r in report["shapes"]) == ["cpu", "naive", "sdpa"]
    assert [r["backend"] for r in report["scaling"]] == ["sdpa", "cpu"] and report["scaling"][0]["tokens"] == 64
    assert [r["backend"] for r in report["video"]] == ["sdpa", "cpu"]
    for row in report["shapes"] + report["scaling"] + report["video"]:
        assert row["median_ms"] > 0 and row["peak_mem_mib"] is not None and not row.get("error"), row
    cpu_row = next(r for r in report["shapes"] if r["backend"] == "cpu")
    assert cpu_row["rel_err"] <= out_tolerance(torch.float32)
    out = capsys.readouterr().out
    assert "### Speed at num_iters=2" in out and "| tiny-96 (H=3, N=96, D=16) |" in out and "| 64 | ~100% |" in out


# ---------------------------------------------------------------------------------------------
# The row type, the verdict, the progress bar


def _goal_rows(vs_sdpa=1.14, peak=290.0, naive_ms=5000.0):
    from asag_kernels._spec import SHAPES

    shape = SHAPES["sdxl-64"]
    make = measure.new_row
    return [
        make("sdxl-64", shape, "sdpa", torch.float32, 0, median_ms=400.0, vs_sdpa=1.0, peak_mem_mib=14.0,
             rel_err=4e-7, within_tolerance=True, deterministic=True),
        make("sdxl-64", shape, "naive", torch.float32, 2, median_ms=naive_ms, vs_sdpa=naive_ms / 400, peak_mem_mib=1900.0,
             rel_err=6e-7, within_tolerance=True, deterministic=True),
        make("sdxl-64", shape, "cpu", torch.float32, 2, median_ms=400.0 * vs_sdpa, vs_sdpa=vs_sdpa, peak_mem_mib=peak,
             rel_err=5e-7, within_tolerance=True, deterministic=True),
    ]


def _lines(rows, device_type="cpu"):
    from asag_kernels.benchmarking import goals

    return {v.goal + ("" if v.required else " stretch"): v for v in goals.verdict(rows, device_type)}


def test_verdict_pass_fail_and_not_measured_from_rows():
    from asag_kernels.benchmarking import goals

    got = _lines(_goal_rows())
    assert got["cpu sdxl-64 T=2 vs SDPA"].status == goals.PASS
    assert got["cpu sdxl-64 T=2 vs SDPA"].line() == "PASS  cpu sdxl-64 T=2 vs SDPA: 1.14x SDPA (goal <= 1.5x)"
    assert got["cpu sdxl-64 T=2 vs SDPA stretch"].status == goals.PASS
    assert got["cpu sdxl-64 T=2 vs naive"].status == goals.PASS and "11.0x" in got["cpu sdxl-64 T=2 vs naive"].detail
    assert got["cpu sdxl-64 T=2 extra peak"].status == goals.PASS and "290 MiB" in got["cpu sdxl-64 T=2 extra peak"].detail
    assert got["SPEC §4 accuracy, every row"].status == goals.PASS
    # On a CPU machine no GPU goal is ever PASS.
    gpu = [v for k, v in got.items() if k.startswith(("triton", "cuda"))]
    assert gpu and all(v.status == goals.NOT_MEASURED and "no GPU" in v.detail for v in gpu)

    got = _lines(_goal_rows(vs_sdpa=1.3, peak=310.0, naive_ms=2000.0))
    assert got["cpu sdxl-64 T=2 vs SDPA"].status == goals.PASS
    assert got["cpu sdxl-64 T=2 vs SDPA stretch"].status == goals.FAIL
    assert got["cpu sdxl-64 T=2 vs naive"].status == goals.FAIL
    assert got["cpu sdxl-64 T=2 extra peak"].line() == "FAIL  cpu sdxl-64 T=2 extra peak: 310 MiB (goal <= 300 MiB)"
    assert _lines(_goal_rows(vs_sdpa=1.6))["cpu sdxl-64 T=2 vs SDPA"].status == goals.FAIL

    wrong = _goal_rows()
    wrong[2].within_tolerance, wrong[2].rel_err = False, 1e-3
    assert _lines(wrong)["SPEC §4 accuracy, every row"].status == goals.FAIL
    # No row for a goal: not measured, never PASS; a skipped row is no measurement.
    skipped = [measure.new_row("sdxl-64", (10, 4096, 64), "cpu", torch.float32, 2, skipped="over budget")]
    for v in goals.verdict(skipped, "cpu"):
        assert v.status == goals.NOT_MEASURED, v.line()
    # On a GPU the CPU goals are not measured.
    on_gpu = _lines(_goal_rows(), "cuda")
    assert on_gpu["cpu sdxl-64 T=2 vs SDPA"].status == goals.NOT_MEASURED
    assert on_gpu["triton sdxl-64 T=2 vs SDPA"].status == goals.NOT_MEASURED  # no triton row in this list


def test_bench_row_round_trips_through_json():
    row = _goal_rows()[2]
    row.times_ms, row.rel_err_heads, row.out_heads = [460.1, 455.9], [0, 9], torch.zeros(1)
    data = json.loads(json.dumps(row.to_dict()))
    assert "out_heads" not in data
    back = measure.BenchRow.from_dict(data)
    assert back == row and back.out_heads is None and back.passes == 5


class _Terminal:
    """A stderr that says it is a terminal and keeps what is written."""

    def __init__(self):
        self.text = []

    def isatty(self):
        return True

    def write(self, text):
        self.text.append(text)
        return len(text)

    def flush(self):
        pass


def test_progress_is_off_when_stderr_is_not_a_terminal():
    import io

    assert cli.progress_wanted(False, io.StringIO()) is False
    assert cli.progress_wanted(False, _Terminal()) is True
    assert cli.progress_wanted(True, _Terminal()) is False


@pytest.mark.parametrize("no_progress", [False, True])
def test_progress_per_shape_and_no_progress(no_progress, monkeypatch, capsys):
    """On a terminal each shape shows its rows (here without tqdm: one line per row); --no-progress: nothing."""
    terminal = _Terminal()
    monkeypatch.setitem(sys.modules, "tqdm", None)  # tqdm absent: the fallback, not an ImportError
    monkeypatch.setattr(sys, "stderr", terminal)
    argv = ["--quick", "--shapes", "tiny-96,2x48x8", "--backends", "torch", "--repeat", "1", "--isolation", "none"]
    assert cli.main(argv + (["--no-progress"] if no_progress else [])) == 0
    written = "".join(terminal.text)
    if no_progress:
        assert written == ""
    else:
        assert "[tiny-96 1/2] sdpa T=0" in written and "[2x48x8 2/2] torch T=2" in written
    assert "SPEC goals on this machine:" in capsys.readouterr().out


def test_tqdm_bar_per_shape_on_a_terminal_without_a_size(monkeypatch):
    """With tqdm (the bench extra) each shape gets its own bar, also on a terminal reporting no size."""
    pytest.importorskip("tqdm", reason="tqdm is in the bench extra")
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    progress = cli.Progress(True)
    for name in ("tiny-96", "2x48x8"):
        progress.shape(name, 2)
        for label in ("sdpa T=0", "torch T=2"):
            progress.start(label)
            progress.advance()
    progress.close()
    written = "".join(terminal.text)
    assert "tiny-96: 100%" in written and "2x48x8: 100%" in written and "2/2" in written and "torch T=2" in written

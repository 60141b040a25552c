"""The one build spec (asag_kernels/build_spec.py) and its three consumers agree: setup.py's
extensions, the just-in-time CUDA build (tests/test_cuda_backend.py checks load()'s arguments) and
scripts/check_cuda_compile.sh (its --print-flags output). Also: the spec imports without torch, and
a failed optional extension never aborts an install (a forced failure, then a broken compiler)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from asag_kernels import build_spec

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def test_spec_is_pytorch_free_and_runs_as_a_script():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('bs', {str(ROOT / 'asag_kernels' / 'build_spec.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['bs'] = m; spec.loader.exec_module(m)\n"
        "assert 'torch' not in sys.modules, 'build_spec imported torch'\n"
        "print(m.CXX_STANDARD)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "c++20", done.stderr
    cli = subprocess.run(
        [sys.executable, str(ROOT / "asag_kernels" / "build_spec.py"), "cxx-flags"], capture_output=True, text=True, timeout=60
    )
    assert cli.returncode == 0 and cli.stdout.split() == list(build_spec.CXX_FLAGS), cli.stderr


def test_sources_and_cxx20_everywhere():
    assert build_spec.csrc_dir() == CSRC
    cpu = build_spec.cpu_extension(CSRC)
    cuda = build_spec.cuda_extension(CSRC, ["80", "90"])
    assert {Path(s).name for s in cpu.sources} == {p.name for p in (CSRC / "cpu").glob("*.cpp")}
    assert {Path(s).name for s in cuda.sources} == {p.name for p in (CSRC / "cuda").iterdir() if p.suffix in (".cu", ".cpp")}
    for ext in (cpu, cuda):
        assert ext.include_dirs == (str(CSRC / "include"),)
        assert "-std=c++20" in ext.cxx_flags and not any(f.startswith("-std=") and f != "-std=c++20" for f in ext.cxx_flags)
    assert "-std=c++20" in cuda.nvcc_flags


@pytest.mark.parametrize(
    "text, archs, gencode",
    [
        ("80;90", ["80", "90"], ["arch=compute_80,code=sm_80", "arch=compute_90,code=sm_90", "arch=compute_90,code=compute_90"]),
        ("8.0, 8.6", ["80", "86"], ["arch=compute_80,code=sm_80", "arch=compute_86,code=sm_86", "arch=compute_86,code=compute_86"]),
        ("sm_90a", ["90a"], ["arch=compute_90a,code=sm_90a"]),  # arch-specific PTX is never the portable one
        ("80 90a", ["80", "90a"], ["arch=compute_80,code=sm_80", "arch=compute_90a,code=sm_90a", "arch=compute_80,code=compute_80"]),
    ],
)
def test_archs_to_gencode(text, archs, gencode):
    assert build_spec.parse_archs(text) == archs
    flags = build_spec.gencode_flags(archs)
    assert flags[0::2] == ["-gencode"] * len(gencode) and flags[1::2] == gencode


@pytest.mark.parametrize("bad", ["", "eighty", "8", "90b;80"])
def test_bad_archs_name_the_variable(bad, monkeypatch):
    monkeypatch.setenv("ASAG_CUDA_ARCHS", bad)
    if not bad:  # the _env rule: empty means the default
        assert build_spec.cuda_archs_from_env() == ["80", "90"]
        return
    with pytest.raises(ValueError, match="ASAG_CUDA_ARCHS"):
        build_spec.cuda_archs_from_env()


def test_forced_failures_parse(monkeypatch):
    monkeypatch.setenv("ASAG_FORCE_BUILD_FAILURE", "cpu, CUDA")
    assert build_spec.forced_failures() == ("cpu", "cuda")
    monkeypatch.setenv("ASAG_FORCE_BUILD_FAILURE", "gpu")
    with pytest.raises(ValueError, match="ASAG_FORCE_BUILD_FAILURE"):
        build_spec.forced_failures()


def _toolkit(root: Path, *, headers: bool, targets: bool = False) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "nvcc").write_text("")
    if headers:
        inc = root / ("targets/x86_64-linux/include" if targets else "include")
        inc.mkdir(parents=True)
        (inc / "cuda_runtime.h").write_text("")
    return root


def test_cuda_home_discovery_checks_for_headers(tmp_path):
    """torch's guess for an nvcc in /usr/local/bin is /usr/local (no headers): the spec skips such
    a folder and finds the real toolkit behind the link."""
    real = _toolkit(tmp_path / "cuda-13.0", headers=True, targets=True)
    bare = _toolkit(tmp_path / "local", headers=False)
    (bare / "bin" / "nvcc").unlink()
    (bare / "bin" / "nvcc").symlink_to(real / "bin" / "nvcc")
    which = lambda name: str(bare / "bin" / "nvcc")  # noqa: E731
    assert build_spec.cuda_home_problem(bare) is not None and build_spec.cuda_home_problem(real) is None
    assert build_spec.find_cuda_home(environ={}, which=which) == str(real)
    assert build_spec.find_cuda_home(environ={"CUDA_HOME": str(real)}, which=lambda n: None) == str(real)
    assert build_spec.find_cuda_home(environ={"CUDA_HOME": str(bare)}, which=which) is None  # given, but unusable


def test_setup_py_builds_from_the_spec(monkeypatch):
    """setup.py's extension objects carry exactly the spec's sources, include dirs and flags."""
    import setuptools
    import torch

    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.setattr(torch.version, "cuda", "13.0")  # as if torch had CUDA: the CUDA extension is declared
    monkeypatch.setenv("ASAG_CUDA_ARCHS", "80;90")
    monkeypatch.delenv("ASAG_SKIP_CUDA_BUILD", raising=False)
    monkeypatch.setenv("CUDA_HOME", build_spec.find_cuda_home() or "")
    if not os.environ["CUDA_HOME"]:
        pytest.skip("no CUDA toolkit here: setup.py declares no CUDA extension")
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", os.environ["CUDA_HOME"])  # None in a CPU torch
    monkeypatch.chdir(ROOT)
    namespace = {"__file__": str(ROOT / "setup.py"), "__name__": "__setup__"}
    exec(compile((ROOT / "setup.py").read_text(), str(ROOT / "setup.py"), "exec"), namespace)
    exts = {ext.name: ext for ext in captured["ext_modules"]}
    expected = {
        build_spec.CPU_EXTENSION: build_spec.cpu_extension(CSRC).setuptools_kwargs(ROOT),
        build_spec.CUDA_EXTENSION: build_spec.cuda_extension(CSRC, ["80", "90"]).setuptools_kwargs(ROOT),
    }
    assert set(exts) == set(expected)
    for name, kwargs in expected.items():
        ext = exts[name]
        assert ext.sources == kwargs["sources"]
        assert all(inc in ext.include_dirs for inc in kwargs["include_dirs"])  # torch appends its own
        assert ext.extra_compile_args == kwargs["extra_compile_args"], name
    # The sources a just-in-time build needs ship in the wheel.
    assert captured["package_dir"]["asag_kernels.csrc"] == "csrc"
    assert captured["package_data"]["asag_kernels.csrc"] == list(build_spec.SHIPPED_SOURCES)


def test_compile_check_script_uses_the_spec():
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "check_cuda_compile.sh"), "--print-flags"],
        capture_output=True, text=True, timeout=120, env={k: v for k, v in os.environ.items() if k != "ASAG_CHECK_ARCHS"},
    )
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(": ", 1) for line in done.stdout.strip().splitlines())
    archs = build_spec.parse_archs(build_spec.CHECK_CUDA_ARCHS)
    assert set(lines) == {f"nvcc flags sm_{a}" for a in archs} | {"binding flags"}
    include = ["-I", str(CSRC / "include")]
    for arch in archs:
        flags = shlex.split(lines[f"nvcc flags sm_{arch}"])
        implicit = list(build_spec.TORCH_IMPLICIT_NVCC_FLAGS)
        assert flags == implicit + [f for f in build_spec.nvcc_flags([arch]) if f not in implicit] + include
    assert shlex.split(lines["binding flags"]) == list(build_spec.CXX_FLAGS) + include


def test_torch_implicit_flags_match_torch():
    """The compile check passes by hand what torch's CUDAExtension adds on its own."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    assert list(build_spec.TORCH_IMPLICIT_NVCC_FLAGS) == list(COMMON_NVCC_FLAGS)


# ---- a failed optional extension never aborts an install ---------------------------------------

PACKAGE_PATHS = ("setup.py", "pyproject.toml", "MANIFEST.in", "LICENSE", "README.md", "asag_kernels", "csrc", "triton")


def _stage_checkout(dest: Path) -> Path:
    """A copy of the package's files (tracked and untracked-but-not-ignored, so no built .so): an
    editable install there cannot touch this checkout's extension."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "--", *PACKAGE_PATHS], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for rel in listed:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(src.read_bytes())
    return dest


def _venv_sharing_torch(path: Path) -> Path:
    """A venv without pip whose path also holds this process's torch (and setuptools): a path entry,
    not a site dir, so this checkout's own editable install stays invisible there."""
    import torch

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    (site,) = (path / "lib").glob("python3*/site-packages")
    (site / "shared_torch.pth").write_text(str(Path(torch.__file__).parents[1]) + "\n")
    return path / "bin" / "python"


@pytest.mark.parametrize(
    "breakage",
    [{"ASAG_FORCE_BUILD_FAILURE": "cpu"}, {"CXX": "false"}],
    ids=["extension-fails", "no-working-compiler"],
)
def test_failed_extension_still_installs_editable(tmp_path, breakage):
    """The issue's abort: the CPU extension failed and `pip install -e .` stopped with "can't copy
    ..._C_cpu...so: doesn't exist". Now the failed extension leaves the build and the package
    installs, with backend_status() saying what is missing."""
    stage = _stage_checkout(tmp_path / "src")
    py = _venv_sharing_torch(tmp_path / "venv")
    env = {**os.environ, **breakage, "ASAG_SKIP_CUDA_BUILD": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-build-isolation", "--no-deps", "--no-index", "-v", "-e", str(stage)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    log = install.stdout + install.stderr
    assert install.returncode == 0, log[-4000:]
    assert "can't copy" not in log
    assert "asag_kernels: building asag_kernels._C_cpu failed" in log or "native build failed before compiling" in log, log[-4000:]
    smoke = (
        "import torch, asag_kernels\n"
        f"assert asag_kernels.__file__.startswith({str(stage)!r}), asag_kernels.__file__\n"
        "status = asag_kernels.backend_status()\n"
        "assert status['cpu'].startswith('not built'), status\n"
        "q = torch.randn(1, 2, 9, 8)\n"
        "out = asag_kernels.sinkhorn_attention(q, q, q)\n"  # auto falls back to the torch backend
        "assert out.shape == q.shape and torch.isfinite(out).all()\n"
        "print('ok', status['cpu'])\n"
    )
    run = subprocess.run([str(py), "-c", smoke], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ""})
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stdout + run.stderr

"""The sdist and wheel build, and the wheel works from a clean virtual environment."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("build") is None, reason="the 'build' package is not installed (pip install asag-kernels[test])"
)


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # No isolation: the extension builds against this torch (an isolated build would fetch another).
    run = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(out), str(ROOT)],
        capture_output=True, text=True, env={**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", "2")},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out


def test_sdist_ships_sources(dist):
    (sdist,) = dist.glob("*.tar.gz")
    names = tarfile.open(sdist).getnames()
    for needed in ("LICENSE", "setup.py", "pyproject.toml", "csrc/include/asag/online_lse.h"):
        assert any(n.endswith(needed) for n in names), f"{needed} missing from the sdist"
    assert any("/triton/" in n and n.endswith(".py") for n in names), "the Triton kernels are missing from the sdist"
    assert not any(n.endswith("triton/__init__.py") for n in names)


def test_wheel_ships_extension_and_kernels(dist):
    (wheel,) = dist.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("asag_kernels/_C_cpu") and n.endswith(".so") for n in names), names
    assert any(n.startswith("asag_kernels/triton_kernels/") and n.endswith(".py") for n in names), names
    assert any(n.endswith("LICENSE") for n in names)


def test_wheel_in_clean_venv(dist, tmp_path):
    (wheel,) = dist.glob("*.whl")
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    py = env_dir / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
    )
    # Share this process's torch (and triton) instead of reinstalling them: a path entry, not a
    # site dir, so the editable install of the checkout stays invisible to the clean venv.
    (site,) = (env_dir / "lib").glob("python3*/site-packages")
    (site / "shared_torch.pth").write_text(str(Path(torch.__file__).parents[1]) + "\n")
    smoke = textwrap.dedent(
        """
        import os, torch, asag_kernels
        assert os.path.realpath(asag_kernels.__file__).startswith(os.path.realpath(%r)), asag_kernels.__file__
        status = asag_kernels.backend_status()
        print(status)
        assert status["cpu"] == "ok", status
        q, k, v = (torch.randn(1, 2, 33, 16) for _ in range(3))
        ref = asag_kernels.sinkhorn_attention(q.double(), k.double(), v.double(), backend="reference")
        for name in ("torch", "cpu", "triton"):
            if status[name] != "ok":
                continue
            out = asag_kernels.sinkhorn_attention(q, k, v, backend=name)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            assert err < 1e-5, (name, err)
            print(name, "ok", err)
        """
    ) % str(env_dir)
    run = subprocess.run(
        [str(py), "-c", smoke], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ""},
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "cpu ok" in run.stdout

"""Runs the vendored ComfyUI on the CPU for the node-pack tests, and registers the node pack the way
ComfyUI does for a folder in custom_nodes/.

Collected only by scripts/test_comfyui.sh (in .venv-latest, from a working directory where
``import asag_kernels`` is the installed package); `python -m pytest tests/` never sees this folder.

ComfyUI's tree is read-only in CI: its writable folders (models/, output/, temp/, user/, input/)
point at a temporary directory, and no bytecode is written into it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
NODE_PACK = REPO / "comfyui_asag"
COMFYUI_DIR = Path(os.environ.get("ASAG_COMFYUI_DIR") or REPO.parent / "shared" / "vendor" / "ComfyUI").resolve()
if not (COMFYUI_DIR / "comfy").is_dir():
    raise RuntimeError(f"no ComfyUI tree at {COMFYUI_DIR}; set ASAG_COMFYUI_DIR (scripts/test_comfyui.sh does)")

sys.dont_write_bytecode = True
# The models are tiny: one thread is fastest, and on a busy two-core machine more threads spin-wait
# (a 3-step tiny-UNet sampling went from 0.35 s to 10-19 s with two threads under load).
torch.set_num_threads(1)
COMFY_HOME = Path(tempfile.mkdtemp(prefix="asag-comfyui-"))
# A placeholder checkpoint name: prompt validation checks the name against models/checkpoints only.
(COMFY_HOME / "models" / "checkpoints").mkdir(parents=True)
(COMFY_HOME / "models" / "checkpoints" / "sd_xl_base_1.0.safetensors").touch()

_argv = sys.argv
sys.argv = [
    "main.py", "--cpu",
    "--base-directory", str(COMFY_HOME),
    "--output-directory", str(COMFY_HOME / "output"),
    "--temp-directory", str(COMFY_HOME / "temp"),
    "--input-directory", str(COMFY_HOME / "input"),
    "--user-directory", str(COMFY_HOME / "user"),
]
(COMFY_HOME / "user").mkdir()
sys.path.insert(0, str(COMFYUI_DIR))
try:
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.model_management  # noqa: F401  (parses the arguments above)
finally:
    sys.argv = _argv


def pytest_unconfigure(config):
    shutil.rmtree(COMFY_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def comfy_nodes():
    """ComfyUI's ``nodes`` module with the node pack loaded by ComfyUI's own custom-node loader."""
    import nodes

    if "AdversarialSinkhornAttentionGuidance" not in nodes.NODE_CLASS_MAPPINGS:
        assert asyncio.run(nodes.load_custom_node(str(NODE_PACK))), "ComfyUI failed to load the comfyui_asag node pack"
    return nodes


@pytest.fixture(scope="session")
def asag_nodes(comfy_nodes):
    m = comfy_nodes.NODE_CLASS_MAPPINGS
    return (m["AdversarialSinkhornAttentionGuidance"], m["AdversarialSinkhornAttentionGuidanceAdvanced"],
            m["AdversarialSinkhornAttentionGuidanceDiT"])

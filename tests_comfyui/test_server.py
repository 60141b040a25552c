"""A real ComfyUI server runs the ASAG node: the vendored ComfyUI, copied fresh, with the pack installed by
scripts/install_comfyui.py, started as ``main.py --cpu --listen 127.0.0.1 --port FREE``; the example workflow
is POSTed to /prompt on a small SD 1.5-architecture checkpoint (tiny_checkpoint.py) and the image it writes
is read back; bad inputs come back as node errors while the server goes on serving. The server is stopped
by its pid."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import COMFYUI_DIR, REPO

WORKFLOW = REPO / "examples" / "comfyui_asag_sdxl_api.json"
ASAG_NODES = ("AdversarialSinkhornAttentionGuidance", "AdversarialSinkhornAttentionGuidanceAdvanced",
              "AdversarialSinkhornAttentionGuidanceDiT")
CKPT = "asag_tiny_sd15.safetensors"
START_TIMEOUT_S = 300
PROMPT_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wheel() -> list[str]:
    """The asag_kernels wheel scripts/setup_env_latest.sh built for this venv (installing it again is quick);
    without one, the install script builds the checkout."""
    venv = os.environ.get("ASAG_COMFYUI_VENV")
    wheels = sorted(Path(venv, "dist").glob("asag_kernels-*.whl")) if venv else []
    return ["--package", str(wheels[-1])] if wheels else []


def _request(url: str, data: dict | None = None, timeout: float = 30):
    req = urllib.request.Request(url, data=None if data is None else json.dumps(data).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


class Server:
    def __init__(self, root: Path, port: int, log: Path):
        self.root, self.url, self.log_path = root, f"http://127.0.0.1:{port}", log
        self.log = open(log, "w")
        # The web frontend is a separate package (comfyui-frontend-package) the API does not need: an
        # empty page stands in for it, through ComfyUI's own --front-end-root.
        front = log.parent / "frontend"
        front.mkdir(exist_ok=True)
        (front / "index.html").write_text("<!doctype html><title>ComfyUI API test</title>\n")
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
             "--front-end-root", str(front)],
            cwd=root, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.pid = self.proc.pid

    def tail(self, lines: int = 60) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.tail()}")
            try:
                status, _ = _request(self.url + "/system_stats", timeout=5)
                if status == 200:
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1)
        raise AssertionError(f"ComfyUI did not answer within {START_TIMEOUT_S} s:\n{self.tail()}")

    def stop(self) -> None:
        """By its pid (and its process group): SIGTERM, then SIGKILL."""
        if self.proc.poll() is None:
            os.killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)
        self.log.close()

    def queue(self, prompt: dict):
        return _request(self.url + "/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})

    def run(self, prompt: dict) -> list[Path]:
        """Queue ``prompt``, wait for it in /history, return the image files it wrote."""
        status, answer = self.queue(prompt)
        assert status == 200 and not answer.get("node_errors"), answer
        prompt_id = answer["prompt_id"]
        deadline = time.monotonic() + PROMPT_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"ComfyUI died running the prompt:\n{self.tail()}"
            _, history = _request(f"{self.url}/history/{prompt_id}")
            entry = (history or {}).get(prompt_id)
            if entry and (entry.get("outputs") or entry.get("status", {}).get("completed") is not None):
                status_str = entry.get("status", {}).get("status_str")
                assert status_str in (None, "success"), (entry.get("status"), self.tail())
                images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
                assert images, (entry, self.tail())
                return [self.root / "output" / img["subfolder"] / img["filename"] for img in images]
            time.sleep(0.5)
        raise AssertionError(f"prompt {prompt_id} did not finish within {PROMPT_TIMEOUT_S} s:\n{self.tail()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tiny_checkpoint import build_sd15_checkpoint

    root = tmp_path_factory.mktemp("comfy") / "ComfyUI"
    shutil.copytree(COMFYUI_DIR, root, ignore=shutil.ignore_patterns("__pycache__", ".git", "*.pyc"), symlinks=True)
    install = subprocess.run([sys.executable, str(REPO / "scripts" / "install_comfyui.py"), str(root),
                              "--python", sys.executable, *_wheel()], capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stdout + install.stderr
    assert (root / "custom_nodes" / "comfyui_asag").is_symlink()
    build_sd15_checkpoint(root / "models" / "checkpoints" / CKPT)
    srv = Server(root, _free_port(), tmp_path_factory.mktemp("log") / "comfyui.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def _prompt(asag: bool, seed: int = 7) -> dict:
    """The example workflow at a size a CPU runs in seconds, on the tiny checkpoint."""
    p = json.loads(WORKFLOW.read_text())
    p["4"]["inputs"]["ckpt_name"] = CKPT
    p["5"]["inputs"].update(width=64, height=64)
    p["3"]["inputs"].update(steps=3, seed=seed, cfg=3.0)
    p["9"]["inputs"]["filename_prefix"] = "asag_test_" + ("asag" if asag else "plain")
    if not asag:
        p["3"]["inputs"]["model"] = ["4", 0]
        del p["10"]
    return p


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def test_object_info_lists_the_nodes_with_tooltips(server):
    status, info = _request(server.url + "/object_info")
    assert status == 200
    for node in ASAG_NODES:
        assert node in info, f"{node} not registered; server log:\n{server.tail()}"
        inputs = {**info[node]["input"]["required"], **info[node]["input"].get("optional", {})}
        missing = [name for name, spec in inputs.items() if len(spec) < 2 or not spec[1].get("tooltip")]
        assert not missing, f"{node}: inputs without a tooltip: {missing}"
        assert info[node]["output"] == ["MODEL"]


def test_workflow_runs_and_asag_changes_the_image(server):
    (asag_png,) = server.run(_prompt(asag=True))
    (plain_png,) = server.run(_prompt(asag=False))
    assert asag_png.is_file() and plain_png.is_file()
    a, b = _pixels(asag_png), _pixels(plain_png)
    assert a.shape == b.shape == (64, 64, 3)
    assert np.abs(a - b).max() > 0, "the same seed with and without the ASAG node gave the same image"
    assert a.std() > 0, "a constant image: the random checkpoint saturated"


@pytest.mark.parametrize("field, value", [("sinkhorn_iters", -1), ("unet_block_list", "m0,x9"), ("unet_block_list", "d3-1")])
def test_bad_input_is_a_node_error_and_the_server_goes_on(server, field, value):
    bad = copy.deepcopy(_prompt(asag=True))
    bad["10"]["inputs"][field] = value
    status, answer = server.queue(bad)
    assert status == 400 and "10" in answer.get("node_errors", {}), answer
    assert field in json.dumps(answer["node_errors"]["10"]), answer
    status, _ = _request(server.url + "/system_stats")
    assert status == 200 and server.proc.poll() is None
    (png,) = server.run(_prompt(asag=True, seed=11))  # the next prompt is served
    assert png.is_file()

#!/usr/bin/env python3
"""Install ASAG for ComfyUI from this checkout, in one command:

    python scripts/install_comfyui.py /path/to/ComfyUI [--python PATH] [--link | --copy]

1. finds the Python that runs ComfyUI: ``--python``, else the ComfyUI folder's ``venv/`` or ``.venv/``;
2. installs the asag_kernels package into it from this checkout (``pip install --no-build-isolation``,
   building its C++ extension against the torch already there, which a constraint keeps as it is), or
   from a wheel built earlier (``--package dist/asag_kernels-*.whl``). Nothing is looked up on a
   package index under the name asag-kernels, which no index has;
3. puts the node pack ``comfyui_asag`` into ``ComfyUI/custom_nodes/``: a symbolic link to this
   checkout (``--link``, the default: ``git pull`` updates the nodes; rerun the script to update the
   package) or a copy (``--copy``);
4. checks, in that Python, that asag_kernels imports and that the pack loads next to ComfyUI.

Every failure says what was expected, what was found and what to do; nothing is changed in the
ComfyUI folder before the package is installed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK = REPO / "comfyui_asag"
PACK_NAME = "comfyui_asag"


class InstallError(RuntimeError):
    """A failed step, with what to do about it."""


def _step(text: str) -> float:
    print(f"[install_comfyui] {text} ...", flush=True)
    return time.perf_counter()


def _done(start: float) -> None:
    print(f"[install_comfyui]   done in {time.perf_counter() - start:.1f}s", flush=True)


def comfyui_dir(path: Path) -> Path:
    path = path.expanduser().resolve()
    if not path.is_dir():
        raise InstallError(f"COMFYUI_DIR: expected a ComfyUI folder, got {str(path)!r}, which is not a folder")
    missing = [name for name in ("main.py", "nodes.py", "comfy") if not (path / name).exists()]
    if missing:
        raise InstallError(f"COMFYUI_DIR: expected a ComfyUI folder (with main.py, nodes.py and comfy/), got {str(path)!r}, "
                           f"which lacks {', '.join(missing)}")
    return path


def find_python(comfy: Path, given: str | None) -> Path:
    """``given``, else ComfyUI's own venv (``venv``/``.venv``, POSIX or Windows layout)."""
    if given is not None:
        python = Path(given).expanduser()
        if not python.exists():
            raise InstallError(f"--python: expected the Python that runs ComfyUI, got {given!r}, which does not exist")
        return python
    candidates = [comfy / venv / sub for venv in ("venv", ".venv") for sub in ("bin/python", "Scripts/python.exe")]
    for python in candidates:
        if python.exists():
            return python
    raise InstallError(
        f"no Python found for ComfyUI at {comfy}: expected a virtual environment in {comfy / 'venv'} or "
        f"{comfy / '.venv'}, found none; pass --python PATH, the Python that runs ComfyUI (e.g. its embedded "
        f"python_embeded/python.exe, or `which python` in the environment you start ComfyUI from)"
    )


def _run(cmd: list, what: str, **kw) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise InstallError(f"{what} failed (exit status {proc.returncode}):\n{tail}")
    return proc.stdout


def torch_version(python: Path) -> str:
    try:
        return _run([python, "-c", "import torch; print(torch.__version__)"], "importing torch").strip()
    except InstallError as exc:
        raise InstallError(
            f"{python} cannot import torch: install ComfyUI's requirements into it first "
            f"(`{python} -m pip install -r requirements.txt` in the ComfyUI folder); asag_kernels builds against "
            f"that torch\n{exc}"
        ) from None


def install_package(python: Path, package: str | None, editable: bool) -> None:
    """pip-install this checkout (or ``package``) into ``python`` with its torch held where it is."""
    version = torch_version(python)
    with tempfile.TemporaryDirectory(prefix="asag-install-") as tmp:
        constraints = Path(tmp) / "constraints.txt"
        # The installed torch stays: asag_kernels declares torch as a range, and pip must not swap it for
        # another build (on a CPU machine the index's default torch is a multi-gigabyte CUDA build).
        # The public version: "==2.14.1" also matches the installed local build 2.14.1+cu130 (PEP 440),
        # which pip will not take as a constraint by its local label.
        constraints.write_text(f"torch=={version.split('+')[0]}\n")
        target = [package] if package else (["-e", str(REPO)] if editable else [str(REPO)])
        cmd = [python, "-m", "pip", "install", "--no-build-isolation", "-c", constraints, *target]
        env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        try:
            _run(cmd, f"pip install of {'the package ' + package if package else 'asag_kernels from ' + str(REPO)}", env=env)
        except InstallError as exc:
            raise InstallError(
                f"{exc}\n\nBuilding asag_kernels needs a C++ compiler and the headers of the torch in {python} "
                f"(torch {version}); on a machine without them, build a wheel where they exist "
                f"(`python -m pip wheel --no-build-isolation --no-deps -w dist .` against the same torch version) and "
                f"pass it with --package"
            ) from None


def place_pack(comfy: Path, mode: str, force: bool) -> Path:
    custom = comfy / "custom_nodes"
    custom.mkdir(exist_ok=True)
    dest = custom / PACK_NAME
    if dest.is_symlink() or dest.exists():
        same_link = dest.is_symlink() and dest.resolve() == PACK.resolve()
        if mode == "link" and same_link:
            return dest
        if not force:
            raise InstallError(f"{dest} already exists ({'a link to ' + str(dest.resolve()) if dest.is_symlink() else 'a folder'}); "
                               f"pass --force to replace it")
        if dest.is_symlink() or dest.is_file():
            dest.unlink()
        else:
            shutil.rmtree(dest)
    if mode == "link":
        dest.symlink_to(PACK, target_is_directory=True)
    else:
        shutil.copytree(PACK, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


# Run in ComfyUI's Python, from the ComfyUI folder: load the pack the way ComfyUI's loader does
# (its module, then comfy_entrypoint's node list), on the CPU so that no GPU is touched.
_CHECK = r"""
import asyncio, importlib.util, sys
sys.argv = ["main.py", "--cpu"]
sys.path.insert(0, ".")
import comfy.options
comfy.options.enable_args_parsing()
import asag_kernels
spec = importlib.util.spec_from_file_location("comfyui_asag", "custom_nodes/comfyui_asag/__init__.py",
                                              submodule_search_locations=["custom_nodes/comfyui_asag"])
module = importlib.util.module_from_spec(spec)
sys.modules["comfyui_asag"] = module
spec.loader.exec_module(module)
assert hasattr(module, "comfy_entrypoint"), "the pack did not export comfy_entrypoint (is asag_kernels importable?)"
ext = asyncio.run(module.comfy_entrypoint())
ids = [n.GET_SCHEMA().node_id for n in asyncio.run(ext.get_node_list())]
print("asag_kernels", asag_kernels.__version__, "from", asag_kernels.__file__)
print("backends", asag_kernels.backend_status())
print("nodes", ", ".join(ids))
"""


def check(python: Path, comfy: Path) -> str:
    return _run([python, "-c", _CHECK], "loading the node pack in ComfyUI's Python", cwd=comfy, timeout=600)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("comfyui", type=Path, metavar="COMFYUI_DIR", help="the ComfyUI folder (with main.py)")
    parser.add_argument("--python", help="the Python that runs ComfyUI (default: COMFYUI_DIR/venv or .venv)")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--link", dest="mode", action="store_const", const="link", help="link the pack (default)")
    how.add_argument("--copy", dest="mode", action="store_const", const="copy", help="copy the pack")
    parser.add_argument("--package", help="install this wheel or sdist of asag_kernels instead of building the checkout")
    parser.add_argument("--editable", action="store_true", help="install the checkout editable (for development)")
    parser.add_argument("--force", action="store_true", help="replace an existing custom_nodes/comfyui_asag")
    args = parser.parse_args(argv)
    if args.package and args.editable:
        parser.error("--package and --editable exclude each other")
    mode = args.mode or "link"
    try:
        comfy = comfyui_dir(args.comfyui)
        python = find_python(comfy, args.python)
        print(f"[install_comfyui] ComfyUI: {comfy}\n[install_comfyui] its Python: {python}", flush=True)
        t = _step("installing asag_kernels into that Python (building the C++ extension: a few minutes)"
                  if not args.package else f"installing {args.package} into that Python")
        install_package(python, args.package, args.editable)
        _done(t)
        t = _step(f"{'linking' if mode == 'link' else 'copying'} the node pack into custom_nodes/")
        dest = place_pack(comfy, mode, args.force)
        _done(t)
        t = _step("checking that the pack loads in ComfyUI's Python")
        print(check(python, comfy), end="", flush=True)
        _done(t)
    except InstallError as exc:
        print(f"install_comfyui: {exc}", file=sys.stderr)
        return 1
    print(f"[install_comfyui] installed: {dest}. Start ComfyUI as usual; the ASAG nodes are under model_patches.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

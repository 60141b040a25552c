"""The example workflow passes ComfyUI's own prompt validation with the node pack registered, and
the tests run against the installed asag_kernels (the package a ComfyUI user pip-installs)."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import sys
from pathlib import Path

import pytest
from conftest import COMFYUI_DIR, NODE_PACK, REPO

WORKFLOW = REPO / "examples" / "comfyui_asag_sdxl_api.json"


def _validate(prompt):
    import execution

    return asyncio.run(execution.validate_prompt("asag-test", prompt, None))


def test_example_workflow_passes_comfyui_validation(comfy_nodes):
    prompt = json.loads(WORKFLOW.read_text())
    assert prompt["10"]["class_type"] == "AdversarialSinkhornAttentionGuidance"
    assert prompt["3"]["inputs"]["model"] == ["10", 0] and prompt["10"]["inputs"]["model"] == ["4", 0]
    valid, error, outputs, node_errors = _validate(prompt)
    assert valid, (error, node_errors)
    assert outputs == ["9"]


@pytest.mark.parametrize("field, value", [("rescale_mode", "cfg"), ("backend", "fastest"), ("sinkhorn_iters", -1)])
def test_validation_enforces_the_node_inputs(comfy_nodes, field, value):
    prompt = json.loads(WORKFLOW.read_text())
    bad = copy.deepcopy(prompt)
    bad["10"]["inputs"][field] = value
    valid, error, outputs, node_errors = _validate(bad)
    assert not valid and "10" in node_errors


def test_node_pack_metadata_parses_with_comfyui_config_parser():
    from comfy_config import config_parser

    config = config_parser.extract_node_configuration(str(NODE_PACK))
    assert config is not None
    assert config.tool_comfy.publisher_id and config.tool_comfy.display_name
    assert config.project.name == "comfyui-asag"
    # Nothing a package index would be asked for: asag-kernels is on none (scripts/install_comfyui.py installs it).
    assert config.project.dependencies == []
    reqs = [line for line in (NODE_PACK / "requirements.txt").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert reqs == []


def test_node_pack_metadata_follows_the_registry_specification():
    """docs.comfy.org/registry/specifications: name rules, X.Y.Z version, Repository URL, PublisherId, an Icon
    URL of an allowed type, requires-comfyui a version specifier that the tested ComfyUI satisfies."""
    import re
    import tomllib

    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    meta = tomllib.loads((NODE_PACK / "pyproject.toml").read_text())
    project, comfy = meta["project"], meta["tool"]["comfy"]
    name = project["name"]
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*", name), name
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]), project["version"]
    assert project["urls"]["Repository"].startswith("https://")
    assert isinstance(project.get("license"), dict) and ("text" in project["license"] or "file" in project["license"])
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", comfy["PublisherId"]), comfy["PublisherId"]
    assert comfy["DisplayName"]
    assert comfy["Icon"].startswith("https://") and comfy["Icon"].rsplit(".", 1)[-1] in ("svg", "png", "jpg", "gif")
    icon = NODE_PACK / comfy["Icon"].rsplit("/comfyui_asag/", 1)[-1]
    assert icon.is_file(), f"the Icon URL points at {icon.name}, which the pack does not ship"
    spec = SpecifierSet(comfy["requires-comfyui"])
    tested = re.search(r'__version__ = "([^"]+)"', (COMFYUI_DIR / "comfyui_version.py").read_text()).group(1)
    assert Version(tested) in spec, f"requires-comfyui {spec} excludes the tested ComfyUI {tested}"


def test_node_pack_metadata_passes_comfy_cli_validation():
    """comfy-cli's own parser of the registry metadata (the one `comfy node publish` runs) accepts it."""
    from comfy_cli.registry import config_parser  # installed by scripts/setup_env_latest.sh

    config = config_parser.extract_node_configuration(str(NODE_PACK / "pyproject.toml"))
    assert config is not None and config.project.name == "comfyui-asag" and config.tool_comfy.publisher_id == "asag-kernels"


def test_asag_kernels_is_the_installed_package():
    import asag_kernels

    path = Path(asag_kernels.__file__).resolve()
    assert path.is_relative_to(Path(sys.prefix).resolve()), f"{path} is not inside this venv {sys.prefix}"
    assert not path.is_relative_to(REPO / "asag_kernels"), "the checkout shadows the installed package"
    expected = os.environ.get("ASAG_COMFYUI_VENV")
    if expected:  # set by scripts/test_comfyui.sh
        assert Path(sys.prefix).resolve() == Path(expected).resolve()
    import asag_kernels._C_cpu  # noqa: F401  (the installed build carries its extension)


def test_core_package_does_not_import_comfyui():
    import subprocess

    code = "import sys, asag_kernels, asag_kernels.joint; bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'nodes', 'comfyui_asag', 'folder_paths')]; print(bad); assert not bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_nodes_are_comfy_api_nodes_registered_through_the_entrypoint(comfy_nodes):
    """The pack is a comfy_api.latest extension: ComfyUI's loader takes comfy_entrypoint (a legacy
    NODE_CLASS_MAPPINGS would make it skip the entrypoint), and every node input has a tooltip."""
    import importlib.util

    from comfy_api.latest import ComfyExtension, io

    spec = importlib.util.spec_from_file_location("asag_pack_probe", NODE_PACK / "__init__.py",
                                                  submodule_search_locations=[str(NODE_PACK)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["asag_pack_probe"] = pack
    spec.loader.exec_module(pack)
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS")
    extension = asyncio.run(pack.comfy_entrypoint())
    assert isinstance(extension, ComfyExtension)
    listed = asyncio.run(extension.get_node_list())
    ids = [cls.GET_SCHEMA().node_id for cls in listed]
    assert ids == ["AdversarialSinkhornAttentionGuidance", "AdversarialSinkhornAttentionGuidanceAdvanced",
                   "AdversarialSinkhornAttentionGuidanceDiT"]
    for node_id in ids:
        registered = comfy_nodes.NODE_CLASS_MAPPINGS[node_id]
        assert issubclass(registered, io.ComfyNode)
        schema = registered.GET_SCHEMA()
        assert schema.display_name and comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id] == schema.display_name
        for section in registered.INPUT_TYPES().values():
            for name, (_, options) in section.items():
                assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"


@pytest.mark.parametrize(
    "node_id, field, value, message",
    [
        ("10", "unet_block_list", "m0,x7", "cannot parse entry 'x7'"),
        ("10", "unet_block_list", "d3-1", "decreasing block range"),
    ],
)
def test_malformed_block_list_is_a_prompt_node_error(comfy_nodes, node_id, field, value, message):
    """A malformed block list is refused by prompt validation (before any model is loaded), as a
    node error naming the input; a well-formed one passes (its blocks are checked when the node runs)."""
    prompt = json.loads(WORKFLOW.read_text())
    bad = copy.deepcopy(prompt)
    bad[node_id]["inputs"][field] = value
    valid, error, outputs, node_errors = _validate(bad)
    assert not valid and node_id in node_errors
    assert any(message in e["details"] for e in node_errors[node_id]["errors"]), node_errors[node_id]
    good = copy.deepcopy(prompt)
    good[node_id]["inputs"][field] = "m0, u0.1"
    assert _validate(good)[0]


def test_dit_layer_lists_are_checked_at_prompt_time(comfy_nodes):
    cls = comfy_nodes.NODE_CLASS_MAPPINGS["AdversarialSinkhornAttentionGuidanceDiT"]
    assert cls.validate_inputs(double_layers="7, 8, 9", single_layers="") is True
    assert cls.validate_inputs(double_layers="default", single_layers="") is True
    assert "cannot parse 'x'" in cls.validate_inputs(double_layers="1,x", single_layers="")
    assert "both empty" in cls.validate_inputs(double_layers=" ", single_layers="")


def test_missing_asag_kernels_logs_one_line_and_comfyui_goes_on(tmp_path):
    """Without asag_kernels in ComfyUI's Python, loading the pack logs one line saying how to install it, registers
    nothing, raises nothing; ComfyUI's loader goes on (it reports the pack as loaded with no nodes)."""
    import subprocess

    hide = tmp_path / "hide"
    hide.mkdir()
    # A module finder that makes `import asag_kernels` fail, as in a Python where it was never installed.
    (hide / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'asag_kernels' or name.startswith('asag_kernels.'):\n"
        "            raise ModuleNotFoundError(f\"No module named {name!r}\", name=name)\n"
        "sys.meta_path.insert(0, _Hide())\n")
    code = (
        "import asyncio, logging, sys\n"
        "logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(message)s')\n"
        "sys.argv = ['main.py', '--cpu']\n"
        f"sys.path.insert(0, {str(COMFYUI_DIR)!r})\n"
        "import comfy.options; comfy.options.enable_args_parsing()\n"
        "import nodes\n"
        "before = set(nodes.NODE_CLASS_MAPPINGS)\n"
        f"ok = asyncio.run(nodes.load_custom_node({str(NODE_PACK)!r}))\n"
        "print('LOADED', ok, sorted(set(nodes.NODE_CLASS_MAPPINGS) - before))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(hide), "PYTHONDONTWRITEBYTECODE": "1"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(tmp_path),
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "LOADED True []" in run.stdout, run.stdout + run.stderr[-2000:]
    hint = [line for line in run.stderr.splitlines() if "comfyui_asag" in line and "install_comfyui.py" in line]
    assert len(hint) == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]

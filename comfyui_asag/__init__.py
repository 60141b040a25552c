"""ComfyUI node pack: Adversarial Sinkhorn Attention Guidance (ASAG) on asag_kernels.

Install it from a checkout of asag_kernels, in one command (docs/comfyui.md)::

    python scripts/install_comfyui.py /path/to/ComfyUI

which installs the asag_kernels package into the Python that runs ComfyUI and puts this folder into
``ComfyUI/custom_nodes/``.

ComfyUI's custom-node loader imports this file and calls :func:`comfy_entrypoint`, which returns the
pack's ``ComfyExtension`` (the ``comfy_api.latest`` node interface). There is deliberately no
``NODE_CLASS_MAPPINGS`` here: ComfyUI's loader takes that legacy mapping first when a pack has it and
then never calls ``comfy_entrypoint``; a ComfyUI old enough to need the mapping has no ``comfy_api.latest``
and cannot import these nodes anyway. The one exception: without asag_kernels the pack logs one line
saying how to install it and exports an empty mapping, so that ComfyUI registers nothing from it, adds
no traceback and goes on loading the other packs.
"""

import logging

INSTALL_HINT = (
    "comfyui_asag: the asag_kernels package is not installed in the Python that runs ComfyUI, so the ASAG nodes "
    "are not loaded; install it from a checkout of asag_kernels with "
    "`python scripts/install_comfyui.py /path/to/ComfyUI` (docs/comfyui.md)"
)

try:
    import asag_kernels  # noqa: F401
except ImportError as exc:
    logging.getLogger(__name__).warning("%s [%s: %s]", INSTALL_HINT, type(exc).__name__, exc)
    NODE_CLASS_MAPPINGS: dict = {}
    __all__ = ["NODE_CLASS_MAPPINGS"]
else:
    from .nodes import NODES, comfy_entrypoint

    __all__ = ["NODES", "comfy_entrypoint"]

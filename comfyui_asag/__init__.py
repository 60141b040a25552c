"""ComfyUI node pack: Adversarial Sinkhorn Attention Guidance (ASAG) on asag_kernels.

ComfyUI's custom-node loader imports this file and calls :func:`comfy_entrypoint`, which returns the
pack's ``ComfyExtension`` (the ``comfy_api.latest`` node interface). There is deliberately no
``NODE_CLASS_MAPPINGS`` here: ComfyUI's loader takes that legacy mapping first when a pack has it and
then never calls ``comfy_entrypoint``; a ComfyUI old enough to need the mapping has no ``comfy_api.latest``
and cannot import these nodes anyway.
"""

from .nodes import NODES, comfy_entrypoint

__all__ = ["NODES", "comfy_entrypoint"]

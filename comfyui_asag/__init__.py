"""ComfyUI node pack: Adversarial Sinkhorn Attention Guidance (ASAG) on asag_kernels.

Install: copy or clone this folder into ``ComfyUI/custom_nodes/`` and ``pip install asag-kernels``
into ComfyUI's Python. ComfyUI imports this file and reads the two mappings below.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

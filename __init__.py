"""comfyui-bfr: diffusion-based blind face restoration for ComfyUI (V1 node API).

Registration only: ComfyUI imports this package from ``custom_nodes/`` and reads the mappings below.
The package also imports without ComfyUI (``pip install -e .`` installs it as ``comfyui_bfr``).
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = None

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

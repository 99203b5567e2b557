"""ComfyUI glue: one module per node family, aggregated here.

Each family module exports ``NODE_CLASS_MAPPINGS`` and ``NODE_DISPLAY_NAME_MAPPINGS``. Only modules in this
package touch ``comfy.*`` and they do so lazily (through :mod:`._comfy`), so importing the pack never needs ComfyUI.
"""

from . import _comfy, clrface, clrface_denoiser, clrface_irn, color, degrade, dr2, dr2_auto, drbfr, face, flipnet
from . import identity

_comfy.register_model_folder()  # models/bfr for our weights; a no-op outside ComfyUI

_FAMILIES = (degrade, dr2, dr2_auto, flipnet, drbfr, face, color, identity, clrface, clrface_denoiser, clrface_irn)

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _family in _FAMILIES:
    NODE_CLASS_MAPPINGS.update(_family.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_family.NODE_DISPLAY_NAME_MAPPINGS)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

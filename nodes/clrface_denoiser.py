"""Node family: CLR-Face's conditional denoiser (CLR-Face §3.2 on SD2.1, design.md §3.5) — BFR Load CLR-Face and
BFR Apply CLR-Face.

Apply patches a clone of the MODEL exactly as BFR Apply DR-BFR does, without the DR prompt
(:func:`.drbfr.patch_conditional_model`): the ``clrface/1`` LoRA through ComfyUI's loader, conv_in widened by an
object patch, the degraded image's latent E(x^d) as ``noise_concat`` on both prompts. Sample it with BFR CLR-Face
Sampler (Heun + identity guidance) in SamplerCustomAdvanced, from E(x_id) with BasicScheduler(karras) at a
denoise below 1 (refinement starts at sigma_start).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ..lora.checkpoint import CheckpointError
from ..lora.cond_checkpoint import CLRFACE_FORMAT, ConditionalCheckpoint, read_conditional_checkpoint
from ._comfy import BFR_FOLDER, model_files, register_model_folder
from .clrface import CATEGORY
from .drbfr import patch_conditional_model
from .helpers import NodeInputError

logger = logging.getLogger(__name__)

LOAD_ID = "BFR Load CLR-Face"
APPLY_ID = "BFR Apply CLR-Face"


@dataclass
class CLRFaceDenoiser:
    """The BFR_CLRFACE value: a validated ``clrface/1`` checkpoint."""

    name: str
    checkpoint: ConditionalCheckpoint

    def __deepcopy__(self, memo):
        return self


def load_clrface(path: str, node: str = LOAD_ID) -> CLRFaceDenoiser:
    try:
        ckpt = read_conditional_checkpoint(path, CLRFACE_FORMAT)
    except (CheckpointError, FileNotFoundError) as exc:
        raise NodeInputError(node, f"{exc} Pick a CLR-Face denoiser (bfr_format clrface/1, written by `bfr train "
                                   "clr-face`) in models/bfr.") from exc
    logger.info("Loaded CLR-Face denoiser %s (LoRA rank %d).", os.path.basename(path), ckpt.rank)
    return CLRFaceDenoiser(os.path.basename(str(path)), ckpt)


class BFRLoadCLRFace:
    """models/bfr/<file> -> BFR_CLRFACE."""

    DESCRIPTION = ("Loads a CLR-Face conditional denoiser (SD2.1-base + LoRA reading the degraded face's latent "
                   "through extra conv_in channels; `bfr train clr-face`) from models/bfr. Connect it to 'BFR Apply "
                   "CLR-Face'.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("BFR_CLRFACE",)
    RETURN_NAMES = ("clrface",)
    OUTPUT_TOOLTIPS = ("The CLR-Face denoiser weights for BFR Apply CLR-Face.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clrface_name": (model_files(BFR_FOLDER), {
            "tooltip": "CLR-Face .safetensors in models/bfr (bfr_format clrface/1), e.g. clrface.safetensors."})}}

    def load(self, clrface_name):
        import folder_paths

        register_model_folder()
        path = folder_paths.get_full_path(BFR_FOLDER, clrface_name)
        if path is None:
            raise NodeInputError(LOAD_ID, f"{clrface_name!r} is not in models/bfr; put the CLR-Face .safetensors "
                                          "there and refresh.")
        return (load_clrface(path),)


class BFRApplyCLRFace:
    """MODEL + BFR_CLRFACE + VAE + degraded IMAGE -> patched MODEL and prompts carrying E(x^d)."""

    DESCRIPTION = (
        "CLR-Face conditional refinement (SD2.1-base): returns a patched copy of the MODEL (CLR-Face LoRA; the UNet "
        "input widened to read the encoded degraded face) and the positive/negative prompts carrying that latent. "
        "Sample with BFR CLR-Face Sampler in SamplerCustomAdvanced, starting from the VAE-encoded initial estimate "
        "x_id (e.g. DR2's output) with BasicScheduler (karras) at denoise < 1.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("model", "positive", "negative")
    OUTPUT_TOOLTIPS = ("A patched clone of the input MODEL (the input stays untouched).",
                       "The positive prompt with the degraded latent attached (noise_concat).",
                       "The negative prompt with the degraded latent attached (noise_concat).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "SD2.1-base (512, eps-prediction) from the checkpoint loader."}),
            "clrface": ("BFR_CLRFACE", {"tooltip": "From BFR Load CLR-Face."}),
            "vae": ("VAE", {"tooltip": "The SD2.1 VAE, to encode the degraded image."}),
            "image": ("IMAGE", {"tooltip": "The degraded face(s) x^d (aligned crops, sides multiples of 8)."}),
            "positive": ("CONDITIONING", {"tooltip": "Prompt (empty is fine)."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative prompt (used with cfg > 1)."}),
        }}

    def apply(self, model, clrface, vae, image, positive, negative):
        if not isinstance(clrface, CLRFaceDenoiser):
            raise NodeInputError(APPLY_ID, f"clrface must come from {LOAD_ID}, got {type(clrface).__name__}.")
        m, pos, neg, _, image = patch_conditional_model(APPLY_ID, model, clrface.checkpoint, clrface.name, vae, image,
                                                        positive, negative)
        logger.info("%s: %s, %d image(s) %dx%d.", APPLY_ID, clrface.name, image.shape[0], image.shape[2],
                    image.shape[1])
        return m, pos, neg


NODE_CLASS_MAPPINGS = {"BFRLoadCLRFace": BFRLoadCLRFace, "BFRApplyCLRFace": BFRApplyCLRFace}
NODE_DISPLAY_NAME_MAPPINGS = {"BFRLoadCLRFace": LOAD_ID, "BFRApplyCLRFace": APPLY_ID}

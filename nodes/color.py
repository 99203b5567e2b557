"""Node family: colour fix (design.md §3.6), a thin adapter over :mod:`..pipelines.color`."""

from __future__ import annotations

import logging

import torch

from ..pipelines import color
from .helpers import NodeInputError, to_rgb

logger = logging.getLogger(__name__)

NODE_ID = "BFR Color Fix"  # display name; errors name the node as users see it
METHODS = ["wavelet", "adain"]


class BFRColorFix:
    """IMAGE + reference IMAGE -> IMAGE with the reference's colours and the image's detail."""

    DESCRIPTION = (
        "Restores the colours of a restored image from a reference (usually the low-quality input) while keeping "
        "the restored detail. wavelet (StableSR / DiffBIR): the image's high-frequency bands plus the reference's "
        "coarse band (5 dilated blur levels, colour and shading at about 32 px and above). adain (StableSR): "
        "per-channel mean and std of the reference. The reference is resized to the image's size when they differ; "
        "one reference image is used for every image of the batch. An alpha channel of the image is kept."
    )
    CATEGORY = "BFR/faces"
    FUNCTION = "fix"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The colour-fixed images: the image's size, batch and alpha channel.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "Restored images whose colours drifted (RGB; an alpha channel is "
                                               "passed through, gray is replicated to RGB)."}),
                "reference": ("IMAGE", {"tooltip": "Images with the right colours, e.g. the low-quality input; any "
                                                   "size (resized to the image's). One image, or one per image."}),
                "method": (METHODS, {"default": "wavelet",
                                     "tooltip": "wavelet: keeps the image's detail, takes colour and shading from "
                                                "the reference (DiffBIR's default). adain: matches each channel's "
                                                "mean and std to the reference's (global, keeps local shading)."}),
            },
        }

    def fix(self, image, reference, method):
        if method not in METHODS:
            raise NodeInputError(NODE_ID, f"method must be one of {METHODS}, got {method!r}.")
        rgb = to_rgb(NODE_ID, image, "image")
        ref = to_rgb(NODE_ID, reference, "reference")
        b = rgb.shape[0]
        if ref.shape[0] not in (1, b):
            raise NodeInputError(NODE_ID, f"reference has {ref.shape[0]} images but image has {b}: connect a single "
                                          "reference image (used for every image) or a batch of the same size, "
                                          "e.g. the images the restorer received.")
        try:
            out = color.color_fix(rgb.movedim(-1, 1), ref.to(rgb.device).movedim(-1, 1), method)
        except ValueError as exc:
            raise NodeInputError(NODE_ID, str(exc)) from exc
        out = out.movedim(1, -1)
        if image.shape[-1] in (2, 4):  # gray + alpha or RGBA: the alpha channel passes through
            out = torch.cat([out, image[..., -1:].to(out.dtype)], dim=-1)
        return (out.to(image.dtype),)


NODE_CLASS_MAPPINGS = {"BFRColorFix": BFRColorFix}
NODE_DISPLAY_NAME_MAPPINGS = {"BFRColorFix": NODE_ID}

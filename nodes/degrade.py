"""Node family: classical degradation synthesis (design.md §3.1)."""

from __future__ import annotations

import json
import logging

from ..pipelines import degradation
from ._comfy import progress_callback
from .helpers import NodeInputError, to_rgb

logger = logging.getLogger(__name__)

NODE_ID = "BFR Degrade (Classical)"  # display name; errors name the node as users see it


def _preset_names() -> list[str]:
    return list(degradation.PRESETS)


def parse_overrides(node: str, text: str) -> dict:
    """Parse the JSON overrides widget into keyword arguments for ``DegradationConfig.with_overrides``."""
    text = (text or "").strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise NodeInputError(
            node, f"overrides is not valid JSON ({exc.msg} at char {exc.pos}): {text!r}. "
            'Write e.g. {"blur_sigma": [1, 3], "jpeg_quality": [40, 60]} or leave it empty.'
        ) from exc
    if not isinstance(value, dict):
        raise NodeInputError(node, f"overrides must be a JSON object, got {type(value).__name__}: {text!r}.")
    return value


class BFRDegradeClassical:
    """IMAGE -> degraded IMAGE + a JSON report of every sampled parameter."""

    DESCRIPTION = (
        "Synthesizes realistic low-quality faces with the classical degradation model "
        "y = [(x * k) downsample + noise]_JPEG, resized back to the input size (GFPGAN / Real-ESRGAN style). "
        "Presets reproduce the training/test degradations of FlipNet, DR-BFR (=GFPGAN), DR2 (mild/medium/severe "
        "at x4/x8/x16) and CLR-Face. Deterministic from the seed; the report lists every sampled parameter per image."
    )
    CATEGORY = "BFR/degradation"
    FUNCTION = "degrade"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "report")
    OUTPUT_TOOLTIPS = (
        "The degraded images, same size as the input.",
        "JSON list with the sampled parameters of each image (kernel, scale, noise, JPEG quality, order).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        presets = _preset_names()
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "High-quality images to degrade (RGB; alpha is dropped, gray is "
                                               "replicated to RGB)."}),
                "preset": (presets, {"default": "flipnet" if "flipnet" in presets else presets[0],
                                     "tooltip": "Degradation ranges of a paper: flipnet (second-order, shuffled), "
                                                "dr-bfr (GFPGAN), dr2-<severity>-x<scale>, clr-face, or custom."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Same seed, same degradation. Each image of the batch gets its own "
                                            "parameters drawn from this seed."}),
                "backend": (["torch", "cv2"], {"default": "torch",
                                               "tooltip": "torch: batched on the image's device. cv2: per image "
                                                          "on the CPU (what `bfr degrade` uses). Same parameters, "
                                                          "same result within documented tolerances."}),
                "jpeg": (["libjpeg", "differentiable"], {"default": "libjpeg",
                                                          "tooltip": "libjpeg: the real codec per image. "
                                                                     "differentiable: kornia's codec (for "
                                                                     "gradients; slightly different artefacts)."}),
            },
            "optional": {
                "overrides": ("STRING", {"default": "", "multiline": True,
                                         "tooltip": "Optional JSON object overriding preset fields, e.g. "
                                                    '{"blur_sigma": [1, 3], "jpeg_quality": [40, 60]}. '
                                                    "The report shows the resulting ranges."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def degrade(self, image, preset, seed, backend, jpeg, overrides="", unique_id=None):
        try:
            config = degradation.get_preset(preset)
            kwargs = parse_overrides(NODE_ID, overrides)
            if kwargs:
                config = config.with_overrides(**kwargs)
        except (KeyError, ValueError, TypeError) as exc:
            if isinstance(exc, NodeInputError):
                raise
            raise NodeInputError(NODE_ID, str(exc)) from exc
        rgb = to_rgb(NODE_ID, image)  # empty batch, channels, NaN/inf, 0-255 or [-1, 1] scaling: clear errors
        progress = progress_callback(1, unique_id)
        bchw = rgb.movedim(-1, 1)
        try:
            out, params = degradation.degrade(bchw, config, seed=int(seed), backend=backend, jpeg=jpeg)
        except ValueError as exc:
            raise NodeInputError(NODE_ID, str(exc)) from exc
        progress(1)
        report = json.dumps({"preset": preset, "seed": int(seed), "backend": backend, "jpeg": jpeg,
                             "images": params}, indent=1)
        return (out.movedim(1, -1).to(image.dtype), report)


NODE_CLASS_MAPPINGS = {"BFRDegradeClassical": BFRDegradeClassical}
NODE_DISPLAY_NAME_MAPPINGS = {"BFRDegradeClassical": NODE_ID}

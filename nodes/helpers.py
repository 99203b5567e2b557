"""Helpers every node family shares: the user-error type and the IMAGE / LATENT conversions and checks."""

from __future__ import annotations

import logging
import math

import torch

from ..pipelines import dr2

logger = logging.getLogger(__name__)

# How far outside 0..1 an IMAGE may stray and still be clamped (with a logged warning) instead of rejected:
# bicubic/lanczos resizers ring past the range (up to ~1.45 / -0.45 on hard edges), while 0-255 or [-1, 1] data
# goes far beyond it (a 0-255 image exceeds 1.5 as soon as one pixel is brighter than 1.5/255).
RANGE_SLACK = 0.5


class NodeInputError(ValueError):
    """A user-facing input error: names the node, the bad value and the fix."""

    def __init__(self, node: str, message: str):
        super().__init__(f"[{node}] {message}")
        self.node = node


def to_rgb(node: str, image, name: str = "IMAGE") -> torch.Tensor:
    """IMAGE (B,H,W,C) -> (B,H,W,3) float in [0,1]: gray replicated, alpha dropped.

    Rejected with a :class:`NodeInputError` naming ``node`` and the input ``name``: not a 4-D tensor, an empty
    batch or zero size, other than 1-4 channels, NaN/inf, values beyond ``RANGE_SLACK`` outside 0..1 (0-255 or
    [-1, 1] scaled data). Values slightly outside 0..1 (resampling overshoot) are clamped, with a logged warning.
    """
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        raise NodeInputError(node, f"expected an {name} batch (B,H,W,C), got "
                                   f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}.")
    if image.shape[0] == 0:
        raise NodeInputError(node, f"the {name} batch is empty (0 images): the upstream node produced no image (e.g. "
                                   "an empty folder, or a filter/selection that matched nothing). Connect a source "
                                   "with at least one image.")
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise NodeInputError(node, f"{name} has zero size ({image.shape[2]}x{image.shape[1]} pixels); check the crop "
                                   "or resize upstream.")
    c = image.shape[-1]
    if c in (1, 2):
        image = image[..., :1].expand(*image.shape[:-1], 3)
    elif c == 4:
        image = image[..., :3]
    elif c != 3:
        raise NodeInputError(node, f"{name} has {c} channels; expected 1 (gray), 2 (gray+alpha), 3 (RGB) or 4 "
                                   "(RGBA).")
    if not torch.isfinite(image).all():
        raise NodeInputError(node, f"{name} contains NaN or inf pixels; fix the source (e.g. a broken upstream node).")
    image = image.float()
    lo, hi = float(image.min()), float(image.max())
    if hi > 1.0 + RANGE_SLACK:
        raise NodeInputError(node, f"{name} values go up to {hi:.4g}: it looks 0-255 scaled, but ComfyUI IMAGEs are "
                                   "floats in 0..1. Fix: divide by 255 upstream (or load it with a node that outputs "
                                   "ComfyUI IMAGEs, e.g. LoadImage).")
    if lo < -RANGE_SLACK:
        raise NodeInputError(node, f"{name} has negative values down to {lo:.4g}: it looks [-1, 1] scaled, but "
                                   "ComfyUI IMAGEs are floats in 0..1. Fix: map it with (x + 1) / 2 upstream.")
    if lo < 0.0 or hi > 1.0:
        logger.warning("[%s] %s values span [%.4g, %.4g] (resampling overshoot?); clamped to 0..1", node, name,
                       lo, hi)
    return image.clamp(0, 1)  # always a new tensor, never a view of the input


def check_latent(node: str, samples, name: str = "LATENT") -> torch.Tensor:
    """A LATENT's ``samples`` (B,C,h,w): rejected if not 4-D, empty, or not finite. Returned unchanged."""
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
        raise NodeInputError(node, f"expected a {name} of shape (B,C,h,w), got "
                                   f"{tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__}"
                                   "; connect the output of VAEEncode (image models only, no video latents).")
    if samples.shape[0] == 0 or samples.shape[-1] == 0 or samples.shape[-2] == 0:
        raise NodeInputError(node, f"the {name} is empty (shape {tuple(samples.shape)}): encode at least one image.")
    if not torch.isfinite(samples).all():
        raise NodeInputError(node, f"the {name} contains NaN or inf values; re-encode the image (a VAE in fp16 can "
                                   "overflow: try ComfyUI's --fp32-vae).")
    return samples


def check_megapixels(node: str, image: torch.Tensor, max_megapixels: float, what: str) -> None:
    """Reject images (B,H,W,C) above ``max_megapixels`` per image with a message that says how to proceed."""
    h, w = int(image.shape[1]), int(image.shape[2])
    mp = h * w / 1e6
    if not (isinstance(max_megapixels, (int, float)) and max_megapixels > 0):
        raise NodeInputError(node, f"max_megapixels must be a number > 0 (got {max_megapixels!r}).")
    if mp > max_megapixels:
        side = int(math.sqrt(max_megapixels * 1e6))
        raise NodeInputError(node, f"IMAGE is {w}x{h} = {mp:.3g} megapixels per image, above max_megapixels="
                                   f"{max_megapixels:g} (about {side}x{side}). {what} Crop the faces first (e.g. "
                                   "aligned 512x512 face crops) or downscale the image; raise max_megapixels only if "
                                   "the device has the memory and you accept the run time.")


def pad_to_multiple(image: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """:func:`..pipelines.dr2.pad_to_multiple` on an IMAGE (B,H,W,C); the output is cropped back later."""
    padded, size = dr2.pad_to_multiple(image.movedim(-1, 1), multiple)
    return padded.movedim(1, -1), size

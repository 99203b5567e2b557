"""Helpers every node family shares: the user-error type and the IMAGE / LATENT conversions and checks."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class NodeInputError(ValueError):
    """A user-facing input error: names the node, the bad value and the fix."""

    def __init__(self, node: str, message: str):
        super().__init__(f"[{node}] {message}")
        self.node = node


def to_rgb(node: str, image) -> torch.Tensor:
    """IMAGE (B,H,W,C) -> (B,H,W,3) float in [0,1]: gray replicated, alpha dropped, NaN/inf rejected."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        raise NodeInputError(node, f"expected an IMAGE batch (B,H,W,C), got {getattr(image, 'shape', type(image))}.")
    c = image.shape[-1]
    if c in (1, 2):
        image = image[..., :1].expand(*image.shape[:-1], 3)
    elif c == 4:
        image = image[..., :3]
    elif c != 3:
        raise NodeInputError(node, f"IMAGE has {c} channels; expected 1 (gray), 2 (gray+alpha), 3 (RGB) or 4 "
                                   "(RGBA).")
    if not torch.isfinite(image).all():
        raise NodeInputError(node, "IMAGE contains NaN or inf pixels; fix the source (e.g. a broken upstream node).")
    return image.float().clamp(0, 1)


def pad_to_multiple(image: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad (B,H,W,C) bottom/right to a multiple of ``multiple``; the output is cropped back later."""
    h, w = image.shape[1:3]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        image = F.pad(image.movedim(-1, 1), (0, pw, 0, ph), mode=mode).movedim(1, -1)
    return image, (h, w)

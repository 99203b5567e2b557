"""Labelled image panels (demo output, validation grids)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def to_uint8_hwc(image) -> np.ndarray:
    """Convert a (3,H,W)/(H,W,3) float [0,1] tensor/array or a uint8 array to uint8 HWC."""
    arr = image.detach().cpu().float().numpy() if hasattr(image, "detach") else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = np.transpose(arr, (1, 2, 0))
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return arr


def labelled_panel(rows: list[list[tuple[str, object]]], tile: int = 256, label_height: int = 18) -> Image.Image:
    """Lay out rows of (label, image) tiles, each resized to ``tile`` px, with the label drawn above it."""
    n_cols = max(len(r) for r in rows)
    cell_h = tile + label_height
    panel = Image.new("RGB", (n_cols * tile, len(rows) * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    font = ImageFont.load_default()
    for r, row in enumerate(rows):
        for c, (label, image) in enumerate(row):
            img = Image.fromarray(to_uint8_hwc(image)).resize((tile, tile), Image.Resampling.BICUBIC)
            x, y = c * tile, r * cell_h
            panel.paste(img, (x, y + label_height))
            draw.text((x + 3, y + 3), label[:40], fill=(0, 0, 0), font=font)
    return panel

"""Labelled image panels (demo output, validation grids)."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from .image_io import to_uint8


def labelled_panel(rows: list[list[tuple[str, object]]], tile: int = 256, label_height: int = 18) -> Image.Image:
    """Lay out rows of (label, image) tiles, each resized to ``tile`` px, with the label drawn above it."""
    n_cols = max(len(r) for r in rows)
    cell_h = tile + label_height
    panel = Image.new("RGB", (n_cols * tile, len(rows) * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    font = ImageFont.load_default()
    for r, row in enumerate(rows):
        for c, (label, image) in enumerate(row):
            img = Image.fromarray(to_uint8(image)).resize((tile, tile), Image.Resampling.BICUBIC)
            x, y = c * tile, r * cell_h
            panel.paste(img, (x, y + label_height))
            draw.text((x + 3, y + 3), label[:40], fill=(0, 0, 0), font=font)
    return panel

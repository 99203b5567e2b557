"""Labelled image panels (demo output, validation grids).

A panel is rows of tiles, each with a one-line label above it. A tile is ``(label, image)`` or ``(label, image,
span)``: the image is fitted into ``span`` x 1 tile cells keeping its aspect ratio (a 2:1 photo with span 2 fills
its cells), centred on white. An image can instead be a :class:`Note`: a tile of text that says what is *not*
shown (a step that did not run), drawn so that nobody takes it for a result.

A flat image (every pixel about the same value: a black, white or grey tile) is never a plausible result of a
restorer or a degradation, but it is what a failed step typically produces (NaNs clamped to 0, a decoder that
returns zeros). :func:`labelled_panel` refuses it (``on_flat="raise"``, :class:`FlatTileError`) or marks it in red
(``on_flat="mark"``) instead of showing it as if it were a result.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .image_io import to_uint8

FLAT_STD = 2.0  # uint8 levels: below this standard deviation over the whole tile, the tile counts as flat


class FlatTileError(ValueError):
    """A tile that should show a result is flat (one colour); the message names the tile."""


@dataclass(frozen=True)
class Note:
    """A text tile in place of an image: what is missing and why (never counted as a result)."""

    text: str


def is_flat(image, threshold: float = FLAT_STD) -> bool:
    """True when the image has (almost) one value everywhere: its uint8 standard deviation is below ``threshold``."""
    return float(to_uint8(image).astype(np.float32).std()) < threshold


def _fit(image, width: int, height: int) -> Image.Image:
    """The image resized (bicubic) to fit ``width`` x ``height`` with its aspect ratio, centred on white."""
    img = Image.fromarray(to_uint8(image))
    s = min(width / img.width, height / img.height)
    w, h = max(int(round(img.width * s)), 1), max(int(round(img.height * s)), 1)
    cell = Image.new("RGB", (width, height), (255, 255, 255))
    cell.paste(img.resize((w, h), Image.Resampling.BICUBIC), ((width - w) // 2, (height - h) // 2))
    return cell


def _note_tile(text: str, width: int, height: int, font) -> Image.Image:
    """Light hatched grey with dark red wrapped text: unmistakably a message, not a picture."""
    cell = Image.new("RGB", (width, height), (236, 236, 236))
    draw = ImageDraw.Draw(cell)
    for x in range(-height, width, 12):
        draw.line([(x, height), (x + height, 0)], fill=(222, 222, 222), width=3)
    chars = max(int(width / 6.2), 8)
    lines = [line for para in text.split("\n") for line in (textwrap.wrap(para, chars) or [""])]
    y = 6
    for line in lines:
        if y > height - 12:
            break
        draw.text((6, y), line, fill=(150, 20, 20), font=font)
        y += 12
    draw.rectangle([0, 0, width - 1, height - 1], outline=(150, 20, 20), width=2)
    return cell


def _label(draw, text: str, x: int, y: int, width: int, font, fill) -> None:
    """One line, cut with '...' to the cell width."""
    if draw.textlength(text, font=font) > width - 6:
        while text and draw.textlength(text + "...", font=font) > width - 6:
            text = text[:-1]
        text += "..."
    draw.text((x + 3, y + 3), text, fill=fill, font=font)


def labelled_panel(rows: list[list[tuple]], tile: int = 256, label_height: int = 18,
                   on_flat: str = "raise") -> Image.Image:
    """Lay out rows of ``(label, image[, span])`` tiles (see the module doc), each label drawn above its tile.

    ``on_flat``: ``"raise"`` (:class:`FlatTileError` for a flat image tile), ``"mark"`` (a red border and a
    'FLAT' label) or ``"allow"``. :class:`Note` tiles are never checked.
    """
    if on_flat not in ("raise", "mark", "allow"):
        raise ValueError(f"on_flat must be 'raise', 'mark' or 'allow' (got {on_flat!r})")
    spans = [[int(item[2]) if len(item) > 2 else 1 for item in row] for row in rows]
    n_cols = max(sum(s) for s in spans)
    cell_h = tile + label_height
    panel = Image.new("RGB", (n_cols * tile, len(rows) * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    font = ImageFont.load_default()
    for r, row in enumerate(rows):
        x = 0
        for item, span in zip(row, spans[r]):
            label, image = item[0], item[1]
            width, y = span * tile, r * cell_h
            color = (0, 0, 0)
            if isinstance(image, Note):
                cell = _note_tile(image.text, width, tile, font)
                color = (150, 20, 20)
            else:
                cell = _fit(image, width, tile)
                if on_flat != "allow" and is_flat(image):
                    if on_flat == "raise":
                        raise FlatTileError(f"panel tile {label!r} is a flat image (one colour): a failed step, not "
                                            "a result")
                    ImageDraw.Draw(cell).rectangle([0, 0, width - 1, tile - 1], outline=(220, 0, 0), width=4)
                    label, color = f"FLAT, NOT A RESULT: {label}", (220, 0, 0)
            panel.paste(cell, (x, y + label_height))
            _label(draw, label, x, y, width, font, color)
            x += width
    return panel

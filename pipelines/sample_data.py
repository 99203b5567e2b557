"""Offline sample faces for demos and tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def sample_face(size: int = 512) -> np.ndarray:
    """The astronaut portrait from scikit-image (public domain, NASA), cropped to the face, uint8 HWC."""
    try:
        from skimage import data
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("The sample face needs scikit-image (`pip install scikit-image`), "
                          "or pass your own image with --image PATH.") from exc
    img = data.astronaut()[20:260, 110:350]  # 240x240 crop around the face
    return np.array(Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC))


def load_image(path: str | Path, size: int | None = None) -> np.ndarray:
    """Read an image file as uint8 RGB HWC, optionally resized to a square ``size``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size:
                im = im.resize((size, size), Image.Resampling.BICUBIC)
            return np.array(im)
    except OSError as exc:
        raise ValueError(f"cannot read image {path}: {exc}. Use a PNG/JPEG/WebP file.") from exc

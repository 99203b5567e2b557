"""Offline sample faces for demos and tests (no downloads)."""

from __future__ import annotations

import numpy as np

from .image_io import resize_uint8


def sample_face(size: int = 512) -> np.ndarray:
    """The astronaut portrait from scikit-image (public domain, NASA), cropped to the face, uint8 HWC."""
    try:
        from skimage import data
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("The sample face needs scikit-image (`pip install scikit-image`), "
                          "or pass your own image with --image PATH.") from exc
    img = data.astronaut()[20:260, 110:350]  # 240x240 crop around the face
    return resize_uint8(np.ascontiguousarray(img), size, size)

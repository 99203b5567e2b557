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


def sample_group_photo() -> np.ndarray:
    """A 1024x512 multi-face photo from scikit-image's two real portraits (public domain): the astronaut (left),
    the cameraman (right) and a mirrored crop of the astronaut's face pasted at the bottom right; uint8 HWC."""
    try:
        from skimage import data
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("The sample photo needs scikit-image (`pip install scikit-image`).") from exc
    camera = np.repeat(data.camera()[..., None], 3, axis=2)
    canvas = np.concatenate([data.astronaut(), camera], axis=1)
    canvas[300:500, 812:1012] = data.astronaut()[40:240, 140:340][:, ::-1]
    return np.ascontiguousarray(canvas)

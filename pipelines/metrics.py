"""Full-reference image metrics and landmark distance as BFR papers report them, in plain torch / numpy.

- :func:`psnr`: ``10 log10(data_range^2 / MSE)``, the MSE over all pixels and channels of an image; identical
  images give ``inf`` (as basicsr's ``calculate_psnr`` and scikit-image's ``peak_signal_noise_ratio``).
- :func:`ssim`: Wang et al. 2004 (IEEE TIP 13(4)) with their constants, the variant basicsr's ``calculate_ssim``
  computes: an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, population (not sample) variances, the SSIM
  map over the "valid" region only (no padding: 5 px lost on each side), averaged over that region and over the
  channels. scikit-image's ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``
  is the same number (tests/test_metrics.py holds us to it on real photos).
- ``y_channel=True``: both metrics on the ITU-R BT.601 luma of the RGB image in studio range, as basicsr's
  ``to_y_channel`` (``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` on [0, 1] RGB, in [16, 235] / 255).
- ``crop_border``: that many pixels dropped on each side first (basicsr's ``crop_border``, the SR scale in SR papers).
- :func:`lmd`: the mean Euclidean distance between corresponding landmarks (pixels, or a fraction of the
  reference's interocular distance).

Images are (H, W, C) or (H, W), numpy or torch, float in [0, ``data_range``] or uint8 (read as x / 255, so keep
``data_range=1``), giving a Python float; a batch (B, H, W, C) (ComfyUI ``IMAGE``) gives one value per image
(a float64 tensor for torch input, an ndarray for numpy). Everything is computed in float64 on the input's device.
:func:`file_record` is the ``{file, sha256}`` entry a metric report gives for each weight file it used.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
# ITU-R BT.601 studio-range luma from [0, 1] RGB, times 255 (basicsr / MATLAB rgb2ycbcr)
BT601_Y = (65.481, 128.553, 24.966)
BT601_Y_OFFSET = 16.0


# ------------------------------------------------------------------------------------------------ inputs
def _as_bchw(x, name: str) -> tuple[torch.Tensor, int, bool]:
    """-> (float64 (B, C, H, W) tensor, number of input dims, whether the input was torch)."""
    is_torch = isinstance(x, torch.Tensor)
    t = x.detach() if is_torch else torch.from_numpy(np.ascontiguousarray(np.asarray(x)))
    nd = t.dim()
    if nd not in (2, 3, 4):
        raise ValueError(f"{name} must be (H, W), (H, W, C) or (B, H, W, C), got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        t = t.to(torch.float64) / 255.0
    elif t.is_floating_point():
        t = t.to(torch.float64) if t.device.type != "mps" else t.cpu().to(torch.float64)
    else:
        raise TypeError(f"{name} must be float (in [0, data_range]) or uint8, got dtype {t.dtype}")
    if nd == 2:
        t = t[None, :, :, None]
    elif nd == 3:
        t = t[None]
    return t.permute(0, 3, 1, 2), nd, is_torch


def _pair(a, b, crop_border: int, y_channel: bool, data_range: float):
    x, nd, is_torch = _as_bchw(a, "a")
    y, nd_b, _ = _as_bchw(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(x.permute(0, 2, 3, 1).shape)} and "
                         f"{tuple(y.permute(0, 2, 3, 1).shape)} (as (B, H, W, C))")
    y = y.to(x.device)
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    c = int(crop_border)
    if c < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    if c:
        if 2 * c >= min(x.shape[-2:]):
            raise ValueError(f"crop_border={c} leaves nothing of a {x.shape[-2]}x{x.shape[-1]} image")
        x, y = x[..., c:-c, c:-c], y[..., c:-c, c:-c]
    if y_channel:
        x, y = rgb_to_y(x, data_range, channel_dim=1), rgb_to_y(y, data_range, channel_dim=1)
    return x, y, nd == 4 or nd_b == 4, is_torch


def _out(values: torch.Tensor, batched: bool, is_torch: bool):
    if not batched:
        return float(values[0])
    return values if is_torch else values.cpu().numpy()


def rgb_to_y(rgb, data_range: float = 1.0, channel_dim: int = -1):
    """ITU-R BT.601 studio-range luma (basicsr's ``to_y_channel``) of RGB in [0, data_range], in the same units
    (so [16, 235] / 255 * data_range), keeping the channel dim with size 1. numpy or torch."""
    if rgb.shape[channel_dim] != 3:
        raise ValueError(f"y_channel needs RGB images (3 channels), got {rgb.shape[channel_dim]} channels")
    if isinstance(rgb, torch.Tensor):
        w = torch.tensor(BT601_Y, dtype=rgb.dtype if rgb.is_floating_point() else torch.float64, device=rgb.device)
        r, g, b = rgb.unbind(channel_dim)
        y = (BT601_Y_OFFSET * data_range + w[0] * r + w[1] * g + w[2] * b) / 255.0
        return y.unsqueeze(channel_dim)
    a = np.moveaxis(np.asarray(rgb, np.float64), channel_dim, -1)
    y = (BT601_Y_OFFSET * data_range + a @ np.asarray(BT601_Y)) / 255.0
    return np.moveaxis(y[..., None], -1, channel_dim)


# ------------------------------------------------------------------------------------------------ metrics
def psnr(a, b, data_range: float = 1.0, crop_border: int = 0, y_channel: bool = False):
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range^2 / MSE)``; ``inf`` for identical images.

    See the module docstring for the input forms; a batch gives one value per image.
    """
    x, y, batched, is_torch = _pair(a, b, crop_border, y_channel, data_range)
    mse = (x - y).pow(2).flatten(1).mean(1)
    vals = 10.0 * torch.log10(float(data_range) ** 2 / mse)  # mse == 0 -> inf
    return _out(vals, batched, is_torch)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, dtype=torch.float64, device=None):
    """The normalised 1-D Gaussian (``cv2.getGaussianKernel(size, sigma)``); SSIM's 2-D window is its outer
    product."""
    r = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2.0
    g = torch.exp(-(r * r) / (2.0 * sigma * sigma))
    return g / g.sum()


def _ssim_one(x: torch.Tensor, y: torch.Tensor, data_range: float) -> torch.Tensor:
    """SSIM of one (1, C, H, W) pair: mean over the valid region and the channels."""
    g = gaussian_window(device=x.device).tolist()
    k = len(g)

    def blur(t):  # separable "valid" filtering as weighted shifted sums (float64 conv2d is slow on CPU)
        h, w = t.shape[-2:]
        t = sum(g[i] * t[..., i:i + w - k + 1] for i in range(k))
        return sum(g[i] * t[..., i:i + h - k + 1, :] for i in range(k))

    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    mx, my, xx, yy, xy = blur(torch.cat([x, y, x * x, y * y, x * y])).unbind(0)
    vx = xx - mx * mx
    vy = yy - my * my
    cxy = xy - mx * my
    m = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return m.mean()


def ssim(a, b, data_range: float = 1.0, crop_border: int = 0, y_channel: bool = False):
    """Structural similarity (Wang et al. 2004; basicsr's ``calculate_ssim``): 11x11 Gaussian window with
    sigma 1.5, K1 = 0.01, K2 = 0.03, valid region only, mean over the channels. Images must be at least 11 px on
    each side (after ``crop_border``). A batch gives one value per image."""
    x, y, batched, is_torch = _pair(a, b, crop_border, y_channel, data_range)
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} px, got "
                         f"{x.shape[-2]}x{x.shape[-1]}")
    vals = torch.stack([_ssim_one(x[i:i + 1], y[i:i + 1], float(data_range)) for i in range(x.shape[0])])
    return _out(vals, batched, is_torch)


# ------------------------------------------------------------------------------------------------ landmarks
def _eye_centres(p: np.ndarray, eyes) -> tuple[np.ndarray, np.ndarray]:
    n = p.shape[-2]
    if eyes is not None:
        i, j = eyes
        return p[..., i, :], p[..., j, :]
    if n == 5:  # FFHQ order (Detection.landmarks): image-left eye centre, image-right eye centre, ...
        return p[..., 0, :], p[..., 1, :]
    if n == 68:  # iBUG 300-W: eye contours 36-41 and 42-47
        return p[..., 36:42, :].mean(-2), p[..., 42:48, :].mean(-2)
    raise ValueError(f"interocular normalisation knows 5 (FFHQ order) and 68-point landmarks, got {n} points; "
                     "pass eyes=(i, j), the indices of the two eye points")


def lmd(landmarks_a, landmarks_b, normalize: str = "none", eyes: tuple[int, int] | None = None):
    """Landmark distance: the mean Euclidean distance between corresponding points of (N, 2) landmarks, or per
    face of (B, N, 2) batches.

    ``normalize="none"``: in pixels (the LMD BFR papers report on 512 px crops); ``"interocular"``: divided by the
    distance between the eye centres of ``landmarks_b`` (the reference), for 5 FFHQ-order points (points 0 and 1),
    68 iBUG points (the means of 36-41 and 42-47), or the points ``eyes=(i, j)``.
    """
    a = np.asarray(landmarks_a, np.float64)
    b = np.asarray(landmarks_b, np.float64)
    if a.shape != b.shape or a.ndim not in (2, 3) or a.shape[-1] != 2:
        raise ValueError(f"landmarks must both be (N, 2) or (B, N, 2), got {a.shape} and {b.shape}")
    d = np.sqrt(((a - b) ** 2).sum(-1)).mean(-1)
    if normalize == "interocular":
        l_eye, r_eye = _eye_centres(b, eyes)
        iod = np.sqrt(((l_eye - r_eye) ** 2).sum(-1))
        if np.any(iod <= 0):
            raise ValueError("the reference landmarks have coincident eye points (interocular distance 0)")
        d = d / iod
    elif normalize != "none":
        raise ValueError(f"normalize must be 'none' or 'interocular', got {normalize!r}")
    return float(d) if a.ndim == 2 else d


# ------------------------------------------------------------------------------------------------ provenance
_SHA256: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 (hex) of a file, computed once per (path, size, mtime) and cached."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA256[key] = h.hexdigest()
    return _SHA256[key]


def file_record(path: str | os.PathLike) -> dict[str, str]:
    """``{"file": name, "sha256": hex}``: how a metric report names one weight file it used."""
    return {"file": Path(path).name, "sha256": file_sha256(path)}



__all__ = ["BT601_Y", "SSIM_K1", "SSIM_K2", "SSIM_SIGMA", "SSIM_WINDOW", "file_record", "file_sha256",
           "gaussian_window", "lmd", "psnr", "rgb_to_y", "ssim"]

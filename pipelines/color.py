"""Colour fix of a restored image against a reference (design.md §3.6, algorithm-notes §4.2). Pure torch.

Diffusion restorers drift in colour; both fixes below take the colours of a reference (the low-quality input, or
a stage-1 cleaned image, resized to the output) and keep the detail of the restored image:

* **wavelet** (StableSR ``scripts/wavelet_color_fix.py`` ``wavelet_reconstruction``; DiffBIR
  ``diffbir/utils/common.py``, which applies it to every output): ``high(image) + low(reference)``, where a
  5-level dilated ("a trous") blur pyramid splits an image into its high-frequency bands and its coarsest low
  band. The output has the restored image's detail and the reference's colour and shading at scales of about
  2^levels px (~32 px for 5 levels) and above.
* **adain** (StableSR ``adaptive_instance_normalization``, "used in paper"): per-image, per-channel affine map
  that gives the restored image the reference's mean and std, optionally measured inside a (face) mask.

Tensors are (B,C,H,W) floats in [0,1], any channel count; the work is done in float32 and the result comes back
in the input's dtype, clamped to [0,1]. A reference batch of one is used for every image.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "adain_color_fix", "color_fix", "wavelet_blur", "wavelet_color_fix", "wavelet_decomposition"]

METHODS = ("none", "wavelet", "adain")

# The 3x3 binomial (B1-spline) kernel of the a trous wavelet, as StableSR/DiffBIR.
_KERNEL = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0


def _check_image(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (B,C,H,W) in [0,1], got {type(x).__name__}.")
    if x.ndim != 4:
        raise ValueError(f"{name} must be a (B,C,H,W) batch, got shape {tuple(x.shape)}.")
    if 0 in x.shape:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}.")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be float in [0,1], got dtype {x.dtype}; use x.float() / 255.")


def _check_levels(levels) -> int:
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels must be an integer >= 1 (5 in StableSR/DiffBIR), got {levels!r}.")
    return levels


def _pair(image: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both checked, float32 on the image's device; a reference batch of one expanded to the image batch."""
    _check_image(image, "image")
    _check_image(reference, "reference")
    b, c = image.shape[:2]
    if reference.shape[1] != c:
        raise ValueError(f"reference has {reference.shape[1]} channels but image has {c}; give both the same "
                         "channels (e.g. drop the alpha channel, or replicate a gray reference to RGB).")
    if reference.shape[0] not in (1, b):
        raise ValueError(f"reference has {reference.shape[0]} images but image has {b}; give one reference (used for "
                         "every image) or one per image.")
    ref = reference.to(device=image.device, dtype=torch.float32)
    return image.float(), ref.expand(b, -1, -1, -1)


def _resize_to(reference: torch.Tensor, size) -> torch.Tensor:
    """The reference at ``size`` (bicubic, antialiased when shrinking; as DiffBIR resizes); unchanged if equal."""
    if tuple(reference.shape[-2:]) == tuple(size):
        return reference
    return F.interpolate(reference, size=tuple(size), mode="bicubic", align_corners=False, antialias=True)


def wavelet_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Depthwise 3x3 binomial blur with dilation ``radius`` (taps at 0, +-radius), replicate borders.

    StableSR ``wavelet_blur``: pad by ``radius`` with edge replication, then a per-channel convolution of the
    kernel ``[[1,2,1],[2,4,2],[1,2,1]]/16`` dilated by ``radius``. Any channel count; same size out.
    """
    c = x.shape[1]
    weight = _KERNEL.to(device=x.device, dtype=x.dtype).expand(c, 1, 3, 3)
    r = int(radius)
    if r < 1:
        raise ValueError(f"radius must be an integer >= 1, got {radius!r}.")
    return F.conv2d(F.pad(x, (r, r, r, r), mode="replicate"), weight, groups=c, dilation=r)


def _decompose(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    high = torch.zeros_like(x)
    for i in range(levels):
        low = wavelet_blur(x, 2**i)
        high += x - low
        x = low
    return high, x


def wavelet_decomposition(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``x`` (B,C,H,W) into (high, low) with an a trous pyramid of ``levels`` blurs (StableSR/DiffBIR).

    Level i blurs the previous low band with :func:`wavelet_blur` at radius 2^i; ``high`` is the sum of the
    differences (all detail bands), ``low`` the last blur, so ``high + low == x`` up to float rounding. A
    constant image has a zero high band. Computed in float32, returned in ``x``'s dtype.
    """
    _check_image(x, "x")
    high, low = _decompose(x.float(), _check_levels(levels))
    return high.to(x.dtype), low.to(x.dtype)


def wavelet_color_fix(image: torch.Tensor, reference: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """``high(image) + low(reference)``, clamped to [0,1] (StableSR/DiffBIR ``wavelet_reconstruction``).

    Keeps the restored image's detail bands and takes the coarse colour/shading band from ``reference``, which
    is resized to the image's size (bicubic, antialiased) when the sizes differ. A reference batch of one is used
    for every image. Returns the image's dtype.
    """
    levels = _check_levels(levels)
    img, ref = _pair(image, reference)
    high, _ = _decompose(img, levels)
    _, low = _decompose(_resize_to(ref, img.shape[-2:]), levels)
    return (high + low).clamp(0.0, 1.0).to(image.dtype)


def _mask_weights(mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """The mask as (B,1,H,W) float32 weights on the image's device, checked."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor (B,1,H,W) or (B,H,W), got {type(mask).__name__}.")
    w = mask[:, None] if mask.ndim == 3 else mask
    b, _, h, wd = image.shape
    if w.ndim != 4 or w.shape[1] != 1 or w.shape[0] not in (1, b) or tuple(w.shape[-2:]) != (h, wd):
        raise ValueError(f"mask must be (B,1,H,W) or (B,H,W) with B in (1, {b}) and the image's size {h}x{wd}, got "
                         f"shape {tuple(mask.shape)}.")
    w = w.to(device=image.device, dtype=torch.float32).expand(b, -1, -1, -1)
    if not torch.isfinite(w).all() or bool((w < 0).any()):
        raise ValueError("mask weights must be finite and >= 0 (1 = use the pixel for the statistics).")
    empty = (w.sum(dim=(-2, -1)) <= 0).flatten().nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"mask is empty for image(s) {empty}: no pixel to take the statistics from.")
    return w


def _mean_std(x: torch.Tensor, eps: float, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel mean and sqrt(unbiased var + eps) over H*W (StableSR ``calc_mean_std``).

    With weights ``w`` (B,1,H,W): weighted mean and the unbiased reliability-weighted variance
    ``sum w (x-mu)^2 / (V1 - V2/V1)`` (V1 = sum w, V2 = sum w^2); for a 0/1 mask this is torch's unbiased variance
    of the masked pixels.
    """
    if w is None:
        flat = x.flatten(2)
        var = flat.var(dim=-1, unbiased=True) if flat.shape[-1] > 1 else torch.zeros_like(flat[..., 0])
        return flat.mean(dim=-1)[..., None, None], (var + eps).sqrt()[..., None, None]
    v1 = w.sum(dim=(-2, -1), keepdim=True)
    v2 = (w * w).sum(dim=(-2, -1), keepdim=True)
    mu = (w * x).sum(dim=(-2, -1), keepdim=True) / v1
    denom = v1 - v2 / v1
    ss = (w * (x - mu) ** 2).sum(dim=(-2, -1), keepdim=True)
    var = torch.where(denom > 0, ss / denom.clamp_min(1e-12), torch.zeros_like(ss))  # one pixel: variance 0
    return mu, (var + eps).sqrt()


def adain_color_fix(image: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """AdaIN colour transfer (StableSR ``adaptive_instance_normalization``), clamped to [0,1].

    ``(x - mu_x) / sigma_x * sigma_r + mu_r`` per image and channel, with ``sigma = sqrt(unbiased var + eps)``.
    Without a mask the reference's statistics are taken at its own size. ``mask`` (B,1,H,W) or (B,H,W) at the
    image's size, weights >= 0 (e.g. a face mask) restricts the statistics of both images to the masked pixels;
    the reference is then resized to the image's size so the mask covers the same region. The map itself is
    applied to every pixel: blend with the mask afterwards to confine the change. Returns the image's dtype.
    """
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps >= 0):
        raise ValueError(f"eps must be a number >= 0, got {eps!r}.")
    img, ref = _pair(image, reference)
    w = None
    if mask is not None:
        w = _mask_weights(mask, img)
        ref = _resize_to(ref, img.shape[-2:])
    mu_x, sd_x = _mean_std(img, float(eps), w)
    mu_r, sd_r = _mean_std(ref, float(eps), w)
    if bool((sd_x == 0).any()):
        raise ValueError("image has a channel with zero variance and eps=0; use eps > 0 (1e-5 in StableSR).")
    return ((img - mu_x) / sd_x * sd_r + mu_r).clamp(0.0, 1.0).to(image.dtype)


def color_fix(image: torch.Tensor, reference: torch.Tensor, method: str, *,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatch: ``"none"`` (the image unchanged), ``"wavelet"`` or ``"adain"`` (``mask`` for adain only)."""
    if method not in METHODS:
        raise ValueError(f"unknown colour-fix method {method!r}; choose one of {', '.join(map(repr, METHODS))}.")
    if mask is not None and method != "adain":
        raise ValueError(f"mask is only used by method 'adain', got method={method!r}; blend the wavelet result "
                         "with the mask instead.")
    if method == "none":
        _check_image(image, "image")
        return image
    if method == "wavelet":
        return wavelet_color_fix(image, reference)
    return adain_color_fix(image, reference, mask=mask)

"""Image-quality metrics beyond PSNR/SSIM, each saying which weights it used or why it was skipped.

Every metric here returns a :class:`MetricResult`: ``value`` (or ``None``), ``weights`` (the ``{file, sha256}``
records of :func:`.metrics.file_record`) and ``skipped`` (a sentence naming the missing file or package and where
it is looked for). Nothing is downloaded, nothing heavy is imported at module import.

- :func:`niqe`: NIQE, Mittal, Soundararajan & Bovik, "Making a completely blind image quality analyzer", IEEE SPL
  20(3) 2013, written from the paper and the authors' MATLAB release semantics: MSCN coefficients with a 7x7
  Gaussian (sigma 7/6, replicate borders), 96x96 patches, 18 (A)GGD features per patch at two scales (the second
  after a MATLAB-style antialiased bicubic halving), a multivariate Gaussian fit, and the distance
  ``sqrt((mu_p - mu_d)^T ((S_p + S_d)/2)^+ (mu_p - mu_d))`` to the pristine model. The pristine model (``mu`` 36-d,
  ``cov`` 36x36) is the MATLAB release's, shipped as ``data/niqe_pris_params.npz`` (the file BasicSR 1.4.2
  distributes, Apache-2.0, https://github.com/XPixelGroup/BasicSR, ``basicsr/metrics/niqe_pris_params.npz``; data
  only, no code taken).
- :class:`LPIPS`: Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric", CVPR 2018
  (v0.1): unit-normalised AlexNet / VGG16 activations, squared differences weighted by the learned 1x1 heads,
  spatial mean, summed over layers. Our own network code; it needs two files: the heads (``alex.pth`` /
  ``vgg.pth`` of the ``lpips`` package's ``weights/v0.1/``, found in an installed ``lpips`` or ``--lpips-dir``) and
  the ImageNet backbone torchvision publishes (``alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth`` in the torch
  hub cache ``$TORCH_HOME/hub/checkpoints``), both read with ``torch.load(weights_only=True)``.
- :func:`frechet_distance` + :class:`FID`: Heusel et al. 2017, ``|mu1-mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2)`` on
  the 2048-d pool3 features of pytorch-fid's Inception-v3, our own network code (:mod:`.fid_inception`, no
  torchvision, no pytorch-fid at run time; features equal pytorch-fid's on the same weights) with pytorch-fid's
  ``pt_inception-2015-12-05-6726825d.pth`` (torch hub cache or a given path, layout checked key for key);
  without it FID is skipped naming the file.
- :class:`CLIPIQA`: Wang, Chan & Loy, AAAI 2023, on CLIP RN50 (:mod:`.clipiqa`, our network code; towers equal
  open_clip's on the same weights): softmax of the scaled cosines to "Good photo." / "Bad photo.", the image at its
  own size without the attention pool's positional embedding. Needs a CLIP RN50 state dict (``--clipiqa-weights``
  or ``$BFR_CLIP_RN50``), otherwise skipped naming it.
- :class:`MUSIQ`: Ke et al., ICCV 2021, multi-scale patch Transformer (:mod:`.musiq`, our network code; scores equal
  pyiqa's on the same weights) with one of pyiqa's release files (default ``musiq_koniq_ckpt-e95806b9.pth``:
  ``--musiq-weights``, ``$BFR_MUSIQ`` or pyiqa's cache ``$TORCH_HOME/hub/pyiqa``); without one it is skipped with
  :data:`MUSIQ_SKIP` naming the file and those places.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from collections.abc import Callable
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from .metrics import file_record

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
NIQE_PARAMS = DATA_DIR / "niqe_pris_params.npz"
NIQE_PATCH = 96
NIQE_WINDOW = 7
NIQE_SIGMA = 7.0 / 6.0
_GAMMA_GRID = np.arange(200, 10001, dtype=np.float64) / 1000.0  # 0.2:0.001:10, as in the MATLAB release

LPIPS_NETS = ("alex", "vgg")
LPIPS_BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
LPIPS_HEAD_FILES = {"alex": "alex.pth", "vgg": "vgg.pth"}
FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"


@dataclass
class MetricResult:
    """A metric value, the weight files it used, or the reason it was skipped."""

    name: str
    value: float | None = None
    weights: list[dict] = field(default_factory=list)
    skipped: str | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "value": self.value, "weights": self.weights, "skipped": self.skipped}


def unavailable(name: str, why: str) -> MetricResult:
    """A skipped metric with its reason (logged once per name and reason)."""
    _log_skip(name, why)
    return MetricResult(name, skipped=why)


@lru_cache(maxsize=None)
def _log_skip(name: str, why: str) -> None:
    logger.warning("%s skipped: %s", name, why)


MUSIQ_SKIP = ("MUSIQ is not available: it needs pyiqa's MUSIQ weights {file} (the {dataset} model), looked for as "
              "--musiq-weights FILE, ${env} and in pyiqa's cache {cache}; copy it there from a machine that has it "
              "(pyiqa downloads it on first use of its 'musiq' metric); the other metrics still run")
MUSIQ_ENV = "BFR_MUSIQ"
CLIPIQA_ENV = "BFR_CLIP_RN50"


def torch_hub_checkpoints() -> Path:
    """``$TORCH_HOME/hub/checkpoints`` (default ``~/.cache/torch/hub/checkpoints``): where torchvision keeps its
    downloaded weights. Only looked at, never downloaded into."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def pyiqa_cache() -> Path:
    """``$TORCH_HOME/hub/pyiqa`` (default ``~/.cache/torch/hub/pyiqa``): where pyiqa keeps the weight files it
    downloads. Only looked at, never downloaded into."""
    return Path(torch.hub.get_dir()) / "pyiqa"


# ================================================================================================ NIQE
def gaussian_window_2d(size: int = NIQE_WINDOW, sigma: float = NIQE_SIGMA) -> np.ndarray:
    """MATLAB ``fspecial('gaussian', size, sigma)``: a normalised 2-D Gaussian."""
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2.0 * sigma * sigma))
    return g / g.sum()


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB ``imresize`` 'bicubic')."""
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    return ((1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
            + (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2)))


def _resize_weights(in_len: int, out_len: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(out_len, P) source indices (0-based, mirrored at the borders) and weights of MATLAB's antialiased bicubic
    resize along one axis."""
    width = 4.0 / scale if scale < 1 else 4.0
    u = np.arange(1, out_len + 1, dtype=np.float64)
    x = u / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(x - width / 2.0)
    taps = int(math.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps)[None, :]
    dist = x[:, None] - idx
    w = scale * _cubic(scale * dist) if scale < 1 else _cubic(dist)
    w = w / w.sum(1, keepdims=True)
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len)[::-1]])
    idx = mirror[np.mod(idx.astype(np.int64) - 1, 2 * in_len)]
    keep = np.any(w != 0, axis=0)
    return idx[:, keep], w[:, keep]


def imresize_matlab(img: np.ndarray, scale: float) -> np.ndarray:
    """A 2-D float image resized by ``scale`` as MATLAB ``imresize(img, scale)`` does (bicubic, antialiased when
    shrinking, symmetric borders), in float64 without rounding."""
    img = np.asarray(img, np.float64)
    h, w = img.shape
    oh, ow = int(math.ceil(h * scale)), int(math.ceil(w * scale))
    ri, rw = _resize_weights(h, oh, scale)
    out = (img[ri] * rw[:, :, None]).sum(1)
    ci, cw = _resize_weights(w, ow, scale)
    return (out[:, ci] * cw[None]).sum(2)


def _replicate_filter(img: np.ndarray, window: np.ndarray) -> np.ndarray:
    """``imfilter(img, window, 'replicate')`` for a symmetric window."""
    k = window.shape[0] // 2
    p = np.pad(img, k, mode="edge")
    h, w = img.shape
    out = np.zeros_like(img)
    for i in range(window.shape[0]):
        for j in range(window.shape[1]):
            out += window[i, j] * p[i:i + h, j:j + w]
    return out


def _lgamma(x):
    from scipy.special import gammaln

    return gammaln(x)


def _aggd_fit(vec: np.ndarray) -> tuple[float, float, float]:
    """Asymmetric generalised Gaussian fit by moment matching over the shape grid 0.2:0.001:10 (Lasmar et al. 2009,
    as NIQE's MATLAB ``estimateaggdparam``): (shape alpha, left scale beta_l, right scale beta_r)."""
    g2 = 2 * _lgamma(2 / _GAMMA_GRID) - _lgamma(1 / _GAMMA_GRID) - _lgamma(3 / _GAMMA_GRID)
    r_gam = np.exp(g2)  # Gamma(2/a)^2 / (Gamma(1/a) Gamma(3/a))
    neg, pos = vec[vec < 0], vec[vec > 0]
    # MATLAB semantics on a one-signed patch: mean([]) is NaN, and min() over an all-NaN vector returns index 1,
    # so alpha = 0.2 with NaN scales; nanmean then still averages that alpha (niqe_score).
    left = np.sqrt(np.mean(neg ** 2)) if len(neg) else float("nan")
    right = np.sqrt(np.mean(pos ** 2)) if len(pos) else float("nan")
    g = left / right
    rhat = np.mean(np.abs(vec)) ** 2 / np.mean(vec ** 2) if np.any(vec) else float("nan")
    rnorm = rhat * (g ** 3 + 1) * (g + 1) / (g ** 2 + 1) ** 2
    if not np.isfinite(rnorm):
        return float(_GAMMA_GRID[0]), float("nan"), float("nan")
    alpha = float(_GAMMA_GRID[np.argmin((r_gam - rnorm) ** 2)])
    k = math.exp(0.5 * (math.lgamma(1 / alpha) - math.lgamma(3 / alpha)))
    return alpha, float(left * k), float(right * k)


_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))  # horizontal, vertical and the two diagonal neighbours


def _patch_features(block: np.ndarray) -> list[float]:
    """The 18 NIQE features of one MSCN patch (paper Sec. III-A/B, MATLAB ``computefeature``): the AGGD fit of the
    coefficients (alpha, (beta_l + beta_r) / 2), then for each of the 4 neighbour products (MATLAB ``circshift``
    within the patch) alpha, the mean ``(beta_r - beta_l) Gamma(2/alpha) / Gamma(1/alpha)``, beta_l, beta_r."""
    alpha, bl, br = _aggd_fit(block.ravel())
    feats = [alpha, (bl + br) / 2.0]
    for shift in _SHIFTS:
        a, bl, br = _aggd_fit(block.ravel() * np.roll(block, shift, axis=(0, 1)).ravel())
        mean = (br - bl) * math.exp(math.lgamma(2 / a) - math.lgamma(1 / a)) if np.isfinite(a) else float("nan")
        feats += [a, mean, bl, br]
    return feats


def niqe_features(gray: np.ndarray, patch: int = NIQE_PATCH) -> np.ndarray:
    """(n_patches, 36) NIQE features of a 2-D image in [0, 255]: 18 per patch at full and at half scale."""
    img = np.asarray(gray, np.float64)
    h, w = img.shape
    nh, nw = h // patch, w // patch
    if nh == 0 or nw == 0:
        raise ValueError(f"NIQE needs an image of at least {patch}x{patch} px, got {w}x{h}")
    img = img[:nh * patch, :nw * patch]
    window = gaussian_window_2d()
    per_scale = []
    for scale in (1, 2):
        mu = _replicate_filter(img, window)
        sigma = np.sqrt(np.abs(_replicate_filter(img * img, window) - mu * mu))
        mscn = (img - mu) / (sigma + 1.0)
        b = patch // scale
        feats = [_patch_features(mscn[i * b:(i + 1) * b, j * b:(j + 1) * b])
                 for i in range(nh) for j in range(nw)]  # blkproc order does not matter for mean / cov
        per_scale.append(np.asarray(feats))
        if scale == 1:
            img = imresize_matlab(img / 255.0, 0.5) * 255.0
    return np.concatenate(per_scale, axis=1)


@lru_cache(maxsize=1)
def niqe_pristine_model() -> tuple[np.ndarray, np.ndarray]:
    """(mu (36,), cov (36, 36)) of the MATLAB release's pristine model."""
    if not NIQE_PARAMS.is_file():
        raise FileNotFoundError(f"NIQE's pristine model {NIQE_PARAMS} is missing; reinstall comfyui-bfr")
    with np.load(NIQE_PARAMS) as d:
        return np.asarray(d["mu_pris_param"], np.float64).reshape(-1), np.asarray(d["cov_pris_param"], np.float64)


def to_gray_255(image, convert: str = "y") -> np.ndarray:
    """(H, W[, 3]) uint8 or float [0, 1] -> the 2-D image NIQE scores, in [0, 255]. ``convert="y"``: BT.601
    studio-range luma rounded to integers (MATLAB ``rgb2ycbcr`` on uint8, what BasicSR / pyiqa report);
    ``"gray"``: MATLAB ``rgb2gray`` weights, rounded."""
    a = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image)
    a = a.astype(np.float64) if a.dtype == np.uint8 else np.asarray(a, np.float64) * 255.0
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 3:
        if a.shape[2] != 3:
            raise ValueError(f"NIQE takes gray or RGB images, got {a.shape[2]} channels")
        if convert == "y":
            a = 16.0 + a @ np.array([65.481, 128.553, 24.966]) / 255.0
        elif convert == "gray":
            a = a @ np.array([0.298936021293775, 0.587043074451121, 0.114020904255103])
        else:
            raise ValueError(f"convert must be 'y' or 'gray', got {convert!r}")
    elif a.ndim != 2:
        raise ValueError(f"NIQE takes (H, W) or (H, W, 3) images, got shape {a.shape}")
    return np.round(a)


def niqe_score(image, crop_border: int = 0, convert: str = "y") -> float:
    """NIQE of one image (lower = more natural). Mittal et al. 2013, Eq. (10)."""
    gray = to_gray_255(image, convert)
    if crop_border:
        gray = gray[crop_border:-crop_border, crop_border:-crop_border]
    feats = niqe_features(gray)
    complete = feats[np.all(np.isfinite(feats), axis=1)]
    if len(complete) < 2:
        raise ValueError("NIQE: fewer than two 96 px patches with finite features (a flat image?)")
    mu_p, cov_p = niqe_pristine_model()
    mu_d = np.nanmean(feats, axis=0)  # MATLAB nanmean: per feature over the patches where it is defined
    cov_d = np.cov(complete, rowvar=False)  # MATLAB nancov: over the patches with every feature defined
    d = mu_p - mu_d
    return float(np.sqrt(d @ np.linalg.pinv((cov_p + cov_d) / 2.0) @ d))


def niqe(image, crop_border: int = 0, convert: str = "y") -> MetricResult:
    """:func:`niqe_score` as a :class:`MetricResult` naming the pristine-model file."""
    try:
        value = niqe_score(image, crop_border, convert)
    except ValueError as exc:
        return MetricResult("NIQE", skipped=str(exc), weights=[file_record(NIQE_PARAMS)])
    return MetricResult("NIQE", value, [file_record(NIQE_PARAMS)])


# ================================================================================================ LPIPS
# Zhang et al. 2018: inputs in [-1, 1] are shifted / scaled to ImageNet statistics before the backbone.
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
# torchvision's feature stacks, described as (kind, args); LPIPS taps the ReLU outputs listed in _TAPS.
_ALEX = [("conv", 3, 64, 11, 4, 2), ("relu",), ("pool",), ("conv", 64, 192, 5, 1, 2), ("relu",), ("pool",),
         ("conv", 192, 384, 3, 1, 1), ("relu",), ("conv", 384, 256, 3, 1, 1), ("relu",),
         ("conv", 256, 256, 3, 1, 1), ("relu",)]
_VGG = []
for _cin, _cout, _n in ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3)):
    for _k in range(_n):
        _VGG += [("conv", _cin if _k == 0 else _cout, _cout, 3, 1, 1), ("relu",)]
    _VGG.append(("pool2",))
_VGG = _VGG[:-1]
_TAPS = {"alex": (1, 4, 7, 9, 11), "vgg": (3, 8, 15, 22, 29)}
_CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}


class LPIPSNet(nn.Module):
    """LPIPS v0.1 (Zhang et al. 2018, Eq. 1): ``sum_l mean_hw || w_l * (f_l(x) - f_l(y)) ||^2`` on unit-normalised
    channel vectors. ``features`` follows torchvision's ``features.N`` numbering, ``lin{l}.model.1`` the heads."""

    def __init__(self, net: str = "alex"):
        super().__init__()
        if net not in LPIPS_NETS:
            raise ValueError(f"LPIPS net must be one of {LPIPS_NETS}, got {net!r}")
        self.net = net
        layers: list[nn.Module] = []
        for spec in (_ALEX if net == "alex" else _VGG):
            if spec[0] == "conv":
                _, cin, cout, k, s, p = spec
                layers.append(nn.Conv2d(cin, cout, k, s, p))
            elif spec[0] == "relu":
                layers.append(nn.ReLU(inplace=False))
            else:
                layers.append(nn.MaxPool2d(3, 2) if spec[0] == "pool" else nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        for i, c in enumerate(_CHANNELS[net]):
            self.add_module(f"lin{i}", nn.Module())
            getattr(self, f"lin{i}").model = nn.Sequential(nn.Identity(), nn.Conv2d(c, 1, 1, bias=False))
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1))

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, taps = [], set(_TAPS[self.net])
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in taps:
                out.append(x)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] each -> (B,) distances."""
        fx = self._taps(((x * 2 - 1) - self.shift) / self.scale)
        fy = self._taps(((y * 2 - 1) - self.shift) / self.scale)
        total = 0
        for i, (a, b) in enumerate(zip(fx, fy)):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{i}").model((a - b) ** 2).mean((2, 3))
        return total.view(-1)


def lpips_head_candidates(net: str, lpips_dir: str | Path | None = None) -> list[Path]:
    """Where the v0.1 heads are looked for: ``lpips_dir``, ``$BFR_LPIPS_DIR``, an installed ``lpips`` package's
    ``weights/v0.1`` (located without importing it)."""
    dirs = [Path(p) for p in (lpips_dir, os.environ.get("BFR_LPIPS_DIR")) if p]
    spec = importlib.util.find_spec("lpips")
    if spec is not None and spec.submodule_search_locations:
        dirs += [Path(p) / "weights" / "v0.1" for p in spec.submodule_search_locations]
    return [d / LPIPS_HEAD_FILES[net] for d in dirs]


class LPIPS:
    """LPIPS with the files found offline, or a skip reason (``available`` False, ``skipped`` says what is missing).

    Args:
        net: ``alex`` (the papers' default) or ``vgg``.
        lpips_dir: folder with the v0.1 heads (``alex.pth`` / ``vgg.pth``).
        backbone: the torchvision ImageNet file; default ``<torch hub>/checkpoints/<torchvision name>``.
    """

    def __init__(self, net: str = "alex", lpips_dir: str | Path | None = None, backbone: str | Path | None = None,
                 device: str | torch.device = "cpu"):
        if net not in LPIPS_NETS:
            raise ValueError(f"LPIPS net must be one of {LPIPS_NETS}, got {net!r}")
        self.name = f"LPIPS ({net})"
        self.net, self.skipped, self.weights, self.model = net, None, [], None
        heads = next((p for p in lpips_head_candidates(net, lpips_dir) if p.is_file()), None)
        bb = Path(backbone) if backbone else torch_hub_checkpoints() / LPIPS_BACKBONE_FILES[net]
        if heads is None:
            self.skipped = (f"LPIPS needs the v0.1 heads {LPIPS_HEAD_FILES[net]} (inside the `lpips` wheel: "
                            f"pip install lpips, or --lpips-dir DIR with lpips/weights/v0.1/{LPIPS_HEAD_FILES[net]})")
        elif not bb.is_file():
            self.skipped = (f"LPIPS needs torchvision's ImageNet backbone {bb.name} at {bb} (the torch hub cache, "
                            "$TORCH_HOME); copy it there from a machine that has it")
        if self.skipped:
            _log_skip(self.name, self.skipped)
            return
        model = LPIPSNet(net)
        sd = {f"features.{k[len('features.'):]}": v for k, v in _load(bb).items() if k.startswith("features.")}
        sd.update(_load(heads))
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if k not in ("shift", "scale")]
        if missing or unexpected:
            raise ValueError(f"LPIPS: {bb.name} + {heads.name} do not match the {net} layout (missing "
                             f"{missing[:4]}, unexpected {unexpected[:4]}); use torchvision's {bb.name} and the "
                             f"lpips v0.1 {heads.name}")
        self.model = model.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self.weights = [file_record(heads), file_record(bb)]

    @property
    def available(self) -> bool:
        return self.model is not None

    def __call__(self, a, b) -> MetricResult:
        """LPIPS of two (H, W, 3) images (uint8 or float [0, 1])."""
        if self.model is None:
            return MetricResult(self.name, skipped=self.skipped)
        x, y = (_as_nchw(t).to(self.device) for t in (a, b))
        with torch.inference_mode():
            return MetricResult(self.name, float(self.model(x, y)[0]), list(self.weights))


def _load(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _as_nchw(img) -> torch.Tensor:
    a = img.detach().cpu() if isinstance(img, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(img))
    a = a.float() / 255.0 if a.dtype == torch.uint8 else a.float()
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {tuple(a.shape)}")
    return a.permute(2, 0, 1)[None]


# ================================================================================================ FID
def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Frechet distance between two Gaussians (Heusel et al. 2017, Eq. 6):
    ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    cov1, cov2 = np.atleast_2d(cov1).astype(np.float64), np.atleast_2d(cov2).astype(np.float64)
    covmean = linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():  # singular product: regularise, as is common practice
        eps = np.eye(cov1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((cov1 + eps) @ (cov2 + eps))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean))


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance with N - 1) of (N, D) features."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got features of shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """:func:`frechet_distance` of the Gaussians fitted to two (N, D) feature sets (covariance with N - 1).

    With fewer images than dimensions (a test set of a few hundred faces vs 2048-d features) the covariances are
    low-rank: ``S1 = A^T A``, ``S2 = B^T B`` with the centred features ``A``, ``B`` scaled by ``1/sqrt(N - 1)``,
    and the nonzero eigenvalues of ``S1 S2`` are those of ``M M^T`` with ``M = A B^T`` (N1 x N2), so
    ``Tr (S1 S2)^(1/2) = sum sqrt(eig(M M^T))`` exactly, without a D x D matrix square root."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    for f in (f1, f2):
        if f.ndim != 2 or len(f) < 2:
            raise ValueError(f"FID needs at least 2 images per set, got features of shape {f.shape}")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature sizes differ: {f1.shape[1]} vs {f2.shape[1]}")
    if min(len(f1), len(f2)) >= f1.shape[1]:
        return frechet_distance(*feature_statistics(f1), *feature_statistics(f2))
    mu1, mu2 = f1.mean(0), f2.mean(0)
    a = (f1 - mu1) / math.sqrt(len(f1) - 1)
    b = (f2 - mu2) / math.sqrt(len(f2) - 1)
    m = a @ b.T
    ev = np.linalg.eigvalsh(m @ m.T if len(f1) <= len(f2) else m.T @ m)
    diff = mu1 - mu2
    return float(diff @ diff + (a * a).sum() + (b * b).sum() - 2.0 * np.sqrt(np.clip(ev, 0.0, None)).sum())


class _NetMetric:
    """A metric network read from a weight file: ``model``, or ``skipped`` saying why not; ``weights`` records the
    file (name + sha256) for the report."""

    name = ""
    skipped: str | None = None
    model = None
    device = torch.device("cpu")

    def _open(self, path: str | Path, load: Callable, errors: type[Exception]) -> None:
        """Unless ``skipped`` is already set (no file), ``model = load(path)`` on the device; a file ``load`` refuses
        (``errors``) skips the metric with its message. Logs the skip or records the file."""
        if self.skipped is None:
            try:
                self.model = load(path).to(self.device)
            except errors as exc:
                self.skipped = str(exc)
        if self.skipped:
            _log_skip(self.name, self.skipped)
            return
        self.weights = [file_record(path)]

    @property
    def available(self) -> bool:
        return self.model is not None


class FID(_NetMetric):
    """FID (Heusel et al. 2017) on the 2048-d pool3 features of pytorch-fid's Inception-v3
    (:mod:`.fid_inception`, our network code, no torchvision), with its weight file ``weights`` (default
    ``<torch hub>/checkpoints/pt_inception-2015-12-05-6726825d.pth``); ``skipped`` says why when it is missing or
    not in that layout. Features of a file set are cached by (path, size, mtime), so the HQ and reference sets are
    computed once per run."""

    name = "FID"

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu", batch_size: int = 16):
        from .fid_inception import FIDWeightsError, load_fid_inception

        self.skipped, self.weights, self.model = None, [], None
        self.device, self.batch_size = torch.device(device), int(batch_size)
        self._cache: dict[tuple, np.ndarray] = {}
        path = Path(weights) if weights else torch_hub_checkpoints() / FID_WEIGHTS
        if not path.is_file():
            self.skipped = (f"FID needs pytorch-fid's Inception weights {FID_WEIGHTS} at {path} (the torch hub cache "
                            "$TORCH_HOME/hub/checkpoints, or --fid-weights FILE); copy it there from a machine "
                            "that has it")
        self._open(path, load_fid_inception, FIDWeightsError)

    def features(self, images: Sequence) -> np.ndarray:
        """(N, 2048) float64 pool3 features of (H, W, 3) images (uint8 or float [0, 1]; sizes may differ)."""
        import torch.nn.functional as F

        from .fid_inception import FID_SIZE

        if self.model is None:
            raise RuntimeError(f"FID is not available: {self.skipped}")
        out = []
        with torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                # each image resized on its own (pytorch-fid's bilinear resize; the network's own resize of a
                # 299 px input is then the identity), so a batch may mix sizes
                x = torch.cat([F.interpolate(_as_nchw(im), size=(FID_SIZE, FID_SIZE), mode="bilinear",
                                             align_corners=False) for im in images[i:i + self.batch_size]])
                out.append(self.model(x.to(self.device)).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 2048))

    def file_features(self, paths: Sequence[str | Path]) -> np.ndarray:
        """:meth:`features` of image files, cached by (path, size, mtime)."""
        from .image_io import read_rgb

        key = tuple((str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime_ns) for p in paths)
        if key not in self._cache:
            self._cache[key] = self.features([read_rgb(p) for p in paths])
        return self._cache[key]

    def _result(self, fa: np.ndarray, fb: np.ndarray) -> MetricResult:
        if len(fa) < 2 or len(fb) < 2:
            return MetricResult(self.name, skipped=f"FID needs >= 2 images per set, got {len(fa)} and {len(fb)}",
                                weights=list(self.weights))
        return MetricResult(self.name, frechet_distance_features(fa, fb), list(self.weights))

    def __call__(self, images: Sequence, reference: Sequence) -> MetricResult:
        """FID between two lists of (H, W, 3) images."""
        if self.model is None:
            return MetricResult(self.name, skipped=self.skipped)
        return self._result(self.features(images), self.features(reference))

    def files(self, images: Sequence[str | Path], reference: Sequence[str | Path]) -> MetricResult:
        """FID between two lists of image files (features cached)."""
        if self.model is None:
            return MetricResult(self.name, skipped=self.skipped)
        return self._result(self.file_features(images), self.file_features(reference))


# ================================================================================================ CLIP-IQA
class CLIPIQA(_NetMetric):
    """CLIP-IQA (Wang et al. 2023; :mod:`.clipiqa`) with a CLIP RN50 state-dict file (``weights``, else
    ``$BFR_CLIP_RN50``), or ``skipped`` naming what is missing. ``prompts``: ``paper`` (Good/Bad photo) or ``pyiqa``
    (pyiqa's three pairs, averaged)."""

    def __init__(self, weights: str | Path | None = None, prompts: str = "paper",
                 device: str | torch.device = "cpu"):
        from .clipiqa import PROMPT_SETS, CLIPIQAModel, CLIPWeightsError, load_clip_rn50

        if prompts not in PROMPT_SETS:
            raise ValueError(f"CLIP-IQA prompts must be one of {sorted(PROMPT_SETS)}, got {prompts!r}")
        self.name = "CLIP-IQA" if prompts == "paper" else f"CLIP-IQA ({prompts} prompts)"
        self.skipped, self.weights, self.model = None, [], None
        self.device = torch.device(device)
        given = weights or os.environ.get(CLIPIQA_ENV)
        if not given:
            self.skipped = ("CLIP-IQA needs CLIP RN50 weights as a state dict: open_clip's RN50 'openai' file "
                            "open_clip_model.safetensors (Hugging Face timm/resnet50_clip.openai) or a state dict "
                            f"of OpenAI's RN50.pt; pass --clipiqa-weights FILE or set ${CLIPIQA_ENV}")
        elif not Path(given).is_file():
            self.skipped = f"CLIP-IQA: the CLIP RN50 weights {given} do not exist"
        self._open(given or "", lambda f: CLIPIQAModel(load_clip_rn50(f), prompts), CLIPWeightsError)

    def __call__(self, image) -> MetricResult:
        """CLIP-IQA of one (H, W, 3) image (uint8 or float [0, 1]) at its own size; higher is better."""
        if self.model is None:
            return MetricResult(self.name, skipped=self.skipped)
        with torch.inference_mode():
            return MetricResult(self.name, float(self.model(_as_nchw(image).to(self.device))[0]), list(self.weights))


# ================================================================================================ MUSIQ
class MUSIQ(_NetMetric):
    """MUSIQ (Ke et al., ICCV 2021; :mod:`.musiq`) with one of pyiqa's MUSIQ files: ``weights``, else ``$BFR_MUSIQ``,
    else ``<pyiqa cache>/<release file of dataset>`` (``dataset``: koniq (pyiqa's ``musiq``), spaq, paq2piq, ava);
    ``skipped`` names the file and those places when none is there or it is not in pyiqa's layout. The score's scale
    is the training set's (KonIQ / SPAQ / PaQ-2-PiQ: MOS ~0-100, AVA: 1-10); the report names the file."""

    name = "MUSIQ"

    def __init__(self, weights: str | Path | None = None, dataset: str = "koniq",
                 device: str | torch.device = "cpu"):
        from .musiq import MUSIQ_FILES, MUSIQWeightsError, load_musiq

        if dataset not in MUSIQ_FILES:
            raise ValueError(f"MUSIQ dataset must be one of {sorted(MUSIQ_FILES)}, got {dataset!r}")
        self.skipped, self.weights, self.model = None, [], None
        self.device = torch.device(device)
        given = weights or os.environ.get(MUSIQ_ENV)
        path = Path(given) if given else pyiqa_cache() / MUSIQ_FILES[dataset]
        if not path.is_file():
            if given:
                self.skipped = f"MUSIQ: the weights {path} do not exist" + (
                    "" if weights else f" (from ${MUSIQ_ENV})")
            else:
                self.skipped = MUSIQ_SKIP.format(file=MUSIQ_FILES[dataset], dataset=dataset, env=MUSIQ_ENV,
                                                 cache=pyiqa_cache())
        self._open(path, load_musiq, MUSIQWeightsError)

    def __call__(self, image) -> MetricResult:
        """MUSIQ of one (H, W, 3) image (uint8 or float [0, 1]) at its own size plus the 224 / 384 px resizes;
        higher is better."""
        if self.model is None:
            return MetricResult(self.name, skipped=self.skipped)
        with torch.inference_mode():
            return MetricResult(self.name, float(self.model(_as_nchw(image).to(self.device))[0]), list(self.weights))


__all__ = ["CLIPIQA", "CLIPIQA_ENV", "FID", "FID_WEIGHTS", "LPIPS", "LPIPSNet", "LPIPS_BACKBONE_FILES", "LPIPS_HEAD_FILES",
           "MUSIQ", "MUSIQ_ENV", "MUSIQ_SKIP", "MetricResult", "NIQE_PARAMS", "feature_statistics", "frechet_distance",
           "frechet_distance_features",
           "gaussian_window_2d", "imresize_matlab", "lpips_head_candidates", "niqe", "niqe_features",
           "niqe_pristine_model", "niqe_score", "pyiqa_cache", "to_gray_255", "torch_hub_checkpoints", "unavailable"]

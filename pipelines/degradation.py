"""Classical degradation synthesis for blind face restoration (design.md §3.1).

The classical model (GFPGAN / DR2 Eq. 13 / DR-BFR Eq. 11 / FlipNet Eq. 9)::

    y = [(x (*) k) resize_s + n]_JPEG_q, then resized back to the input size

optionally applied twice with fresh parameters and a shuffled stage order (FlipNet's on-the-fly scheme, after
Real-ESRGAN's second-order model), followed by optional GFPGAN colour jitter / grayscale.

Presets (``PRESETS``; sigma = blur std in px, s/r = down-scale factor, delta = noise std in /255 units, q = JPEG
quality):

==========================  ============================================================================  ==========
name                        ranges                                                                        source
==========================  ============================================================================  ==========
``flipnet``                 sigma [0.1,15], s [0.8,32], delta [0,20], q [30,95]; twice, 2nd pass shuffled  FlipNet §5.1
``dr-bfr``                  sigma [0.1,10], r [0.8,8], delta [0,20], q [60,100] (= GFPGAN's ranges)         DR-BFR §4.1
``dr2-{mild,medium,severe}  r fixed in {4,8,16}; sigma/delta/q {3:5}/{5:20}/{60:80}, {5:7}/{15:40}/{40:60},  DR2 §4.1
-x{4,8,16}``                {7:9}/{25:50}/{30:40}; bicubic; noise Gaussian, Laplace or Poisson
``clr-face``                delta [0,20], s [1,32], q [30,90]; blur sigma [0.1,10] (our choice, see below)  CLR-Face §4
``clr-face-x32``            s = 32 fixed, blur + noise, no JPEG (the paper's "extreme upscaling" test)       CLR-Face §4
``custom``                  every range set by hand (starts from the GFPGAN ranges)                         --
==========================  ============================================================================  ==========

Where a paper is silent we chose (and say so in ``PRESETS`` comments): kernel size 41 with isotropic/anisotropic
Gaussians 50/50 (GFPGAN); FlipNet's resize mode (area/bilinear/bicubic) and gray-noise probability 0.4 from
Real-ESRGAN, which FlipNet names as its synthesizer; CLR-Face's blur sigma [0.1,10] from GFPGAN, the degradation
model it cites; clr-face-x32's blur/noise amounts from the clr-face training ranges. Blur sigmas and kernel sizes
are in input pixels: a blur that a shuffled order puts after the down-sample is scaled to the down-sampled grid
(``effective_blur``; the report's ``blur.grid_scale`` and ``blur.applied`` say what ran).

One parameter sampler (``sample_params``, numpy ``SeedSequence`` per image / pass / stage, so every draw is
independent of the other stages' settings) and two executors of the same parameters:

* ``backend="torch"``: device-batched (images grouped by stage and shape; per-sample kernels by FFT or grouped
  convolution; per-sample resize sizes looped), differentiable with ``jpeg="differentiable"`` (kornia).
* ``backend="cv2"`` / ``degrade_numpy``: one image at a time on the CPU (the ``bfr degrade`` CLI): cv2.filter2D
  (cv2.sepFilter2D for rank-one kernels), cv2 bilinear enlargement, torch's CPU kernels for the other resizes
  (area pooling; PIL's antialiased filter, whose own float path is several times slower), libjpeg through cv2.
  Kernels and noise fields come from the shared torch helpers.

Conventions shared by both backends (so they agree):

* blur is a correlation with reflect-101 borders (cv2 ``BORDER_REFLECT_101`` = torch ``reflect``), any image size;
* resize is PIL's separable filter (torch ``antialias=True`` in both directions, i.e. bicubic a=-0.5); ``area`` is
  torch's adaptive average pooling; the down-sampled size is ``max(1, floor(H/s))`` (clamping is reported);
* noise fields are drawn with a torch CPU/device ``Generator`` from the reported seed: Gaussian ``delta/255*z``,
  Laplace with std ``delta/255``, Poisson ``P(lam*x)/lam - x`` with ``lam = 0.5*(255/delta)^2`` (std ``delta/255``
  at intensity 0.5, variance proportional to intensity) sampled by inverse CDF of a uniform field, so a pixel's
  sample depends only on its own rate (rates from 8-bit levels, as BasicSR). On a GPU the fields come from the
  device generator, so they differ from the CPU ones (same distribution);
* every stage clamps to [0,1]; JPEG rounds to 8 bits (round-half-even) and runs libjpeg through cv2 (bit-exact with
  PIL's ``Image.save(quality=q)`` here);
* the output is rounded to 8-bit levels (``round_output``; straight-through when gradients are needed).

Torch-vs-cv2 agreement on CPU for the same parameters, per stage (max abs on [0,1]; measured / tested bound): blur
6e-7 / 2e-6 (cv2 filter2D or sepFilter2D vs FFT or grouped conv); resize 4e-6 / 2e-5 (cv2 bilinear enlargement vs
torch; area and the antialiased modes run the same torch kernel, identical); noise 0 / 0 for identical input (same
generator; Poisson counts are per-pixel); libjpeg 0 / 0 for identical uint8 input. Whole chains differ only where a
~1e-6 float difference flips an 8-bit rounding before JPEG: over all presets, 256 px, 12 images each, seeds 0 and
21, at most 0.38 % of values differ, mean abs <= 1.6e-5, max 6/255 (one JPEG block), <= 0.08 % by more than
1.5/255; tested bounds mean < 1e-4 and < 0.3 % of values off by more than 1.5/255. A flip before a JPEG of a tiny
grid moves a whole block, magnified by the resize back (after x32, one block is the whole image), so the area
pooling of both backends is the same torch kernel: its averages of 8-bit levels often fall on rounding ties.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .image_io import to_uint8

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS", "JPEG_BACKENDS", "KERNEL_TYPES", "NOISE_TYPES", "PRESETS", "RESIZE_MODES", "STAGES",
    "DegradationConfig", "UnknownPresetError", "apply_blur", "degrade", "degrade_numpy", "effective_blur",
    "get_preset", "lr_size", "make_kernels", "sample_params",
]

STAGES = ("blur", "resize", "noise", "jpeg")
KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso", "sinc")
RESIZE_MODES = ("area", "bilinear", "bicubic")
NOISE_TYPES = ("gaussian", "laplace", "poisson")
JPEG_BACKENDS = ("libjpeg", "differentiable")
BACKENDS = ("torch", "cv2")
_STAGE_IDS = {"order": 0, "blur": 1, "resize": 2, "noise": 3, "jpeg": 4, "back": 5, "color": 6}
_MAX_SEED = 2**53  # JSON/JavaScript-safe integers for the reported noise seeds
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as cv2/PIL/torchvision grayscale
_FFT_MIN_KERNEL = 13  # blur by FFT from this kernel size up, grouped convolution below


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------

_RANGE_FIELDS = ("blur_sigma", "rotation_range", "betag_range", "betap_range", "sinc_omega", "resize_scale",
                 "noise_sigma", "jpeg_quality", "color_shift", "brightness", "contrast", "saturation", "hue")
_PROB_FIELDS = ("blur_prob", "resize_prob", "noise_prob", "gray_noise_prob", "jpeg_prob", "color_jitter_prob",
                "color_jitter_pt_prob", "gray_prob")


@dataclass(frozen=True)
class DegradationConfig:
    """Ranges (min, max) and probabilities of the classical degradation; validated on construction.

    Args:
        name: preset name, echoed in the report.
        order: ``"first"`` (one pass) or ``"second"`` (the chain twice with fresh parameters, Real-ESRGAN / FlipNet).
        shuffle: shuffle the stage order of the second pass per image (FlipNet); ``shuffle_first`` also the first.
        kernel_size: odd blur kernel size (41 in GFPGAN).
        kernel_types, kernel_probs: kernel families (``KERNEL_TYPES``) and their probabilities.
        blur_sigma: kernel std range in px (0 = delta kernel); ``rotation_range`` in radians for anisotropic ones;
            ``betag_range`` / ``betap_range`` shape exponents (generalized / plateau); ``sinc_omega`` cutoff (rad).
        resize_scale: down-scale factor s (size = floor(H/s); s < 1 enlarges); ``resize_modes`` drawn uniformly;
            ``resize_back``: ``"same"`` mode as the down-scale, ``"random"``, or a mode name.
        noise_sigma: noise std delta in /255 units; ``noise_types`` / ``noise_probs``; ``gray_noise_prob``: the same
            noise on all channels.
        jpeg_quality: integer quality range in [1, 100]; ``jpeg_backend`` default codec for ``degrade``.
        *_prob: probability that a stage is applied (per image and pass).
        color_jitter_prob, color_shift: GFPGAN per-channel shift U(-a, a)/255; ``color_jitter_pt_prob`` with
            ``brightness``/``contrast``/``saturation`` factors and ``hue`` shift (turns); ``gray_prob``: grayscale.
        round_output: round the result to 8-bit levels.
    """

    name: str = "custom"
    order: str = "first"
    shuffle: bool = False
    shuffle_first: bool = False
    kernel_size: int = 41
    kernel_types: tuple = ("iso", "aniso")
    kernel_probs: tuple = (0.5, 0.5)
    blur_prob: float = 1.0
    blur_sigma: tuple = (0.1, 10.0)
    rotation_range: tuple = (-math.pi, math.pi)
    betag_range: tuple = (0.5, 4.0)
    betap_range: tuple = (1.0, 2.0)
    sinc_omega: tuple = (math.pi / 5, math.pi)
    resize_prob: float = 1.0
    resize_scale: tuple = (0.8, 8.0)
    resize_modes: tuple = ("bilinear",)
    resize_back: str = "same"
    noise_prob: float = 1.0
    noise_sigma: tuple = (0.0, 20.0)
    noise_types: tuple = ("gaussian",)
    noise_probs: tuple = (1.0,)
    gray_noise_prob: float = 0.0
    jpeg_prob: float = 1.0
    jpeg_quality: tuple = (60, 100)
    jpeg_backend: str = "libjpeg"
    color_jitter_prob: float = 0.0
    color_shift: tuple = (-20.0, 20.0)
    color_jitter_pt_prob: float = 0.0
    brightness: tuple = (0.5, 1.5)
    contrast: tuple = (0.5, 1.5)
    saturation: tuple = (0.0, 1.5)
    hue: tuple = (-0.1, 0.1)
    gray_prob: float = 0.0
    round_output: bool = True

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        _validate_config(self)

    @property
    def passes(self) -> int:
        return 2 if self.order == "second" else 1

    def with_overrides(self, **kw) -> DegradationConfig:
        """A copy with some fields replaced; a scalar for a range field means a fixed value (v, v)."""
        valid = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(kw) - valid)
        if unknown:
            raise ValueError(f"DegradationConfig has no field {', '.join(map(repr, unknown))}. "
                             f"Valid fields: {', '.join(sorted(valid))}.")
        clean = {}
        for key, value in kw.items():
            if key in _RANGE_FIELDS and isinstance(value, (int, float)) and not isinstance(value, bool):
                value = (value, value)
            elif isinstance(value, list):
                value = tuple(value)
            clean[key] = value
        return dataclasses.replace(self, **clean)

    def describe(self) -> str:
        """One line with the ranges a user picks a preset by (``bfr degrade --list-presets``)."""
        def rng(value, prob=1.0) -> str:
            lo, hi = value
            text = f"{lo:g}" if lo == hi else f"[{lo:g}, {hi:g}]"
            return text if prob >= 1.0 else f"{text} (p {prob:g})"

        passes = "2 passes" + (", shuffled" if self.shuffle else "") if self.passes == 2 else "1 pass"
        parts = [passes, f"blur sigma {rng(self.blur_sigma, self.blur_prob)} ({'/'.join(self.kernel_types)})",
                 f"scale {rng(self.resize_scale, self.resize_prob)} ({'/'.join(self.resize_modes)})",
                 f"noise {rng(self.noise_sigma, self.noise_prob)} ({'/'.join(self.noise_types)})",
                 f"jpeg q {rng(self.jpeg_quality, self.jpeg_prob)}" if self.jpeg_prob > 0 else "no jpeg"]
        return ", ".join(parts)

    def to_dict(self) -> dict:
        """JSON-serialisable field values."""
        return {f.name: (list(v) if isinstance(v, tuple) else v)
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}


def _bad(field: str, value: Any, why: str, fix: str) -> ValueError:
    return ValueError(f"DegradationConfig.{field} = {value!r} is invalid: {why}. Fix: {fix}.")


def _is_num(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def _check_range(cfg, name, lo=None, hi=None, integer=False, lo_open=False):
    value = getattr(cfg, name)
    if not isinstance(value, tuple) or len(value) != 2 or not all(_is_num(v) for v in value):
        raise _bad(name, value, "expected a (min, max) pair of finite numbers", f"write e.g. {name}=(a, b)")
    a, b = value
    if integer and (float(a) != int(a) or float(b) != int(b)):
        raise _bad(name, value, "expected integers", f"use whole numbers, e.g. ({int(a)}, {int(b)})")
    if a > b:
        raise _bad(name, value, f"min {a} > max {b}", f"swap them: ({b}, {a})")
    bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
    if lo is not None and (a < lo or (lo_open and a <= lo)):
        raise _bad(name, value, f"min {a} is {'<=' if lo_open else '<'} {lo}",
                   f"keep {name} within {'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]")
    if hi is not None and b > hi:
        raise _bad(name, value, f"max {b} > {hi}", f"keep {name} within {bounds}")
    if integer:
        object.__setattr__(cfg, name, (int(a), int(b)))
    else:
        object.__setattr__(cfg, name, (float(a), float(b)))


def _check_choices(cfg, name, allowed, probs_name=None):
    value = getattr(cfg, name)
    if not isinstance(value, tuple) or not value or any(v not in allowed for v in value):
        raise _bad(name, value, "unknown or empty choice", f"pick one or more of {list(allowed)}")
    if probs_name is not None:
        probs = getattr(cfg, probs_name)
        if (not isinstance(probs, tuple) or len(probs) != len(value) or not all(_is_num(p) and p >= 0 for p in probs)
                or sum(probs) <= 0):
            raise _bad(probs_name, probs, f"needs {len(value)} non-negative weights (one per {name} entry) with a "
                       "positive sum", f"e.g. {probs_name}={tuple([round(1 / len(value), 3)] * len(value))}")
        object.__setattr__(cfg, probs_name, tuple(float(p) for p in probs))


def _validate_config(cfg: DegradationConfig) -> None:
    if not isinstance(cfg.name, str):
        raise _bad("name", cfg.name, "expected a string", "use e.g. name='custom'")
    if cfg.order not in ("first", "second"):
        raise _bad("order", cfg.order, "expected 'first' or 'second'", "order='first' (one pass) or 'second' (twice)")
    for name in ("shuffle", "shuffle_first", "round_output"):
        if not isinstance(getattr(cfg, name), bool):
            raise _bad(name, getattr(cfg, name), "expected True or False", f"{name}=True or False")
    ks = cfg.kernel_size
    if not isinstance(ks, (int, np.integer)) or isinstance(ks, bool) or ks < 1 or ks % 2 == 0 or ks > 255:
        raise _bad("kernel_size", ks, "expected an odd integer in [1, 255]", "e.g. kernel_size=41 (GFPGAN) or 21")
    object.__setattr__(cfg, "kernel_size", int(ks))
    for name in _PROB_FIELDS:
        p = getattr(cfg, name)
        if not _is_num(p) or not 0.0 <= p <= 1.0:
            raise _bad(name, p, "a probability must be in [0, 1]", f"e.g. {name}=0.5")
        object.__setattr__(cfg, name, float(p))
    _check_choices(cfg, "kernel_types", KERNEL_TYPES, "kernel_probs")
    _check_choices(cfg, "resize_modes", RESIZE_MODES)
    _check_choices(cfg, "noise_types", NOISE_TYPES, "noise_probs")
    if cfg.resize_back not in ("same", "random", *RESIZE_MODES):
        raise _bad("resize_back", cfg.resize_back, "unknown mode", f"one of {['same', 'random', *RESIZE_MODES]}")
    if cfg.jpeg_backend not in JPEG_BACKENDS:
        raise _bad("jpeg_backend", cfg.jpeg_backend, "unknown JPEG codec", f"one of {list(JPEG_BACKENDS)}")
    _check_range(cfg, "blur_sigma", lo=0.0, hi=1000.0)
    _check_range(cfg, "rotation_range")
    _check_range(cfg, "betag_range", lo=0.0, hi=100.0, lo_open=True)
    _check_range(cfg, "betap_range", lo=0.0, hi=100.0, lo_open=True)
    _check_range(cfg, "sinc_omega", lo=0.0, hi=math.pi, lo_open=True)
    _check_range(cfg, "resize_scale", lo=0.0, hi=4096.0, lo_open=True)
    _check_range(cfg, "noise_sigma", lo=0.0, hi=255.0)
    _check_range(cfg, "jpeg_quality", lo=1, hi=100, integer=True)
    _check_range(cfg, "color_shift", lo=-255.0, hi=255.0)
    _check_range(cfg, "brightness", lo=0.0, hi=10.0)
    _check_range(cfg, "contrast", lo=0.0, hi=10.0)
    _check_range(cfg, "saturation", lo=0.0, hi=10.0)
    _check_range(cfg, "hue", lo=-0.5, hi=0.5)


def _dr2(severity: str, r: int) -> DegradationConfig:
    # DR2 §4.1 (Eq. 13): "convolved with a Gaussian blur kernel k_sigma, then bicubically downsampled with a scale
    # factor r. n_delta ... randomly chosen from Gaussian, Laplace, and Poisson." Kernel size and isotropy are not
    # stated: we use an isotropic 41-px Gaussian (GFPGAN's size; one sigma per the paper's notation).
    sigma, delta, q = {"mild": ((3, 5), (5, 20), (60, 80)), "medium": ((5, 7), (15, 40), (40, 60)),
                       "severe": ((7, 9), (25, 50), (30, 40))}[severity]
    return DegradationConfig(
        name=f"dr2-{severity}-x{r}", kernel_types=("iso",), kernel_probs=(1.0,), blur_sigma=sigma,
        resize_scale=(r, r), resize_modes=("bicubic",), noise_sigma=delta,
        noise_types=("gaussian", "laplace", "poisson"), noise_probs=(1 / 3, 1 / 3, 1 / 3), jpeg_quality=q)


def _build_presets() -> dict[str, DegradationConfig]:
    presets = {
        # FlipNet §5.1 Eq. (9): sigma, s, delta, q ~ U[0.1,15], U[0.8,32], U[0,20], U[30,95]; "the process is
        # performed for the second time, where random degradations are applied in shuffled order". FlipNet names
        # Real-ESRGAN as the synthesizer, so unstated details follow Real-ESRGAN: resize mode uniform over
        # area/bilinear/bicubic (also for the resize back) and gray noise with p 0.4. Kernel: 41-px iso/aniso
        # Gaussians 50/50 (GFPGAN; sigma 15 is truncated at +-1.3 sigma by the 41-px support, as in the paper's
        # formula with the GFPGAN kernel size).
        # Units of a blur after the resize: sigma is sampled in HQ pixels (the paper's [0.1, 15] at 512 px), so when
        # the shuffled second pass puts the blur after the down-sample it acts in the down-sampled grid's units:
        # sigma * g and kernel size ~41 * g (odd, >= 3), g = LR/HQ size ~ 1/s (``effective_blur``; the report's
        # blur.grid_scale and blur.applied). Read literally (sigma 10 with a 41-px kernel on a 17-px image, the
        # seed-0 case at 512 px) it flattens the image to its mean colour. Real-ESRGAN never blurs after the
        # resize; we keep the paper's shuffled order and the sampled sigma's meaning instead.
        "flipnet": DegradationConfig(
            name="flipnet", order="second", shuffle=True, blur_sigma=(0.1, 15.0), resize_scale=(0.8, 32.0),
            resize_modes=("area", "bilinear", "bicubic"), resize_back="random", noise_sigma=(0.0, 20.0),
            gray_noise_prob=0.4, jpeg_quality=(30, 95)),
        # DR-BFR §4.1 Eq. (11): sigma, r, delta, q from {0.1:10}, {0.8:8}, {0:20}, {60:100} "to ensure direct
        # comparability with recent BFR methods" = GFPGAN's train_gfpgan_v1.yml (41-px iso/aniso 50/50, bilinear
        # resize). GFPGAN's colour jitter (p 0.3, shift 20) and gray (p 0.01) are not in Eq. (11): off here, enable
        # with color_jitter_prob=0.3, gray_prob=0.01.
        "dr-bfr": DegradationConfig(name="dr-bfr"),
        # CLR-Face §4: delta, s, q ~ U[0,20], U[1,32], U[30,90] with the model of GFPGAN et al.; the blur range is
        # not given, we use GFPGAN's sigma [0.1,10] (41-px iso/aniso), bilinear resize.
        "clr-face": DegradationConfig(name="clr-face", resize_scale=(1.0, 32.0), jpeg_quality=(30, 90)),
        # CLR-Face §4 "Extreme Upscaling": fixed x32 (512 -> 16 px) "with noise and blur" (no JPEG mentioned);
        # amounts not given, we use the clr-face training ranges (blur sigma [0.1,10], delta [0,20]).
        "clr-face-x32": DegradationConfig(name="clr-face-x32", resize_scale=(32.0, 32.0), jpeg_prob=0.0),
    }
    for severity in ("mild", "medium", "severe"):
        for r in (4, 8, 16):
            presets[f"dr2-{severity}-x{r}"] = _dr2(severity, r)
    presets["custom"] = DegradationConfig(name="custom")
    return presets


PRESETS: dict[str, DegradationConfig] = _build_presets()


class UnknownPresetError(KeyError, ValueError):
    """Unknown preset name (both a KeyError and a ValueError)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def get_preset(name: str) -> DegradationConfig:
    """The preset ``name`` (case-insensitive); raises ``UnknownPresetError`` listing the valid names."""
    key = str(name).strip().lower()
    if key not in PRESETS:
        raise UnknownPresetError(f"unknown degradation preset {name!r}. Valid presets: {', '.join(PRESETS)}.")
    return PRESETS[key]


# ----------------------------------------------------------------------------------------------------------------
# Parameter sampling (one sampler for both backends)
# ----------------------------------------------------------------------------------------------------------------

def _rng(seed: int, index: int, pass_: int, stage: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index, pass_, _STAGE_IDS[stage]]))


def _uniform(rng: np.random.Generator, rng_pair) -> float:
    a, b = rng_pair
    return float(a) if a == b else float(rng.uniform(a, b))


def _beta(rng, rng_pair) -> float:
    # BasicSR: beta from U(min, 1) or U(1, max) with probability 1/2 each (shape below / above Gaussian).
    a, b = rng_pair
    if a < 1.0 < b:
        return float(rng.uniform(a, 1.0)) if rng.random() < 0.5 else float(rng.uniform(1.0, b))
    return _uniform(rng, rng_pair)


def _choice(rng, items, probs=None):
    if len(items) == 1:
        return items[0]
    p = None if probs is None else np.asarray(probs, float) / float(sum(probs))
    return items[int(rng.choice(len(items), p=p))]


def _sample_blur(cfg, rng) -> dict | None:
    if rng.random() >= cfg.blur_prob:
        return None
    ktype = _choice(rng, cfg.kernel_types, cfg.kernel_probs)
    spec = {"type": ktype, "size": cfg.kernel_size, "sigma_x": None, "sigma_y": None, "theta": None,
            "beta": None, "omega_c": None}
    if ktype == "sinc":
        spec["omega_c"] = _uniform(rng, cfg.sinc_omega)
        return spec
    sx = _uniform(rng, cfg.blur_sigma)
    if ktype.endswith("aniso"):
        sy, theta = _uniform(rng, cfg.blur_sigma), _uniform(rng, cfg.rotation_range)
    else:
        sy, theta = sx, 0.0
    spec.update(sigma_x=sx, sigma_y=sy, theta=theta)
    if ktype.startswith("generalized"):
        spec["beta"] = _beta(rng, cfg.betag_range)
    elif ktype.startswith("plateau"):
        spec["beta"] = _beta(rng, cfg.betap_range)
    return spec


def _scaled_kernel_size(size: int, grid_scale: float) -> int:
    """The odd kernel size nearest ``size * grid_scale``; at least 3 (1 stays 1), at most 255."""
    n = int(size) * float(grid_scale)
    k = 2 * math.floor((n - 1.0) / 2.0 + 0.5) + 1
    return int(min(255, max(k, min(int(size), 3))))


def effective_blur(spec: dict) -> dict:
    """The blur spec in the pixels of the image it meets: what both executors build the kernel from.

    A sampled spec's sigmas, size and sinc cutoff are in input-image pixels, as the config's ranges; its
    ``grid_scale`` is the grid px per input px where the blur runs: 1 before the pass's resize,
    ``sqrt(h*w / (H*W))`` of the down-sampled size h x w when a shuffled order put it after the resize (about 1/s).
    Sigmas are multiplied by it, the kernel size likewise (odd, at least 3: the support keeps its width in
    sigmas), a sinc cutoff divided by it (at most pi, the grid's Nyquist frequency). A spec without ``grid_scale``
    (hand-written, or a report from before this key existed) is applied as written, in the pixels of the image it
    meets. ``spec["applied"]`` (written by ``sample_params``) is for the report only; this function recomputes it.
    """
    g = spec.get("grid_scale")
    if g is None:
        return spec
    if not (_is_num(g) and g > 0):
        raise ValueError(f"blur grid_scale must be a finite number > 0 (grid px per input px), got {g!r}.")
    g = float(g)
    if g == 1.0:
        return spec
    out = {key: value for key, value in spec.items() if key != "applied"}
    out["size"] = _scaled_kernel_size(spec["size"], g)
    if spec["type"] == "sinc":
        out["omega_c"] = min(math.pi, float(spec["omega_c"]) / g)
    else:
        for key in ("sigma_x", "sigma_y"):
            if spec.get(key) is not None:
                out[key] = float(spec[key]) * g
    out["grid_scale"] = 1.0
    return out


def _place_blur(blur: dict, order: list, resize: dict | None, height: int, width: int) -> None:
    """Record where in the pass the sampled blur runs (``grid_scale``) and the kernel it applies (``applied``)."""
    g = 1.0
    if resize is not None and order.index("resize") < order.index("blur"):
        h, w = resize["size"]
        g = math.sqrt(h * w / (height * width))
    blur["grid_scale"] = g
    eff = effective_blur(blur)
    blur["applied"] = {key: eff[key] for key in ("size", "sigma_x", "sigma_y", "omega_c")}


def lr_size(height: int, width: int, scale: float) -> tuple[int, int, bool]:
    """Down-sampled size ``max(1, floor(H/s))`` per axis and whether it had to be clamped to 1 px."""
    h, w = math.floor(height / scale + 1e-9), math.floor(width / scale + 1e-9)
    return max(1, h), max(1, w), h < 1 or w < 1


def _sample_resize(cfg, rng, height, width) -> tuple[dict | None, dict | None]:
    if rng.random() >= cfg.resize_prob:
        return None, None
    scale = _uniform(rng, cfg.resize_scale)
    mode = _choice(rng, cfg.resize_modes)
    if cfg.resize_back == "same":
        back = mode
    elif cfg.resize_back == "random":
        back = _choice(rng, cfg.resize_modes)
    else:
        back = cfg.resize_back
    h, w, clamped = lr_size(height, width, scale)
    if clamped:
        logger.warning("degradation: %dx%d down-scaled by %.3g is below 1 px; clamped to %dx%d "
                       "(reported as resize.clamped)", height, width, scale, h, w)
    return ({"scale": scale, "mode": mode, "size": [h, w], "clamped": clamped},
            {"mode": back, "size": [height, width]})


def _sample_noise(cfg, rng) -> dict | None:
    if rng.random() >= cfg.noise_prob:
        return None
    ntype = _choice(rng, cfg.noise_types, cfg.noise_probs)
    sigma = _uniform(rng, cfg.noise_sigma)
    gray = bool(rng.random() < cfg.gray_noise_prob)
    return {"type": ntype, "sigma": sigma, "gray": gray, "seed": int(rng.integers(0, _MAX_SEED))}


def _sample_jpeg(cfg, rng) -> dict | None:
    if rng.random() >= cfg.jpeg_prob:
        return None
    lo, hi = cfg.jpeg_quality
    return {"quality": int(rng.integers(lo, hi + 1))}


def _sample_color(cfg, rng) -> tuple[list | None, dict | None, bool]:
    shift = None
    if rng.random() < cfg.color_jitter_prob:
        shift = [float(rng.uniform(*cfg.color_shift)) for _ in range(3)]
    gray = bool(rng.random() < cfg.gray_prob)
    jitter = None
    if rng.random() < cfg.color_jitter_pt_prob:
        jitter = {"brightness": _uniform(rng, cfg.brightness), "contrast": _uniform(rng, cfg.contrast),
                  "saturation": _uniform(rng, cfg.saturation), "hue": _uniform(rng, cfg.hue)}
    return shift, jitter, gray


def _check_int(name, value, lo):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}.")
    return int(value)


def sample_params(config: DegradationConfig, batch_size: int, seed: int, height: int, width: int) -> list[dict]:
    """Draw the degradation parameters of ``batch_size`` images of size ``height`` x ``width``.

    Image ``i`` of seed ``s`` always gets the same parameters (whatever the batch size); each stage has its own
    random stream, so changing e.g. the noise range does not change the sampled kernels. The dicts are
    JSON-serialisable and are all ``degrade``/``degrade_numpy`` need.
    """
    if not isinstance(config, DegradationConfig):
        raise TypeError(f"config must be a DegradationConfig (e.g. get_preset('flipnet')), got {type(config).__name__}.")
    batch_size = _check_int("batch_size", batch_size, 1)
    seed = _check_int("seed", seed, 0)
    height, width = _check_int("height", height, 1), _check_int("width", width, 1)
    out = []
    for i in range(batch_size):
        passes = []
        for k in range(config.passes):
            shuffle = config.shuffle_first if k == 0 else config.shuffle
            order = list(STAGES)
            if shuffle:
                order = [STAGES[j] for j in _rng(seed, i, k, "order").permutation(len(STAGES))]
            resize, back = _sample_resize(config, _rng(seed, i, k, "resize"), height, width)
            blur = _sample_blur(config, _rng(seed, i, k, "blur"))
            if blur is not None:
                _place_blur(blur, order, resize, height, width)
            passes.append({
                "order": order,
                "blur": blur,
                "resize": resize,
                "noise": _sample_noise(config, _rng(seed, i, k, "noise")),
                "jpeg": _sample_jpeg(config, _rng(seed, i, k, "jpeg")),
                "resize_back": back,
            })
        shift, jitter, gray = _sample_color(config, _rng(seed, i, 0, "color"))
        out.append({"preset": config.name, "seed": seed, "index": i, "input_size": [height, width],
                    "passes": passes, "color_shift": shift, "gray": gray, "color_jitter": jitter,
                    "round_output": config.round_output})
    return out


# ----------------------------------------------------------------------------------------------------------------
# Kernels (batched torch; shared by both backends)
# ----------------------------------------------------------------------------------------------------------------

def make_kernels(specs: list[dict], device: torch.device | str | None = None) -> torch.Tensor:
    """Normalised blur kernels (n, k, k) float32 for blur specs of one size (BasicSR/Real-ESRGAN families).

    Gaussian ``exp(-Q/2)``, generalized ``exp(-Q^beta/2)``, plateau ``1/(1+Q^beta)`` with
    ``Q = [x y] Sigma^-1 [x y]^T``, ``Sigma = R(theta) diag(sx^2, sy^2) R(theta)^T`` (x = column offset, y = row
    offset, integer-centred grid); sinc ``omega J1(omega r) / (2 pi r)`` (centre ``omega^2/(4 pi)``). Built in
    float64 on the CPU (deterministic), then moved to ``device``. Sigma 0 gives a delta kernel.
    """
    if not specs:
        raise ValueError("make_kernels needs at least one blur spec.")
    size = int(specs[0]["size"])
    if any(int(s["size"]) != size for s in specs) or size < 1 or size % 2 == 0:
        raise ValueError(f"all kernels of a batch must share one odd size, got {[s['size'] for s in specs]}.")
    ax = torch.arange(size, dtype=torch.float64) - size // 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    xx, yy = xx[None], yy[None]

    def col(key, default=0.0):
        return torch.tensor([default if s.get(key) is None else float(s[key]) for s in specs],
                            dtype=torch.float64)[:, None, None]

    types = [s["type"] for s in specs]
    unknown = sorted(set(types) - set(KERNEL_TYPES))
    if unknown:
        raise ValueError(f"unknown kernel type(s) {unknown}; valid: {list(KERNEL_TYPES)}.")
    sx = col("sigma_x", 1.0).clamp_min(1e-6)
    sy = col("sigma_y", 1.0).clamp_min(1e-6)
    th, beta = col("theta"), col("beta", 1.0)
    c, s = torch.cos(th), torch.sin(th)
    a = c * c / sx**2 + s * s / sy**2
    b = c * s * (1.0 / sx**2 - 1.0 / sy**2)
    d = s * s / sx**2 + c * c / sy**2
    q = a * xx * xx + 2.0 * b * xx * yy + d * yy * yy
    family = torch.tensor([0 if t in ("iso", "aniso") else 1 if t.startswith("generalized") else
                           2 if t.startswith("plateau") else 3 for t in types])[:, None, None]
    present = set(family.flatten().tolist())
    k = torch.zeros_like(q)
    if 0 in present:
        k = torch.where(family == 0, torch.exp(-0.5 * q), k)
    if 1 in present:
        k = torch.where(family == 1, torch.exp(-0.5 * q.pow(beta)), k)
    if 2 in present:
        k = torch.where(family == 2, 1.0 / (1.0 + q.pow(beta)), k)
    if 3 in present:
        omega = col("omega_c", math.pi)
        r = torch.sqrt(xx * xx + yy * yy)
        safe_r = torch.where(r == 0, torch.ones_like(r), r)
        sinc = torch.where(r == 0, omega**2 / (4 * math.pi),
                           omega * torch.special.bessel_j1(omega * safe_r) / (2 * math.pi * safe_r))
        k = torch.where(family == 3, sinc, k)
    k = k / k.sum(dim=(-2, -1), keepdim=True)
    return k.to(device=device, dtype=torch.float32)


def _reflect101_index(n: int, pad: int, device) -> torch.Tensor:
    """Source indices of a reflect-101 padded axis (cv2 BORDER_REFLECT_101), valid for any pad and n >= 1."""
    i = torch.arange(-pad, n + pad, device=device)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * n - 2
    m = torch.remainder(i, period)
    return torch.where(m < n, m, period - m)


def _next_fast_len(n: int) -> int:
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def apply_blur(images: torch.Tensor, kernels: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """Correlate each image (B,C,H,W) with its kernel (B,k,k) or a shared (k,k) one, reflect-101 borders.

    ``method``: ``"conv"`` (grouped ``conv2d``), ``"fft"`` (exact circular FFT on the padded image; faster for large
    kernels) or ``"auto"`` (FFT from k = 13). Same result as ``cv2.filter2D(..., borderType=BORDER_REFLECT_101)``.
    """
    if kernels.ndim == 2:
        kernels = kernels[None].expand(images.shape[0], -1, -1)
    n, ch, h, w = images.shape
    k = kernels.shape[-1]
    if kernels.shape != (n, k, k) or k % 2 == 0:
        raise ValueError(f"kernels must be (B,k,k) with odd k and B={n}, got {tuple(kernels.shape)}.")
    p = k // 2
    kernels = kernels.to(device=images.device, dtype=images.dtype)
    if p < h and p < w:
        xp = F.pad(images, (p, p, p, p), mode="reflect")
    else:  # pad longer than the image: reflect repeatedly, as cv2 does
        ri, ci = _reflect101_index(h, p, images.device), _reflect101_index(w, p, images.device)
        xp = images.index_select(-2, ri).index_select(-1, ci)
    if method == "auto":
        method = "fft" if k >= _FFT_MIN_KERNEL else "conv"
    if method == "conv":
        weight = kernels[:, None].repeat_interleave(ch, dim=0)
        out = F.conv2d(xp.reshape(1, n * ch, h + 2 * p, w + 2 * p), weight, groups=n * ch)
        return out.reshape(n, ch, h, w)
    if method != "fft":
        raise ValueError(f"apply_blur method must be 'auto', 'conv' or 'fft', got {method!r}.")
    s1, s2 = _next_fast_len(h + 2 * p), _next_fast_len(w + 2 * p)
    kf = torch.fft.rfft2(torch.flip(kernels, (-2, -1)), s=(s1, s2))
    y = torch.fft.irfft2(torch.fft.rfft2(xp, s=(s1, s2)) * kf[:, None], s=(s1, s2))
    return y[..., 2 * p:2 * p + h, 2 * p:2 * p + w].contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Noise fields (torch generators; shared by both backends so the same seed gives the same field)
# ----------------------------------------------------------------------------------------------------------------

_POISSON_TABLE_MAX = 1000.0  # exact inverse-CDF table below this rate, Cornish-Fisher quantile above


def _poisson_counts(u: torch.Tensor, level: torch.Tensor, lam: float) -> torch.Tensor:
    """Poisson(lam * level/255) counts by inverse CDF at the uniforms ``u`` (float64), per pixel.

    Rates come from 8-bit levels (as BasicSR's Poisson noise, which rounds the image to 8 bits), so the exact CDF
    is tabulated once per level (cumulated pmf); each pixel starts from the Cornish-Fisher normal quantile
    ``mu + sqrt(mu) z + (z^2-1)/6`` and walks to the smallest k with CDF(k) >= u. Rates >= 1000 keep the
    Cornish-Fisher value (off by < 1 count, i.e. < 1/lam in intensity). A pixel's count depends only on its own
    rate and uniform, so tiny input differences between backends stay local.
    """
    dev = u.device
    n_lv = 256
    mus = torch.arange(n_lv, device=dev, dtype=torch.float64) * (lam / 255.0)
    m = mus[level]
    z = torch.special.ndtri(u).clamp(-40.0, 40.0)  # u == 0 gives -inf
    k = torch.where(m > 0, torch.ceil(m + torch.sqrt(m) * z + (z * z - 1.0) / 6.0 - 0.5), 0.0).clamp_min(0.0)
    n_tab = int((mus < _POISSON_TABLE_MAX).sum())
    if n_tab == 0:
        return k
    m_max = float(mus[n_tab - 1])
    n_k = int(m_max + 12.0 * math.sqrt(m_max) + 30.0)
    j = torch.arange(n_k, device=dev, dtype=torch.float64)
    mt = mus[:n_tab, None]
    pmf = torch.exp(j * torch.log(torch.where(mt > 0, mt, torch.ones_like(mt))) - mt - torch.lgamma(j + 1.0))
    pmf[0] = 0.0
    pmf[0, 0] = 1.0  # rate 0: always 0 counts
    cdf = torch.cumsum(pmf, dim=1)
    cdf[:, -1] = 1.0  # the table covers > 12 sigma; close it so every u finds a count
    flat = torch.cat([torch.zeros(n_tab, 1, device=dev, dtype=torch.float64), cdf], dim=1).reshape(-1)
    tab = level < n_tab
    idx = torch.nonzero(tab.reshape(-1)).squeeze(1) if not bool(tab.all()) else None
    kk = k.reshape(-1) if idx is None else k.reshape(-1)[idx]
    uu = u.reshape(-1) if idx is None else u.reshape(-1)[idx]
    row = (level.reshape(-1) if idx is None else level.reshape(-1)[idx]) * (n_k + 1)
    kk = kk.clamp_max(n_k - 1).long()
    act = None  # indices still moving; each pass moves them one count towards their quantile
    for _ in range(4 * n_k):
        if act is None:
            pos, ua, ka = row + kk, uu, kk
        else:
            pos, ua, ka = row[act] + kk[act], uu[act], kk[act]
        # CDF(k) < u: one up; CDF(k-1) >= u: one down (never below 0, even for u == 0)
        step = (ua > flat[pos + 1]).long() - ((ua <= flat[pos]) & (ka > 0)).long()
        moving = torch.nonzero(step).squeeze(1)
        if moving.numel() == 0:
            break
        act = moving if act is None else act[moving]
        kk[act] = ka[moving] + step[moving]
    if idx is None:
        return kk.double().reshape(k.shape)
    out = k.reshape(-1).clone()
    out[idx] = kk.double()
    return out.reshape(k.shape)


def _noise(x: torch.Tensor, spec: dict) -> torch.Tensor:
    """Additive noise (C or 1, h, w) for one image x (C,h,w) in [0,1], from ``spec`` (type, sigma, gray, seed)."""
    sigma = float(spec["sigma"])
    ntype = spec["type"]
    if ntype not in NOISE_TYPES:
        raise ValueError(f"unknown noise type {ntype!r}; valid: {list(NOISE_TYPES)}.")
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"noise sigma must be >= 0 (in /255 units), got {sigma!r}.")
    ch, h, w = x.shape
    shape = (1 if spec["gray"] else ch, h, w)
    gen = torch.Generator(device=x.device)
    gen.manual_seed(int(spec["seed"]))
    if ntype == "gaussian":
        return torch.randn(shape, generator=gen, device=x.device, dtype=torch.float32) * (sigma / 255.0)
    if ntype == "laplace":
        u = torch.rand(shape, generator=gen, device=x.device, dtype=torch.float32) - 0.5
        mag = torch.log1p(-(2.0 * u.abs()).clamp_max(1.0 - 1e-7))
        return -torch.sign(u) * mag * (sigma / 255.0 / math.sqrt(2.0))
    u = torch.rand(shape, generator=gen, device=x.device, dtype=torch.float64)
    lam = 0.5 * (255.0 / sigma) ** 2
    base = x.detach().float().clamp(0.0, 1.0)
    if spec["gray"]:
        base = sum(wt * base[c] for c, wt in enumerate(_LUMA))[None] if ch == 3 else base.mean(0, keepdim=True)
    level = torch.round(base * 255.0).long()
    # Zero-mean around the 8-bit rate; constant w.r.t. the image (torch.poisson has a zero gradient anyway).
    return (_poisson_counts(u, level, lam) / lam - level.double() / 255.0).float()


# ----------------------------------------------------------------------------------------------------------------
# JPEG
# ----------------------------------------------------------------------------------------------------------------

def _check_quality(q) -> int:
    if isinstance(q, bool) or not _is_num(q) or float(q) != int(q) or not 1 <= int(q) <= 100:
        raise ValueError(f"JPEG quality must be an integer in [1, 100], got {q!r}. Fix the jpeg_quality range.")
    return int(q)


def _libjpeg_uint8(rgb: np.ndarray, quality: int) -> np.ndarray:
    """Encode/decode an RGB uint8 HWC image with libjpeg (cv2; 4:2:0, islow DCT; = PIL ``save(quality=q)``)."""
    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"cv2.imencode failed for a {rgb.shape} image at quality {quality}.")
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]


# ----------------------------------------------------------------------------------------------------------------
# torch backend (batched, on the input's device)
# ----------------------------------------------------------------------------------------------------------------

def _round8(x: torch.Tensor) -> torch.Tensor:
    r = torch.round(x * 255.0) / 255.0
    return x + (r - x).detach() if x.requires_grad else r


def _t_blur(x, specs, jpeg):
    return apply_blur(x, make_kernels([effective_blur(s) for s in specs], x.device)).clamp(0.0, 1.0)


def _t_resize(x, size, mode):
    if mode == "area":
        out = F.interpolate(x, size=tuple(size), mode="area")
    else:
        out = F.interpolate(x, size=tuple(size), mode=mode, align_corners=False, antialias=True)
    return out.clamp(0.0, 1.0)


def _t_noise(x, specs, jpeg):
    noise = [_noise(x[j], s) if float(s["sigma"]) > 0 else None for j, s in enumerate(specs)]
    if all(n is None for n in noise):
        return x
    noise = torch.stack([torch.zeros(x.shape[1:], device=x.device) if n is None else
                         n.expand(x.shape[1], -1, -1) for n in noise])
    return (x + noise.to(x.dtype)).clamp(0.0, 1.0)


def _t_jpeg(x, specs, jpeg):
    qs = [_check_quality(s["quality"]) for s in specs]
    if jpeg == "differentiable":
        import kornia

        q = torch.tensor(qs, device=x.device, dtype=x.dtype)
        return kornia.enhance.jpeg_codec_differentiable(x, q).clamp(0.0, 1.0)
    out = []
    for j, q in enumerate(qs):
        dec = torch.from_numpy(np.ascontiguousarray(_libjpeg_uint8(to_uint8(x[j]), q)))
        out.append(dec.permute(2, 0, 1).to(device=x.device, dtype=x.dtype) / 255.0)
    return torch.stack(out)


def _t_color(x: torch.Tensor, prm: dict) -> torch.Tensor:
    """GFPGAN colour ops on one image (1,3,H,W): per-channel shift, grayscale, then brightness/contrast/sat/hue."""
    luma = torch.tensor(_LUMA, device=x.device, dtype=x.dtype)[None, :, None, None]
    if prm.get("color_shift") is not None:
        shift = torch.tensor(prm["color_shift"], device=x.device, dtype=x.dtype)[None, :, None, None] / 255.0
        x = (x + shift).clamp(0.0, 1.0)
    if prm.get("gray"):
        x = (x * luma).sum(1, keepdim=True).expand(-1, 3, -1, -1)
    jit = prm.get("color_jitter")
    if jit is not None:
        x = (x * jit["brightness"]).clamp(0.0, 1.0)
        mean = (x * luma).sum(1, keepdim=True).mean(dim=(-2, -1), keepdim=True)
        x = (jit["contrast"] * x + (1.0 - jit["contrast"]) * mean).clamp(0.0, 1.0)
        gray = (x * luma).sum(1, keepdim=True)
        x = (jit["saturation"] * x + (1.0 - jit["saturation"]) * gray).clamp(0.0, 1.0)
        m = torch.from_numpy(_hue_matrix(jit["hue"])).to(device=x.device, dtype=x.dtype)
        x = torch.einsum("ij,bjhw->bihw", m, x).clamp(0.0, 1.0)
    return x


def _hue_matrix(hue: float) -> np.ndarray:
    """Rotation by 2*pi*hue about the gray axis (1,1,1)/sqrt(3) (Rodrigues), float32 3x3."""
    a = 2.0 * math.pi * float(hue)
    c, s = math.cos(a), math.sin(a)
    t = (1.0 - c) / 3.0
    r = s / math.sqrt(3.0)
    return np.array([[c + t, t - r, t + r], [t + r, c + t, t - r], [t - r, t + r, c + t]], dtype=np.float32)


_T_STAGES: dict[str, Callable] = {"blur": _t_blur, "noise": _t_noise, "jpeg": _t_jpeg}


def _degrade_torch(x: torch.Tensor, params: list[dict], jpeg: str) -> torch.Tensor:
    xs = [x[i:i + 1] for i in range(x.shape[0])]
    n_passes = max(len(p["passes"]) for p in params)
    for k in range(n_passes):
        active = [i for i, p in enumerate(params) if k < len(p["passes"])]
        for step in range(len(STAGES)):
            groups: dict[tuple, list[int]] = {}
            for i in active:
                ps = params[i]["passes"][k]
                stage = ps["order"][step]
                spec = ps[stage]
                if spec is None:
                    continue
                shape = tuple(xs[i].shape)
                if stage == "resize":
                    if list(shape[-2:]) == list(spec["size"]):
                        continue
                    key = (stage, shape, tuple(spec["size"]), spec["mode"])
                elif stage == "blur":
                    key = (stage, shape, int(effective_blur(spec)["size"]))
                else:
                    key = (stage, shape)
                groups.setdefault(key, []).append(i)
            for key, idx in groups.items():
                batch = torch.cat([xs[i] for i in idx]) if len(idx) > 1 else xs[idx[0]]
                if key[0] == "resize":
                    out = _t_resize(batch, key[2], key[3])
                else:
                    specs = [params[i]["passes"][k][key[0]] for i in idx]
                    out = _T_STAGES[key[0]](batch, specs, jpeg)
                for j, i in enumerate(idx):
                    xs[i] = out[j:j + 1]
        groups = {}
        for i in active:
            back = params[i]["passes"][k]["resize_back"]
            if back is None or list(xs[i].shape[-2:]) == list(back["size"]):
                continue
            groups.setdefault((tuple(xs[i].shape), tuple(back["size"]), back["mode"]), []).append(i)
        for (_, size, mode), idx in groups.items():
            out = _t_resize(torch.cat([xs[i] for i in idx]), size, mode)
            for j, i in enumerate(idx):
                xs[i] = out[j:j + 1]
    for i, p in enumerate(params):
        xs[i] = _t_color(xs[i], p)
        if p.get("round_output", True):
            xs[i] = _round8(xs[i])
    return torch.cat(xs)


# ----------------------------------------------------------------------------------------------------------------
# numpy / cv2 / libjpeg backend (one image, CPU)
# ----------------------------------------------------------------------------------------------------------------

def _np_resize(img: np.ndarray, size, mode: str) -> np.ndarray:
    """Resize an HWC float32 image: bilinear enlargement by cv2 (= the triangle filter), the rest by the torch
    backend's CPU kernels (area pooling: bit-identical with the torch backend on CPU, faster than numpy cumsums;
    antialiased bilinear/bicubic: PIL's separable filter, PIL's own float path is several times slower)."""
    h, w = int(size[0]), int(size[1])
    if mode == "bilinear" and h >= img.shape[0] and w >= img.shape[1]:
        import cv2

        out = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
        if out.ndim == 2:
            out = out[..., None]
    elif mode in RESIZE_MODES:
        chw = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]
        res = _t_resize(chw, (h, w), mode)
        out = np.ascontiguousarray(res[0].numpy().transpose(1, 2, 0))
    else:
        raise ValueError(f"unknown resize mode {mode!r}; valid: {list(RESIZE_MODES)}.")
    return np.clip(out, 0.0, 1.0, out=out)


def _np_stage(img: np.ndarray, stage: str, spec: dict) -> np.ndarray:
    import cv2

    if stage == "blur":
        kernel = make_kernels([effective_blur(spec)])[0].numpy()
        k64 = kernel.astype(np.float64)
        ky, kx = k64.sum(axis=1), k64.sum(axis=0) / k64.sum()
        if np.abs(np.outer(ky, kx) - k64).max() <= 1e-7 * k64.max():
            # rank one (isotropic / axis-aligned Gaussians): two 1-D passes, same result up to float rounding
            out = cv2.sepFilter2D(img, -1, kx.astype(np.float32), ky.astype(np.float32),
                                  borderType=cv2.BORDER_REFLECT_101)
        else:
            out = cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT_101)
        return np.clip(out, 0.0, 1.0, out=out)
    if stage == "resize":
        if list(img.shape[:2]) == list(spec["size"]):
            return img
        return _np_resize(img, spec["size"], spec["mode"])
    if stage == "noise":
        if float(spec["sigma"]) <= 0:
            return img
        n = _noise(torch.from_numpy(img).permute(2, 0, 1), spec).permute(1, 2, 0).numpy()
        out = img + n
        return np.clip(out, 0.0, 1.0, out=out)
    if stage == "jpeg":
        q = _check_quality(spec["quality"])
        return _libjpeg_uint8(to_uint8(img), q).astype(np.float32) / np.float32(255.0)
    raise ValueError(f"unknown stage {stage!r}; valid: {list(STAGES)}.")


def _np_color(img: np.ndarray, prm: dict) -> np.ndarray:
    luma = np.asarray(_LUMA, np.float32)
    if prm.get("color_shift") is not None:
        img = np.clip(img + np.asarray(prm["color_shift"], np.float32) / np.float32(255.0), 0.0, 1.0)
    if prm.get("gray"):
        img = np.repeat((img @ luma)[..., None], 3, axis=-1)
    jit = prm.get("color_jitter")
    if jit is not None:
        img = np.clip(img * np.float32(jit["brightness"]), 0.0, 1.0)
        c = np.float32(jit["contrast"])
        img = np.clip(c * img + (1 - c) * np.float32((img @ luma).mean()), 0.0, 1.0)
        s = np.float32(jit["saturation"])
        img = np.clip(s * img + (1 - s) * (img @ luma)[..., None], 0.0, 1.0)
        img = np.clip(img @ _hue_matrix(jit["hue"]).T, 0.0, 1.0)
    return img.astype(np.float32, copy=False)


def _prepare_numpy(image: np.ndarray) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"expected an HWC image with 1-4 channels (or HW gray), got shape {arr.shape}.")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"image is empty: shape {arr.shape}.")
    dtype = arr.dtype
    arr = _to_rgb_hwc(arr)
    if dtype == np.uint8:
        x = arr.astype(np.float32)
        x /= np.float32(255.0)
    elif dtype == np.uint16:
        x = arr.astype(np.float32)
        x /= np.float32(65535.0)
    elif np.issubdtype(dtype, np.floating):
        x = np.ascontiguousarray(arr, dtype=np.float32)
        vmin, vmax = float(x.min()), float(x.max())  # NaN propagates, inf shows
        n_bad = 0 if math.isfinite(vmin) and math.isfinite(vmax) else int((~np.isfinite(x)).sum())
        _check_values(vmin, vmax, n_bad)
        if vmin < 0.0 or vmax > 1.0:
            x = np.clip(x, 0.0, 1.0)
    else:
        raise ValueError(f"unsupported image dtype {dtype}; use uint8, uint16 or float in [0, 1].")

    def restore(out: np.ndarray) -> np.ndarray:
        if dtype == np.uint8:
            return to_uint8(out)
        if dtype == np.uint16:
            return np.clip(np.rint(out * 65535.0), 0, 65535).astype(np.uint16)
        return out.astype(dtype, copy=False)

    return np.ascontiguousarray(x), restore


def _to_rgb_hwc(x: np.ndarray) -> np.ndarray:
    # 1 channel: gray, replicated; 2: gray + alpha, alpha dropped; 4: RGBA, alpha dropped (not composited).
    c = x.shape[2]
    if c in (1, 2):
        return np.repeat(x[..., :1], 3, axis=-1)
    return x[..., :3]


def _check_values(vmin: float, vmax: float, n_bad: int) -> None:
    if n_bad:
        raise ValueError(f"the image has {n_bad} NaN/inf pixel values; clean the input (e.g. nan_to_num) first.")
    if vmin < -1.0 / 255 or vmax > 1.0 + 1.0 / 255:
        raise ValueError(f"float images must be in [0, 1], got values in [{vmin:.4g}, {vmax:.4g}]. "
                         "If they are 0..255, divide by 255; if -1..1, use (x + 1) / 2.")


def _check_params(params: dict, height: int, width: int) -> None:
    if not isinstance(params, dict) or "passes" not in params:
        raise ValueError("params must be one dict from sample_params(...) (with a 'passes' list).")
    size = params.get("input_size")
    if size is not None and [int(size[0]), int(size[1])] != [height, width]:
        raise ValueError(f"params were sampled for a {size[0]}x{size[1]} image but the image is {height}x{width}; "
                         "call sample_params with this image's height and width.")
    for p in params["passes"]:
        if sorted(p["order"]) != sorted(STAGES):
            raise ValueError(f"pass order must be a permutation of {list(STAGES)}, got {p['order']}.")
        if p.get("jpeg") is not None:
            _check_quality(p["jpeg"]["quality"])
        if p.get("blur") is not None:
            effective_blur(p["blur"])  # a bad grid_scale fails before any work


def degrade_numpy(image_hwc_uint8_or_float: np.ndarray, params: dict, *, jpeg: str = "libjpeg") -> np.ndarray:
    """Degrade one RGB HWC image (uint8/uint16, or float in [0,1]) with ``params`` on the CPU (cv2/PIL/libjpeg).

    Gray (HW or 1 channel) is replicated to RGB; a 2nd/4th channel is taken as alpha and dropped. Returns an
    (H, W, 3) array of the input's dtype. Same result as ``degrade(..., backend="torch")`` within the tolerances
    in the module docstring.
    """
    if jpeg != "libjpeg":
        raise ValueError(f"degrade_numpy only runs the libjpeg codec, got jpeg={jpeg!r}; "
                         "use degrade(..., backend='torch', jpeg='differentiable') for kornia's codec.")
    img, restore = _prepare_numpy(image_hwc_uint8_or_float)
    _check_params(params, img.shape[0], img.shape[1])
    return restore(_run_numpy(img, params))


def _run_numpy(img: np.ndarray, params: dict) -> np.ndarray:
    """The cv2 executor on a checked, contiguous float32 RGB HWC image in [0,1]."""
    for p in params["passes"]:
        for stage in p["order"]:
            if p[stage] is not None:
                img = _np_stage(img, stage, p[stage])
        back = p.get("resize_back")
        if back is not None and list(img.shape[:2]) != list(back["size"]):
            img = _np_resize(img, back["size"], back["mode"])
    img = _np_color(img, params)
    if params.get("round_output", True):
        img = img * np.float32(255.0)
        np.rint(img, out=img)
        img /= np.float32(255.0)
    return img.astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------------

def _prepare_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor (B,3,H,W) in [0,1], got {type(images).__name__}; "
                        "for numpy arrays use degrade_numpy.")
    if images.ndim != 4:
        raise ValueError(f"images must be a (B,C,H,W) batch, got shape {tuple(images.shape)}.")
    b, c, h, w = images.shape
    if c not in (1, 2, 3, 4):
        hint = " It looks channels-last: use images.movedim(-1, 1)." if images.shape[-1] in (1, 2, 3, 4) else ""
        raise ValueError(f"images must have 1-4 channels on dim 1, got shape {tuple(images.shape)}.{hint}")
    if b < 1 or h < 1 or w < 1:
        raise ValueError(f"images must be non-empty, got shape {tuple(images.shape)}.")
    if not images.is_floating_point():
        raise ValueError(f"images must be float in [0,1], got dtype {images.dtype}; use images.float() / 255.")
    x = images.float()
    lo, hi = torch.aminmax(x.detach())  # one pass; NaN propagates and inf shows
    vmin, vmax = float(lo), float(hi)
    n_bad = 0 if math.isfinite(vmin) and math.isfinite(vmax) else int((~torch.isfinite(x.detach())).sum())
    _check_values(vmin, vmax, n_bad)
    if vmin < 0.0 or vmax > 1.0:
        x = x.clamp(0.0, 1.0)
    if c in (1, 2):
        x = x[:, :1].expand(-1, 3, -1, -1)
    elif c == 4:
        x = x[:, :3]
    return x.contiguous()


def degrade(images: torch.Tensor, config: DegradationConfig, seed: int = 0, backend: str = "torch",
            params: list[dict] | None = None, jpeg: str | None = None) -> tuple[torch.Tensor, list[dict]]:
    """Classical degradation of a batch (B,C,H,W) in [0,1] on any device; returns (images, params used).

    ``backend``: ``"torch"`` (batched on the input's device) or ``"cv2"`` (per image on the CPU, libjpeg only).
    ``jpeg``: ``"libjpeg"`` (real codec, per image on the CPU) or ``"differentiable"`` (kornia, on the device);
    ``None`` uses ``config.jpeg_backend`` (default libjpeg). ``params`` (from ``sample_params``) replaces sampling.
    Gray / gray+alpha inputs are replicated to RGB and alpha is dropped, so the output always has 3 channels;
    otherwise the output has the input's shape, dtype and device.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}.")
    if not isinstance(config, DegradationConfig):
        raise TypeError(f"config must be a DegradationConfig (e.g. get_preset('flipnet')), got {type(config).__name__}.")
    jpeg = config.jpeg_backend if jpeg is None else jpeg
    if jpeg not in JPEG_BACKENDS:
        raise ValueError(f"jpeg must be one of {list(JPEG_BACKENDS)}, got {jpeg!r}.")
    if backend == "cv2" and jpeg != "libjpeg":
        raise ValueError("backend='cv2' runs the real libjpeg codec only; use backend='torch' with "
                         "jpeg='differentiable' for kornia's differentiable codec.")
    x = _prepare_images(images)
    b, _, h, w = x.shape
    if params is None:
        params = sample_params(config, b, seed, h, w)
    elif not isinstance(params, (list, tuple)) or len(params) != b:
        raise ValueError(f"params must be a list with one dict per image ({b}), got "
                         f"{len(params) if isinstance(params, (list, tuple)) else type(params).__name__}.")
    for p in params:
        _check_params(p, h, w)
    if backend == "torch":
        out = _degrade_torch(x, list(params), jpeg)
    else:
        hwc = x.detach().cpu().permute(0, 2, 3, 1).contiguous()
        res = torch.empty_like(hwc)
        for i in range(b):
            res[i] = torch.from_numpy(_run_numpy(hwc[i].numpy(), params[i]))
        out = res.permute(0, 3, 1, 2).to(x.device)  # a channels-last view: no extra copy
    return out.to(images.dtype), [dict(p) for p in params]

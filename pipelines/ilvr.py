"""DR2 / ILVR low-frequency refinement: the pure math, shared by the diffusers pipeline and the ComfyUI sampler.

DR2 (Wang et al., CVPR 2023, §3.3) starts from the degraded input y diffused to step omega (Eq. 9), denoises with
any diffusion model, replaces the low-frequency part of every x_{t-1} with that of y_{t-1} (Eq. 10), and stops at
tau with the x0 prediction (Eq. 11). Phi_N is ILVR's low-pass filter: downsample by N, upsample back, exactly ILVR's
MATLAB-imresize-style resizer (bicubic a=-0.5, antialiased when shrinking, symmetric boundary), borders included.

A noise level is always given by its k-diffusion sigma = sqrt((1 - alpha_bar) / alpha_bar); every function that
touches x_t takes a ``parameterization``:

- ``"ddpm"``:  x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps   (the paper, diffusers)
- ``"sigma"``: x_t = x0 + sigma eps                                 (k-diffusion, ComfyUI)

The two differ only by the factor sqrt(alpha_bar) on x_t and Phi_N is linear, so one implementation serves both.

Units: tau and omega are indices on a respaced schedule of ``steps`` levels (DR2 "inferences every 10 steps":
steps = T = 100 over SD's 1000 training steps); level i is training timestep round(i * 999 / (steps - 1)).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F

from ..sd.diffusion import TRAIN_TIMESTEPS

logger = logging.getLogger(__name__)

Parameterization = Literal["ddpm", "sigma"]
SPACES = ("latent", "pixel")
OMEGA_RULES = ("auto", "official")
DR2_STEPS = 100  # DR2's respaced T
VAE_SCALE_FACTOR = 8  # SD VAE: one latent pixel = 8x8 image pixels

# DR2's demo presets (N, tau) at 256 px, pixel space, T = 100 (Kaldwin0106/DR2 demo.py / readme).
PAPER_PRESETS = {"mild": (4, 22), "medium": (8, 35), "severe": (16, 35)}
PAPER_RESOLUTION = 256

# Official code's omega offsets (T = 100 units), keyed by the largest N they apply to.
_OFFICIAL_OMEGA_OFFSETS = ((1, 5), (2, 10), (4, 20), (8, 25), (math.inf, 30))


class DR2ParameterError(ValueError):
    """A bad DR2 parameter; the message names the parameter, the value and the fix."""


# --------------------------------------------------------------------------------------------------------------
# Schedule: respaced levels, omega rules, sigmas
# --------------------------------------------------------------------------------------------------------------


def respaced_timesteps(steps: int = DR2_STEPS, train_timesteps: int = TRAIN_TIMESTEPS) -> list[int]:
    """Training timestep of each respaced level 0..steps-1, evenly spread over [0, train_timesteps - 1]."""
    if steps < 2 or steps > train_timesteps:
        raise DR2ParameterError(
            f"steps must be in [2, {train_timesteps}] (got {steps}); DR2 uses steps=100 (one level every 10 "
            "training timesteps).")
    stride = (train_timesteps - 1) / (steps - 1)
    return [round(i * stride) for i in range(steps)]


def omega_official(tau: int, n: float, steps: int = DR2_STEPS) -> int:
    """The official DR2 code's N-dependent omega (tau + 5/10/20/25/30 at T=100, scaled to ``steps``), clipped."""
    offset = next(off for limit, off in _OFFICIAL_OMEGA_OFFSETS if n <= limit)
    return min(tau + max(1, round(offset * steps / DR2_STEPS)), steps - 1)


def omega_auto(tau: int, steps: int = DR2_STEPS) -> int:
    """The paper's rule omega = tau + 0.25 T (§3.3), clipped to the last level."""
    return min(tau + max(1, round(0.25 * steps)), steps - 1)


def resolve_omega(tau: int, omega: int | str, n: float, steps: int = DR2_STEPS) -> int:
    """Turn ``"auto"`` / ``"official"`` / an explicit level into a level index (not validated)."""
    if omega == "auto":
        return omega_auto(tau, steps)
    if omega == "official":
        return omega_official(tau, n, steps)
    if isinstance(omega, str):
        raise DR2ParameterError(f"omega must be 'auto', 'official' or an integer level (got {omega!r}).")
    return int(omega)


def validate_parameters(n: float, tau: int, omega: int | str = "auto", steps: int = DR2_STEPS,
                        space: str = "latent", train_timesteps: int = TRAIN_TIMESTEPS) -> int:
    """Check N, tau, omega, steps, space; return the resolved omega. Raises DR2ParameterError naming the fix."""
    if not (isinstance(n, (int, float)) and math.isfinite(n)) or n < 1:
        raise DR2ParameterError(
            f"N must be a number >= 1 (got {n!r}); N is the low-pass factor: 1 keeps the whole input, larger N "
            "keeps only coarser structure (DR2 uses 4, 8, 16 at 256 px).")
    if int(steps) != steps or steps < 2 or steps > train_timesteps:
        raise DR2ParameterError(
            f"steps must be an integer in [2, {train_timesteps}] (got {steps!r}); it is the length T of the "
            "respaced schedule (DR2: 100).")
    if int(tau) != tau or tau < 0:
        raise DR2ParameterError(f"tau must be an integer >= 0 (got {tau!r}); DR2 presets use 22 or 35 of T=100.")
    if tau >= steps - 1:
        raise DR2ParameterError(
            f"tau={tau} leaves no room below the last level {steps - 1} (steps={steps}); choose tau < {steps - 1}.")
    resolved = resolve_omega(int(tau), omega, n, int(steps))
    if resolved > steps - 1:
        raise DR2ParameterError(
            f"omega={resolved} exceeds the last level T-1={steps - 1} (steps={steps}); use omega <= {steps - 1} "
            "or 'auto' (tau + T/4).")
    if resolved <= tau:
        raise DR2ParameterError(
            f"omega={resolved} must be greater than tau={tau}: denoising runs from omega down to tau; use 'auto' "
            f"(tau + T/4 = {omega_auto(int(tau), int(steps))}) or a larger omega.")
    if space not in SPACES:
        raise DR2ParameterError(f"space must be one of {SPACES} (got {space!r}).")
    return resolved


@dataclass(frozen=True)
class DR2Schedule:
    """The levels DR2 visits: respaced indices omega..tau and their training timesteps (descending)."""

    tau: int
    omega: int
    steps: int
    timesteps: tuple[int, ...]

    @property
    def levels(self) -> range:
        return range(self.omega, self.tau - 1, -1)


def make_schedule(n: float, tau: int, omega: int | str = "auto", steps: int = DR2_STEPS,
                  train_timesteps: int = TRAIN_TIMESTEPS) -> DR2Schedule:
    """Validated schedule from omega down to tau (inclusive) on the respaced grid."""
    omega_i = validate_parameters(n, tau, omega, steps, "latent", train_timesteps)
    grid = respaced_timesteps(int(steps), train_timesteps)
    return DR2Schedule(int(tau), omega_i, int(steps), tuple(grid[i] for i in range(omega_i, int(tau) - 1, -1)))


def schedule_sigmas(schedule: DR2Schedule, sigma_table: torch.Tensor) -> torch.Tensor:
    """sigma_omega ... sigma_tau from a per-training-timestep table (ComfyUI ``model_sampling.sigmas``)."""
    if sigma_table.shape[0] <= max(schedule.timesteps):
        raise DR2ParameterError(
            f"the model's schedule has {sigma_table.shape[0]} timesteps but DR2 needs timestep "
            f"{max(schedule.timesteps)}; only discrete 1000-step (SD1/SD2-style) models are supported.")
    return sigma_table[list(schedule.timesteps)].to(torch.float32)


# --------------------------------------------------------------------------------------------------------------
# The math: Phi_N, Eq. 9, Eq. 10, Eq. 11, one ancestral transition
# --------------------------------------------------------------------------------------------------------------


def scales(sigma, parameterization: Parameterization, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with x_t = a x0 + b eps at level ``sigma`` (scalar or per-sample), shaped to broadcast with ``like``."""
    s = torch.as_tensor(sigma, dtype=torch.float64 if like.dtype == torch.float64 else torch.float32,
                        device=like.device)
    s = s.reshape(-1, *([1] * (like.ndim - 1))) if s.ndim else s
    if parameterization == "sigma":
        return torch.ones_like(s), s
    if parameterization == "ddpm":
        a = torch.rsqrt(1.0 + s * s)
        return a, s * a
    raise DR2ParameterError(f"parameterization must be 'ddpm' or 'sigma' (got {parameterization!r}).")


def _keys_cubic(t: torch.Tensor) -> torch.Tensor:
    """MATLAB's bicubic kernel (Keys, a = -0.5): zero outside |t| <= 2."""
    a = t.abs()
    near = (1.5 * a - 2.5) * a * a + 1.0
    far = ((-0.5 * a + 2.5) * a - 4.0) * a + 2.0
    return torch.where(a <= 1, near, torch.where(a <= 2, far, torch.zeros_like(a)))


@functools.lru_cache(maxsize=64)
def _resize_matrix(in_len: int, out_len: int, antialias: bool) -> torch.Tensor:
    """(out_len, in_len) float64 CPU matrix of one axis of ILVR's resizer.py (MATLAB imresize, bicubic).

    Output pixel x (1-based) sits at u = x / s + (1 - 1 / s) / 2 on the input, s = out_len / in_len; it takes
    ceil(width) + 2 taps from floor(u - width / 2), weighted by the Keys cubic (stretched to s k(s t), width 4 / s,
    when shrinking with antialiasing) and normalised to sum 1. Taps outside the image are mirrored with MATLAB's
    symmetric rule (0 -> 1, -1 -> 2, in_len + 1 -> in_len, periodic beyond) and their weights added onto the pixel
    they land on.
    """
    scale = out_len / in_len
    stretch = antialias and scale < 1
    width = 4.0 / scale if stretch else 4.0
    u = torch.arange(1, out_len + 1, dtype=torch.float64) / scale + 0.5 * (1.0 - 1.0 / scale)
    left = torch.floor(u - width / 2)
    taps = left[:, None] + torch.arange(math.ceil(width) + 2, dtype=torch.float64)  # 1-based input indices
    dist = u[:, None] - taps
    weights = scale * _keys_cubic(scale * dist) if stretch else _keys_cubic(dist)
    weights = weights / weights.sum(dim=1, keepdim=True)
    mirror = torch.cat([torch.arange(in_len), torch.arange(in_len - 1, -1, -1)])
    cols = mirror[(taps.long() - 1).remainder(2 * in_len)]
    return torch.zeros(out_len, in_len, dtype=torch.float64).scatter_add_(1, cols, weights)


@functools.lru_cache(maxsize=64)
def _lowpass_matrix(length: int, small: int) -> torch.Tensor:
    """Phi_N along one axis, folded into one (length, length) float64 matrix: up(small -> length) @ down."""
    return _resize_matrix(small, length, True) @ _resize_matrix(length, small, True)


def lowpass(x: torch.Tensor, n: float) -> torch.Tensor:
    """Phi_N (DR2 Eq. 10, ILVR): down by N and up, as MATLAB imresize bicubic (a=-0.5), antialiased, symmetric edges."""
    if n < 1:
        raise DR2ParameterError(f"N must be >= 1 (got {n}).")
    if n == 1:
        return x
    # ILVR's resizer.py given explicit shapes (small = round(size / N), so fractional N works), folded per axis into
    # one projection: M_h @ x @ M_w^T over the last two dims, in float32 (float64 for float64 input).
    h, w = x.shape[-2:]
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    m_h = _lowpass_matrix(h, max(1, round(h / n))).to(dtype=work).to(x.device)
    m_w = _lowpass_matrix(w, max(1, round(w / n))).to(dtype=work).to(x.device)
    return (m_h @ F.linear(x.to(work), m_w)).to(x.dtype)


def diffuse(y: torch.Tensor, noise: torch.Tensor, sigma, parameterization: Parameterization) -> torch.Tensor:
    """y_t = sqrt(ab) y + sqrt(1 - ab) eps (DR2 Eq. 9 / DDPM Eq. 2); sigma form y + sigma eps."""
    a, b = scales(sigma, parameterization, y)
    return (a * y + b * noise).to(y.dtype)


def refine(x: torch.Tensor, y_t: torch.Tensor, n: float) -> torch.Tensor:
    """x := Phi_N(y_t) + (I - Phi_N)(x) (DR2 Eq. 10), computed as x + Phi_N(y_t - x) (Phi_N is linear)."""
    return x + lowpass(y_t - x, n)


def predict_x0(x: torch.Tensor, eps: torch.Tensor, sigma, parameterization: Parameterization) -> torch.Tensor:
    """x0-hat = (x_t - sqrt(1 - ab) eps) / sqrt(ab) (DR2 Eq. 11); sigma form x - sigma eps."""
    a, b = scales(sigma, parameterization, x)
    return ((x - b * eps) / a).to(x.dtype)


def eps_from_x0(x: torch.Tensor, x0: torch.Tensor, sigma, parameterization: Parameterization) -> torch.Tensor:
    """The noise implied by x_t and an x0 estimate (inverse of Eq. 11)."""
    a, b = scales(sigma, parameterization, x)
    return ((x - a * x0) / b).to(x.dtype)


def eps_from_v(x: torch.Tensor, v: torch.Tensor, sigma, parameterization: Parameterization) -> torch.Tensor:
    """eps from a v-prediction (v = sqrt(ab) eps - sqrt(1 - ab) x0): eps = sqrt(ab) v + sqrt(1 - ab) x_t(DDPM)."""
    a_d, b_d = scales(sigma, "ddpm", x)
    x_ddpm = x if parameterization == "ddpm" else x * a_d
    return (a_d * v + b_d * x_ddpm).to(x.dtype)


def ancestral_step(x: torch.Tensor, x0: torch.Tensor, sigma, sigma_next, noise: torch.Tensor,
                   parameterization: Parameterization) -> torch.Tensor:
    """One DDPM transition x_t -> x_{t-1} ~ q(x_{t-1} | x_t, x0-hat) with the posterior variance (DDPM Eq. 7).

    In sigma form this is the eta=1 ancestral step: sigma_up^2 = s'^2 (s^2 - s'^2) / s^2, sigma_down^2 =
    s'^2 - sigma_up^2, x' = x0 + sigma_down eps-hat + sigma_up z; in DDPM form both sides carry sqrt(ab).
    """
    if float(torch.as_tensor(sigma_next).max()) <= 0:
        return x0
    a, b = scales(sigma, parameterization, x)
    a_next, b_next = scales(sigma_next, parameterization, x)
    s, s_next = b / a, b_next / a_next
    eps_hat = (x / a - x0) / s
    var_up = (s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2).clamp(min=0)
    sigma_down = (s_next ** 2 - var_up).clamp(min=0).sqrt()
    return (a_next * (x0 + sigma_down * eps_hat + var_up.sqrt() * noise)).to(x.dtype)


# --------------------------------------------------------------------------------------------------------------
# Refiners: Eq. 10 in latent space, and with Phi_N in pixel space through a VAE
# --------------------------------------------------------------------------------------------------------------


class LatentRefiner:
    """Eq. 10 on the latent: x_{t-1} := x_{t-1} + Phi_N(y_{t-1} - x_{t-1}), N in latent pixels."""

    def __init__(self, y: torch.Tensor, n: float, parameterization: Parameterization):
        self.y, self.n, self.parameterization = y, float(n), parameterization

    def __call__(self, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
        return refine(x, diffuse(self.y, eps, sigma, self.parameterization), self.n)


class PixelRefiner:
    """Eq. 10 with Phi_N on images in [0, 1]. x_{t-1} = a x0 + n and y_{t-1} = a y + b eps split Eq. 10 (linear) into

    clean: Phi_N(y) + (I - Phi_N)(D(x0)) in pixels, re-encoded (one VAE round trip per step), and
    noise: Phi_{N/f}(b eps) + (I - Phi_{N/f})(n) on the latent grid (f = VAE factor; N/f < 1 -> fresh noise).

    ``y_pixels`` (B,3,H,W) is the degraded input in [0, 1]; ``decode(latent)`` must return images in [0, 1] and
    ``encode(image)`` take them (the convention of ``sd.vae`` and of ComfyUI's VAE). ``interrupt()`` is called
    between the decode and the encode of every step (it raises to cancel).
    """

    def __init__(self, y_pixels: torch.Tensor, n: float, decode: Callable[[torch.Tensor], torch.Tensor],
                 encode: Callable[[torch.Tensor], torch.Tensor], parameterization: Parameterization,
                 vae_scale_factor: int = VAE_SCALE_FACTOR, interrupt: Callable[[], None] | None = None):
        self.n, self.parameterization = float(n), parameterization
        self.decode, self.encode = decode, encode
        self.interrupt = interrupt
        self.y_low = lowpass(y_pixels, self.n)  # Phi_N(y) is the same every step
        self.noise_n = max(1.0, self.n / vae_scale_factor)

    def refine_clean(self, x0: torch.Tensor) -> torch.Tensor:
        """Phi_N(y) + (I - Phi_N)(D(x0)), encoded back to a latent."""
        image = self.decode(x0)
        if self.interrupt is not None:
            self.interrupt()
        y_low = self.y_low.to(image.device, image.dtype)
        return self.encode(y_low + image - lowpass(image, self.n)).to(x0.device, x0.dtype)

    def __call__(self, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
        a, b = scales(sigma, self.parameterization, x)
        noise_part = x - a * x0
        clean = self.refine_clean(x0)
        return (a * clean + refine(noise_part, b * eps, self.noise_n)).to(x.dtype)


# --------------------------------------------------------------------------------------------------------------
# Noise and the loop
# --------------------------------------------------------------------------------------------------------------


def step_seed(seed: int) -> int:
    """Seed of the per-step noise stream, decorrelated from the initial noise drawn with ``seed`` itself."""
    return (int(seed) ^ 0x5DEECE66D) & 0x7FFF_FFFF_FFFF_FFFF


class DR2Noise:
    """Noise of one DR2 run: eps at omega (Eq. 9) and, per transition, the DDPM noise z and the eps of y_{t-1}.

    ``initial`` defaults to ``torch.randn(shape, generator=torch.manual_seed(seed))`` on the CPU, which is exactly
    ComfyUI's ``comfy.sample.prepare_noise``; per-step noise comes from a CPU generator seeded with
    ``step_seed(seed)``. Both wrappers use this class, so the same seed gives the same numbers on both sides.
    """

    def __init__(self, seed: int, shape: Sequence[int] | None = None, initial: torch.Tensor | None = None):
        if initial is None:
            if shape is None:
                raise ValueError("DR2Noise needs either shape or initial noise")
            initial = torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(int(seed)))
        self.initial = initial
        self._gen = torch.Generator("cpu").manual_seed(step_seed(seed))

    def step(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, eps) for one transition, drawn in that order, on ``like``'s device and dtype."""
        z = torch.randn(like.shape, generator=self._gen)
        eps = torch.randn(like.shape, generator=self._gen)
        return z.to(like.device, like.dtype), eps.to(like.device, like.dtype)


Denoiser = Callable[[torch.Tensor, float, int], torch.Tensor]  # (x_t, sigma, step index) -> x0-hat
Refiner = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]  # (x, x0, eps, sigma) -> x


@dataclass
class DR2Result:
    x0: torch.Tensor  # x0-hat at tau (Eq. 11): the DR2 output, clean latent
    x_tau: torch.Tensor  # the refined sample at tau


def dr2_sample(denoise: Denoiser, y: torch.Tensor, sigmas: Sequence[float] | torch.Tensor, noise: DR2Noise,
               refiner: Refiner, parameterization: Parameterization,
               callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
               interrupt: Callable[[], None] | None = None) -> DR2Result:
    """DR2 §3.3: x_omega := y_omega (Eq. 9); per transition, a DDPM step then Eq. 10; x0-hat at tau (Eq. 11).

    ``sigmas`` run from sigma_omega down to sigma_tau; the model is evaluated len(sigmas) times (the last one at
    tau gives the output). ``callback(i, x, x0)`` is called after each evaluation (progress, preview);
    ``interrupt()`` before each model evaluation and before each refinement (it raises to cancel the run).
    """
    levels = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    if len(levels) < 2 or any(b >= a for a, b in zip(levels, levels[1:])):
        raise DR2ParameterError(
            f"DR2 needs at least two strictly decreasing sigmas (omega > tau), got {levels[:4]}...; build them with "
            "the BFR DR2 Sigmas node / make_schedule.")
    x = diffuse(y, noise.initial.to(y.device, y.dtype), levels[0], parameterization)
    check = interrupt if interrupt is not None else (lambda: None)
    for i, (s, s_next) in enumerate(zip(levels, levels[1:])):
        check()
        x0 = denoise(x, s, i)
        z, eps = noise.step(x)
        x = ancestral_step(x, x0, s, s_next, z, parameterization)
        if s_next > 0:
            check()
            x = refiner(x, x0, eps, s_next)
        if callback is not None:
            callback(i, x, x0)
    last = len(levels) - 1
    check()
    x0 = denoise(x, levels[-1], last) if levels[-1] > 0 else x
    if callback is not None:
        callback(last, x, x0)
    return DR2Result(x0=x0, x_tau=x)


# --------------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------------


def preset(name: str, space: str = "latent", resolution: int = 512) -> tuple[float, int]:
    """DR2's (N, tau) presets scaled to ``resolution``: pixel N * res/256, latent N * res/256 / 8; tau unchanged."""
    if name not in PAPER_PRESETS:
        raise DR2ParameterError(f"unknown DR2 preset {name!r}; choose one of {sorted(PAPER_PRESETS)}.")
    if space not in SPACES:
        raise DR2ParameterError(f"space must be one of {SPACES} (got {space!r}).")
    n, tau = PAPER_PRESETS[name]
    n_pixel = n * resolution / PAPER_RESOLUTION
    return (n_pixel if space == "pixel" else max(1.0, n_pixel / VAE_SCALE_FACTOR)), tau

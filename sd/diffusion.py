"""Diffusion math on SD's discrete DDPM schedule (Ho et al. 2020; FlipNet Eq. 1-3), one function per equation.

``alphas_cumprod`` is alpha_bar_t per training timestep (T = 1000 for SD 1.x/2.x). The k-diffusion noise level
used by ComfyUI is sigma = sqrt((1 - alpha_bar) / alpha_bar), so that x_sigma = x0 + sigma * eps.
"""

from __future__ import annotations

import torch

TRAIN_TIMESTEPS = 1000
PREDICTION_TYPES = ("epsilon", "v_prediction")


def sd_alphas_cumprod(train_timesteps: int = TRAIN_TIMESTEPS, beta_start: float = 0.00085,
                      beta_end: float = 0.012) -> torch.Tensor:
    """alpha_bar of SD's scaled-linear schedule (float64)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma = sqrt((1 - alpha_bar) / alpha_bar) (k-diffusion / ComfyUI parameterization)."""
    return ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5


def alphas_cumprod_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """alpha_bar = 1 / (1 + sigma^2), the inverse of :func:`sigmas_from_alphas_cumprod`."""
    return 1.0 / (1.0 + sigmas ** 2)


def _gather(alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """alphas_cumprod[t] reshaped to broadcast against ``like`` (B, ...)."""
    a = alphas_cumprod.to(device=like.device, dtype=torch.float32)[t.to(like.device).long()]
    return a.view(-1, *([1] * (like.ndim - 1)))


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r} is not supported; use one of {PREDICTION_TYPES}.")


def q_sample(z0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """q(z_t | z_0) (FlipNet Eq. 1, DDPM Eq. 4): z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) eps."""
    a = _gather(alphas_cumprod, t, z0)
    return (a.sqrt() * z0.float() + (1.0 - a).sqrt() * noise.float()).to(z0.dtype)


def diffusion_target(
    z0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Regression target of FlipNet Eq. 2: eps (eps-prediction, SD2.1-base) or v = sqrt(a) eps - sqrt(1-a) z0."""
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    a = _gather(alphas_cumprod, t, z0)
    return (a.sqrt() * noise.float() - (1.0 - a).sqrt() * z0.float()).to(z0.dtype)


def predict_x0(
    z_t: torch.Tensor, model_out: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """FlipNet Eq. 3: z0_hat = (z_t - sqrt(1 - a_t) eps_theta) / sqrt(a_t)  (v-prediction: sqrt(a) z_t - sqrt(1-a) v)."""
    _check_prediction_type(prediction_type)
    a = _gather(alphas_cumprod, t, z_t)
    if prediction_type == "epsilon":
        return ((z_t.float() - (1.0 - a).sqrt() * model_out.float()) / a.sqrt()).to(z_t.dtype)
    return (a.sqrt() * z_t.float() - (1.0 - a).sqrt() * model_out.float()).to(z_t.dtype)

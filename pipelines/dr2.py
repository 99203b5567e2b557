"""DR2 on a diffusers SD model (CLI, evaluation): the same loop as the ComfyUI sampler, DDPM parameterization.

``restore(model, images, DR2Config(...))`` encodes the degraded images (B,3,H,W) in [0, 1] through the one VAE
codec (:mod:`..sd.vae`), runs :func:`.ilvr.dr2_sample` with the UNet as eps_theta(x_t, t) and returns the decoded
x0-hat at tau (DR2 §3.3, Eq. 9-11), images in [0, 1], plus its model-space latents. No comfy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..sd import vae as codec
from ..sd.diffusion import sigmas_from_alphas_cumprod
from ..sd.loader import SDModel
from . import ilvr

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]  # (done, total); may raise to cancel


@dataclass(frozen=True)
class DR2Config:
    """DR2 controls. N is in latent pixels for space='latent' and in image pixels for space='pixel'."""

    n: float = 2.0
    tau: int = 35
    omega: int | str = "auto"  # "auto" (tau + T/4), "official" (N-dependent offsets) or a level
    steps: int = 100  # T of the respaced schedule; tau/omega count its levels
    space: str = "latent"
    seed: int = 0

    def validate(self) -> int:
        """Raise DR2ParameterError on bad values; return the resolved omega."""
        return ilvr.validate_parameters(self.n, self.tau, self.omega, self.steps, self.space)


@dataclass
class DR2Output:
    images: torch.Tensor  # (B, 3, H, W) in [0, 1]: x0-hat at tau, decoded
    latents: torch.Tensor  # (B, 4, H/8, W/8): x0-hat at tau, model space (VAE latent x scaling factor)
    x_tau: torch.Tensor  # the refined sample at tau (DDPM form)


def pad_to_multiple(images: torch.Tensor, multiple: int = ilvr.VAE_SCALE_FACTOR) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad (B,C,H,W) on the bottom/right to a multiple of ``multiple``; return it and the original size."""
    h, w = images.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        images = F.pad(images, (0, pw, 0, ph), mode=mode)
    return images, (h, w)


# ---------------------------------------------------------------------------------------------- the pipeline


def make_denoiser(model: SDModel, timesteps: tuple[int, ...], context: torch.Tensor) -> ilvr.Denoiser:
    """x0-hat(x_t) from the UNet in DDPM form (Eq. 11), eps or v prediction."""
    param = next(model.unet.parameters())

    def denoise(x: torch.Tensor, sigma: float, i: int) -> torch.Tensor:
        t = torch.full((x.shape[0],), timesteps[i], device=param.device, dtype=torch.long)
        out = model.unet(x.to(param.device, param.dtype), t, encoder_hidden_states=context).sample.to(x.dtype)
        eps = out if model.prediction_type == "epsilon" else ilvr.eps_from_v(x, out, sigma, "ddpm")
        return ilvr.predict_x0(x, eps, sigma, "ddpm")

    return denoise


@torch.no_grad()
def restore_latents(model: SDModel, latents: torch.Tensor, config: DR2Config, *,
                    y_pixels: torch.Tensor | None = None, context: torch.Tensor | None = None,
                    noise: ilvr.DR2Noise | None = None, progress: ProgressFn | None = None) -> ilvr.DR2Result:
    """DR2 on model-space LQ latents. ``y_pixels`` (in [0, 1]) is the pixel reference for space='pixel'."""
    config.validate()
    schedule = ilvr.make_schedule(config.n, config.tau, config.omega, config.steps,
                                  model.alphas_cumprod.shape[0])
    sigmas = ilvr.schedule_sigmas(schedule, sigmas_from_alphas_cumprod(model.alphas_cumprod))
    param = next(model.unet.parameters())
    y = latents.to(param.device, torch.float32)
    if context is None:
        context = torch.zeros(y.shape[0], 77, model.context_dim)  # null conditioning (DR2 is unconditional)
    context = context.to(param.device, param.dtype)
    if config.space == "pixel":
        if y_pixels is None:
            y_pixels = codec.decode(model.vae, y)
        refiner = ilvr.PixelRefiner(y_pixels.to(param.device, torch.float32), config.n,
                                    lambda z: codec.decode(model.vae, z), lambda im: codec.encode(model.vae, im).float(),
                                    "ddpm",
                                    vae_scale_factor=model.vae_scale_factor)
    else:
        refiner = ilvr.LatentRefiner(y, config.n, "ddpm")
    noise = noise or ilvr.DR2Noise(config.seed, y.shape)
    total = len(schedule.timesteps)
    callback = (lambda i, x, x0: progress(i + 1, total)) if progress else None
    logger.info("DR2: N=%s tau=%d omega=%d steps=%d space=%s seed=%d, %d model evaluations", config.n,
                schedule.tau, schedule.omega, schedule.steps, config.space, config.seed, total)
    return ilvr.dr2_sample(make_denoiser(model, schedule.timesteps, context), y, sigmas, noise, refiner, "ddpm",
                           callback=callback)


@torch.no_grad()
def restore(model: SDModel, images: torch.Tensor, config: DR2Config, *, context: torch.Tensor | None = None,
            progress: ProgressFn | None = None) -> DR2Output:
    """DR2 on images (B,3,H,W) in [0, 1]; sizes that are not multiples of 8 are reflect-padded and cropped back."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"DR2 expects images of shape (B, 3, H, W), got {tuple(images.shape)}; convert to RGB.")
    if images.shape[0] == 0:
        raise ValueError("DR2 got an empty batch (0 images); pass at least one image.")
    if not torch.isfinite(images).all():
        raise ValueError("DR2 input contains NaN or inf pixels; fix the image before restoring it.")
    config.validate()
    padded, (h, w) = pad_to_multiple(images.float(), model.vae_scale_factor)
    latents = codec.encode(model.vae, padded).float()
    result = restore_latents(model, latents, config, y_pixels=padded, context=context, progress=progress)
    out = codec.decode(model.vae, result.x0)[..., :h, :w]
    return DR2Output(images=out.cpu(), latents=result.x0.cpu(), x_tau=result.x_tau.cpu())


def demo_rows(model: SDModel, hq, degraded: dict[str, torch.Tensor], config: DR2Config,
              label_fmt: str = "DR2 N={n:g} tau={tau}") -> list[list[tuple[str, object]]]:
    """``bfr demo``: one panel row per degradation preset: HQ input | degraded | DR2(degraded)."""
    rows = []
    label = label_fmt.format(n=config.n, tau=config.tau) + ("" if model.is_real else " (TINY RANDOM MODEL)")
    for name, image in degraded.items():
        x = image if image.ndim == 4 else image[None]
        restored = restore(model, x.float(), config).images[0]
        rows.append([("input (HQ)", hq), (name, x[0]), (label, restored)])
        logger.info("demo: DR2 on %s done", name)
    return rows

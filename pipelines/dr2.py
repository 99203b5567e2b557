"""DR2 on a diffusers SD model (CLI, evaluation): the same loop as the ComfyUI sampler, DDPM parameterization.

``restore(model, images, DR2Config(...))`` encodes the degraded images, runs :func:`.ilvr.dr2_sample` with the
UNet as eps_theta(x_t, t) and returns the decoded x0-hat at tau (DR2 §3.3, Eq. 9-11) plus its latents. No comfy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import ilvr
from .sd_models import SDModel, load_model

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


# ---------------------------------------------------------------------------------------------- VAE codec


def encode(vae, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (B,3,H,W; clamped) -> model-space latents (deterministic: the posterior mode)."""
    param = next(vae.parameters())
    out = vae.encode(images.clamp(-1.0, 1.0).to(param.device, param.dtype))
    dist = getattr(out, "latent_dist", None)
    latents = dist.mode() if dist is not None else out.latents
    return latents.float() * float(getattr(vae.config, "scaling_factor", 1.0))


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Model-space latents -> images in [-1, 1], clamped (DR2 clips x0-hat)."""
    param = next(vae.parameters())
    z = latents / float(getattr(vae.config, "scaling_factor", 1.0))
    return vae.decode(z.to(param.device, param.dtype)).sample.float().clamp(-1.0, 1.0)


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
    """DR2 on model-space LQ latents. ``y_pixels`` (in [-1, 1]) is the pixel reference for space='pixel'."""
    config.validate()
    schedule = ilvr.make_schedule(config.n, config.tau, config.omega, config.steps,
                                  model.alphas_cumprod.shape[0])
    sigmas = ilvr.schedule_sigmas(schedule, ilvr.sigmas_from_alphas_cumprod(model.alphas_cumprod))
    param = next(model.unet.parameters())
    y = latents.to(param.device, torch.float32)
    if context is None:
        context = torch.zeros(y.shape[0], 77, model.context_dim)  # null conditioning (DR2 is unconditional)
    context = context.to(param.device, param.dtype)
    if config.space == "pixel":
        if y_pixels is None:
            y_pixels = decode(model.vae, y)
        refiner = ilvr.PixelRefiner(y_pixels.to(param.device, torch.float32), config.n,
                                    lambda z: decode(model.vae, z), lambda im: encode(model.vae, im), "ddpm",
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
    if not torch.isfinite(images).all():
        raise ValueError("DR2 input contains NaN or inf pixels; fix the image before restoring it.")
    config.validate()
    padded, (h, w) = pad_to_multiple(images.float() * 2.0 - 1.0, model.vae_scale_factor)
    latents = encode(model.vae, padded)
    result = restore_latents(model, latents, config, y_pixels=padded, context=context, progress=progress)
    out = (decode(model.vae, result.x0)[..., :h, :w] + 1.0) / 2.0
    return DR2Output(images=out.clamp(0, 1).cpu(), latents=result.x0.cpu(), x_tau=result.x_tau.cpu())


# ---------------------------------------------------------------------------------------------- CLI entry points


def restore_file(image: str | Path, out: str | Path, config: DR2Config, *, model: SDModel | None = None,
                 checkpoint: str | Path | None = None, download: bool = False, repo_id: str | None = None,
                 size: int | None = None, device: str = "cpu") -> Path:
    """``bfr restore --method dr2 IMAGE --out OUT``: restore one image file (or every image in a folder).

    ``out`` is a file for one image, a folder for a folder. The model comes from ``model`` or the resolution
    order of :func:`.sd_models.load_model` (tiny random fallback, loudly). ``size`` resizes to a square first.
    """
    from PIL import Image

    from .sample_data import load_image

    image, out = Path(image), Path(out)
    if model is None:
        model = load_model(checkpoint, download=download, repo_id=repo_id, device=device)
    config.validate()
    sources = sorted(p for p in image.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES) if image.is_dir() else [image]
    if not sources:
        raise FileNotFoundError(f"no images ({', '.join(_IMAGE_SUFFIXES)}) in {image}")
    if image.is_dir() or out.suffix.lower() not in _IMAGE_SUFFIXES:
        out.mkdir(parents=True, exist_ok=True)
    for src in sources:
        arr = load_image(src, size=size)
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 255.0
        result = restore(model, x, config,
                         progress=lambda d, t: logger.debug("DR2 %s: %d/%d", src.name, d, t))
        dst = out / f"{src.stem}_dr2.png" if out.is_dir() else out
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_to_uint8(result.images[0])).save(dst)
        logger.info("DR2 restored %s -> %s", src, dst)
    if not model.is_real:
        logger.warning("the output above came from the TINY RANDOM model: it is NOT a real restoration")
    return out


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


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _to_uint8(image: torch.Tensor):
    import numpy as np

    return np.clip(np.rint(image.permute(1, 2, 0).numpy() * 255.0), 0, 255).astype(np.uint8)

"""The one VAE codec: images in [0, 1] <-> model-space latents (VAE latent x ``config.scaling_factor``).

Works for diffusers ``AutoencoderKL`` (posterior mean, or a sample with ``sample=True``) and ``AutoencoderTiny``
(TAESD). Every method (DR2, FlipNet, training) encodes and decodes through these two functions.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _param(vae: nn.Module) -> torch.Tensor:
    return next(vae.parameters())


def scaling_factor(vae: nn.Module) -> float:
    return float(getattr(vae.config, "scaling_factor", 1.0))


def encode(vae: nn.Module, images: torch.Tensor, *, sample: bool = False,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Images (B,3,H,W) in [0, 1] (clamped) -> model-space latents in the VAE's dtype and device.

    Deterministic by default (the posterior mean, which is its mode); ``sample=True`` draws from the posterior."""
    p = _param(vae)
    x = images.to(p.device, p.dtype).clamp(0.0, 1.0) * 2.0 - 1.0
    out = vae.encode(x)
    dist = getattr(out, "latent_dist", None)
    if dist is None:
        z = out.latents
    else:
        z = dist.sample(generator) if sample else dist.mean
    return z * scaling_factor(vae)


def decode(vae: nn.Module, latents: torch.Tensor, *, clamp: bool = True) -> torch.Tensor:
    """Model-space latents -> images (B,3,H,W) in [0, 1], float32; ``clamp=False`` keeps gradients past the range."""
    p = _param(vae)
    out = vae.decode(latents.to(p.device, p.dtype) / scaling_factor(vae)).sample.float()
    images = (out + 1.0) * 0.5
    return images.clamp(0.0, 1.0) if clamp else images

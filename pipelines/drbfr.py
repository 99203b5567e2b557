"""DR-BFR restoration on SD2.1-base (DR-BFR §3.2, design.md §3.4): the diffusers sampler.

eps_theta(z_t, f_LQ, f_DR, t) (Eq. 8) is :func:`..lora.ldrm.concat_unet_eps`: the UNet (SD2.1 + LoRA + the widened
conv_in) sees ``[z_t, E_VAE(y)]`` on the channel axis and ``[text, alpha_t f_DR + beta_t]`` on the token axis, with
f_DR = E_DR(y) computed once per image and the DR tokens re-modulated at every step's t (Eq. 10). The LQ latent and
the DR tokens condition both CFG branches; only the text differs (the trainer drops the caption for CFG). Sampling is
DDIM on SD2.1's training betas. The ComfyUI node (:mod:`..nodes.drbfr`) runs the same two functions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler

from ..lora.cond_checkpoint import DRBFR_FORMAT, apply_conditional_checkpoint, read_conditional_checkpoint
from ..lora.ldrm import concat_unet_eps
from ..sd.loader import encode_prompts, load_components
from ..sd.vae import decode as vae_decode
from ..sd.vae import encode as vae_encode

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 50  # the paper samples its LDM with 50 DDIM steps (§4.1 implementation details: unstated; ours)


@dataclass
class DRBFRSampleConfig:
    """Sampling settings. ``guidance_scale`` 1 (no CFG: the paper has no text; ours), ``use_dr_prompt`` False drops
    the DR tokens (the "w/o DR" ablation; with a zero conv_in it is SD2.1 itself)."""

    num_inference_steps: int = DEFAULT_STEPS
    guidance_scale: float = 1.0
    prompt: str = ""
    negative_prompt: str = ""
    use_dr_prompt: bool = True
    seed: int = 0
    seeds: list[int] | None = None

    def __post_init__(self):
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}.")
        if self.guidance_scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1 = no CFG), got {self.guidance_scale}.")


def check_images(images: torch.Tensor, what: str = "DR-BFR") -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{what} expects images (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}.")
    if images.shape[-1] % 8 or images.shape[-2] % 8 or min(images.shape[-2:]) < 16:
        raise ValueError(f"{what}: image size {tuple(images.shape[-2:])} must be multiples of 8 and >= 16 "
                         "(aligned 512 x 512 faces as in training).")
    if not torch.isfinite(images).all():
        raise ValueError(f"{what}: input images contain NaN/inf values.")


def row_noise(shape, seeds) -> torch.Tensor:
    """Initial noise, row i from its own CPU generator (device and batching independent)."""
    rows = [torch.randn(tuple(shape[1:]), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows)


class DRBFRPipeline:
    """A UNet carrying the DR-BFR LoRA + widened conv_in, the SD VAE / text encoder, E_DR and the DR prompt."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, dr_encoder, dr_prompt, defaults=None):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler = DDIMScheduler.from_config(scheduler.config)
        self.dr_encoder, self.dr_prompt = dr_encoder, dr_prompt
        self.defaults = dict(defaults or {})

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @classmethod
    def from_checkpoint(cls, base: str | Path | None, checkpoint: str | Path, device="cpu", dtype=torch.float32,
                        components: dict | None = None, tokenizer: str | Path | None = None) -> DRBFRPipeline:
        """Base SD2.1 components (``base`` path, or ready ``components``) + a ``drbfr/1`` file."""
        if components is None and not base:
            raise ValueError("DRBFRPipeline.from_checkpoint needs the SD2.1-base model path (--base-model).")
        ckpt = read_conditional_checkpoint(checkpoint, DRBFR_FORMAT)
        comps = components or load_components(base, tokenizer=tokenizer, device=device, dtype=dtype)
        apply_conditional_checkpoint(comps["unet"], ckpt)
        comps["unet"].to(device=device, dtype=dtype).eval()
        enc = ckpt.build("dr_encoder").to(device=device, dtype=dtype)
        prompt = ckpt.build("dr_prompt").to(device=device, dtype=dtype)
        return cls(comps["unet"], comps["vae"], comps["text_encoder"], comps["tokenizer"], comps["scheduler"], enc,
                   prompt, ckpt.defaults)

    @torch.no_grad()
    def degradation_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """f_DR = E_DR(y) (Eq. 3), (B, l, d)."""
        p = next(self.dr_encoder.parameters())
        return self.dr_encoder(images.to(p.device, p.dtype))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, cfg: DRBFRSampleConfig | None = None,
                 callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """LQ faces (B, 3, H, W) in [0, 1] -> restored faces in [0, 1]."""
        cfg = cfg or DRBFRSampleConfig()
        check_images(images)
        device, dtype = self.device, next(self.unet.parameters()).dtype
        b = images.shape[0]
        seeds = list(cfg.seeds) if cfg.seeds is not None else [cfg.seed + i for i in range(b)]
        if len(seeds) != b:
            raise ValueError(f"DRBFRSampleConfig.seeds has {len(seeds)} entries for a batch of {b} images.")
        lq_latent = vae_encode(self.vae, images.to(device)).to(dtype)
        f_dr = self.degradation_tokens(images) if cfg.use_dr_prompt else None
        prompt = self.dr_prompt if cfg.use_dr_prompt else None
        pos = encode_prompts(self.tokenizer, self.text_encoder, [cfg.prompt] * b).to(dtype)
        do_cfg = cfg.guidance_scale > 1.0 and cfg.negative_prompt != cfg.prompt
        if do_cfg:
            neg = encode_prompts(self.tokenizer, self.text_encoder, [cfg.negative_prompt] * b).to(dtype)
            text, lq_latent = torch.cat([neg, pos]), lq_latent.repeat(2, 1, 1, 1)
            f_dr = None if f_dr is None else f_dr.repeat(2, 1, 1)
        else:
            text = pos
        self.scheduler.set_timesteps(cfg.num_inference_steps, device=device)
        x = row_noise(lq_latent[:b].shape, seeds).to(device, dtype) * self.scheduler.init_noise_sigma
        total = len(self.scheduler.timesteps)
        for i, t in enumerate(self.scheduler.timesteps):
            x_in = self.scheduler.scale_model_input(x, t).repeat(2 if do_cfg else 1, 1, 1, 1)
            tt = torch.full((x_in.shape[0],), int(t), device=device)
            eps = concat_unet_eps(self.unet, x_in, tt, text, lq_latent, prompt, f_dr)
            if do_cfg:
                uncond, cond = eps.chunk(2)
                eps = uncond + cfg.guidance_scale * (cond - uncond)
            x = self.scheduler.step(eps, t, x).prev_sample
            if callback is not None:
                callback(i + 1, total)
        return vae_decode(self.vae, x).clamp(0.0, 1.0)

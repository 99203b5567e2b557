"""FlipNet inference on diffusers components (FlipNet §4, design §3.3): restoration and degradation mode.

One sampler serves both modes; only the roles flip:

* ``restore``: the condition is the LQ image; the HQ image is generated; text + BFR face tokens (LQ encoder ->
  adapter) in cross-attention; negative prompt "low quality, blurry, ..."; CFG 1.5.
* ``degrade``: the condition is the HQ image; the LQ image is generated; text only (null prompt by default).

Each step the UNet sees the joint batch ``cat([x_t, y_{t_y}])`` (BoostHub convention, ``lora/boosthub.py``): the
condition latent diffused to ``t_y`` (policy ``same``: t_y = t; ``fixed``: a constant with a fixed noise draw). Under
``fixed`` the condition stream never changes, so the LQ cache (``lq_cache=True``) runs it once to record every
BoostHub layer's K/V and then denoises the input stream alone.

Base components come from :func:`..sd.loader.load_components`; folder-level use (``bfr restore --method flipnet``,
``bfr synthesize``) lives in :mod:`..cli.folders`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusers import DDIMScheduler

from ..lora.checkpoint import FLIPNET_MODES, FlipNetDefaults, apply_flipnet_checkpoint, build_face_modules, read_flipnet_checkpoint
from ..lora import face_embedder
from ..lora.boosthub import boosthub_is_zero, boosthub_processors
from ..sd.diffusion import predict_x0, q_sample
from ..sd.loader import encode_prompts, load_components
from ..sd.vae import decode as vae_decode
from ..sd.vae import encode as vae_encode

logger = logging.getLogger(__name__)

DEFAULT_NEGATIVE_PROMPT = ("low quality, blurry, poorly rendered hands, deformed, jpeg artifacts, noisy, "
                           "out of focus, low resolution")


def mode_streams(mode: str, hq: torch.Tensor, lq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input stream, condition stream): restore = (HQ, LQ), degrade = (LQ, HQ) -- "simply flipping the inputs"."""
    if mode == "restore":
        return hq, lq
    if mode == "degrade":
        return lq, hq
    raise ValueError(f"FlipNet mode must be one of {FLIPNET_MODES}, got {mode!r}.")


def joint_batch(input_stream: torch.Tensor, condition_stream: torch.Tensor) -> torch.Tensor:
    """cat([input, condition]) on the batch axis: row i pairs with row B+i in BoostHub (§4.1)."""
    if input_stream.shape != condition_stream.shape:
        raise ValueError(f"Input and condition latents must have the same shape, got {tuple(input_stream.shape)} "
                         f"and {tuple(condition_stream.shape)}.")
    return torch.cat([input_stream, condition_stream], dim=0)


# --------------------------------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class FlipNetSampleConfig:
    """Sampling settings (paper §5.1: CFG 1.5, negative prompt for restoration, null prompt for degradation)."""

    mode: str = "restore"
    num_inference_steps: int = 50
    guidance_scale: float = 1.5
    prompt: str = ""
    negative_prompt: str | None = None  # None: DEFAULT_NEGATIVE_PROMPT (restore) / "" (degrade)
    phi: float | None = None  # None: the checkpoint's default
    t_y_policy: str | None = None  # "same" | "fixed"; None: the checkpoint's default
    t_y: int | None = None
    lq_cache: bool = True
    use_face_embedding: bool = True
    seed: int = 0
    seeds: list[int] | None = None  # one seed per image (overrides ``seed``); results then ignore batching

    def __post_init__(self):
        if self.mode not in FLIPNET_MODES:
            raise ValueError(f"mode must be one of {FLIPNET_MODES}, got {self.mode!r}.")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}.")
        if self.guidance_scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (paper: 1.5), got {self.guidance_scale}.")
        if self.phi is not None and self.phi < 0:
            raise ValueError(f"phi must be >= 0 (paper: 1, range [0, 2]), got {self.phi}.")
        if self.t_y_policy is not None and self.t_y_policy not in ("same", "fixed"):
            raise ValueError(f"t_y_policy must be 'same' or 'fixed', got {self.t_y_policy!r}.")
        if self.t_y is not None and not 0 <= self.t_y < 1000:
            raise ValueError(f"t_y must be in [0, 999], got {self.t_y}.")


class FlipNetPipeline:
    """Diffusers-based FlipNet sampler: a UNet carrying the FlipNet LoRA + BoostHub, the SD VAE/text encoder, a
    scheduler (DDIM by default) and, for restoration, the LQ face encoder + adapter."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, boosthub_state, face_encoder=None, adapter=None,
                 face_image_size: int | None = None, defaults=None, sampling_scheduler=None):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        # the training (DDPM) schedule defines q(y_t | y); sampling uses DDIM on the same betas unless given
        self.train_alphas = scheduler.alphas_cumprod
        self.scheduler = sampling_scheduler or DDIMScheduler.from_config(scheduler.config)
        self.state = boosthub_state
        self.face_encoder, self.adapter = face_encoder, adapter
        self.face_image_size = face_image_size
        self.defaults = defaults or FlipNetDefaults()

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @classmethod
    def from_checkpoint(cls, base: str | Path | None, checkpoint: str | Path, device="cpu", dtype=torch.float32,
                        components: dict | None = None, tokenizer: str | Path | None = None) -> FlipNetPipeline:
        """Base SD2.1 components (``base`` path, or ready ``components``) + a FlipNet ``.safetensors``."""
        if components is None and not base:
            raise ValueError("FlipNetPipeline.from_checkpoint needs the SD2.1-base model path (--base-model).")
        comps = components or load_components(base, tokenizer=tokenizer, device=device, dtype=dtype)
        ckpt = read_flipnet_checkpoint(checkpoint)
        state = apply_flipnet_checkpoint(comps["unet"], ckpt)
        comps["unet"].to(device=device, dtype=dtype).eval()
        enc = ada = None
        if ckpt.has_face_embedder:
            enc, ada = build_face_modules(ckpt)
            enc.to(device=device, dtype=dtype)
            ada.to(device=device, dtype=dtype)
        return cls(comps["unet"], comps["vae"], comps["text_encoder"], comps["tokenizer"], comps["scheduler"], state,
                   enc, ada, ckpt.face_image_size, ckpt.defaults)

    def boosthub_active(self, phi: float) -> bool:
        """Whether BoostHub can change the output: phi > 0 and some W_o non-zero. Otherwise the condition stream is
        not run at all (no joint batch) and sampling is exactly the LoRA-only UNet's, as the ComfyUI node does."""
        hubs = [p.hub for p in boosthub_processors(self.unet).values()]
        return float(phi) > 0 and not boosthub_is_zero(hubs)

    def face_tokens(self, lq_images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tau(z_y), tau(0)) for the conditional and unconditional branches."""
        return face_embedder.face_tokens(self.face_encoder, self.adapter, lq_images, self.face_image_size)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, cfg: FlipNetSampleConfig | None = None,
                 callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Condition images (B,3,H,W) in [0,1] (LQ to restore, or HQ to degrade) -> generated images in [0,1]."""
        cfg = cfg or FlipNetSampleConfig()
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"FlipNet expects images (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}.")
        if images.shape[-1] % 8 or images.shape[-2] % 8:
            raise ValueError(f"Image size {tuple(images.shape[-2:])} must be a multiple of 8 (512 recommended).")
        if not torch.isfinite(images).all():
            raise ValueError("Input images contain NaN/inf values.")
        device, dtype = self.device, next(self.unet.parameters()).dtype
        b = images.shape[0]
        phi = self.defaults.phi if cfg.phi is None else cfg.phi
        policy = cfg.t_y_policy or self.defaults.t_y_policy
        t_y_fixed = self.defaults.t_y if cfg.t_y is None else cfg.t_y
        negative = cfg.negative_prompt if cfg.negative_prompt is not None else (
            DEFAULT_NEGATIVE_PROMPT if cfg.mode == "restore" else "")
        seeds = list(cfg.seeds) if cfg.seeds is not None else [cfg.seed + i for i in range(b)]
        if len(seeds) != b:
            raise ValueError(f"FlipNetSampleConfig.seeds has {len(seeds)} entries for a batch of {b} images.")

        cond_latent = vae_encode(self.vae, images.to(device)).to(dtype)
        pos = encode_prompts(self.tokenizer, self.text_encoder, [cfg.prompt] * b).to(dtype)
        use_face = cfg.mode == "restore" and cfg.use_face_embedding and self.face_encoder is not None
        neg = encode_prompts(self.tokenizer, self.text_encoder, [negative] * b).to(dtype)
        if use_face:
            c_id, c_null = self.face_tokens(images.to(device))
            pos = torch.cat([pos, c_id.to(dtype)], dim=1)
            neg = torch.cat([neg, c_null.to(dtype)], dim=1)
        do_cfg = cfg.guidance_scale > 1.0 and (negative != cfg.prompt or use_face)
        context = torch.cat([neg, pos]) if do_cfg else pos
        reps = 2 if do_cfg else 1

        self.scheduler.set_timesteps(cfg.num_inference_steps, device=device)
        x, eps_y = _per_row_noise(cond_latent.shape, seeds)
        x = x.to(device, dtype) * self.scheduler.init_noise_sigma
        eps_y = eps_y.to(device, dtype)
        alphas = self.train_alphas.to(device)
        self.state.phi = float(phi)
        boost = self.boosthub_active(phi)
        cache = boost and cfg.lq_cache and policy == "fixed"

        def cond_at(t_y: int) -> torch.Tensor:
            return q_sample(cond_latent, eps_y, alphas, torch.full((b,), t_y, device=device, dtype=torch.long))

        old_mode, old_enabled = self.state.cache_mode, self.state.enabled
        try:
            self.state.enabled = old_enabled and boost
            if cache:
                y = cond_at(t_y_fixed).repeat(reps, 1, 1, 1)
                self.state.kv_cache.clear()
                self.state.cache_mode = "record"
                self.unet(y, torch.full((y.shape[0],), t_y_fixed, device=device), context)
                self.state.cache_mode = "replay"
            total = len(self.scheduler.timesteps)
            for i, t in enumerate(self.scheduler.timesteps):
                x_in = self.scheduler.scale_model_input(x, t).repeat(reps, 1, 1, 1)
                tt = torch.full((x_in.shape[0],), int(t), device=device)
                if cache or not boost:  # replay, or no BoostHub: the input stream alone
                    out = self.unet(x_in, tt, context).sample
                else:
                    t_y = int(t) if policy == "same" else t_y_fixed
                    y = cond_at(t_y).repeat(reps, 1, 1, 1)
                    ty = torch.full((y.shape[0],), t_y, device=device)
                    out = self.unet(joint_batch(x_in, y), torch.cat([tt, ty]), torch.cat([context, context])
                                    ).sample[: x_in.shape[0]]
                if do_cfg:
                    uncond, cond = out.chunk(2)
                    out = uncond + cfg.guidance_scale * (cond - uncond)
                x = self.scheduler.step(out, t, x).prev_sample
                if callback is not None:
                    callback(i + 1, total)
        finally:
            self.state.cache_mode, self.state.enabled = old_mode, old_enabled
            self.state.kv_cache.clear()
        return vae_decode(self.vae, x).clamp(0.0, 1.0)


def _per_row_noise(shape: Sequence[int], seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial noise and condition noise, each row drawn from its own seed (CPU generator, device independent)."""
    xs, ys = [], []
    for s in seeds:
        g = torch.Generator(device="cpu").manual_seed(int(s))
        xs.append(torch.randn(tuple(shape[1:]), generator=g))
        ys.append(torch.randn(tuple(shape[1:]), generator=g))
    return torch.stack(xs), torch.stack(ys)


def one_step_x0(unet, z_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor, alphas_cumprod: torch.Tensor,
                prediction_type: str = "epsilon") -> torch.Tensor:
    """Eq. (3) through a UNet call on a joint batch (helper for tests and diagnostics)."""
    out = unet(z_t, t, context).sample
    return predict_x0(z_t, out, alphas_cumprod, t, prediction_type)

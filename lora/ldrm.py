"""Conditioning an SD2.1 UNet on the LQ image: the widened ``conv_in`` (DR-BFR §3.2 and CLR-Face §3.2 on SD2.1,
design.md §3.4-3.5) and the timestep-modulated degradation prompt (DR-BFR Eq. 10). Pure torch, no comfy.

* :class:`ConcatConvIn`: ``conv_in`` widened from 4 to 4 + k input channels for ``[z_t, E(y)]``. It keeps the
  stock convolution and adds ``W_extra * x[:, 4:]`` with ``W_extra`` zero-initialised, so an untrained model equals
  SD2.1 bit for bit (``y + 0`` is exact) and the base checkpoint stays a stock 4-channel file. The same module is the
  ComfyUI object patch of ``diffusion_model.input_blocks.0.0``: a convolution over the concatenation is the sum of
  the convolutions over the two channel groups.
* :class:`DRPrompt`: ``alpha_t * f_DR + beta_t`` with ``(alpha_t, beta_t) = MLP(t)`` (Eq. 10), then a linear
  projection from the DR width d to SD2.1's context width 1024; the l tokens are appended to the text context
  (design.md §3.4: SD2.1 keeps its text prompt, the paper's LDM had none). ``alpha_t, beta_t`` are per-channel
  (d-vectors broadcast over the l tokens, FiLM style; the paper leaves the shape open). The MLP's last layer starts
  at alpha = 1, beta = 0. Appending tokens to a softmax attention changes it even when they are zero, so the prompt
  is *not* a no-op at initialisation (only ``conv_in`` is): an untrained DR-BFR with the prompt off equals SD2.1.
* :func:`timestep_embedding`: SD's sinusoidal embedding (cos half first), the input of MLP(t); timesteps may be
  fractional (ComfyUI's ``model_sampling.timestep(sigma)`` for Karras sigmas).
* :func:`dr_context` / :func:`concat_unet_eps`: the two pieces of math, called by the diffusers pipeline, the
  trainers and the ComfyUI wrapper alike.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

SD_LATENT_CHANNELS = 4
SD2_CONTEXT_DIM = 1024
TIME_EMBED_DIM = 320  # SD2.1's model_channels: the width of its own sinusoidal timestep embedding
EXTRA_WEIGHT = "conv_in_extra.weight"  # checkpoint key of W_extra


class ConditioningError(ValueError):
    """A conditional UNet was called without (or with a wrongly shaped) LQ latent / DR tokens."""


# ------------------------------------------------------------------------------------------------ widened conv_in
class ConcatConvIn(nn.Module):
    """``conv_in`` over ``[z_t, c]`` (4 + k channels): ``base(x[:, :4]) + conv(x[:, 4:], W_extra)``.

    ``base`` is the stock convolution (frozen, never copied: a diffusers ``nn.Conv2d`` or ComfyUI's cast-aware op);
    ``extra`` is (out, k, kh, kw), zero at initialisation."""

    def __init__(self, base: nn.Module, extra_channels: int = SD_LATENT_CHANNELS, weight: torch.Tensor | None = None):
        super().__init__()
        if extra_channels < 1:
            raise ValueError(f"extra_channels must be >= 1, got {extra_channels}.")
        w = base.weight
        self.base = base
        self.base_channels = int(w.shape[1])
        self.extra_channels = int(extra_channels)
        self.stride, self.padding = base.stride, base.padding
        shape = (w.shape[0], self.extra_channels, *w.shape[2:])
        if weight is not None and tuple(weight.shape) != tuple(shape):
            raise ValueError(f"{EXTRA_WEIGHT} is {tuple(weight.shape)}, this conv_in needs {tuple(shape)} "
                             f"({self.extra_channels} extra input channels of a {w.shape[0]}-wide conv_in).")
        init = torch.zeros(shape, dtype=torch.float32 if weight is None else weight.dtype, device=w.device)
        self.extra = nn.Parameter(init if weight is None else weight.detach().clone().to(w.device))

    @property
    def in_channels(self) -> int:
        return self.base_channels + self.extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_channels:
            raise ConditioningError(
                f"the conditional UNet takes {self.in_channels} input channels ({self.base_channels} latent + "
                f"{self.extra_channels} LQ latent), got {x.shape[1]}. The LQ latent was not attached: in ComfyUI use "
                "the positive/negative CONDITIONING of the Apply node, not the original ones.")
        y = self.base(x[:, :self.base_channels])
        c = x[:, self.base_channels:].to(y.dtype)
        return y + F.conv2d(c, self.extra.to(device=y.device, dtype=y.dtype), None, self.stride, self.padding)


def install_concat_conv_in(unet: nn.Module, extra_channels: int = SD_LATENT_CHANNELS,
                           weight: torch.Tensor | None = None) -> ConcatConvIn:
    """Widen a diffusers UNet's ``conv_in`` in place (idempotent: an installed one gets ``weight`` loaded)."""
    conv = unet.conv_in
    if isinstance(conv, ConcatConvIn):
        if conv.extra_channels != extra_channels:
            raise ValueError(f"conv_in already takes {conv.extra_channels} extra channels, not {extra_channels}.")
        if weight is not None:
            with torch.no_grad():
                conv.extra.copy_(weight.to(conv.extra))
        return conv
    conv.requires_grad_(False)
    unet.conv_in = ConcatConvIn(conv, extra_channels, weight)
    return unet.conv_in


def concat_conv_in(unet: nn.Module) -> ConcatConvIn:
    conv = getattr(unet, "conv_in", None)
    if not isinstance(conv, ConcatConvIn):
        raise ValueError("This UNet's conv_in is not widened; call install_concat_conv_in first.")
    return conv


# ----------------------------------------------------------------------------------------------- Eq. 10 prompt
def timestep_embedding(t: torch.Tensor, dim: int = TIME_EMBED_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """SD's sinusoidal embedding: ``[cos(t w_k), sin(t w_k)]``, ``w_k = max_period^(-k / (dim/2))``; (B,) -> (B, dim)."""
    if dim % 2:
        raise ValueError(f"timestep embedding width must be even, got {dim}.")
    half = dim // 2
    t = t.reshape(-1).float()
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


@dataclass
class DRPromptConfig:
    """``token_dim`` d and ``num_tokens`` l of E_DR's output; ``context_dim`` 1024 (SD2.1's text width);
    ``time_dim`` the sinusoidal width fed to MLP(t); ``hidden`` the MLP's hidden width (ours: 512)."""

    token_dim: int = 256
    num_tokens: int = 4
    context_dim: int = SD2_CONTEXT_DIM
    time_dim: int = TIME_EMBED_DIM
    hidden: int = 512

    def __post_init__(self):
        for name in ("token_dim", "num_tokens", "context_dim", "time_dim", "hidden"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"DRPrompt {name} must be positive, got {getattr(self, name)}.")
        if self.time_dim % 2:
            raise ValueError(f"DRPrompt time_dim must be even, got {self.time_dim}.")

    def to_dict(self) -> dict:
        return asdict(self)


class DRPrompt(nn.Module):
    """DR tokens for cross-attention (Eq. 10): ``proj(alpha_t * f_DR + beta_t)``, (B, l, d) x (B,) -> (B, l, 1024)."""

    def __init__(self, cfg: DRPromptConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or DRPromptConfig()
        self.time_mlp = nn.Sequential(nn.Linear(cfg.time_dim, cfg.hidden), nn.SiLU(),
                                      nn.Linear(cfg.hidden, 2 * cfg.token_dim))
        last = self.time_mlp[-1]
        with torch.no_grad():  # alpha_t = 1, beta_t = 0 for every t at initialisation
            last.weight.zero_()
            last.bias.copy_(torch.cat([torch.ones(cfg.token_dim), torch.zeros(cfg.token_dim)]))
        self.proj = nn.Linear(cfg.token_dim, cfg.context_dim)

    def modulation(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, beta_t) = MLP(t), each (B, d)."""
        p = self.proj.weight
        ab = self.time_mlp(timestep_embedding(t.to(p.device), self.cfg.time_dim).to(p.dtype))
        return ab.chunk(2, dim=-1)

    def forward(self, f_dr: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if f_dr.ndim != 3 or tuple(f_dr.shape[1:]) != (cfg.num_tokens, cfg.token_dim):
            raise ConditioningError(f"DR tokens must be (B, {cfg.num_tokens}, {cfg.token_dim}), got "
                                    f"{tuple(f_dr.shape)}: the DR encoder and the prompt come from different models.")
        t = t.reshape(-1)
        if t.numel() == 1:
            t = t.expand(f_dr.shape[0])
        if t.numel() != f_dr.shape[0]:
            raise ConditioningError(f"{t.numel()} timesteps for {f_dr.shape[0]} rows of DR tokens.")
        alpha, beta = self.modulation(t)
        f = f_dr.to(alpha.dtype)
        return self.proj(alpha[:, None] * f + beta[:, None])


def dr_context(text_context: torch.Tensor, prompt: DRPrompt | None, f_dr: torch.Tensor | None,
               t: torch.Tensor) -> torch.Tensor:
    """The cross-attention context ``[text tokens, DR tokens at t]`` (token axis); the text alone without DR."""
    if prompt is None or f_dr is None:
        return text_context
    tokens = prompt(f_dr, t).to(text_context.dtype)
    if tokens.shape[0] != text_context.shape[0]:
        raise ConditioningError(f"{tokens.shape[0]} rows of DR tokens for {text_context.shape[0]} rows of text.")
    return torch.cat([text_context, tokens], dim=1)


def concat_unet_eps(unet: nn.Module, z_t: torch.Tensor, t: torch.Tensor, text_context: torch.Tensor,
                    lq_latent: torch.Tensor, prompt: DRPrompt | None = None,
                    f_dr: torch.Tensor | None = None) -> torch.Tensor:
    """eps_theta(z_t, f_LQ, f_DR, t) (DR-BFR Eq. 8; CLR-Face's conditional denoiser without f_DR) for a diffusers
    UNet with :class:`ConcatConvIn`: ``unet([z_t, E(y)], t, [text, DR tokens])``. ``lq_latent`` is model space
    (x 0.18215); it is repeated to the batch when it has one row."""
    if lq_latent.shape[-2:] != z_t.shape[-2:]:
        raise ConditioningError(f"LQ latent {tuple(lq_latent.shape)} and z_t {tuple(z_t.shape)} differ in size.")
    if lq_latent.shape[0] != z_t.shape[0]:
        if z_t.shape[0] % lq_latent.shape[0]:
            raise ConditioningError(f"{lq_latent.shape[0]} LQ latents for a batch of {z_t.shape[0]}.")
        lq_latent = lq_latent.repeat(z_t.shape[0] // lq_latent.shape[0], 1, 1, 1)
    t = t.reshape(-1)
    if t.numel() == 1:
        t = t.expand(z_t.shape[0])
    x = torch.cat([z_t, lq_latent.to(z_t.dtype)], dim=1)
    return unet(x, t, encoder_hidden_states=dr_context(text_context, prompt, f_dr, t)).sample

"""CLR-Face on SD2.1 (CLR-Face §3.2-3.3, design.md §3.5): EDM Heun refinement from an initial estimate, with the
masked identity guidance at every model evaluation. Pure torch; the ComfyUI sampler (:mod:`..nodes.clrface`) and
the diffusers pipeline (:class:`CLRFacePipeline`) run the same three functions:

* :func:`identity_gradient` -- ``g = grad_{z0_hat} L_arc``, ``L_arc = D_cos(f_arc(G(z0_hat)), f_arc(x_id))`` (the
  second term of Eq. 11 used as a guidance loss, §3.3), the decoder G and the identity network f_arc in autograd,
  nothing else: no gradient through the UNet (the paper differentiates w.r.t. the denoised output, not z_t).
* :func:`apply_identity_guidance` -- the guided denoised estimate (how ``s * M_l (.) grad L_arc`` enters, below).
* :func:`guided_heun` -- Karras et al. 2022 Alg. 1 (deterministic Heun, s_churn = 0): the exact update of
  ComfyUI's ``k_diffusion.sampling.sample_heun`` (same sigmas, Euler on the last step to sigma = 0, the averaged
  slope otherwise), with the denoiser's output passed through the guidance before every slope.

How the guidance enters (our precise reading of §3.3). Eq. 10 integrates ``dz/dt = -t s(z_t, z^d, t)`` with the
EDM score ``s = (D(z_t, t) - z_t) / t^2`` (t = sigma, ComfyUI's ``x = x0 + sigma eps``). The paper adds
``grad_{z0_hat} L_arc``, masked by M_l, "to the estimated score at each step", without the weight. We apply it in
denoised space::

    D~(z_t, sigma) = D(z_t, sigma) - s * M_l (.) grad_{z0_hat} L_arc(G(z0_hat), x_id),   z0_hat = D(z_t, sigma)

i.e. the score correction ``s~ = s - (s / sigma^2) M_l (.) grad L_arc``: the paper's term with the weight
``lambda(sigma) = s / sigma^2`` that makes it one gradient-descent step of size s on the denoised latent, at every
noise level alike (the sign lowers L_arc, as a guidance loss must). Then ``dz/dsigma = (z - D~) / sigma`` is what Heun
integrates. Consequences the tests hold: s = 0, or M_l = 0 everywhere, gives the unguided sampler bit for bit (the
gradient is not even computed); M_l = 1 everywhere is plain classifier guidance on z0_hat (Dhariwal & Nichol's
guidance, with the loss on the one-step estimate, as the paper says). ``M_l = f_M(z_t)`` (:mod:`..lora.id_mask`)
sees the UNet's input ``z_t = x / sqrt(1 + sigma^2)``.

Memory: every guidance call builds its own graph (decode + identity forward) under ``torch.enable_grad`` (and
outside ``torch.inference_mode``, which ComfyUI runs its nodes in), takes ``torch.autograd.grad`` w.r.t. the
latent only (no ``.grad`` is accumulated on any weight) and returns detached tensors, so no graph survives a
step. Weights created under inference mode cannot be saved for backward; :func:`autograd_ready` makes a normal copy
when it must (ComfyUI's VAE loaded inside a running prompt).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..lora.cond_checkpoint import CLRFACE_FORMAT, apply_conditional_checkpoint, read_conditional_checkpoint
from ..lora.id_mask import IdentityMask
from ..lora.ldrm import ConcatConvIn, concat_unet_eps
from ..sd import vae as codec
from ..sd.diffusion import sd_alphas_cumprod, sigmas_from_alphas_cumprod
from ..sd.loader import encode_prompts
from .arcface import IdentityModel, cosine

logger = logging.getLogger(__name__)

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # D(x, sigma) -> z0_hat (k-diffusion x)
Decoder = Callable[[torch.Tensor], torch.Tensor]  # model-space latent -> (B, 3, H, W) image in [0, 1], unclamped
MaskFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, sigma) -> M_l in [0, 1], x's shape
Guidance = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, sigma, D) -> D~

PAPER_STEPS = 40  # §5: "40 time steps with heun sampler"
KARRAS_RHO = 7.0


class CLRFaceParameterError(ValueError):
    """A bad CLR-Face setting (steps, denoise, scale, reference batch); the message names the value and the fix."""


# ------------------------------------------------------------------------------------------------ schedules


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = KARRAS_RHO) -> torch.Tensor:
    """Karras et al. 2022 Eq. 5 noise levels, ``steps`` values from sigma_max to sigma_min, then 0 (float32; the
    same numbers as ComfyUI's ``karras`` scheduler, ``k_diffusion.sampling.get_sigmas_karras``)."""
    if int(steps) < 1:
        raise CLRFaceParameterError(f"steps must be >= 1, got {steps}.")
    ramp = torch.linspace(0, 1, int(steps))
    min_inv_rho, max_inv_rho = float(sigma_min) ** (1 / rho), float(sigma_max) ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def start_sigmas(steps: int, denoise: float, sigma_min: float, sigma_max: float,
                 rho: float = KARRAS_RHO) -> torch.Tensor:
    """The last ``steps + 1`` sigmas of a Karras schedule of ``int(steps / denoise)`` steps: ComfyUI's
    ``BasicScheduler(karras, steps, denoise)``. ``sigmas[0]`` is sigma_start, the level E(x_id) is noised to."""
    if not 0.0 < float(denoise) <= 1.0:
        raise CLRFaceParameterError(f"denoise must be in (0, 1], got {denoise}: 1 starts from pure noise "
                                    "(sigma_max), smaller values start closer to the initial estimate x_id.")
    total = int(steps) if denoise >= 1.0 else int(int(steps) / float(denoise))
    return karras_sigmas(total, sigma_min, sigma_max, rho)[-(int(steps) + 1):]


def is_max_denoise(sigma_start: float, sigma_max: float) -> bool:
    """ComfyUI's ``KSAMPLER.max_denoise``: a start at (or above) sigma_max noises by ``sqrt(1 + sigma^2)``."""
    return math.isclose(float(sigma_max), float(sigma_start), rel_tol=1e-05) or float(sigma_start) > float(sigma_max)


def noised_start(latent: torch.Tensor, noise: torch.Tensor, sigma_start: float, sigma_max: float) -> torch.Tensor:
    """E(x_id) noised to sigma_start as ComfyUI's ``noise_scaling`` (EPS/V): ``latent + sigma noise``, or
    ``latent + sqrt(1 + sigma^2) noise`` at a max-denoise start."""
    s = float(sigma_start)
    scale = math.sqrt(1.0 + s * s) if is_max_denoise(s, sigma_max) else s
    return latent + noise * scale


def seed_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """ComfyUI's ``comfy.sample.prepare_noise`` for a whole batch: one CPU generator seeded with ``seed``."""
    return torch.randn(tuple(shape), generator=torch.manual_seed(int(seed)), device="cpu")


# ------------------------------------------------------------------------------------------------- guidance


def autograd_ready(module: nn.Module) -> nn.Module:
    """``module`` itself, or (when any of its tensors was created under ``torch.inference_mode``, e.g. ComfyUI's VAE
    loaded inside a running prompt) a copy with normal tensors that autograd may save for backward. The copy costs
    the module's weights once more while it is held (the CLR-Face sampler holds it for one run)."""
    tensors = list(module.parameters()) + list(module.buffers())
    if not any(t.is_inference() for t in tensors):
        return module
    with torch.inference_mode(False):
        logger.info("CLR-Face: %s was loaded in inference mode; using a copy of its %.1f M parameters for the "
                    "identity gradient", type(module).__name__, sum(p.numel() for p in module.parameters()) / 1e6)
        return copy.deepcopy(module).requires_grad_(False)


def reference_embedding(identity: IdentityModel, x_id: torch.Tensor) -> torch.Tensor:
    """f_arc(x_id): (B, 512) unit embeddings of the initial estimate (FFHQ-aligned (B, 3, H, W) in [0, 1]), as a
    normal (non-inference) tensor usable in the guidance graph."""
    with torch.inference_mode(False), torch.no_grad():
        return identity.embed(x_id.clone(), grad=True).detach().clone()


def identity_loss(images: torch.Tensor, identity: IdentityModel, reference: torch.Tensor) -> torch.Tensor:
    """L_arc per image (B,): the cosine distance ``1 - cos(f_arc(images), f_arc(x_id))`` (Eq. 11's second term);
    ``reference`` is (B or 1, 512). Differentiable in ``images``."""
    emb = identity.embed(images, grad=True)
    return 1.0 - cosine(emb, reference.to(emb.device))


def identity_gradient(z0_hat: torch.Tensor, decode: Decoder, identity: IdentityModel,
                      reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_arc (B,), grad_{z0_hat} sum_b L_arc)`` (CLR-Face §3.3), both detached, the gradient in z0_hat's dtype and
    device. The graph (decoder + identity network) lives only inside this call; the sum makes every image's
    gradient independent of the batch size."""
    if reference.ndim != 2 or reference.shape[0] not in (1, z0_hat.shape[0]):
        raise CLRFaceParameterError(f"{reference.shape[0]} reference embeddings for a batch of {z0_hat.shape[0]} "
                                    "latents: give one x_id per latent, or one for all.")
    with torch.inference_mode(False), torch.enable_grad():
        z = z0_hat.detach().clone().requires_grad_(True)
        loss = identity_loss(decode(z), identity, reference.clone())
        (grad,) = torch.autograd.grad(loss.sum(), z)
    return loss.detach().clone(), grad.detach().to(z0_hat.dtype)


def apply_identity_guidance(denoised: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor | None,
                            scale: float) -> torch.Tensor:
    """``D~ = D - s * M_l (.) grad L_arc`` (module docstring); ``mask=None`` is the uniform mask M_l = 1 (plain
    classifier guidance)."""
    step = grad if mask is None else mask.to(grad) * grad
    return denoised - float(scale) * step


def latent_mask(mask_net: IdentityMask, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """M_l = f_M(z_t) with ``z_t = x / sqrt(1 + sigma^2)`` (the UNet's input scaling), float32 on x's device, no
    graph."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
    s = s.view(-1, *([1] * (x.ndim - 1))) if s.numel() == x.shape[0] else s[:1].view(*([1] * x.ndim))
    with torch.no_grad():
        return mask_net(x.float() / torch.sqrt(1.0 + s * s)).float().to(x.device)


#: How the guidance decodes z0_hat: ``full`` (the whole latent, exact) or ``window`` (only the latent cells the identity
#: network's input reads, plus :data:`WINDOW_MARGIN` cells, the rest of the image grey). bench/clrface.py, full SD2.1
#: VAE with random weights, 512 px, r50: the window's gradient has cosine 0.996 with the full one inside the window and
#: 99.96 % of its energy there, L_arc differs by 3e-5 relative; a guidance call costs 0.66x and its peak 1.6 GiB less.
DECODES = ("full", "window")
WINDOW_MARGIN = 2


def template_pixel_box(identity: IdentityModel, height: int, width: int) -> tuple[int, int, int, int]:
    """``(r0, r1, c0, c1)``, half-open: the pixels of a (height, width) crop that ``identity.preprocess`` reads (its
    gradient w.r.t. an image of ones is non-zero there: the antialiased shrink and the template warp included), so
    the box is exact for either ``align``."""
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.ones(1, 3, int(height), int(width), requires_grad=True)
        (g,) = torch.autograd.grad(identity.preprocess(x).float().sum(), x)
    used = g.detach().abs().sum((0, 1)).cpu() > 0
    rows, cols = used.any(1).nonzero().flatten(), used.any(0).nonzero().flatten()
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def latent_window(pixel_box: tuple[int, int, int, int], latent_hw: tuple[int, int], factor: int,
                  margin: int = WINDOW_MARGIN) -> tuple[int, int, int, int]:
    """The latent cells (``factor`` px each) covering ``pixel_box``, rounded out, plus ``margin`` cells, clipped."""
    r0, r1, c0, c1 = pixel_box
    h, w = latent_hw
    return (max(0, r0 // factor - margin), min(h, -(-r1 // factor) + margin),
            max(0, c0 // factor - margin), min(w, -(-c1 // factor) + margin))


def window_decoder(decode: Decoder, box: tuple[int, int, int, int], latent_hw: tuple[int, int],
                   factor: int) -> Decoder:
    """``decode`` restricted to the latent window ``box``: the window's decode placed in a grey (0.5) image of the
    full size. What the identity network reads comes from the window; the gradient outside it is zero."""
    r0, r1, c0, c1 = box
    h, w = latent_hw

    def decode_window(z: torch.Tensor) -> torch.Tensor:
        img = decode(z[..., r0:r1, c0:c1])
        return F.pad(img, (factor * c0, factor * (w - c1), factor * r0, factor * (h - r1)), value=0.5)

    return decode_window


def guidance_decoder(decode: Decoder, identity: IdentityModel, latent_hw: tuple[int, int], factor: int,
                     mode: str = "full") -> Decoder:
    """The decoder the guidance differentiates through: ``decode`` itself (``full``) or its :func:`window_decoder`
    over the identity network's input region (``window``; the whole latent when that region is the whole crop)."""
    if mode not in DECODES:
        raise CLRFaceParameterError(f"decode must be one of {', '.join(DECODES)}, got {mode!r}.")
    if mode == "full":
        return decode
    h, w = (int(v) for v in latent_hw)
    box = latent_window(template_pixel_box(identity, h * factor, w * factor), (h, w), factor)
    if box == (0, h, 0, w):
        return decode
    logger.info("CLR-Face: decoding latent rows %d:%d, cols %d:%d of %dx%d for the identity gradient", *box, h, w)
    return window_decoder(decode, box, (h, w), factor)


@dataclass
class GuidanceStep:
    """One guidance call: sigma, mean L_arc of the batch before the correction, the mean mask value, and the RMS
    of the correction ``s M grad`` relative to the RMS of D (how hard the guidance pushes; 0 when skipped)."""

    sigma: float
    l_arc: float
    mask_mean: float
    relative_step: float


@dataclass
class IdentityGuidance:
    """The masked identity guidance as a :data:`Guidance` callable ``(x, sigma, D) -> D~`` for :func:`guided_heun`.

    ``decode``: model-space latent -> image in [0, 1] (differentiable, unclamped); ``reference``: f_arc(x_id),
    (B or 1, 512); ``mask``: ``(x, sigma) -> M_l`` or None for the uniform mask; ``history`` records every call."""

    decode: Decoder
    identity: IdentityModel
    reference: torch.Tensor
    scale: float
    mask: MaskFn | None = None
    interrupt: Callable[[], None] | None = None
    history: list[GuidanceStep] = field(default_factory=list)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        s_val = float(torch.as_tensor(sigma).reshape(-1)[0])
        if self.scale == 0:
            self.history.append(GuidanceStep(s_val, float("nan"), 0.0, 0.0))
            return denoised
        m = None if self.mask is None else self.mask(x, sigma)
        if m is not None and not bool(m.any()):
            self.history.append(GuidanceStep(s_val, float("nan"), 0.0, 0.0))
            return denoised
        if self.interrupt is not None:
            self.interrupt()
        loss, grad = identity_gradient(denoised, self.decode, self.identity, self.reference)
        out = apply_identity_guidance(denoised, grad, m, self.scale)
        with torch.no_grad():
            rms = denoised.float().pow(2).mean().sqrt().clamp_min(1e-12)
            rel = float((out.float() - denoised.float()).pow(2).mean().sqrt() / rms)
        self.history.append(GuidanceStep(s_val, float(loss.mean()), 1.0 if m is None else float(m.mean()), rel))
        return out

    def summary(self) -> str:
        used = [h for h in self.history if h.relative_step > 0 or h.l_arc == h.l_arc]
        if not used:
            return f"identity guidance off (s={self.scale:g}{', all-zero mask' if self.mask else ''})"
        first, last = used[0], used[-1]
        return (f"identity guidance s={self.scale:g}, {'learned' if self.mask else 'uniform'} mask: {len(used)} "
                f"calls, L_arc {first.l_arc:.4f} (sigma {first.sigma:.3g}) -> {last.l_arc:.4f} (sigma "
                f"{last.sigma:.3g}), mean |s M grad| / |D| {sum(h.relative_step for h in used) / len(used):.3g}")


# ---------------------------------------------------------------------------------------------------- Heun


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The ODE slope ``dx/dsigma = (x - D) / sigma`` (Karras et al. 2022 Eq. 3 with sigma(t) = t)."""
    return (x - denoised) / sigma.reshape(*([1] * x.ndim)) if torch.is_tensor(sigma) else (x - denoised) / sigma


def guided_heun(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, guidance: Guidance | None = None,
                callback: Callable[[dict], None] | None = None,
                interrupt: Callable[[], None] | None = None) -> torch.Tensor:
    """Karras et al. 2022 Alg. 1 (Heun, s_churn = 0) from ``x`` at ``sigmas[0]`` along ``sigmas`` (CLR-Face Eq. 10
    with the guided score); the update is ComfyUI's ``sample_heun`` line for line. ``denoiser(x, sigma)`` gets a 0-d
    sigma; ``guidance(x, sigma, D)`` corrects every denoised estimate (None: unguided). ``callback`` gets
    k-diffusion's ``{x, i, sigma, sigma_hat, denoised}`` once per step; ``interrupt()`` may raise to cancel."""
    sigmas = torch.as_tensor(sigmas)

    def guided(xt: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        denoised = denoiser(xt, sigma)
        return denoised if guidance is None else guidance(xt, sigma, denoised)

    for i in range(len(sigmas) - 1):
        if interrupt is not None:
            interrupt()
        sigma_hat = sigmas[i]
        denoised = guided(x, sigma_hat)
        d = to_d(x, sigma_hat, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt  # Euler step to sigma = 0
        else:
            x_2 = x + d * dt
            denoised_2 = guided(x_2, sigmas[i + 1])
            d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
            d_prime = (d + d_2) / 2
            x = x + d_prime * dt
    return x


# ------------------------------------------------------------------------------------------ diffusers side


def timestep_from_sigma(sigma: torch.Tensor, sigma_table: torch.Tensor) -> torch.Tensor:
    """The training timestep nearest in log-sigma (ComfyUI's ``ModelSamplingDiscrete.timestep``), as float."""
    log_table = sigma_table.float().log().to(sigma.device)
    return (sigma.float().log() - log_table[:, None]).abs().argmin(dim=0).view(sigma.shape).float()


def diffusers_denoiser(unet: nn.Module, context: torch.Tensor, *, sigma_table: torch.Tensor | None = None,
                       prediction_type: str = "epsilon", lq_latent: torch.Tensor | None = None) -> Denoiser:
    """D(x, sigma) of a diffusers SD UNet in ComfyUI's k-diffusion form: ``c_in = 1/sqrt(sigma^2 + 1)``, t nearest
    in log-sigma, ``D = x - sigma eps`` (eps) or ``x/(sigma^2+1) - v sigma/sqrt(sigma^2+1)`` (v). A UNet with the
    widened ``conv_in`` gets ``[z_t, lq_latent]`` through :func:`..lora.ldrm.concat_unet_eps`."""
    table = sigmas_from_alphas_cumprod(sd_alphas_cumprod()) if sigma_table is None else sigma_table
    table = table.float()
    if prediction_type not in ("epsilon", "v_prediction"):
        raise CLRFaceParameterError(f"prediction_type {prediction_type!r}: use 'epsilon' or 'v_prediction'.")
    conditional = isinstance(getattr(unet, "conv_in", None), ConcatConvIn)
    if conditional and lq_latent is None:
        raise CLRFaceParameterError("this UNet has the widened conv_in of the conditional denoiser: pass the LQ "
                                    "latent E(x^d) (lq_latent).")
    p = next(unet.parameters())

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        s = s.expand(x.shape[0]) if s.numel() == 1 else s
        sv = s.view(-1, *([1] * (x.ndim - 1)))
        xc = (x / (sv ** 2 + 1.0) ** 0.5).to(p.device, p.dtype)
        t = timestep_from_sigma(s, table).to(p.device)
        ctx = context.to(p.device, p.dtype)
        if ctx.shape[0] != x.shape[0]:
            ctx = ctx.expand(x.shape[0], -1, -1)
        if lq_latent is not None:
            out = concat_unet_eps(unet, xc, t, ctx, lq_latent.to(p.device, p.dtype))
        else:
            out = unet(xc, t, encoder_hidden_states=ctx).sample
        out = out.float().to(x.device)
        if prediction_type == "epsilon":
            return x - out * sv
        return x * 1.0 / (sv ** 2 + 1.0) - out * sv / (sv ** 2 + 1.0) ** 0.5

    return denoise


def vae_decoder(vae: nn.Module) -> Decoder:
    """The diffusers VAE as a differentiable, unclamped :data:`Decoder` (the one codec, :mod:`..sd.vae`)."""
    return lambda z: codec.decode(vae, z, clamp=False)


@dataclass
class CLRFaceConfig:
    """Sampling settings: ``steps`` Heun steps (paper 40) after a start at ``denoise`` (BasicScheduler semantics:
    1 = from sigma_max, i.e. pure noise; 0.5 = the last 40 of 80 Karras levels), ``guidance_scale`` s (0 = off),
    ``seed`` (ComfyUI's noise for the whole batch)."""

    steps: int = PAPER_STEPS
    denoise: float = 0.5
    guidance_scale: float = 1.0
    seed: int = 0
    rho: float = KARRAS_RHO
    decode: str = "full"

    def __post_init__(self):
        if int(self.steps) < 1:
            raise CLRFaceParameterError(f"steps must be >= 1, got {self.steps} (paper: 40).")
        if not 0.0 < float(self.denoise) <= 1.0:
            raise CLRFaceParameterError(f"denoise must be in (0, 1], got {self.denoise}.")
        if not (math.isfinite(float(self.guidance_scale)) and self.guidance_scale >= 0):
            raise CLRFaceParameterError(f"guidance_scale must be a finite number >= 0, got {self.guidance_scale}.")
        if self.decode not in DECODES:
            raise CLRFaceParameterError(f"decode must be one of {', '.join(DECODES)}, got {self.decode!r}.")


@dataclass
class CLRFaceOutput:
    images: torch.Tensor  # (B, 3, H, W) in [0, 1]
    latents: torch.Tensor  # (B, 4, h, w) model space
    guidance: IdentityGuidance | None


class CLRFacePipeline:
    """CLR-Face refinement on a diffusers SD2.1 UNet + VAE: E(x_id) noised to sigma_start, Karras sigmas of SD2.1's
    discrete schedule, Heun with the masked identity guidance toward f_arc(x_id). ``identity`` None (or s = 0) runs
    unguided. A UNet with the widened conv_in (the conditional denoiser) also gets E(x^d) (``lq_images``)."""

    def __init__(self, unet: nn.Module, vae: nn.Module, identity: IdentityModel | None = None,
                 mask: IdentityMask | None = None, context: torch.Tensor | None = None,
                 alphas_cumprod: torch.Tensor | None = None, prediction_type: str = "epsilon"):
        self.unet, self.vae, self.identity, self.mask = unet, vae, identity, mask
        self.sigma_table = sigmas_from_alphas_cumprod(
            sd_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod).float()
        dim = int(getattr(getattr(unet, "config", None), "cross_attention_dim", 1024) or 1024)
        self.context = torch.zeros(1, 77, dim) if context is None else context  # null prompt
        self.prediction_type = prediction_type

    @classmethod
    def from_components(cls, components: dict, checkpoint: str | None = None, identity: IdentityModel | None = None,
                        mask: IdentityMask | None = None, prompt: str = "") -> CLRFacePipeline:
        """SD2.1-base components (``sd.loader.load_components``: UNet, VAE, text encoder, tokenizer, scheduler) and,
        when given, a ``clrface/1`` file: its LoRA and widened conv_in are added to ``components['unet']`` IN PLACE
        (the conditional denoiser; without a file the plain SD2.1 prior refines). The context is the text encoder's
        encoding of ``prompt`` (empty: what ``bfr train clr-face`` drops captions to, and ComfyUI's empty
        CLIPTextEncode)."""
        unet = components["unet"]
        if checkpoint:
            apply_conditional_checkpoint(unet, read_conditional_checkpoint(checkpoint, CLRFACE_FORMAT))
        p = next(unet.parameters())
        unet.to(p.device).eval()
        with torch.no_grad():
            context = encode_prompts(components["tokenizer"], components["text_encoder"], [prompt]).to(p.device)
        sched = components["scheduler"]
        return cls(unet, components["vae"], identity, mask, context, alphas_cumprod=sched.alphas_cumprod,
                   prediction_type=sched.config.prediction_type)

    def sigmas(self, cfg: CLRFaceConfig) -> torch.Tensor:
        return start_sigmas(cfg.steps, cfg.denoise, float(self.sigma_table[0]), float(self.sigma_table[-1]),
                            cfg.rho)

    def guidance(self, x_id: torch.Tensor, scale: float, latent_hw: tuple[int, int] | None = None,
                 decode: str = "full") -> IdentityGuidance | None:
        if self.identity is None or scale == 0:
            return None
        mask = None if self.mask is None else (lambda x, s: latent_mask(self.mask, x, s))
        dec = vae_decoder(self.vae)
        if latent_hw is not None:
            dec = guidance_decoder(dec, self.identity, latent_hw, x_id.shape[-1] // latent_hw[-1], decode)
        return IdentityGuidance(dec, self.identity, reference_embedding(self.identity, x_id), float(scale), mask)

    @torch.no_grad()
    def __call__(self, x_id: torch.Tensor, cfg: CLRFaceConfig | None = None, lq_images: torch.Tensor | None = None,
                 callback: Callable[[dict], None] | None = None) -> CLRFaceOutput:
        cfg = cfg or CLRFaceConfig()
        if x_id.ndim != 4 or x_id.shape[1] != 3 or x_id.shape[-1] % 8 or x_id.shape[-2] % 8:
            raise CLRFaceParameterError(f"x_id must be (B, 3, H, W) in [0, 1] with H, W multiples of 8, got "
                                        f"{tuple(x_id.shape)}.")
        latent = codec.encode(self.vae, x_id).float()
        lq = None if lq_images is None else codec.encode(self.vae, lq_images).float()
        denoiser = diffusers_denoiser(self.unet, self.context, sigma_table=self.sigma_table,
                                      prediction_type=self.prediction_type, lq_latent=lq)
        sigmas = self.sigmas(cfg)
        x = noised_start(latent, seed_noise(latent.shape, cfg.seed).to(latent.device), float(sigmas[0]),
                         float(self.sigma_table[-1]))
        guidance = self.guidance(x_id, cfg.guidance_scale, tuple(latent.shape[-2:]), cfg.decode)
        z = guided_heun(denoiser, x, sigmas, guidance, callback)
        if guidance is not None:
            logger.info("CLR-Face: %s", guidance.summary())
        return CLRFaceOutput(codec.decode(self.vae, z).clamp(0, 1), z, guidance)

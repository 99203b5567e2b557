"""Node family: DR2 degradation remover (design.md §3.2; DR2, Wang et al. CVPR 2023, §3.3).

Thin adapters around :mod:`..pipelines.ilvr`: the same ``dr2_sample`` loop as the diffusers pipeline, run in
ComfyUI's k-diffusion parameterization (x = x0 + sigma eps) inside a custom SAMPLER. comfy is imported lazily.

Input handling (each case is a NodeInputError naming the node, the value and the fix, or a documented rule):
IMAGE/reference through :func:`.helpers.to_rgb` (empty batch, channels, NaN/inf, 0-255 or [-1, 1] scaling);
images above ``max_megapixels`` rejected before any work; a positive CONDITIONING whose width differs from the
MODEL's context dim rejected; SDXL-family models get a zero pooled output in the null prompt; a pixel-space
reference of one image is broadcast over the latent batch, another batch size is rejected; every step, VAE call
and pixel refinement honours Cancel.
"""

from __future__ import annotations

import logging

import torch

from ..pipelines import ilvr
from ._comfy import check_interrupted, sampler_callback
from .helpers import NodeInputError, check_latent, check_megapixels, pad_to_multiple, to_rgb

logger = logging.getLogger(__name__)

# display names (the node ids are the class names); errors name the node as users see it
SAMPLER_ID = "BFR DR2 Sampler"
SIGMAS_ID = "BFR DR2 Sigmas"
RESTORE_ID = "BFR DR2 Restore"
OMEGA_MODES = ["auto", "official", "explicit"]

_N_TOOLTIP = ("Low-pass factor N of Phi_N (downsample by N, upsample back, bicubic antialiased): the input's "
              "structure coarser than N pixels is imposed at every step. Larger N = more degradation removed, less "
              "fidelity. In space=latent N counts latent pixels (1 latent px = 8 image px; fractional allowed), in "
              "space=pixel image pixels. DR2 at 256 px used 4/8/16 = latent 1/2/4 (pixel 8/16/32) at 512 px.")
_TAU_TOOLTIP = ("Output step tau (levels of the respaced schedule, DR2: of T=100). DR2 stops here and returns the "
                "x0 prediction. Larger tau = cleaner but further from the input; presets 22 (mild) and 35.")
_OMEGA_MODE_TOOLTIP = ("Start step omega: auto = tau + T/4 (the paper), official = the DR2 code's N-dependent "
                       "tau+5/10/20/25/30 (T=100), explicit = the omega value below.")
_OMEGA_TOOLTIP = "Start step omega when omega_mode is explicit (tau < omega <= steps-1); ignored otherwise."
_STEPS_TOOLTIP = ("T: length of the respaced schedule over the model's 1000 training steps (DR2: 100, one level "
                  "every 10 steps). tau and omega count its levels; the run costs omega - tau + 1 model calls.")
_SPACE_TOOLTIP = ("latent: Phi_N on the SD latent (cheap). pixel: decode the x0 estimate, apply Phi_N in pixels "
                  "with the paper's N, re-encode - exact DR2 semantics, one VAE round trip per step.")
MAX_MEGAPIXELS = 4.2  # default size guard of BFR DR2 Restore: 2048x2048 (4.19 MP) passes
_MAX_MP_TOOLTIP = ("Size guard: images above this many megapixels (per image) are rejected before any work, because "
                   "DR2 runs the diffusion model (and in space=pixel the VAE, every step) on the whole image. The "
                   "default 4.2 admits 2048x2048. Crop the faces first; raise it only if the device has the memory.")
# text-encoder widths users meet, for messages that say which side to change
_CONTEXT_NAMES = {768: "SD1.x, CLIP-L", 1024: "SD2.x, OpenCLIP-H", 1280: "SDXL refiner, OpenCLIP-G",
                  2048: "SDXL, CLIP-L + OpenCLIP-G", 4096: "T5-XXL"}


def _omega_value(omega_mode: str, omega: int) -> int | str:
    return int(omega) if omega_mode == "explicit" else omega_mode


def _validate(node: str, n, tau, omega_mode, omega, steps, space="latent") -> int:
    try:
        if omega_mode not in OMEGA_MODES:
            raise ilvr.DR2ParameterError(f"omega_mode must be one of {OMEGA_MODES} (got {omega_mode!r}).")
        return ilvr.validate_parameters(float(n), int(tau), _omega_value(omega_mode, omega), int(steps), space)
    except (ilvr.DR2ParameterError, TypeError, ValueError) as exc:
        raise NodeInputError(node, str(exc)) from exc


def _static_check(node: str, **values) -> bool | str:
    """VALIDATE_INPUTS helper: linked inputs arrive as None and are checked at run time instead."""
    if any(v is None for v in values.values()):
        return True
    try:
        _validate(node, **values)
    except NodeInputError as exc:
        return str(exc)
    return True


# ---------------------------------------------------------------------------------------------- the sampler


def _vae_codec(vae, latent_in, latent_out):
    """decode(model-space latent) -> (B,3,H,W) in [0,1] and encode back, through ComfyUI's VAE object.

    Cancel is honoured before every VAE call. ComfyUI's VAE falls back to its own tiled encode/decode when a
    full-size call runs out of device memory; below the restore size guard the full-size call is the normal path.
    """

    def decode(z: torch.Tensor) -> torch.Tensor:
        check_interrupted()
        return vae.decode(latent_out(z)).movedim(-1, 1)[:, :3].float()

    def encode(images: torch.Tensor) -> torch.Tensor:
        check_interrupted()
        return latent_in(vae.encode(images.clamp(0, 1).movedim(1, -1)))

    return decode, encode


def match_reference(node: str, reference: torch.Tensor, latent: torch.Tensor, factor: int) -> torch.Tensor:
    """The pixel reference (B,H,W,3) in [0,1] as (B_latent,3,H,W) for the latent batch (B_latent,C,h,w).

    A batch of one reference image is used for every latent (e.g. several seeds of one face); otherwise the batch
    sizes must match. A reference whose size is not a multiple of the VAE factor is centre-cropped exactly as
    ComfyUI's VAEEncode crops its input; any other size mismatch is an error.
    """
    b, (h, w) = latent.shape[0], (latent.shape[-2] * factor, latent.shape[-1] * factor)
    if reference.shape[0] not in (1, b):
        raise NodeInputError(node, f"reference has {reference.shape[0]} images but latent_image has {b}: connect the "
                                   "same images that were VAE-encoded into latent_image (or a single reference "
                                   "image, which is used for every latent of the batch).")
    rh, rw = reference.shape[1:3]
    if (rh, rw) != (h, w) and (rh // factor * factor, rw // factor * factor) == (h, w):
        top, left = (rh % factor) // 2, (rw % factor) // 2  # VAEEncode's crop (comfy.sd.VAE.vae_encode_crop_pixels)
        reference = reference[:, top:top + h, left:left + w]
    elif (rh, rw) != (h, w):
        raise NodeInputError(node, f"reference image is {rw}x{rh} but latent_image decodes to {w}x{h}: connect the "
                                   "image that was VAE-encoded into latent_image (same size, same batch).")
    return reference.movedim(-1, 1).expand(b, -1, -1, -1)


@torch.no_grad()
def sample_dr2(model, x, sigmas, extra_args=None, callback=None, disable=None, n: float = 2.0,
               space: str = "latent", vae=None, reference=None):
    """k-diffusion sampler function: DR2 from sigmas[0] (omega) to sigmas[-1] (tau), returns x0-hat at tau."""
    extra_args = extra_args or {}
    y = getattr(model, "latent_image", None)
    if y is None:
        raise NodeInputError(SAMPLER_ID, "no input latent: connect the encoded LQ image as latent_image.")
    check_latent(SAMPLER_ID, y, "latent_image")
    initial = getattr(model, "noise", None)
    if initial is None:  # not called through KSAMPLER: recover the noise from x = y + sigma0 * noise
        initial = (x - y) / float(sigmas[0])
    noise = ilvr.DR2Noise(int(extra_args.get("seed") or 0), initial=initial)
    s_in = x.new_ones([x.shape[0]])

    def denoise(xt, sigma, _i):
        return model(xt, sigma * s_in, **extra_args)

    if space == "pixel":
        if vae is None:
            raise NodeInputError(SAMPLER_ID, "space=pixel needs the VAE input connected (or use space=latent).")
        base = model.inner_model.inner_model
        factor = vae.spacial_compression_encode()
        decode, encode = _vae_codec(vae, base.process_latent_in, base.process_latent_out)
        if reference is not None:
            y_pix = match_reference(SAMPLER_ID, reference, y, factor)
        else:
            y_pix = decode(y)
        refiner = ilvr.PixelRefiner(y_pix.to(x.device), n, decode, encode, "sigma", vae_scale_factor=factor,
                                    interrupt=check_interrupted)
    else:
        refiner = ilvr.LatentRefiner(y, n, "sigma")

    k_callback = None
    if callback is not None:
        def k_callback(i, xt, x0):
            s = sigmas[min(i, len(sigmas) - 1)]
            callback({"x": xt, "i": i, "sigma": s, "sigma_hat": s, "denoised": x0})
    return ilvr.dr2_sample(denoise, y, sigmas, noise, refiner, "sigma", callback=k_callback,
                           interrupt=check_interrupted).x0


class BFRDR2Sampler:
    """SAMPLER running DR2's low-frequency refinement; pair it with BFR DR2 Sigmas in SamplerCustom(Advanced)."""

    DESCRIPTION = (
        "DR2 degradation remover as a SAMPLER (DR2 §3.3). Give SamplerCustomAdvanced the LQ image's latent as "
        "latent_image, RandomNoise, a guider with an empty/neutral prompt at CFG 1, and the sigmas of "
        "'BFR DR2 Sigmas' (omega -> tau). It diffuses the input to omega (Eq. 9), runs DDPM steps, replaces the "
        "low-frequency part of every x_{t-1} by that of the input diffused to the same level (Eq. 10), and "
        "evaluates the model once more at tau so that 'output' (and 'denoised_output') is the x0 prediction at "
        "tau (Eq. 11). Sigmas ending at 0 return the last denoised latent instead.")
    CATEGORY = "BFR/DR2"
    FUNCTION = "get_sampler"
    RETURN_TYPES = ("SAMPLER",)
    RETURN_NAMES = ("sampler",)
    OUTPUT_TOOLTIPS = ("DR2 sampler for SamplerCustom / SamplerCustomAdvanced.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "n": ("FLOAT", {"default": 2.0, "min": 1.0, "max": 64.0, "step": 0.25, "tooltip": _N_TOOLTIP}),
                "space": (list(ilvr.SPACES), {"default": "latent", "tooltip": _SPACE_TOOLTIP}),
            },
            "optional": {
                "vae": ("VAE", {"tooltip": "Needed for space=pixel (decode/re-encode each step)."}),
                "reference": ("IMAGE", {"tooltip": "space=pixel: the LQ images that were encoded (exact pixels for "
                                                   "Phi_N), same batch as the latent; a single image is used for "
                                                   "every latent. Without it the latent is decoded once instead."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, n, space):
        if n is not None and not (isinstance(n, (int, float)) and n >= 1):
            return f"[{SAMPLER_ID}] N must be a number >= 1 (got {n!r}); use 1 to keep the whole input."
        if space is not None and space not in ilvr.SPACES:
            return f"[{SAMPLER_ID}] space must be one of {ilvr.SPACES} (got {space!r})."
        return True

    def get_sampler(self, n, space, vae=None, reference=None):
        import comfy.samplers

        if not n >= 1:
            raise NodeInputError(SAMPLER_ID, f"N must be >= 1 (got {n}).")
        if space == "pixel" and vae is None:
            raise NodeInputError(SAMPLER_ID, "space=pixel needs the VAE input connected (or use space=latent).")
        if reference is not None:
            reference = to_rgb(SAMPLER_ID, reference, "reference")
        options = {"n": float(n), "space": space, "vae": vae, "reference": reference}
        return (comfy.samplers.KSAMPLER(sample_dr2, extra_options=options),)


class BFRDR2Sigmas:
    """SIGMAS from omega down to tau on the respaced schedule of the model."""

    DESCRIPTION = (
        "Sigmas for the BFR DR2 Sampler: the model's noise levels at the respaced steps omega, omega-1, ..., tau "
        "(steps = T levels over the 1000 training steps; DR2 uses T=100). The list ends at tau, not 0: the DR2 "
        "sampler evaluates the model once more at tau and returns its x0 prediction.")
    CATEGORY = "BFR/DR2"
    FUNCTION = "get_sigmas"
    RETURN_TYPES = ("SIGMAS",)
    RETURN_NAMES = ("sigmas",)
    OUTPUT_TOOLTIPS = ("sigma_omega ... sigma_tau (omega - tau + 1 values).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model whose noise schedule is used (SD1.x/2.x)."}),
                "n": ("FLOAT", {"default": 2.0, "min": 1.0, "max": 64.0, "step": 0.25,
                                "tooltip": "Only used by omega_mode=official (its offsets depend on N)."}),
                "tau": ("INT", {"default": 35, "min": 0, "max": 999, "tooltip": _TAU_TOOLTIP}),
                "omega_mode": (OMEGA_MODES, {"default": "auto", "tooltip": _OMEGA_MODE_TOOLTIP}),
                "omega": ("INT", {"default": 60, "min": 1, "max": 1000, "tooltip": _OMEGA_TOOLTIP}),
                "steps": ("INT", {"default": 100, "min": 2, "max": 1000, "tooltip": _STEPS_TOOLTIP}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, n, tau, omega_mode, omega, steps):
        return _static_check(SIGMAS_ID, n=n, tau=tau, omega_mode=omega_mode, omega=omega, steps=steps)

    def get_sigmas(self, model, n, tau, omega_mode, omega, steps):
        _validate(SIGMAS_ID, n, tau, omega_mode, omega, steps)
        return (_model_sigmas(SIGMAS_ID, model, n, tau, omega_mode, omega, steps),)


def _model_sigmas(node, model, n, tau, omega_mode, omega, steps) -> torch.Tensor:
    import comfy.model_sampling as cms

    ms = model.get_model_object("model_sampling")
    table = getattr(ms, "sigmas", None)
    supported = (isinstance(ms, cms.ModelSamplingDiscrete) and isinstance(ms, cms.EPS)
                 and not isinstance(ms, (cms.ModelSamplingDiscreteEDM, cms.StableCascadeSampling)))
    if not supported or table is None or table.ndim != 1 or table.shape[0] < 2:
        raise NodeInputError(node, f"model sampling {type(ms).__name__} is not a discrete DDPM schedule; DR2 "
                                   "needs an eps/v-prediction SD1.x/SD2.x/SDXL-style model (x = x0 + sigma eps), "
                                   "not a flow/EDM model.")
    try:
        schedule = ilvr.make_schedule(float(n), int(tau), _omega_value(omega_mode, omega), int(steps),
                                      int(table.shape[0]))
        return ilvr.schedule_sigmas(schedule, table.detach().cpu().double())
    except ilvr.DR2ParameterError as exc:
        raise NodeInputError(node, str(exc)) from exc


# ---------------------------------------------------------------------------------------------- restore node


def prepare_image(node: str, image: torch.Tensor) -> torch.Tensor:
    """:func:`to_rgb`, and tiny sizes rejected (DR2 pads other sizes to a multiple of 8)."""
    image = to_rgb(node, image)
    if min(image.shape[1:3]) < 16:
        raise NodeInputError(node, f"IMAGE {image.shape[2]}x{image.shape[1]} is too small; DR2 needs at least "
                                   "16x16 pixels (faces work best at 512x512).")
    return image


class BFRDR2Restore:
    """MODEL + VAE + IMAGE -> DR2 output IMAGE and its LATENT (one node: encode, sample, decode)."""

    DESCRIPTION = (
        "DR2 degradation remover (Wang et al. CVPR 2023), training-free on any SD1.x/2.x model: the input is "
        "diffused to step omega, denoised down to tau while the low frequencies (coarser than N) are taken from "
        "the input at every step, and the x0 prediction at tau is decoded. Removes noise, blur and JPEG "
        "artefacts at the cost of fine identity detail: larger N and tau = cleaner, smaller = more faithful. "
        "Follow it with an enhancement model (FlipNet, or a face restorer through core 'Load Upscale Model'). "
        "Sizes that are not multiples of 8 are reflect-padded and cropped back (the LATENT keeps the padding). "
        "Images above max_megapixels (default 4.2: 2048x2048) are rejected before any work - crop the faces "
        "first. An optional prompt must come from the MODEL's own CLIP; SDXL models run with a zero pooled "
        "output when no prompt is connected.")
    CATEGORY = "BFR/DR2"
    FUNCTION = "restore"
    RETURN_TYPES = ("IMAGE", "LATENT")
    RETURN_NAMES = ("image", "latent")
    OUTPUT_TOOLTIPS = ("DR2 output x0-hat at tau, decoded, same size as the input.",
                       "The same result as a latent (size padded to a multiple of 8).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "SD2.1-base (or another SD1.x/2.x model: training-free)."}),
                "vae": ("VAE", {"tooltip": "The model's VAE."}),
                "image": ("IMAGE", {"tooltip": "Degraded images (batch allowed). Gray and RGBA are converted."}),
                "n": ("FLOAT", {"default": 2.0, "min": 1.0, "max": 64.0, "step": 0.25, "tooltip": _N_TOOLTIP}),
                "tau": ("INT", {"default": 35, "min": 0, "max": 999, "tooltip": _TAU_TOOLTIP}),
                "omega_mode": (OMEGA_MODES, {"default": "auto", "tooltip": _OMEGA_MODE_TOOLTIP}),
                "omega": ("INT", {"default": 60, "min": 1, "max": 1000, "tooltip": _OMEGA_TOOLTIP}),
                "steps": ("INT", {"default": 100, "min": 2, "max": 1000, "tooltip": _STEPS_TOOLTIP}),
                "space": (list(ilvr.SPACES), {"default": "latent", "tooltip": _SPACE_TOOLTIP}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Noise seed (the diffused input and every refinement step)."}),
            },
            "optional": {
                "positive": ("CONDITIONING", {"tooltip": "Optional prompt (e.g. 'a sharp photo of a face'), encoded "
                                                         "with the CLIP of the MODEL's checkpoint. Default: null "
                                                         "conditioning (DR2 is unconditional)."}),
                "max_megapixels": ("FLOAT", {"default": MAX_MEGAPIXELS, "min": 0.01, "max": 1024.0, "step": 0.1,
                                             "tooltip": _MAX_MP_TOOLTIP}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, n, tau, omega_mode, omega, steps, space):
        return _static_check(RESTORE_ID, n=n, tau=tau, omega_mode=omega_mode, omega=omega, steps=steps,
                             space=space)

    @torch.no_grad()
    def restore(self, model, vae, image, n, tau, omega_mode, omega, steps, space, seed, positive=None,
                max_megapixels=MAX_MEGAPIXELS, unique_id=None):
        import comfy.sample
        import comfy.samplers

        _validate(RESTORE_ID, n, tau, omega_mode, omega, steps, space)
        factor = vae.spacial_compression_encode()
        if not isinstance(factor, int):
            raise NodeInputError(RESTORE_ID, "this VAE is not an image VAE with an integer downscale factor.")
        image = prepare_image(RESTORE_ID, image)
        check_megapixels(RESTORE_ID, image, max_megapixels, "BFR DR2 Restore runs the diffusion model on the whole "
                         "image at every step (and in space=pixel a VAE round trip per step).")
        sigmas = _model_sigmas(RESTORE_ID, model, n, tau, omega_mode, omega, steps)
        cond = (check_conditioning(RESTORE_ID, model, positive) if positive is not None
                else null_conditioning(RESTORE_ID, model))
        padded, (h, w) = pad_to_multiple(image, factor)
        check_interrupted()
        latent = vae.encode(padded)
        check_interrupted()
        sampler = comfy.samplers.KSAMPLER(sample_dr2, extra_options={
            "n": float(n), "space": space, "vae": vae, "reference": padded})
        noise = comfy.sample.prepare_noise(latent, int(seed))
        callback = sampler_callback(model, len(sigmas), unique_id)
        logger.info("DR2 restore: %d image(s) %dx%d, N=%s tau=%d omega=%s steps=%d space=%s",
                    image.shape[0], w, h, n, tau, omega if omega_mode == "explicit" else omega_mode, steps, space)
        samples = comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, cond, cond, latent,
                                             callback=callback, disable_pbar=True, seed=int(seed))
        check_interrupted()
        out = vae.decode(samples)[:, :h, :w, :3].clamp(0, 1)
        return (out, {"samples": samples})


def _model_config(model):
    return getattr(getattr(model, "model", None), "model_config", None)


def _context_dim(model) -> int | None:
    dim = (getattr(_model_config(model), "unet_config", None) or {}).get("context_dim")
    return int(dim) if dim else None


def _describe(width: int) -> str:
    name = _CONTEXT_NAMES.get(int(width))
    return f"{width} wide ({name})" if name else f"{width} wide"


def _needs_pooled(model) -> bool:
    """SDXL-family models build their ADM vector from the prompt's pooled output (comfy.model_base.sdxl_pooled)."""
    import comfy.model_base as mb

    return isinstance(getattr(model, "model", None), (mb.SDXL, mb.SDXLRefiner))


_POOLED_WIDTH = 1280  # OpenCLIP-G pooled output, what SDXL and the SDXL refiner read


def check_conditioning(node: str, model, positive):
    """The positive CONDITIONING must fit the MODEL: token width == context dim, a pooled output for SDXL."""
    if not isinstance(positive, list) or not positive:
        raise NodeInputError(node, "positive is not a CONDITIONING (a non-empty list of [tensor, options]); connect "
                                   "CLIPTextEncode, or disconnect it to use DR2's null prompt.")
    dim = _context_dim(model)
    model_name = type(_model_config(model)).__name__
    pooled = _needs_pooled(model)
    for entry in positive:
        tensor = entry[0] if isinstance(entry, (list, tuple)) and entry else None
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3:
            raise NodeInputError(node, "positive CONDITIONING holds no [B, tokens, width] tensor; connect "
                                       "CLIPTextEncode, or disconnect it to use DR2's null prompt.")
        width = int(tensor.shape[-1])
        if dim is not None and width != dim:
            raise NodeInputError(node, f"positive CONDITIONING is {_describe(width)} but this MODEL ({model_name}) "
                                       f"expects {_describe(dim)}: encode the prompt with the CLIP of the MODEL's "
                                       "own checkpoint (the same CheckpointLoader), or load the MODEL that matches "
                                       "the prompt's CLIP, or disconnect positive to use DR2's null prompt.")
        options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
        if pooled and options.get("pooled_output") is None:
            raise NodeInputError(node, f"this MODEL ({model_name}) needs the prompt's pooled output, which the "
                                       "positive CONDITIONING lacks: encode it with CLIPTextEncode on the SDXL "
                                       "checkpoint's CLIP, or disconnect positive to use DR2's null prompt.")
    return positive


def null_conditioning(node: str, model):
    """[[zeros(1, 77, context_dim), {}]]: the unconditional input for models without CLIP wiring.

    SDXL-family models also get a zero pooled output (their ADM input), so DR2 runs on them without a prompt."""
    dim = _context_dim(model)
    if not dim:
        raise NodeInputError(node, "cannot build a null prompt for this model (no context_dim); connect a "
                                   "'positive' CONDITIONING from CLIPTextEncode.")
    options = {"pooled_output": torch.zeros(1, _POOLED_WIDTH)} if _needs_pooled(model) else {}
    return [[torch.zeros(1, 77, dim), options]]


NODE_CLASS_MAPPINGS = {"BFRDR2Sampler": BFRDR2Sampler, "BFRDR2Sigmas": BFRDR2Sigmas, "BFRDR2Restore": BFRDR2Restore}
NODE_DISPLAY_NAME_MAPPINGS = {"BFRDR2Sampler": SAMPLER_ID, "BFRDR2Sigmas": SIGMAS_ID, "BFRDR2Restore": RESTORE_ID}

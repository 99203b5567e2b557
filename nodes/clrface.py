"""Node family: CLR-Face identity guidance (CLR-Face §3.2-3.3, design.md §3.5) — BFR Load Identity Model, BFR Load
CLR-Face Mask, BFR CLR-Face Sampler (a SAMPLER for SamplerCustom / SamplerCustomAdvanced) and BFR CLR-Face Restore.

Thin adapters around :mod:`..pipelines.clrface`: the sampler function runs :func:`~..pipelines.clrface.guided_heun`
(ComfyUI's ``sample_heun`` update, s_churn 0) with :class:`~..pipelines.clrface.IdentityGuidance` on ComfyUI's
denoiser, the VAE object given to the node as the decoder G (``first_stage_model.decode`` in autograd) and the
identity network as f_arc. ComfyUI runs prompts under ``torch.inference_mode``; the guidance takes its gradient
outside it, on normal copies of weights that were made inside it (:func:`~..pipelines.clrface.autograd_ready`).
Before the first gradient the UNet, the VAE and the identity network are loaded together through
``model_management.load_models_gpu`` (so ComfyUI counts them and does not offload the UNet to make room).
comfy is imported lazily.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

from ..lora.checkpoint import CheckpointError
from ..lora.id_mask import IdentityMaskCheckpoint, load_mask_checkpoint
from ..pipelines import clrface
from ..pipelines.arcface import ALIGNS, IdentityModel, IdentityWeightsError, load_identity_model
from ._comfy import (BFR_FOLDER, IDENTITY_FOLDER, check_interrupted, model_files, module_patcher,
                     register_model_folder, sampler_callback)
from .dr2 import check_conditioning, null_conditioning
from .helpers import NodeInputError, check_megapixels, pad_to_multiple, to_rgb

logger = logging.getLogger(__name__)

CATEGORY = "BFR/CLR-Face"
LOAD_ID = "BFR Load Identity Model"
MASK_ID = "BFR Load CLR-Face Mask"
SAMPLER_ID = "BFR CLR-Face Sampler"
RESTORE_ID = "BFR CLR-Face Restore"
MAX_MEGAPIXELS = 1.1  # default size guard of the restore node: 1024 x 1024 faces pass

UNIFORM_NOTE = ("no trained mask connected: uniform mask M_l = 1, i.e. plain classifier guidance on the whole "
                "latent (the paper's ablation without M_l); train one with `bfr train id-mask`")
_SCALE_TOOLTIP = ("Guidance scale s: every denoised estimate D becomes D - s * M (.) grad L_arc, one gradient step of "
                  "size s on the latent toward the identity of x_id (L_arc = cosine distance of the identity "
                  "embeddings). 0 = plain Heun (bit-exact). The useful range depends on the identity model; the log "
                  "reports |s M grad| / |D| per run (a few percent is a gentle pull).")
_DECODE_TOOLTIP = ("How the identity gradient decodes the estimate: full = the whole latent (exact); window = only the "
                   "latent cells the identity network reads (+2 cells), the rest grey: a guidance call costs ~0.66x "
                   "and ~1.6 GiB less at 512 px (measured with random VAE weights: gradient cosine 0.996 vs full).")
_REFERENCE_TOOLTIP = ("x_id: the initial estimate whose identity is kept (any restorer's output: DR2, FlipNet, a face "
                      "model), FFHQ-aligned face crops in [0, 1] (Crop Faces output). One image for the whole batch or "
                      "one per latent. Encode the same image into latent_image: refinement starts from E(x_id).")


# --------------------------------------------------------------------------------------------------- identity model


@dataclass
class IdentityHandle:
    """BFR_IDENTITY_MODEL: the iresnet (our :class:`IdentityModel`) and the ModelPatcher ComfyUI manages it with
    (None outside ComfyUI)."""

    model: IdentityModel
    patcher: object | None = None

    def on_device(self) -> IdentityModel:
        """The model with the device its weights are on now and weights autograd may save (see module doc)."""
        view = copy.copy(self.model)
        view.net = clrface.autograd_ready(self.model.net)
        view.device = next(view.net.parameters()).device
        return view


def identity_handle(model: IdentityModel) -> IdentityHandle:
    """Wrap an :class:`IdentityModel` for the graph: a ModelPatcher (load / offload devices of ComfyUI) when ComfyUI is
    there. Used by the loader node and by tests with random weights."""
    return IdentityHandle(model, module_patcher(model.net))


class BFRLoadIdentityModel:
    """models/bfr/identity/<file> -> BFR_IDENTITY_MODEL (an ArcFace-style iresnet r18/r34/r50/r100)."""

    DESCRIPTION = (
        "Loads a face-recognition network for CLR-Face's identity guidance: an arcface_torch iresnet backbone "
        "(r18/r34/r50/r100, 'backbone.pth', 112x112 input, 512-d output; the arch is read from the keys) from "
        "models/bfr/identity, with torch.load(weights_only=True) or from a .safetensors copy; a file with pickled "
        "code or another layout is refused. Our own implementation: no insightface, no onnxruntime. LICENCES: "
        "insightface's released recognition models are for non-commercial research only, and their training sets "
        "carry their own terms; check the licence of the file you use. align=template warps FFHQ-aligned crops to "
        "the ArcFace 5-point template (no detector); resize shrinks the whole crop.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("BFR_IDENTITY_MODEL",)
    RETURN_NAMES = ("identity_model",)
    OUTPUT_TOOLTIPS = ("The identity network f_arc for BFR CLR-Face Sampler / Restore.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "identity_name": (model_files(IDENTITY_FOLDER), {
                "tooltip": "iresnet weights in models/bfr/identity, e.g. ms1mv3_arcface_r50_fp16/backbone.pth (or "
                           "a .safetensors copy). Mind the licence of the file."}),
            "align": (list(ALIGNS), {"default": "template", "tooltip": "template: FFHQ crop -> ArcFace template "
                                                                       "warp; resize: whole crop to 112x112."}),
        }}

    def load(self, identity_name, align="template"):
        import folder_paths

        register_model_folder()
        path = folder_paths.get_full_path(IDENTITY_FOLDER, identity_name)
        if path is None:
            raise NodeInputError(LOAD_ID, f"{identity_name!r} is not in models/bfr/identity; put an arcface_torch "
                                          "iresnet backbone.pth (or .safetensors) there and refresh.")
        import comfy.model_management as mm

        try:
            with torch.inference_mode(False):  # normal tensors: the guidance back-propagates through them
                model = load_identity_model(path, device=mm.unet_offload_device(), align=align)
        except (IdentityWeightsError, ValueError) as exc:
            raise NodeInputError(LOAD_ID, str(exc)) from exc
        return (identity_handle(model),)


class BFRLoadCLRFaceMask:
    """models/bfr/<file> (clrface-mask/1) -> BFR_CLRFACE_MASK."""

    DESCRIPTION = (
        "Loads CLR-Face's learned latent mask f_M (CLR-Face §3.3; a few convolutions + sigmoid on the noisy latent, "
        "trained by `bfr train id-mask` with a perceptual + identity + sparsity objective) from models/bfr. The "
        "mask keeps the identity gradient to the latent features that carry identity. Without it the CLR-Face "
        "sampler uses a uniform mask (plain classifier guidance).")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("BFR_CLRFACE_MASK",)
    RETURN_NAMES = ("mask",)
    OUTPUT_TOOLTIPS = ("The identity mask f_M for BFR CLR-Face Sampler / Restore.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask_name": (model_files(BFR_FOLDER), {
            "tooltip": "A clrface-mask/1 .safetensors in models/bfr (from `bfr train id-mask`)."})}}

    def load(self, mask_name):
        import folder_paths

        register_model_folder()
        path = folder_paths.get_full_path(BFR_FOLDER, mask_name)
        if path is None:
            raise NodeInputError(MASK_ID, f"{mask_name!r} is not in models/bfr; put the mask .safetensors there.")
        try:
            return (load_mask_checkpoint(path),)
        except (CheckpointError, FileNotFoundError) as exc:
            raise NodeInputError(MASK_ID, str(exc)) from exc


# ------------------------------------------------------------------------------------------------------- sampler


def _load_for_guidance(model, vae, identity: IdentityHandle, x: torch.Tensor) -> None:
    """UNet + VAE + identity network on the device together (ComfyUI memory management)."""
    import comfy.model_management as mm

    patchers = [p for p in (getattr(getattr(model, "inner_model", None), "model_patcher", None),
                            getattr(vae, "patcher", None), identity.patcher) if p is not None]
    need = 0
    if hasattr(vae, "memory_used_decode"):
        need = 3 * vae.memory_used_decode(x.shape, vae.vae_dtype)  # decode activations kept for the backward
    mm.load_models_gpu(patchers, memory_required=need)


def comfy_decoder(vae, latent_out) -> clrface.Decoder:
    """ComfyUI's VAE as a differentiable decoder: model-space latent -> (B, 3, H, W) in [0, 1], unclamped, float32."""
    stage = clrface.autograd_ready(vae.first_stage_model)
    device, dtype = getattr(vae, "device", None), getattr(vae, "vae_dtype", torch.float32)

    def decode(z: torch.Tensor) -> torch.Tensor:
        check_interrupted()
        out = stage.decode(latent_out(z).to(device or z.device, dtype))
        return (out.float().to(z.device)[:, :3] + 1.0) * 0.5

    return decode


def prepare_reference(node: str, reference, batch: int) -> torch.Tensor:
    """IMAGE (B, H, W, C) -> (B, 3, H, W) in [0, 1]; one image or one per latent."""
    ref = to_rgb(node, reference, "reference")
    if ref.shape[0] not in (1, batch):
        raise NodeInputError(node, f"reference has {ref.shape[0]} images but the latent batch has {batch}: give one "
                                   "x_id per latent (the images encoded into latent_image) or a single one.")
    return ref.movedim(-1, 1)


@torch.no_grad()
def sample_clrface(model, x, sigmas, extra_args=None, callback=None, disable=None, vae=None, identity=None,
                   reference=None, scale: float = 1.0, mask: IdentityMaskCheckpoint | None = None, report=None,
                   decode: str = "full"):
    """k-diffusion sampler function: guided Heun (:func:`..pipelines.clrface.guided_heun`) along ``sigmas``."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])

    def denoiser(xt, sigma):
        return model(xt, sigma * s_in, **extra_args)

    guidance = None
    peak_before = None
    if scale > 0:
        _load_for_guidance(model, vae, identity, x)
        if x.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(x.device)
            peak_before = torch.cuda.memory_allocated(x.device)
        base = model.inner_model.inner_model
        idm = identity.on_device()
        ref = prepare_reference(SAMPLER_ID, reference, x.shape[0])
        mask_fn = None
        if mask is not None:
            net = copy.deepcopy(mask.mask).to(x.device)
            mask_fn = lambda xt, sigma: clrface.latent_mask(net, xt, sigma)  # noqa: E731
        dec = clrface.guidance_decoder(comfy_decoder(vae, base.process_latent_out), idm, tuple(x.shape[-2:]),
                                       int(vae.spacial_compression_decode()), decode)
        guidance = clrface.IdentityGuidance(dec, idm,
                                            clrface.reference_embedding(idm, ref), float(scale), mask_fn,
                                            interrupt=check_interrupted)
    out = clrface.guided_heun(denoiser, x, sigmas, guidance, callback, interrupt=check_interrupted)
    if guidance is not None:
        text = guidance.summary() + ("" if mask is not None else f"; {UNIFORM_NOTE}")
        if peak_before is not None:
            peak = torch.cuda.max_memory_allocated(x.device) - peak_before
            text += f"; peak extra device memory {peak / 2 ** 20:.0f} MiB"
        logger.info("[%s] %s", SAMPLER_ID, text)
        if report is not None:
            report.append(text)
    return out


class BFRCLRFaceSampler:
    """SAMPLER: Heun with CLR-Face's masked identity guidance, for SamplerCustom / SamplerCustomAdvanced."""

    DESCRIPTION = (
        "CLR-Face refinement as a SAMPLER (CLR-Face §3.2-3.3): deterministic Heun (Karras Alg. 1, the same update "
        "as ComfyUI's 'heun', no churn) where every denoised estimate is corrected by the masked identity gradient "
        "D - s * M (.) grad L_arc, L_arc = cosine distance between the identity embeddings of the decoded estimate "
        "and of x_id. Wiring: VAEEncode(x_id) -> latent_image, RandomNoise, BasicScheduler(karras, ~40 steps, "
        "denoise < 1: sigma_start, where E(x_id) is noised to) -> sigmas, a guider at CFG 1. With the conditional "
        "denoiser (Apply CLR-Face) the MODEL also sees the LQ latent. Without a mask input the mask is uniform "
        "(plain classifier guidance). Costs one VAE decode + identity forward/backward per model call.")
    CATEGORY = CATEGORY
    FUNCTION = "get_sampler"
    RETURN_TYPES = ("SAMPLER", "STRING")
    RETURN_NAMES = ("sampler", "info")
    OUTPUT_TOOLTIPS = ("CLR-Face sampler for SamplerCustom / SamplerCustomAdvanced.",
                       "Which mask and scale the sampler uses (the run's L_arc figures go to the log).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("VAE", {"tooltip": "The MODEL's VAE: the decoder G the identity gradient flows through."}),
                "identity_model": ("BFR_IDENTITY_MODEL", {"tooltip": "f_arc from BFR Load Identity Model."}),
                "reference": ("IMAGE", {"tooltip": _REFERENCE_TOOLTIP}),
                "scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10000.0, "step": 0.1,
                                    "tooltip": _SCALE_TOOLTIP}),
            },
            "optional": {
                "mask": ("BFR_CLRFACE_MASK", {"tooltip": "Learned mask f_M (BFR Load CLR-Face Mask). Without it: "
                                                         "uniform mask = plain classifier guidance."}),
                "decode": (list(clrface.DECODES), {"default": "full", "tooltip": _DECODE_TOOLTIP}),
            },
        }

    def get_sampler(self, vae, identity_model, reference, scale, mask=None, decode="full"):
        import comfy.samplers

        if not isinstance(identity_model, IdentityHandle):
            raise NodeInputError(SAMPLER_ID, "identity_model must come from BFR Load Identity Model.")
        if not scale >= 0:
            raise NodeInputError(SAMPLER_ID, f"scale must be >= 0 (got {scale}); 0 turns the guidance off.")
        ref = to_rgb(SAMPLER_ID, reference, "reference")
        if mask is None and scale > 0:
            logger.warning("[%s] %s", SAMPLER_ID, UNIFORM_NOTE)
        info = (f"CLR-Face sampler: s={scale:g}, " + ("guidance off (s=0): plain Heun" if scale == 0 else
                f"learned mask {mask.path.name} (trained at s={mask.guidance_scale:g})" if mask is not None
                else UNIFORM_NOTE))
        if decode not in clrface.DECODES:
            raise NodeInputError(SAMPLER_ID, f"decode must be one of {', '.join(clrface.DECODES)}, got {decode!r}.")
        options = {"vae": vae, "identity": identity_model, "reference": ref, "scale": float(scale), "mask": mask,
                   "decode": decode}
        return (comfy.samplers.KSAMPLER(sample_clrface, extra_options=options), info)


# ------------------------------------------------------------------------------------------------- restore node


def model_sigmas(model, steps: int, denoise: float) -> torch.Tensor:
    """BasicScheduler(karras, steps, denoise) of the MODEL's schedule."""
    ms = model.get_model_object("model_sampling")
    try:
        return clrface.start_sigmas(int(steps), float(denoise), float(ms.sigma_min), float(ms.sigma_max))
    except clrface.CLRFaceParameterError as exc:
        raise NodeInputError(RESTORE_ID, str(exc)) from exc


class BFRCLRFaceRestore:
    """x_id (+ MODEL, VAE, identity model) -> refined faces: encode, noise to sigma_start, guided Heun, decode."""

    DESCRIPTION = (
        "CLR-Face in one node: E(x_id) noised to sigma_start (denoise: 1 = pure noise, 0.3-0.6 keeps the estimate's "
        "structure), 'steps' guided Heun steps on the Karras schedule of the MODEL (paper: 40), the masked identity "
        "guidance toward x_id at every model call, then decode. x_id is any restorer's output (DR2, FlipNet, a "
        "face model) as FFHQ-aligned crops. Without a mask: uniform mask (plain classifier guidance). Returns the "
        "images, the latent and a report (L_arc before/after, guidance strength).")
    CATEGORY = CATEGORY
    FUNCTION = "restore"
    RETURN_TYPES = ("IMAGE", "LATENT", "STRING")
    RETURN_NAMES = ("image", "latent", "report")
    OUTPUT_TOOLTIPS = ("Refined faces, same size as x_id.", "The refined latent.",
                       "Guidance figures of the run and which mask was used.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "SD2.1-base (or its CLR-Face conditional denoiser)."}),
                "vae": ("VAE", {"tooltip": "The MODEL's VAE."}),
                "identity_model": ("BFR_IDENTITY_MODEL", {"tooltip": "f_arc from BFR Load Identity Model."}),
                "x_id": ("IMAGE", {"tooltip": "Initial estimates (any restorer's output), FFHQ-aligned crops."}),
                "steps": ("INT", {"default": clrface.PAPER_STEPS, "min": 1, "max": 1000,
                                  "tooltip": "Heun steps after sigma_start (paper: 40); 2 model calls each."}),
                "denoise": ("FLOAT", {"default": 0.5, "min": 0.01, "max": 1.0, "step": 0.01,
                                      "tooltip": "Where refinement starts: BasicScheduler's denoise (1 = sigma_max)."}),
                "scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10000.0, "step": 0.1,
                                    "tooltip": _SCALE_TOOLTIP}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Noise seed of the start."}),
            },
            "optional": {
                "mask": ("BFR_CLRFACE_MASK", {"tooltip": "Learned mask f_M; without it a uniform mask."}),
                "positive": ("CONDITIONING", {"tooltip": "Optional prompt from the MODEL's CLIP; default null."}),
                "max_megapixels": ("FLOAT", {"default": MAX_MEGAPIXELS, "min": 0.01, "max": 64.0, "step": 0.1,
                                             "tooltip": "Size guard per image: crop faces first."}),
                "decode": (list(clrface.DECODES), {"default": "full", "tooltip": _DECODE_TOOLTIP}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @torch.no_grad()
    def restore(self, model, vae, identity_model, x_id, steps, denoise, scale, seed, mask=None, positive=None,
                max_megapixels=MAX_MEGAPIXELS, decode="full", unique_id=None):
        import comfy.sample

        image = to_rgb(RESTORE_ID, x_id, "x_id")
        check_megapixels(RESTORE_ID, image, max_megapixels, "CLR-Face decodes and back-propagates through the VAE "
                         "and the identity network at every model call.")
        sigmas = model_sigmas(model, steps, denoise)
        cond = (check_conditioning(RESTORE_ID, model, positive) if positive is not None
                else null_conditioning(RESTORE_ID, model))
        factor = vae.spacial_compression_encode()
        padded, (h, w) = pad_to_multiple(image, factor)
        sampler, info = BFRCLRFaceSampler().get_sampler(vae, identity_model, image, scale, mask, decode)
        report: list[str] = []
        sampler.extra_options["report"] = report
        check_interrupted()
        latent = vae.encode(padded)
        noise = comfy.sample.prepare_noise(latent, int(seed))
        callback = sampler_callback(model, len(sigmas) - 1, unique_id)
        samples = comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, cond, cond, latent,
                                             callback=callback, disable_pbar=True, seed=int(seed))
        check_interrupted()
        out = vae.decode(samples)[:, :h, :w, :3].clamp(0, 1)
        return (out, {"samples": samples}, "\n".join([info] + report))


NODE_CLASS_MAPPINGS = {"BFRLoadIdentityModel": BFRLoadIdentityModel, "BFRLoadCLRFaceMask": BFRLoadCLRFaceMask,
                       "BFRCLRFaceSampler": BFRCLRFaceSampler, "BFRCLRFaceRestore": BFRCLRFaceRestore}
NODE_DISPLAY_NAME_MAPPINGS = {"BFRLoadIdentityModel": LOAD_ID, "BFRLoadCLRFaceMask": MASK_ID,
                              "BFRCLRFaceSampler": SAMPLER_ID, "BFRCLRFaceRestore": RESTORE_ID}

"""Node family: DR-BFR on SD2.1-base (design.md §3.4, comfyui-notes §6).

* ``BFR Load DR-BFR`` reads a ``drbfr/1`` file from ``models/bfr`` (:mod:`..lora.cond_checkpoint` checks every
  tensor) into a ``BFR_DRBFR`` value: the kohya LoRA, W_extra of the widened conv_in, E_DR and the DR prompt.
* ``BFR Apply DR-BFR`` patches a clone of the MODEL -- never the input:
  - the LoRA through ComfyUI's loader (``comfy.lora.load_lora`` + ``add_patches``);
  - ``diffusion_model.input_blocks.0.0`` replaced by an object patch :class:`..lora.ldrm.ConcatConvIn` around the
    stock 4-channel conv, so a plain SD2.1-base checkpoint takes ``[z_t, E(y)]``;
  - the LQ latent E(y) (model space) as ``noise_concat`` on BOTH the positive and the negative CONDITIONING: ComfyUI
    turns it into ``c_concat``, repeats it to the batch and concatenates it after input scaling;
  - the DR tokens ``alpha_t f_DR + beta_t`` (Eq. 10) through a ``DIFFUSION_MODEL`` wrapper that appends them to the
    context at every UNet call, modulated by that call's timestep (they cannot live in CONDITIONING, which is fixed
    for the whole run). f_DR = E_DR(y) is computed once, here.
  The math is :func:`..lora.ldrm.dr_context` and :class:`..lora.ldrm.ConcatConvIn`, the same functions the diffusers
  pipeline (:mod:`..pipelines.drbfr`) calls; ``tests/comfy/test_drbfr_nodes.py`` holds the two to the same eps.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..lora.checkpoint import CheckpointError
from ..lora.cond_checkpoint import DRBFR_FORMAT, read_conditional_checkpoint
from ..lora.ldrm import ConcatConvIn, ConditioningError, dr_context
from ._comfy import BFR_FOLDER, model_files, module_patcher, register_model_folder
from .flipnet import add_lora_patches, check_sd21_model, prepare_image, unet_compute_dtype
from .helpers import NodeInputError

logger = logging.getLogger(__name__)

LOAD_ID = "BFR Load DR-BFR"
APPLY_ID = "BFR Apply DR-BFR"
CATEGORY = "BFR/DR-BFR"
WRAPPER_KEY = "bfr_drbfr"
CONV_IN = "diffusion_model.input_blocks.0.0"


class DRModules(nn.Module):
    """E_DR + the DR prompt as ONE module, so a ModelPatcher loads / offloads them with the UNet."""

    def __init__(self, encoder: nn.Module, prompt: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.prompt = prompt


@dataclass
class DRBFRModel:
    """The BFR_DRBFR value: a validated ``drbfr/1`` checkpoint and its modules (CPU, the file's dtype), built once
    and shared by every Apply and clone; :meth:`patcher` is their ModelPatcher."""

    name: str
    checkpoint: object  # lora.cond_checkpoint.ConditionalCheckpoint
    modules: DRModules
    _patcher: object = field(default=None, repr=False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.modules.parameters()).dtype

    def patcher(self):
        if self._patcher is None:
            self._patcher = module_patcher(self.modules)
        return self._patcher

    @torch.no_grad()
    def degradation_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """f_DR = E_DR(y) (Eq. 3) for IMAGE (B, H, W, 3), on the device ComfyUI loads the modules to; fp32 on CPU."""
        import comfy.model_management as mm

        p = self.patcher()
        mm.load_models_gpu([p])
        w = next(p.model.parameters())
        f = p.model.encoder(image.movedim(-1, 1).to(w.device, w.dtype))
        return f.float().cpu()

    def __deepcopy__(self, memo):  # weights are shared, never duplicated by a clone
        return self


def load_drbfr(path: str, node: str = LOAD_ID) -> DRBFRModel:
    """Read a ``drbfr/1`` file into a :class:`DRBFRModel`; every problem is a NodeInputError naming the fix."""
    name = os.path.basename(str(path))
    try:
        ckpt = read_conditional_checkpoint(path, DRBFR_FORMAT)
        modules = DRModules(ckpt.build("dr_encoder"), ckpt.build("dr_prompt")).requires_grad_(False).eval()
    except (CheckpointError, FileNotFoundError) as exc:
        raise NodeInputError(node, f"{exc} Pick a DR-BFR checkpoint (bfr_format drbfr/1, written by `bfr train "
                                   "drbfr`) in models/bfr.") from exc
    logger.info("Loaded DR-BFR %s (LoRA rank %d, %d LQ-latent channels, %d DR tokens).", name, ckpt.rank,
                ckpt.extra_channels, ckpt.configs["dr_prompt"].num_tokens)
    return DRBFRModel(name=name, checkpoint=ckpt, modules=modules)


class BFRLoadDRBFR:
    """models/bfr/<file> -> BFR_DRBFR."""

    DESCRIPTION = ("Loads a DR-BFR checkpoint (degradation representation as a prompt, on SD2.1-base) from models/bfr: "
                   "the LoRA, the extra conv_in channels that read the LQ latent, the degradation encoder E_DR and "
                   "the timestep-modulated prompt. Connect it to 'BFR Apply DR-BFR'.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("BFR_DRBFR",)
    RETURN_NAMES = ("drbfr",)
    OUTPUT_TOOLTIPS = ("The DR-BFR weights for BFR Apply DR-BFR.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"drbfr_name": (model_files(BFR_FOLDER), {
            "tooltip": "DR-BFR .safetensors in models/bfr (bfr_format drbfr/1), e.g. drbfr.safetensors from "
                       "`bfr train drbfr`."})}}

    def load(self, drbfr_name):
        import folder_paths

        register_model_folder()
        path = folder_paths.get_full_path(BFR_FOLDER, drbfr_name)
        if path is None:
            raise NodeInputError(LOAD_ID, f"{drbfr_name!r} is not in models/bfr; put the DR-BFR .safetensors there "
                                          "(or in a 'bfr' entry of extra_model_paths.yaml) and refresh.")
        return (load_drbfr(path),)


def tile_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Row r -> t[r mod B]: how ComfyUI repeats a condition to the latent batch (``utils.repeat_to_batch_size``)."""
    if t.shape[0] >= rows:
        return t[:rows]
    return t.repeat(math.ceil(rows / t.shape[0]), *([1] * (t.ndim - 1)))[:rows]


class DRPromptWrapper:
    """``DIFFUSION_MODEL`` wrapper: context -> ``[context, DR tokens at this call's timesteps]`` (Eq. 10).

    The UNet batch is ``len(cond_or_uncond)`` chunks of equal size (one per CFG branch); within each chunk row r
    belongs to image ``r mod B``, as the ``noise_concat`` latent that travels in the conditioning."""

    def __init__(self, f_dr: torch.Tensor, drbfr: DRBFRModel, node: str = APPLY_ID):
        self.f_dr = f_dr
        self.drbfr = drbfr
        self.node = node

    def __deepcopy__(self, memo):
        return self

    def rows(self, context: torch.Tensor, chunks: int) -> torch.Tensor:
        """f_DR for every row of the UNet batch."""
        rows = context.shape[0]
        if chunks < 1 or rows % chunks:
            raise NodeInputError(self.node, f"cannot split a UNet batch of {rows} rows into {chunks} CFG chunks.")
        return tile_rows(self.f_dr, rows // chunks).repeat(chunks, 1, 1)

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        prompt = self.drbfr.modules.prompt
        w = next(prompt.parameters())
        f = self.rows(context, len(transformer_options.get("cond_or_uncond", [0])))
        try:
            context = dr_context(context, prompt, f.to(w.device, w.dtype), timesteps.to(w.device)).to(context.device)
        except ConditioningError as exc:
            raise NodeInputError(self.node, str(exc)) from exc
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)


class BFRApplyDRBFR:
    """MODEL + BFR_DRBFR + VAE + IMAGE -> patched MODEL, prompts carrying the LQ latent, the latent to sample."""

    DESCRIPTION = (
        "DR-BFR (SD2.1-base): restores low-quality faces. Returns a patched copy of the MODEL (DR-BFR LoRA; the UNet "
        "input widened to read the encoded LQ image; the image's degradation representation appended to the prompt "
        "at every step, modulated by the step's timestep), the positive/negative prompts carrying the encoded LQ "
        "image (use these, not the originals), and an empty latent of the image's size. Sample with KSampler or "
        "SamplerCustomAdvanced at denoise 1.0, any sampler/scheduler; cfg 1 unless the checkpoint was trained with "
        "text dropout (then e.g. 1.5 with a negative prompt).")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("model", "positive", "negative", "latent")
    OUTPUT_TOOLTIPS = ("A patched clone of the input MODEL (the input stays untouched).",
                       "The positive prompt with the LQ latent attached (noise_concat).",
                       "The negative prompt with the LQ latent attached (noise_concat).",
                       "An empty latent of the image's size and batch: sample this one (denoise 1.0).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "SD2.1-base (512, eps-prediction) from the checkpoint loader."}),
            "drbfr": ("BFR_DRBFR", {"tooltip": "From BFR Load DR-BFR."}),
            "vae": ("VAE", {"tooltip": "The SD2.1 VAE, to encode the LQ image."}),
            "image": ("IMAGE", {"tooltip": "The low-quality face(s): aligned crops, sides multiples of 8 (512x512 "
                                           "as in training)."}),
            "positive": ("CONDITIONING", {"tooltip": "Prompt from CLIPTextEncode with this checkpoint's CLIP (empty "
                                                     "is fine: DR-BFR was trained mostly without text)."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative prompt (only used with cfg > 1)."}),
            "use_dr_prompt": ("BOOLEAN", {"default": True, "tooltip": "Append the degradation representation tokens "
                                                                      "(the method). Off = the 'w/o DR' ablation: LQ "
                                                                      "latent only."}),
        }}

    def apply(self, model, drbfr, vae, image, positive, negative, use_dr_prompt=True):
        import comfy.patcher_extension as pe

        node = APPLY_ID
        if not isinstance(drbfr, DRBFRModel):
            raise NodeInputError(node, f"drbfr must come from {LOAD_ID}, got {type(drbfr).__name__}.")
        m, pos, neg, latent, image = patch_conditional_model(node, model, drbfr.checkpoint, drbfr.name, vae, image,
                                                             positive, negative)
        if use_dr_prompt:
            f_dr = drbfr.degradation_tokens(image)
            m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, DRPromptWrapper(f_dr, drbfr, node))
            m.set_additional_models(WRAPPER_KEY, [drbfr.patcher()])
        logger.info("%s: %s, %d image(s) %dx%d, DR prompt %s, UNet compute dtype %s.", node, drbfr.name,
                    image.shape[0], image.shape[2], image.shape[1], "on" if use_dr_prompt else "off",
                    unet_compute_dtype(model))
        return m, pos, neg, latent


def patch_conditional_model(node: str, model, ckpt, source: str, vae, image, positive, negative):
    """A clone of ``model`` with a ``drbfr/1`` / ``clrface/1`` file's LoRA (ComfyUI's loader) and widened conv_in
    (object patch), the prompts with the LQ latent as ``noise_concat`` on both, an empty latent of the image's size,
    and the checked IMAGE. The input MODEL is never changed."""
    import node_helpers

    check_sd21_model(node, model, ckpt.title)
    image = prepare_image(node, image, ckpt.title)
    conv = model.get_model_object(CONV_IN)
    if isinstance(conv, ConcatConvIn):
        raise NodeInputError(node, "this MODEL already carries a widened conv_in (DR-BFR or CLR-Face was applied "
                                   "before); connect the checkpoint loader's MODEL instead.")
    if tuple(conv.weight.shape[:1]) != tuple(ckpt.conv_in_extra.shape[:1]):
        raise NodeInputError(node, f"{source}: conv_in extra weights {tuple(ckpt.conv_in_extra.shape)} do not fit "
                                   f"this UNet's conv_in {tuple(conv.weight.shape)}.")
    with torch.no_grad():
        raw = vae.encode(image)
    lq = model.model.process_latent_in(raw.float()).float().cpu()
    m = model.clone()
    add_lora_patches(node, m, ckpt.lora, source)
    m.add_object_patch(CONV_IN, ConcatConvIn(conv, ckpt.extra_channels, ckpt.conv_in_extra))
    pos = node_helpers.conditioning_set_values(positive, {"noise_concat": lq})
    neg = node_helpers.conditioning_set_values(negative, {"noise_concat": lq})
    return m, pos, neg, {"samples": torch.zeros_like(raw, device="cpu")}, image


NODE_CLASS_MAPPINGS = {"BFRLoadDRBFR": BFRLoadDRBFR, "BFRApplyDRBFR": BFRApplyDRBFR}
NODE_DISPLAY_NAME_MAPPINGS = {"BFRLoadDRBFR": LOAD_ID, "BFRApplyDRBFR": APPLY_ID}

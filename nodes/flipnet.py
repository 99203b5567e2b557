"""Node family: FlipNet restoration / degradation on SD2.1-base (design.md §3.3, §5).

* ``BFR Load FlipNet`` reads a ``flipnet/1`` checkpoint from ``models/bfr`` (:mod:`..lora.checkpoint`, which checks
  every tensor against the layer it targets) into a ``BFR_FLIPNET`` value: the kohya LoRA dict, the BoostHub
  projections of every self-attention layer, and (restore mode) the LQ face encoder + adapter.
* ``BFR Apply FlipNet`` patches a clone of the MODEL -- never the input -- with the LoRA, through ComfyUI's own
  loader (``comfy.lora.load_lora`` + ``add_patches``, merged at load time), and the patch objects of
  :mod:`.flipnet_patches` (the joint-batch / LQ-cache ``APPLY_MODEL`` wrapper, the ``attn1_patch`` and the
  ``attn1_output_patch`` that add ``phi * F_ro`` in every self-attention layer, and on the first transformer block
  an ``attn1`` replace that computes the equal cond/uncond CFG rows once); it returns positive / negative
  CONDITIONING with the face tokens ``tau(z_y)`` / ``tau(0)`` appended on the token axis (restore mode; degrade mode
  leaves the prompts unchanged), plus an empty LATENT of the image's size.

The math is the same as the diffusers pipeline (:mod:`..pipelines.flipnet`); ``tests/comfy/test_flipnet_nodes.py``
holds the two to the same numbers. The BoostHub weights live in one ModelPatcher registered with
``set_additional_models``, so clones share them and ComfyUI moves them with the UNet. comfy is imported lazily.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..lora import boosthub as bh
from ..lora.checkpoint import FLIPNET_MODES, SD2_CONTEXT_DIM, CheckpointError, build_face_modules, read_flipnet_checkpoint
from ..lora.face_embedder import append_face_tokens, face_tokens
from ._comfy import BFR_FOLDER, intermediate_device, model_files, module_patcher, register_model_folder
from .flipnet_patches import BoostHubOutput, BoostHubStash, HubBank, JointBatchWrapper, SharedRowsAttention
from .helpers import NodeInputError, to_rgb

logger = logging.getLogger(__name__)

# display names (the node ids are the class names); errors name the node as users see it
LOAD_ID = "BFR Load FlipNet"
APPLY_ID = "BFR Apply FlipNet"
CATEGORY = "BFR/FlipNet"

T_Y_POLICIES = ["checkpoint", "same", "fixed"]
WRAPPER_KEY = "bfr_flipnet"
# Below the compute floor (design §7): under CFG the first self-attention layer and its BoostHub branch run once for
# the equal cond/uncond rows (flipnet_patches.SharedRowsAttention); False runs every row (tests compare the two).
SHARE_CFG_ROWS = True


# ---------------------------------------------------------------------------------------------- BFR_FLIPNET


COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class FaceModules(nn.Module):
    """The LQ face encoder + adapter as ONE module, so a ModelPatcher can load/offload them together."""

    def __init__(self, encoder: nn.Module, adapter: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.adapter = adapter


def unet_compute_dtype(model) -> torch.dtype:
    """The dtype the MODEL's UNet computes in: ``manual_cast_dtype`` when ComfyUI casts weights per layer (e.g. bf16
    or fp8 weights on a device without bf16/fp8 compute), else its weight dtype (``model_base.BaseModel._apply_model``
    casts the UNet input, context included, to exactly this dtype)."""
    base = model.model
    dtype = getattr(base, "manual_cast_dtype", None) or base.get_dtype()
    return dtype if dtype in COMPUTE_DTYPES else torch.float32


@dataclass
class FlipNetModel:
    """The BFR_FLIPNET value: a validated checkpoint plus its torch modules (built once, shared by every Apply).

    ``hubs`` / ``face_encoder`` / ``adapter`` are the modules as stored in the file (CPU, the file's dtype; the
    BoostHub bank holds the checkpoint's tensors themselves). A UNet computing in another dtype gets one cast copy
    per dtype (:meth:`bank`, :meth:`face`), built on first use and shared by every Apply and clone after that; every set sits
    in its own ModelPatchers (:meth:`hub_patcher`, :meth:`face_patcher`) so ComfyUI's model management loads it to
    the UNet's device, counts it and offloads it like any model -- nothing here moves a module by itself.
    """

    name: str
    checkpoint: object  # lora.checkpoint.FlipNetCheckpoint
    hubs: HubBank
    face_encoder: nn.Module | None = None
    adapter: nn.Module | None = None
    _cast: dict = field(default_factory=dict, repr=False)  # (kind, dtype) -> HubBank | FaceModules
    _patchers: dict = field(default_factory=dict, repr=False)  # (kind, dtype) -> ModelPatcher

    @property
    def mode(self) -> str:
        return self.checkpoint.mode

    @property
    def has_face_embedder(self) -> bool:
        return self.face_encoder is not None

    @functools.cached_property
    def boosthub_is_zero(self) -> bool:
        """Every W_o of the bank is zero (an untrained checkpoint): BoostHub adds exactly nothing."""
        return bh.boosthub_is_zero(self.hubs.layers.values())

    @property
    def stored_dtype(self) -> torch.dtype:
        return next(self.hubs.parameters()).dtype

    def _cast_copy(self, kind: str, dtype: torch.dtype | None, build) -> nn.Module:
        dtype = dtype or self.stored_dtype
        key = (kind, dtype)
        if key not in self._cast:
            module = build()
            if dtype != self.stored_dtype:
                module = copy.deepcopy(module).to(dtype)
            self._cast[key] = module.requires_grad_(False).eval()
        return self._cast[key]

    def bank(self, dtype: torch.dtype | None = None) -> HubBank:
        """The BoostHub bank in ``dtype`` (None: as stored)."""
        return self._cast_copy("boosthub", dtype, lambda: self.hubs)

    def face(self, dtype: torch.dtype | None = None) -> FaceModules | None:
        """The face encoder + adapter in ``dtype`` (None: as stored); None without a face embedder."""
        if not self.has_face_embedder:
            return None
        return self._cast_copy("face", dtype, lambda: FaceModules(self.face_encoder, self.adapter))

    def _patcher(self, kind: str, module: nn.Module, dtype: torch.dtype):
        key = (kind, dtype)
        if key not in self._patchers:
            self._patchers[key] = module_patcher(module)
        return self._patchers[key]

    def hub_patcher(self, dtype: torch.dtype | None = None):
        """A ModelPatcher around the BoostHub bank in ``dtype``; Apply registers it with ``set_additional_models``,
        so sampling loads/offloads it with the UNet (comfyui-notes §3.5)."""
        dtype = dtype or self.stored_dtype
        return self._patcher("boosthub", self.bank(dtype), dtype)

    def face_patcher(self, dtype: torch.dtype | None = None):
        """A ModelPatcher around the face encoder + adapter in ``dtype`` (None without a face embedder)."""
        dtype = dtype or self.stored_dtype
        face = self.face(dtype)
        return None if face is None else self._patcher("face", face, dtype)

    def __deepcopy__(self, memo):  # weights are shared, never duplicated by a clone
        return self


def load_flipnet(path: str, node: str = LOAD_ID) -> FlipNetModel:
    """Read a FlipNet ``.safetensors`` into a :class:`FlipNetModel`; every problem is a NodeInputError."""
    name = os.path.basename(str(path))
    try:
        ckpt = read_flipnet_checkpoint(path)
        hubs = bh.boosthub_modules_from_state_dict(ckpt.boosthub)
        enc = ada = None
        if ckpt.has_face_embedder:
            enc, ada = build_face_modules(ckpt)
    except (CheckpointError, FileNotFoundError) as exc:
        raise NodeInputError(node, f"{exc} Pick a FlipNet checkpoint (bfr_format flipnet/1, written by `bfr train "
                                   "flipnet`) in models/bfr.") from exc
    except ValueError as exc:
        raise NodeInputError(node, f"{name}: {exc} The file is not a valid FlipNet checkpoint; re-export it with "
                                   "`bfr train flipnet`.") from exc
    for module in (enc, ada):
        if module is not None:
            module.requires_grad_(False).eval()
    bank = HubBank(hubs).requires_grad_(False).eval()
    logger.info("Loaded FlipNet %s (%s mode, LoRA rank %d, %d BoostHub layers, face embedder: %s).", name,
                ckpt.mode, ckpt.rank, len(hubs), enc is not None)
    return FlipNetModel(name=name, checkpoint=ckpt, hubs=bank, face_encoder=enc, adapter=ada)


class BFRLoadFlipNet:
    """models/bfr/<file> -> BFR_FLIPNET."""

    DESCRIPTION = (
        "Loads a FlipNet checkpoint (FlipNet, BFR on SD2.1-base) from models/bfr: the rank-64 LoRA on every "
        "attention projection, the BoostHub branch of every self-attention layer and, for restoration "
        "checkpoints, the LQ face encoder + adapter that turn the input face into extra prompt tokens. Connect it "
        "to 'BFR Apply FlipNet'. The file's metadata says whether it restores or degrades.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("BFR_FLIPNET",)
    RETURN_NAMES = ("flipnet",)
    OUTPUT_TOOLTIPS = ("The FlipNet weights (LoRA, BoostHub, face embedder) for BFR Apply FlipNet.",)

    @classmethod
    def INPUT_TYPES(cls):
        names = model_files(BFR_FOLDER)  # weight files only; an empty list outside ComfyUI
        return {
            "required": {
                "flipnet_name": (names, {"tooltip": "FlipNet .safetensors in models/bfr (bfr_format flipnet/1), "
                                                    "e.g. flipnet_restore.safetensors from `bfr train flipnet`."}),
            },
        }

    def load(self, flipnet_name):
        import folder_paths

        register_model_folder()
        path = folder_paths.get_full_path(BFR_FOLDER, flipnet_name)
        if path is None:
            raise NodeInputError(LOAD_ID, f"{flipnet_name!r} is not in models/bfr; put the FlipNet .safetensors "
                                          "there (or in a 'bfr' entry of extra_model_paths.yaml) and refresh.")
        return (load_flipnet(path),)


# ---------------------------------------------------------------------------------------------- patched MODEL


def joint_batch_wrapper(model) -> JointBatchWrapper | None:
    """The FlipNet wrapper on a patched MODEL (None if it carries none); tests read its condition latent here."""
    import comfy.patcher_extension as pe

    found = model.wrappers.get(pe.WrappersMP.APPLY_MODEL, {}).get(WRAPPER_KEY, [])
    return found[-1] if found else None


# ---------------------------------------------------------------------------------------------- Apply node


def check_sd21_model(node: str, model, what: str = "FlipNet") -> dict:
    """The MODEL's unet_config, after checking it is an SD2.x UNet (context 1024, 4 latent channels)."""
    try:
        cfg = model.model.model_config.unet_config
        diffusion = model.model.diffusion_model
    except AttributeError as exc:
        raise NodeInputError(node, f"expected a MODEL from a checkpoint loader, got {type(model).__name__}.") from exc
    ctx = cfg.get("context_dim")
    if ctx != SD2_CONTEXT_DIM:
        raise NodeInputError(node, f"{what} needs an SD2.1-base MODEL (text context width {SD2_CONTEXT_DIM}); this "
                                   f"MODEL ({type(model.model).__name__}) has context_dim={ctx} (SD1.x: 768, SDXL: "
                                   "2048). Load v2-1_512-ema-pruned (SD2.1-base) with the checkpoint loader.")
    if cfg.get("in_channels", 4) != 4 or not hasattr(diffusion, "input_blocks"):
        raise NodeInputError(node, f"{what} needs a plain 4-channel SD2.1-base UNet, got in_channels="
                                   f"{cfg.get('in_channels')} ({type(diffusion).__name__}). Use the SD2.1-base "
                                   "checkpoint, not an inpainting or depth model.")
    return cfg


def self_attention_blocks(model) -> dict[tuple[str, int, int], int]:
    """{ComfyUI (block, number, block_index): attn1 width} for every transformer block of the MODEL's UNet."""
    from comfy.ldm.modules.attention import SpatialTransformer

    unet = model.model.diffusion_model
    found = {}
    groups = [("input", i, b) for i, b in enumerate(unet.input_blocks)] + [("middle", 0, unet.middle_block)] + \
        [("output", i, b) for i, b in enumerate(unet.output_blocks)]
    for name, number, block in groups:
        for module in block:
            if isinstance(module, SpatialTransformer):
                for k, tb in enumerate(module.transformer_blocks):
                    found[(name, number, k)] = int(tb.attn1.to_q.in_features)
    return found


def _block_keys(node: str, flipnet: FlipNetModel, model, unet_config: dict) -> dict[tuple[str, int, int], str]:
    have = self_attention_blocks(model)
    keys = {}
    try:
        for path in flipnet.hubs.paths():
            keys[bh.comfy_block_key(path, unet_config)] = path
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise NodeInputError(node, f"{flipnet.name}: {exc} The checkpoint does not fit this MODEL's UNet.") from exc
    if set(keys) != set(have):
        raise NodeInputError(node, f"{flipnet.name} has BoostHub layers for {sorted(keys)} but this MODEL's "
                                   f"self-attention blocks are {sorted(have)}: it was trained on another UNet "
                                   "topology. Use the SD2.1-base checkpoint it was trained with.")
    for key, path in keys.items():
        width = flipnet.hubs.get(path).hidden_size
        if width != have[key]:
            raise NodeInputError(node, f"{flipnet.name}: BoostHub {path} is {width} wide but block {key} of this "
                                       f"MODEL is {have[key]} wide; use the SD2.1-base checkpoint it was trained "
                                       "with.")
    return keys


def first_block(keys) -> tuple[str, int, int] | None:
    """The UNet's first transformer block (input block, lowest number): the only one before any cross-attention."""
    inputs = [k for k in keys if k[0] == "input"]
    return min(inputs, key=lambda k: (k[1], k[2])) if inputs else None


def comfy_attention(q, k, v, heads, extra_options):
    """The attention a ComfyUI transformer block runs (``optimized_attention``, as selected at startup), for
    :class:`.flipnet_patches.SharedRowsAttention`."""
    from comfy.ldm.modules import attention

    return attention.optimized_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"),
                                         transformer_options=extra_options)


def add_lora_patches(node: str, m, lora: dict[str, torch.Tensor], source: str) -> None:
    """Patch the clone ``m`` with a kohya LoRA through ComfyUI's own loader (merged at load time); every layer of
    the file must find its target."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(m.model, {})
    patches = comfy.lora.load_lora(lora, key_map, log_missing=False)
    applied = m.add_patches(patches, 1.0)
    expected = sum(k.endswith(".lora_down.weight") for k in lora)
    if len(applied) != expected:
        raise NodeInputError(node, f"{source}: only {len(applied)} of {expected} LoRA layers fit this MODEL; the "
                                   "checkpoint was trained on another UNet. Use the SD2.1-base checkpoint it was "
                                   "trained with.")


def _has_attn1_replace(model, key) -> bool:
    replace = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    return key in replace or key[:2] in replace


def parameter_problem(phi=None, t_y_policy=None, t_y=None) -> str | None:
    """What is wrong with the Apply node's widget values, in words (None: nothing); None inputs are linked ones."""
    if phi is not None and not (isinstance(phi, (int, float)) and 0.0 <= phi <= 2.0):
        return f"phi must be in [0, 2] (got {phi!r}); 1 is the paper's default."
    if t_y_policy is not None and t_y_policy not in T_Y_POLICIES:
        return f"t_y_policy must be one of {T_Y_POLICIES} (got {t_y_policy!r})."
    if t_y is not None and not (isinstance(t_y, int) and 0 <= t_y <= 999):
        return f"t_y must be an integer timestep in [0, 999] (got {t_y!r})."
    return None


def prepare_image(node: str, image, what: str = "FlipNet") -> torch.Tensor:
    """:func:`.helpers.to_rgb`, and sides that are not multiples of 8 (or below 16) rejected."""
    image = to_rgb(node, image)
    h, w = image.shape[1:3]
    if h % 8 or w % 8 or min(h, w) < 16:
        raise NodeInputError(node, f"IMAGE is {w}x{h}; {what} needs sides that are multiples of 8 and >= 16 "
                                   "(aligned 512x512 faces are what it was trained on). Crop or resize the image "
                                   "(e.g. with ImageScale or ImageCrop).")
    return image


def condition_noise(shape, seed: int) -> torch.Tensor:
    """The condition stream's noise: row i from a CPU generator seeded with seed + i (device independent)."""
    rows = []
    for i in range(shape[0]):
        g = torch.Generator(device="cpu").manual_seed((int(seed) + i) & 0xFFFF_FFFF_FFFF_FFFF)
        rows.append(torch.randn(tuple(shape[1:]), generator=g))
    return torch.stack(rows)


def _with_tokens(node: str, conditioning, tokens: torch.Tensor, what: str):
    """A new CONDITIONING whose tensors carry ``tokens`` appended on the token axis (inputs are not modified)."""
    out = []
    b = tokens.shape[0]
    for cond, opts in conditioning:
        if cond.shape[-1] != tokens.shape[-1]:
            raise NodeInputError(node, f"{what} conditioning is {cond.shape[-1]} wide, the face tokens "
                                       f"{tokens.shape[-1]}: encode the prompt with the SD2.1 CLIP of the same "
                                       "checkpoint.")
        if cond.shape[0] not in (1, b):
            raise NodeInputError(node, f"{what} conditioning has batch {cond.shape[0]} but there are {b} images; "
                                       "use one prompt (batch 1) or one per image.")
        if cond.shape[0] != b:
            cond = cond.expand(b, -1, -1)
        out.append([append_face_tokens(cond, tokens.to(cond.device)), dict(opts)])
    return out


def _sigma_of_timestep(model, t_y: int) -> float:
    ms = model.get_model_object("model_sampling")
    table = getattr(ms, "sigmas", None)
    if table is None or table.ndim != 1:
        raise NodeInputError(APPLY_ID, f"model sampling {type(ms).__name__} has no discrete sigma table; FlipNet "
                                       "needs the SD2.1-base DDPM schedule.")
    import comfy.model_sampling as cms

    if not isinstance(ms, cms.EPS) or isinstance(ms, cms.V_PREDICTION):
        logger.warning("%s: the MODEL is not eps-prediction (%s); FlipNet was trained on SD2.1-base (512, eps). "
                       "Results with SD2.1-768-v are not what the checkpoint learned.", APPLY_ID, type(ms).__name__)
    if not 0 <= t_y < table.shape[0]:
        raise NodeInputError(APPLY_ID, f"t_y={t_y} is outside the model's {table.shape[0]} training timesteps.")
    return float(table[t_y])


class BFRApplyFlipNet:
    """MODEL + BFR_FLIPNET + IMAGE -> patched MODEL, prompts with face tokens, and the latent to sample."""

    DESCRIPTION = (
        "FlipNet (SD2.1-base): restores a low-quality face or synthesizes a realistic degraded version of a clean "
        "face; the checkpoint decides which (a restore file restores, a degrade file degrades). Returns a patched copy of the MODEL (FlipNet LoRA + BoostHub: "
        "every UNet call also runs the encoded input image, diffused to t_y, and each self-attention layer of the "
        "generated image reads its features, weighted by phi), the positive/negative prompts with the face "
        "embedding tokens of the image appended (restore checkpoints with a face embedder), and an empty latent of the image's size. Sample "
        "with KSampler: cfg 1.5 (paper), any SD sampler, denoise 1.0; negative prompt e.g. 'low quality, blurry, "
        "jpeg artifacts, noisy'; with a degrade checkpoint leave both prompts empty. Do not combine with ControlNet.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("model", "positive", "negative", "latent")
    OUTPUT_TOOLTIPS = (
        "A patched clone of the input MODEL (the input stays untouched).",
        "The positive prompt with the face tokens tau(z_y) of the image appended (unchanged for a degrade "
        "checkpoint).",
        "The negative prompt with the null face tokens tau(0) appended (unchanged for a degrade checkpoint).",
        "An empty latent of the image's size and batch: sample this one (denoise 1.0).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "SD2.1-base (512, eps-prediction) from the checkpoint loader."}),
                "flipnet": ("BFR_FLIPNET", {"tooltip": "From BFR Load FlipNet."}),
                "vae": ("VAE", {"tooltip": "The SD2.1 VAE, to encode the condition image."}),
                "image": ("IMAGE", {"tooltip": "The condition: with a restore checkpoint the low-quality face(s) "
                                               "to restore, with a degrade checkpoint the clean face(s) to "
                                               "degrade. Aligned face crops, sides multiples of 8 "
                                               "(512x512 as in training)."}),
                "positive": ("CONDITIONING", {"tooltip": "Prompt from CLIPTextEncode with this checkpoint's CLIP "
                                                         "(restore checkpoint: a caption or empty; degrade checkpoint: "
                                                         "empty)."}),
                "negative": ("CONDITIONING", {"tooltip": "Negative prompt (restore checkpoint: 'low quality, blurry, "
                                                         "...'; degrade checkpoint: empty)."}),
                "phi": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05,
                                  "tooltip": "BoostHub enhance weight: how strongly the generated image follows "
                                             "the input image's features. 0 = prompt/face tokens only (identity "
                                             "drifts), 1 = paper default, 2 = the input dominates (smooth)."}),
                "t_y_policy": (T_Y_POLICIES, {"default": "checkpoint",
                                              "tooltip": "Noise level of the condition image at each step: same = "
                                                         "the current step's; fixed = timestep t_y at every step; "
                                                         "checkpoint = the policy and t_y stored in the file."}),
                "t_y": ("INT", {"default": 100, "min": 0, "max": 999,
                                "tooltip": "Condition timestep (of 1000) for t_y_policy=fixed; small = sharp "
                                           "condition. Ignored by 'same' and 'checkpoint'."}),
                "lq_cache": ("BOOLEAN", {"default": True,
                                         "tooltip": "t_y fixed only: compute the condition image's BoostHub keys/"
                                                    "values once per prompt and reuse them at every step (about "
                                                    "half the UNet work; same result). Off = run the joint batch "
                                                    "every step."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFF_FFFF_FFFF_FFFF, "control_after_generate": True,
                                 "tooltip": "Seed of the noise added to the condition image (image i uses "
                                            "seed + i). The sampler's own seed drives the generated image."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, phi=None, t_y_policy=None, t_y=None):
        problem = parameter_problem(phi=phi, t_y_policy=t_y_policy, t_y=t_y)
        return True if problem is None else f"[{APPLY_ID}] {problem}"

    def apply(self, model, flipnet, vae, image, positive, negative, phi=1.0, t_y_policy="checkpoint", t_y=100,
              lq_cache=True, seed=0):
        import comfy.patcher_extension as pe

        node = APPLY_ID
        if not isinstance(flipnet, FlipNetModel):
            raise NodeInputError(node, f"flipnet must come from {LOAD_ID}, got {type(flipnet).__name__}.")
        problem = parameter_problem(phi=phi, t_y_policy=t_y_policy, t_y=t_y)
        if problem is not None:
            raise NodeInputError(node, problem)
        mode = flipnet.mode  # the checkpoint decides: a restore file restores, a degrade file degrades
        if mode not in FLIPNET_MODES:
            raise NodeInputError(node, f"{flipnet.name} has mode {mode!r}, expected one of {FLIPNET_MODES}; "
                                       "re-export it with `bfr train flipnet`.")
        unet_config = check_sd21_model(node, model)
        keys = _block_keys(node, flipnet, model, unet_config)
        image = prepare_image(node, image)
        ckpt = flipnet.checkpoint
        policy = ckpt.defaults.t_y_policy if t_y_policy == "checkpoint" else t_y_policy
        ty = int(ckpt.defaults.t_y if t_y_policy == "checkpoint" else t_y)

        # condition latent (model space) and its noise
        with torch.no_grad():
            raw = vae.encode(image)
        base = model.model
        condition = base.process_latent_in(raw.float()).float().cpu()
        noise = condition_noise(condition.shape, seed)
        sigma_fixed = _sigma_of_timestep(model, ty)  # also checks the schedule for policy 'same'
        sigma_y = sigma_fixed if policy == "fixed" else None

        # patch a clone: LoRA through ComfyUI's loader, BoostHub patches, the joint-batch wrapper
        m = model.clone()
        add_lora_patches(node, m, ckpt.lora, flipnet.name)
        dtype = unet_compute_dtype(model)  # the bank is kept in the UNet's compute dtype: the patch casts nothing
        wrapper = None
        if phi > 0 and not flipnet.boosthub_is_zero:
            first = first_block(keys)
            share = SHARE_CFG_ROWS and first is not None and not _has_attn1_replace(m, first)
            m.set_model_attn1_patch(BoostHubStash(first if share else None))
            if share:  # another node's attn1 replace on that block is kept: its rows are then computed one by one
                m.set_model_attn1_replace(SharedRowsAttention(comfy_attention), *first)
            m.set_model_attn1_output_patch(BoostHubOutput(flipnet.bank(dtype), keys, phi, node=node, source=flipnet.name))
            wrapper = JointBatchWrapper(condition, noise, sigma_y, lq_cache=lq_cache, node=node)
            m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY, wrapper)
            m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, wrapper.outer_sample)
            m.set_additional_models(WRAPPER_KEY, [flipnet.hub_patcher(dtype)])
        else:  # phi * F_ro is exactly 0: the condition stream cannot reach the output, so it is not run at all
            logger.info("%s: BoostHub adds nothing (%s); the condition image is not run and the MODEL is the LoRA-only "
                        "model%s.", node, "phi = 0" if phi <= 0 else f"{flipnet.name} has zero W_o everywhere",
                        " with face tokens" if mode == "restore" and flipnet.has_face_embedder else "")

        # prompts: + face tokens (restore), unchanged (degrade)
        pos, neg = positive, negative
        if mode == "restore":
            if flipnet.has_face_embedder:
                c_id, c_null = self.face_tokens(flipnet, image, dtype)
                pos = _with_tokens(node, positive, c_id, "positive")
                neg = _with_tokens(node, negative, c_null, "negative")
            else:
                logger.warning("%s: %s has no face embedder; prompts are used without face tokens.", node,
                               flipnet.name)
        latent = {"samples": torch.zeros_like(raw, device="cpu")}
        logger.info("%s: %s mode, phi=%.3g, t_y policy %s%s, %d image(s) %dx%d.", node, mode, phi, policy,
                    f" (t_y={ty}, LQ cache {'on' if wrapper is not None and wrapper.lq_cache else 'off'})"
                    if policy == "fixed" else "",
                    image.shape[0], image.shape[2], image.shape[1])
        return m, pos, neg, latent

    @staticmethod
    @torch.no_grad()
    def face_tokens(flipnet: FlipNetModel, image: torch.Tensor, dtype: torch.dtype | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(tau(z_y), tau(0)) for IMAGE (B,H,W,3) through :func:`..lora.face_embedder.face_tokens`, the computation
        :meth:`FlipNetPipeline.face_tokens` uses too, in ``dtype`` (the UNet's compute dtype) on the device ComfyUI
        loads the face modules to (``load_models_gpu``: counted, and offloaded when memory is needed)."""
        import comfy.model_management as mm

        dtype = dtype or flipnet.stored_dtype
        patcher = flipnet.face_patcher(dtype)
        mm.load_models_gpu([patcher])
        face = patcher.model
        pixels = image.movedim(-1, 1)
        size = flipnet.checkpoint.face_image_size
        c_id, c_null = face_tokens(face.encoder, face.adapter, pixels, size)
        if dtype != torch.float32 and not (torch.isfinite(c_id).all() and torch.isfinite(c_null).all()):
            logger.warning("%s: the face tokens overflowed in %s; computing them in float32.", APPLY_ID, dtype)
            face32 = flipnet.face_patcher(torch.float32)
            mm.load_models_gpu([face32])
            c_id, c_null = face_tokens(face32.model.encoder, face32.model.adapter, pixels, size)
        out = intermediate_device()
        return c_id.float().to(out), c_null.float().to(out)


NODE_CLASS_MAPPINGS = {"BFRLoadFlipNet": BFRLoadFlipNet, "BFRApplyFlipNet": BFRApplyFlipNet}
NODE_DISPLAY_NAME_MAPPINGS = {"BFRLoadFlipNet": LOAD_ID, "BFRApplyFlipNet": APPLY_ID}

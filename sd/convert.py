"""Offline conversion between single-file (original LDM / ComfyUI) checkpoints and diffusers models, SD 1.x/2.x.

Why this exists: diffusers' ``from_single_file`` fetches the model config from the Hugging Face hub, and SD 2.x is no
longer on Stability's pages. This module maps state-dict keys in both directions from the block structure alone, and
carries the known SD2.1-base configs as constants, so a ComfyUI ``models/checkpoints/*.safetensors`` loads into
diffusers modules with no network access (and diffusers weights can be written back in the form ComfyUI loads).

Key forms (prefixes as in an SD2.1 single-file checkpoint):

- UNet: ``model.diffusion_model.<ldm path>`` <-> ``UNet2DConditionModel`` keys.
  ldm ``input_blocks.N`` / ``middle_block`` / ``output_blocks.N`` / ``time_embed`` / ``out`` against diffusers
  ``down_blocks`` / ``mid_block`` / ``up_blocks`` / ``time_embedding`` / ``conv_norm_out`` + ``conv_out``. Inside a
  transformer (``proj_in``, ``transformer_blocks.k.attn1.to_q``, ...) the names are the same on both sides; inside a
  ResBlock ``in_layers.0/2, emb_layers.1, out_layers.0/3, skip_connection`` are diffusers'
  ``norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut``.
- VAE (AutoencoderKL): ``first_stage_model.<ldm path>`` (``encoder.down.l.block.i``, ``mid.attn_1.q`` as 1x1
  convs, ``decoder.up.l`` numbered from the lowest resolution up) <-> ``AutoencoderKL`` keys (``down_blocks``,
  ``mid_block.attentions.0.to_q`` as linears, ``decoder.up_blocks.j`` with ``j = levels-1-l``).
- TAESD: ComfyUI's ``comfy.taesd.taesd.TAESD`` keys (``taesd_encoder.N``, ``taesd_decoder.N``, ``vae_scale``,
  ``vae_shift``) <-> diffusers ``AutoencoderTiny`` (``encoder.layers.N``, ``decoder.layers.N-1``: ComfyUI's decoder
  Sequential starts with its tanh clamp as layer 0, diffusers applies the clamp in ``forward``).
- Text encoder: OpenCLIP as stored in SD2 checkpoints (``cond_stage_model.model.transformer.resblocks.i.attn.
  in_proj_weight`` ...) or Hugging Face form under ``cond_stage_model.model.transformer.text_model.*`` <->
  ``transformers.CLIPTextModel`` keys (with or without the ``text_model.`` prefix: transformers 5 dropped it).

Nothing here imports comfy. diffusers/transformers are imported lazily, only by the functions that build modules.
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any, Mapping

import torch

logger = logging.getLogger(__name__)

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_TEXT_PREFIX = "cond_stage_model.model."

# ------------------------------------------------------------------------------------------- known SD2.1 configs
#: diffusers ``UNet2DConditionModel`` config of stabilityai/stable-diffusion-2-1-base (512 px, epsilon).
#: ``attention_head_dim`` is, by a diffusers naming quirk, the number of heads per block (head width 64).
#: The 768-v model (stable-diffusion-2-1) differs only in ``sample_size`` 96 and ``upcast_attention`` True.
SD21_BASE_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True,
    "upcast_attention": False,
}

#: diffusers ``AutoencoderKL`` config of SD 1.x/2.x (the same VAE architecture; scaling factor 0.18215).
SD21_BASE_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

#: ``transformers.CLIPTextConfig`` kwargs of the SD2 text encoder in diffusers form (OpenCLIP ViT-H/14 text tower).
#: 23 layers: SD2 conditions on the penultimate layer of the 24-layer OpenCLIP model, so diffusers drops the last
#: layer and uses the final-layer-normed last hidden state. ComfyUI keeps all 24 and takes layer -2 instead.
SD21_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "pad_token_id": 1,
    "projection_dim": 512,
    "vocab_size": 49408,
}
#: Layers stored in an SD2 single-file checkpoint (full OpenCLIP text tower).
SD2_OPENCLIP_LAYERS = 24

#: DDPM noise schedule of SD2.1-base, for ``DDPMScheduler.from_config`` (and the other diffusers schedulers).
SD21_BASE_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}

SD_LATENT_SCALE = 0.18215


class ConversionError(ValueError):
    """A state dict does not have the structure a conversion expects (names the offending keys)."""


def _listify(value, n: int) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConversionError(f"config list {value!r} must have {n} entries (one per block)")
        return list(value)
    return [value] * n


def _fmt_keys(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# --------------------------------------------------------------------------------------------- generic machinery
# A "module map" is a list of (diffusers_module_path, ldm_module_path, inner) where inner maps the first name
# component under the module (diffusers -> ldm), or is None when the names below the module are identical.

_RESNET_INNER = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET_INNER = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                     "conv_shortcut": "nin_shortcut"}
_VAE_ATTN_INNER = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _convert(sd: Mapping[str, torch.Tensor], module_map, to_ldm: bool, what: str,
             reshape=None) -> dict[str, torch.Tensor]:
    """Rename every key of ``sd`` through ``module_map``; fail on a key no entry covers."""
    entries = []
    for d_path, l_path, inner in module_map:
        src, dst = (d_path, l_path) if to_ldm else (l_path, d_path)
        inner_map = None
        if inner is not None:
            inner_map = dict(inner) if to_ldm else {v: k for k, v in inner.items()}
        entries.append((src + ".", dst + ".", inner_map))
    entries.sort(key=lambda e: len(e[0]), reverse=True)  # longest (most specific) prefix first

    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        for src, dst, inner_map in entries:
            if not key.startswith(src):
                continue
            rest = key[len(src):]
            if inner_map is not None:
                for a in sorted(inner_map, key=len, reverse=True):
                    if rest.startswith(a + "."):
                        rest = inner_map[a] + rest[len(a):]
                        break
                else:
                    continue
            new_key = dst + rest
            if reshape is not None:
                value = reshape(new_key, value)
            if new_key in out:
                raise ConversionError(f"{what}: two keys map to {new_key!r}")
            out[new_key] = value
            break
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(f"{what}: {len(unknown)} keys do not fit the expected structure: {_fmt_keys(unknown)}")
    return out


# ------------------------------------------------------------------------------------------------------- UNet
def _unet_levels(config: Mapping[str, Any]):
    downs = list(config["down_block_types"])
    ups = list(config["up_block_types"])
    n = len(downs)
    if len(ups) != n or len(config["block_out_channels"]) != n:
        raise ConversionError("down_block_types, up_block_types and block_out_channels must have equal length")
    res = _listify(config.get("layers_per_block", 2), n)
    down_attn = [t.startswith("CrossAttn") for t in downs]
    up_attn = [t.startswith("CrossAttn") for t in ups]
    return n, res, down_attn, up_attn


def unet_module_map(unet_config: Mapping[str, Any]) -> list[tuple[str, str, dict | None]]:
    """(diffusers module path, ldm module path, inner renames) for every module of a diffusers UNet config."""
    n, res, down_attn, up_attn = _unet_levels(unet_config)
    m: list[tuple[str, str, dict | None]] = [
        ("conv_in", "input_blocks.0.0", None),
        ("time_embedding.linear_1", "time_embed.0", None),
        ("time_embedding.linear_2", "time_embed.2", None),
        ("conv_norm_out", "out.0", None),
        ("conv_out", "out.2", None),
        ("mid_block.resnets.0", "middle_block.0", _RESNET_INNER),
        ("mid_block.attentions.0", "middle_block.1", None),
        ("mid_block.resnets.1", "middle_block.2", _RESNET_INNER),
    ]
    idx = 1
    for level in range(n):
        for i in range(res[level]):
            m.append((f"down_blocks.{level}.resnets.{i}", f"input_blocks.{idx}.0", _RESNET_INNER))
            if down_attn[level]:
                m.append((f"down_blocks.{level}.attentions.{i}", f"input_blocks.{idx}.1", None))
            idx += 1
        if level != n - 1:
            m.append((f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{idx}.0.op", None))
            idx += 1
    idx = 0
    for j in range(n):
        level = n - 1 - j
        for i in range(res[level] + 1):
            m.append((f"up_blocks.{j}.resnets.{i}", f"output_blocks.{idx}.0", _RESNET_INNER))
            if up_attn[j]:
                m.append((f"up_blocks.{j}.attentions.{i}", f"output_blocks.{idx}.1", None))
            if i == res[level] and j != n - 1:
                pos = 2 if up_attn[j] else 1
                m.append((f"up_blocks.{j}.upsamplers.0.conv", f"output_blocks.{idx}.{pos}.conv", None))
            idx += 1
    return m


def unet_key_map(unet_config: Mapping[str, Any], state_dict_keys=None) -> dict[str, str]:
    """``{diffusers_key: ldm_key}`` (no ``model.diffusion_model.`` prefix) for the given diffusers keys."""
    if state_dict_keys is None:
        raise ValueError("pass the diffusers state-dict keys (e.g. unet.state_dict().keys())")
    sd = {k: k for k in state_dict_keys}
    converted = _convert(sd, unet_module_map(unet_config), True, "UNet diffusers->ldm")
    return {v: k for k, v in converted.items()}


def unet_diffusers_to_ldm_state_dict(unet_state_dict: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any],
                                     prefix: str = LDM_UNET_PREFIX) -> dict[str, torch.Tensor]:
    """diffusers ``UNet2DConditionModel`` state dict -> ldm/ComfyUI keys under ``prefix``."""
    out = _convert(unet_state_dict, unet_module_map(unet_config), True, "UNet diffusers->ldm")
    return {prefix + k: v for k, v in out.items()}


def unet_ldm_to_diffusers_state_dict(sd: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any] | None = None,
                                     prefix: str | None = None) -> dict[str, torch.Tensor]:
    """ldm/ComfyUI UNet keys (under ``prefix``; auto-detected when None) -> diffusers keys.

    Keys outside the prefix are ignored, so a whole single-file checkpoint can be passed.
    """
    if prefix is None:
        prefix = detect_unet_prefix(sd)
    unet_sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not unet_sd:
        raise ConversionError(f"no UNet keys under prefix {prefix!r}")
    if unet_config is None:
        unet_config = infer_unet_config_from_ldm(unet_sd, prefix="")
    return _convert(unet_sd, unet_module_map(unet_config), False, "UNet ldm->diffusers")


def detect_unet_prefix(sd: Mapping[str, Any]) -> str:
    for p in (LDM_UNET_PREFIX, "diffusion_model.", ""):
        if f"{p}input_blocks.0.0.weight" in sd:
            return p
    raise ConversionError("no ldm UNet found: expected a key like 'model.diffusion_model.input_blocks.0.0.weight'")


def infer_unet_config_from_ldm(sd: Mapping[str, torch.Tensor], prefix: str | None = None,
                               head_dim: int | None = None) -> dict[str, Any]:
    """A diffusers UNet config read off an ldm UNet state dict.

    Read from the weights: in/out channels, widths per level, res blocks per level, which levels have transformers
    and their depth, cross-attention width, linear vs conv projections. Not in the weights: the number of heads.
    SD2 (context 1024) uses 64-wide heads, SD1 (context 768) 8 heads per block; ``head_dim`` overrides the former.
    Everything else comes from :data:`SD21_BASE_UNET_CONFIG`.
    """
    if prefix is None:
        prefix = detect_unet_prefix(sd)
    keys = [k[len(prefix):] for k in sd if k.startswith(prefix)]

    def w(name):
        return sd[prefix + name]

    conv_in = w("input_blocks.0.0.weight")
    blocks: dict[int, list[str]] = {}
    for k in keys:
        mt = re.match(r"input_blocks\.(\d+)\.(.*)", k)
        if mt:
            blocks.setdefault(int(mt.group(1)), []).append(mt.group(2))
    levels: list[dict] = [{"res": 0, "ch": None, "depth": 0}]
    for idx in sorted(blocks):
        if idx == 0:
            continue
        names = blocks[idx]
        if "0.op.weight" in names:
            levels.append({"res": 0, "ch": None, "depth": 0})
            continue
        if "0.out_layers.3.weight" not in names:
            raise ConversionError(f"input_blocks.{idx} is neither a ResBlock nor a downsampler")
        lv = levels[-1]
        lv["res"] += 1
        lv["ch"] = int(w(f"input_blocks.{idx}.0.out_layers.3.weight").shape[0])
        depth = len({n.split(".")[2] for n in names if n.startswith("1.transformer_blocks.")})
        lv["depth"] = max(lv["depth"], depth)
    if any(lv["ch"] is None for lv in levels):
        raise ConversionError("a UNet level has no ResBlock")
    ctx = None
    linear = None
    for k in keys:
        if ctx is None and k.endswith("attn2.to_k.weight"):
            ctx = int(sd[prefix + k].shape[1])
        if linear is None and k.endswith("proj_in.weight"):
            linear = sd[prefix + k].ndim == 2
    if ctx is None:
        raise ConversionError("no cross-attention layer found (attn2.to_k): not an SD 1.x/2.x UNet")
    chans = [lv["ch"] for lv in levels]
    if head_dim is None and ctx == 768:
        heads: int | list[int] = 8
    else:
        hd = head_dim or 64
        heads = [max(c // hd, 1) for c in chans]
    res = [lv["res"] for lv in levels]
    depth = [max(lv["depth"], 1) for lv in levels]
    has_attn = [lv["depth"] > 0 for lv in levels]
    cfg = copy.deepcopy(SD21_BASE_UNET_CONFIG)
    cfg.update({
        "in_channels": int(conv_in.shape[1]),
        "out_channels": int(w("out.2.weight").shape[0]),
        "block_out_channels": chans,
        "layers_per_block": res[0] if len(set(res)) == 1 else res,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)],
        "cross_attention_dim": ctx,
        "use_linear_projection": bool(linear),
        "attention_head_dim": heads,
    })
    if any(d != 1 for d in depth):
        cfg["transformer_layers_per_block"] = depth
    if int(conv_in.shape[0]) != chans[0]:
        raise ConversionError("conv_in width differs from the first level width")
    return cfg


def ldm_to_diffusers_unet(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None,
                          prefix: str | None = None, dtype: torch.dtype | None = None):
    """Build a diffusers ``UNet2DConditionModel`` from an ldm/ComfyUI (single-file) state dict, offline."""
    from diffusers import UNet2DConditionModel

    if prefix is None:
        prefix = detect_unet_prefix(sd)
    if config is None:
        config = infer_unet_config_from_ldm(sd, prefix=prefix)
    dsd = unet_ldm_to_diffusers_state_dict(sd, config, prefix=prefix)
    return _build_and_load(lambda: UNet2DConditionModel.from_config(dict(config)), dsd, dtype, "UNet")


def unet_config_is_sd2(unet_config: Mapping[str, Any]) -> bool:
    return unet_config.get("cross_attention_dim") == 1024 and unet_config.get("block_out_channels", [0])[0] == 320


# --------------------------------------------------------------------------------------------------- VAE (KL)
def vae_module_map(vae_config: Mapping[str, Any]) -> list[tuple[str, str, dict | None]]:
    """(diffusers module path, ldm module path, inner renames) for an ``AutoencoderKL`` config."""
    n = len(vae_config["block_out_channels"])
    res = int(vae_config.get("layers_per_block", 2))
    m: list[tuple[str, str, dict | None]] = [
        ("quant_conv", "quant_conv", None),
        ("post_quant_conv", "post_quant_conv", None),
    ]
    for part in ("encoder", "decoder"):
        m += [
            (f"{part}.conv_in", f"{part}.conv_in", None),
            (f"{part}.conv_norm_out", f"{part}.norm_out", None),
            (f"{part}.conv_out", f"{part}.conv_out", None),
            (f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET_INNER),
            (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET_INNER),
            (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTN_INNER),
        ]
    for level in range(n):
        for i in range(res):
            m.append((f"encoder.down_blocks.{level}.resnets.{i}", f"encoder.down.{level}.block.{i}",
                      _VAE_RESNET_INNER))
        if level != n - 1:
            m.append((f"encoder.down_blocks.{level}.downsamplers.0.conv", f"encoder.down.{level}.downsample.conv",
                      None))
    for j in range(n):
        level = n - 1 - j
        for i in range(res + 1):
            m.append((f"decoder.up_blocks.{j}.resnets.{i}", f"decoder.up.{level}.block.{i}", _VAE_RESNET_INNER))
        if j != n - 1:
            m.append((f"decoder.up_blocks.{j}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv", None))
    return m


_VAE_ATTN_LINEAR = re.compile(r"(encoder|decoder)\.mid(_block)?\.(attn_1|attentions\.0)\."
                              r"(q|k|v|proj_out|to_q|to_k|to_v|to_out\.0)\.weight$")
# diffusers < 0.14 named the VAE attention projections query/key/value/proj_attn.
_VAE_LEGACY_ATTN = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.", "proj_attn.": "to_out.0."}


def _vae_reshape_to_ldm(key: str, value: torch.Tensor) -> torch.Tensor:
    if _VAE_ATTN_LINEAR.search(key) and value.ndim == 2:
        return value[:, :, None, None]
    return value


def _vae_reshape_to_diffusers(key: str, value: torch.Tensor) -> torch.Tensor:
    if _VAE_ATTN_LINEAR.search(key) and value.ndim == 4:
        return value[:, :, 0, 0]
    return value


def vae_diffusers_to_ldm_state_dict(vae_state_dict: Mapping[str, torch.Tensor], vae_config: Mapping[str, Any],
                                    prefix: str = LDM_VAE_PREFIX) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` state dict -> ldm keys under ``prefix`` (attention linears become 1x1 convs)."""
    fixed = {}
    for k, v in vae_state_dict.items():
        for old, new in _VAE_LEGACY_ATTN.items():
            if ".mid_block.attentions.0." + old in k:
                k = k.replace(".mid_block.attentions.0." + old, ".mid_block.attentions.0." + new)
        fixed[k] = v
    out = _convert(fixed, vae_module_map(vae_config), True, "VAE diffusers->ldm", reshape=_vae_reshape_to_ldm)
    return {prefix + k: v for k, v in out.items()}


def vae_ldm_to_diffusers_state_dict(sd: Mapping[str, torch.Tensor], vae_config: Mapping[str, Any] | None = None,
                                    prefix: str = LDM_VAE_PREFIX) -> dict[str, torch.Tensor]:
    """ldm VAE keys under ``prefix`` -> diffusers ``AutoencoderKL`` keys. Other keys are ignored."""
    vsd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not vsd:
        raise ConversionError(f"no VAE keys under prefix {prefix!r}")
    if vae_config is None:
        vae_config = infer_vae_config_from_ldm(vsd, prefix="")
    return _convert(vsd, vae_module_map(vae_config), False, "VAE ldm->diffusers", reshape=_vae_reshape_to_diffusers)


def infer_vae_config_from_ldm(sd: Mapping[str, torch.Tensor], prefix: str = LDM_VAE_PREFIX) -> dict[str, Any]:
    """An ``AutoencoderKL`` config read off ldm VAE keys (levels, widths, blocks per level, channels)."""
    if f"{prefix}encoder.conv_in.weight" not in sd:
        raise ConversionError(f"no KL VAE under prefix {prefix!r} (missing encoder.conv_in.weight)")
    levels = sorted({int(m.group(1)) for k in sd for m in [re.match(re.escape(prefix) + r"encoder\.down\.(\d+)\.", k)]
                     if m})
    res = len({m.group(1) for k in sd for m in [re.match(re.escape(prefix) + r"encoder\.down\.0\.block\.(\d+)\.", k)]
               if m})
    chans = [int(sd[f"{prefix}encoder.down.{lv}.block.{res - 1}.conv2.weight"].shape[0]) for lv in levels]
    cfg = copy.deepcopy(SD21_BASE_VAE_CONFIG)
    cfg.update({
        "block_out_channels": chans,
        "down_block_types": ["DownEncoderBlock2D"] * len(chans),
        "up_block_types": ["UpDecoderBlock2D"] * len(chans),
        "layers_per_block": res,
        "in_channels": int(sd[f"{prefix}encoder.conv_in.weight"].shape[1]),
        "out_channels": int(sd[f"{prefix}decoder.conv_out.weight"].shape[0]),
        "latent_channels": int(sd[f"{prefix}decoder.conv_in.weight"].shape[1]),
    })
    return cfg


def ldm_to_diffusers_vae(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None,
                         prefix: str = LDM_VAE_PREFIX, dtype: torch.dtype | None = None):
    """Build the checkpoint's VAE as a diffusers module: ``AutoencoderKL``, or ``AutoencoderTiny`` for TAESD keys."""
    if any(k.startswith(prefix + "taesd_decoder.") for k in sd):
        return comfy_taesd_to_diffusers_vae(sd, prefix=prefix, dtype=dtype)
    from diffusers import AutoencoderKL

    if config is None:
        config = infer_vae_config_from_ldm(sd, prefix=prefix)
    dsd = vae_ldm_to_diffusers_state_dict(sd, config, prefix=prefix)
    return _build_and_load(lambda: AutoencoderKL.from_config(dict(config)), dsd, dtype, "VAE")


# ------------------------------------------------------------------------------------------------------ TAESD
#: ``AutoencoderTiny`` config with the TAESD topology that ComfyUI's ``comfy.taesd.taesd.TAESD`` hard-codes.
TAESD_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "encoder_block_out_channels": [64, 64, 64, 64],
    "decoder_block_out_channels": [64, 64, 64, 64],
    "act_fn": "relu",
    "upsample_fn": "nearest",
    "latent_channels": 4,
    "upsampling_scaling_factor": 2,
    "num_encoder_blocks": [1, 3, 3, 3],
    "num_decoder_blocks": [3, 3, 3, 1],
    "latent_magnitude": 3,
    "latent_shift": 0.5,
    "force_upcast": False,
    "scaling_factor": 1.0,
    "shift_factor": 0.0,
}


def taesd_diffusers_to_comfy(sd: Mapping[str, torch.Tensor], vae_scale: float = 1.0, vae_shift: float = 0.0,
                             prefix: str = "") -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderTiny`` state dict -> ComfyUI TAESD keys (+ ``vae_scale``/``vae_shift`` scalars).

    ComfyUI encodes ``taesd_encoder(img01) / vae_scale + vae_shift`` and decodes
    ``taesd_decoder((z - vae_shift) * vae_scale)``; both default to 1 / 0 when absent from a checkpoint.
    """
    out: dict[str, torch.Tensor] = {}
    bad = []
    for k, v in sd.items():
        m = re.match(r"(encoder|decoder)\.layers\.(\d+)\.(.*)", k)
        if not m:
            bad.append(k)
            continue
        part, idx, rest = m.group(1), int(m.group(2)), m.group(3)
        if part == "encoder":
            out[f"{prefix}taesd_encoder.{idx}.{rest}"] = v
        else:
            out[f"{prefix}taesd_decoder.{idx + 1}.{rest}"] = v
    if bad:
        raise ConversionError(f"TAESD diffusers->comfy: unexpected keys {_fmt_keys(bad)}")
    out[f"{prefix}vae_scale"] = torch.tensor(float(vae_scale))
    out[f"{prefix}vae_shift"] = torch.tensor(float(vae_shift))
    return out


def taesd_comfy_to_diffusers(sd: Mapping[str, torch.Tensor], prefix: str = "") -> tuple[dict, float, float]:
    """ComfyUI TAESD keys under ``prefix`` -> (``AutoencoderTiny`` state dict, vae_scale, vae_shift)."""
    out: dict[str, torch.Tensor] = {}
    scale, shift = 1.0, 0.0
    for k, v in sd.items():
        if not k.startswith(prefix):
            continue
        k = k[len(prefix):]
        m = re.match(r"taesd_(encoder|decoder)\.(\d+)\.(.*)", k)
        if m:
            idx = int(m.group(2))
            if m.group(1) == "encoder":
                out[f"encoder.layers.{idx}.{m.group(3)}"] = v
            else:
                if idx == 0:
                    raise ConversionError("TAESD decoder layer 0 is the parameter-free clamp; it has no weights")
                out[f"decoder.layers.{idx - 1}.{m.group(3)}"] = v
        elif k == "vae_scale":
            scale = float(v)
        elif k == "vae_shift":
            shift = float(v)
    if not out:
        raise ConversionError(f"no TAESD keys under prefix {prefix!r}")
    return out, scale, shift


def comfy_taesd_to_diffusers_vae(sd: Mapping[str, torch.Tensor], prefix: str = LDM_VAE_PREFIX,
                                 dtype: torch.dtype | None = None):
    """An ``AutoencoderTiny`` that encodes/decodes exactly like ComfyUI's TAESD built from the same keys.

    ComfyUI's LATENT is ``enc / vae_scale + vae_shift``; a diffusers pipeline computes the model-space latent as
    ``vae.encode(x).latents * scaling_factor`` while ComfyUI's sampler multiplies its LATENT by 0.18215
    (``latent_formats.SD15``). Equal model-space latents need ``scaling_factor = 0.18215 / vae_scale`` and
    ``shift_factor = 0``; a non-zero ``vae_shift`` is not representable and raises.
    """
    from diffusers import AutoencoderTiny

    dsd, scale, shift = taesd_comfy_to_diffusers(sd, prefix=prefix)
    if shift != 0.0:
        raise ConversionError(f"TAESD vae_shift={shift} has no AutoencoderTiny equivalent (needs 0)")
    cfg = dict(TAESD_CONFIG, scaling_factor=SD_LATENT_SCALE / scale)
    return _build_and_load(lambda: AutoencoderTiny.from_config(cfg), dsd, dtype, "TAESD")


# ---------------------------------------------------------------------------------------------- text encoder
_OPENCLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                   "attn.out_proj": "self_attn.out_proj"}


def openclip_to_hf_text_state_dict(sd: Mapping[str, torch.Tensor], prefix: str = LDM_TEXT_PREFIX,
                                   num_layers: int | None = SD21_TEXT_ENCODER_CONFIG["num_hidden_layers"],
                                   text_model_prefix: str = "") -> dict[str, torch.Tensor]:
    """SD2 text encoder in a single-file checkpoint -> ``CLIPTextModel`` keys.

    Accepts OpenCLIP form (``<prefix>transformer.resblocks.i.attn.in_proj_weight``, ...) and Hugging Face form
    (``<prefix>transformer.text_model.*``, as ComfyUI saves). ``num_layers`` keeps only the first layers
    (23 = diffusers' SD2 text encoder); ``None`` keeps all. ``text_model_prefix`` is prepended to every key
    (``"text_model."`` for transformers 4.x; ``""`` for transformers 5, see :func:`load_hf_text_encoder`).
    ``text_projection`` and ``logit_scale`` are dropped (``CLIPTextModel`` has no projection).
    """
    out: dict[str, torch.Tensor] = {}
    hf_prefix = prefix + "transformer.text_model."
    for k, v in sd.items():
        if not k.startswith(prefix):
            continue
        if k.startswith(hf_prefix):
            name = k[len(hf_prefix):]
            m = re.match(r"encoder\.layers\.(\d+)\.", name)
            if m and num_layers is not None and int(m.group(1)) >= num_layers:
                continue
            if name.endswith("position_ids"):
                continue
            out[text_model_prefix + name] = v
            continue
        name = k[len(prefix):]
        if name == "positional_embedding":
            out[text_model_prefix + "embeddings.position_embedding.weight"] = v
        elif name == "token_embedding.weight":
            out[text_model_prefix + "embeddings.token_embedding.weight"] = v
        elif name.startswith("ln_final."):
            out[text_model_prefix + "final_layer_norm." + name[len("ln_final."):]] = v
        elif name.startswith("transformer.resblocks."):
            m = re.match(r"transformer\.resblocks\.(\d+)\.(.*)", name)
            layer, rest = int(m.group(1)), m.group(2)
            if num_layers is not None and layer >= num_layers:
                continue
            base = f"{text_model_prefix}encoder.layers.{layer}."
            if rest.startswith("attn.in_proj_"):
                kind = rest[len("attn.in_proj_"):]
                q, kk, vv = v.chunk(3, dim=0)
                for proj, t in (("q_proj", q), ("k_proj", kk), ("v_proj", vv)):
                    out[f"{base}self_attn.{proj}.{kind}"] = t.contiguous()
            else:
                for a, b in _OPENCLIP_LAYER.items():
                    if rest.startswith(a + "."):
                        out[base + b + rest[len(a):]] = v
                        break
                else:
                    raise ConversionError(f"text encoder: unexpected key {k!r}")
        elif name in ("text_projection", "logit_scale", "attn_mask") or name.startswith("transformer.text_projection"):
            continue
        else:
            raise ConversionError(f"text encoder: unexpected key {k!r}")
    if not out:
        raise ConversionError(f"no text encoder keys under prefix {prefix!r}")
    return out


def hf_text_to_openclip_state_dict(sd: Mapping[str, torch.Tensor], prefix: str = LDM_TEXT_PREFIX
                                   ) -> dict[str, torch.Tensor]:
    """``CLIPTextModel`` keys (with or without ``text_model.``) -> OpenCLIP keys under ``prefix`` (SD2 ldm form)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        name = k[len("text_model."):] if k.startswith("text_model.") else k
        if name.endswith("position_ids"):
            continue
        if name == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = v
        elif name == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = v
        elif name.startswith("final_layer_norm."):
            out[prefix + "ln_final." + name[len("final_layer_norm."):]] = v
        elif name.startswith("encoder.layers."):
            m = re.match(r"encoder\.layers\.(\d+)\.(.*)", name)
            layer, rest = int(m.group(1)), m.group(2)
            base = f"{prefix}transformer.resblocks.{layer}."
            mq = re.match(r"self_attn\.(q|k|v)_proj\.(weight|bias)$", rest)
            if mq:
                qkv.setdefault((layer, mq.group(2)), {})[mq.group(1)] = v
                continue
            for a, b in _OPENCLIP_LAYER.items():
                if rest.startswith(b + "."):
                    out[base + a + rest[len(b):]] = v
                    break
            else:
                raise ConversionError(f"text encoder: unexpected key {k!r}")
        else:
            raise ConversionError(f"text encoder: unexpected key {k!r}")
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ConversionError(f"text encoder layer {layer}: incomplete q/k/v {kind}")
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def load_hf_text_encoder(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None,
                         dtype: torch.dtype | None = None):
    """Build a ``transformers.CLIPTextModel`` from CLIP text keys with or without ``text_model.`` (any version)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = dict(SD21_TEXT_ENCODER_CONFIG if config is None else config)
    cfg.pop("architectures", None)
    cfg.pop("model_type", None)
    n_layers = len({int(m.group(1)) for k in sd for m in [re.search(r"encoder\.layers\.(\d+)\.", k)] if m})
    if n_layers and config is None:
        cfg["num_hidden_layers"] = n_layers

    def factory():
        return CLIPTextModel(CLIPTextConfig(**cfg))

    probe_keys = _model_keys(factory)
    want_prefix = any(k.startswith("text_model.") for k in probe_keys)
    fixed = {}
    for k, v in sd.items():
        bare = k[len("text_model."):] if k.startswith("text_model.") else k
        fixed[("text_model." + bare) if want_prefix else bare] = v
    return _build_and_load(factory, fixed, dtype, "text encoder")


# ------------------------------------------------------------------------------------------ whole checkpoints
def split_single_file(sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Split a single-file checkpoint into ``unet`` / ``vae`` / ``text_encoder`` / ``other`` key groups."""
    groups: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "vae": {}, "text_encoder": {}, "other": {}}
    for k, v in sd.items():
        if k.startswith(LDM_UNET_PREFIX):
            groups["unet"][k] = v
        elif k.startswith(LDM_VAE_PREFIX):
            groups["vae"][k] = v
        elif k.startswith(LDM_TEXT_PREFIX):
            groups["text_encoder"][k] = v
        else:
            groups["other"][k] = v
    return groups


def load_single_file_components(path, dtype: torch.dtype | None = None, text_encoder: bool = True,
                                vae: bool = True, unet_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Load an SD 2.x single-file ``.safetensors`` (ComfyUI ``models/checkpoints``) into diffusers modules, offline.

    Returns ``{"unet", "vae", "text_encoder", "scheduler", "unet_config"}`` (``vae``/``text_encoder`` None when the
    file has none or they were not requested). No tokenizer: the CLIP BPE vocabulary is not inside checkpoints.
    """
    from safetensors.torch import load_file

    sd = load_file(str(path))
    groups = split_single_file(sd)
    if not groups["unet"]:
        raise ConversionError(f"{path}: no UNet weights under {LDM_UNET_PREFIX!r}; is this a single-file SD "
                              "checkpoint? (diffusers folders: use diffusers' from_pretrained)")
    cfg = dict(unet_config) if unet_config is not None else infer_unet_config_from_ldm(groups["unet"])
    out: dict[str, Any] = {"unet_config": cfg, "unet": ldm_to_diffusers_unet(groups["unet"], cfg, dtype=dtype)}
    out["vae"] = ldm_to_diffusers_vae(groups["vae"], dtype=dtype) if vae and groups["vae"] else None
    te = None
    if text_encoder and groups["text_encoder"]:
        te = load_hf_text_encoder(openclip_to_hf_text_state_dict(groups["text_encoder"]), dtype=dtype)
    out["text_encoder"] = te
    from diffusers import DDPMScheduler

    out["scheduler"] = DDPMScheduler.from_config(dict(SD21_BASE_SCHEDULER_CONFIG))
    return out


# ---------------------------------------------------------------------------------------------------- helpers
def _model_keys(factory) -> list[str]:
    with torch.device("meta"):
        model = factory()
    return list(model.state_dict().keys())


def _build_and_load(factory, state_dict: Mapping[str, torch.Tensor], dtype, what: str):
    """Instantiate on the meta device, load ``state_dict`` strictly with assign, materialise leftovers on CPU."""
    with torch.device("meta"):
        model = factory()
    expected = set(model.state_dict().keys())
    got = set(state_dict.keys())
    missing, unexpected = expected - got, got - expected
    if missing or unexpected:
        raise ConversionError(f"{what}: state dict does not match the model: missing [{_fmt_keys(missing)}], "
                              f"unexpected [{_fmt_keys(unexpected)}]")
    model.load_state_dict(dict(state_dict), strict=True, assign=True)
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:  # non-persistent buffers (e.g. CLIP position_ids): rebuild them for real
        real = factory()
        real.load_state_dict(dict(state_dict), strict=True)
        model = real
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()

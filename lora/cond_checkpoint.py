"""One self-describing ``.safetensors`` per conditional SD2.1 restorer: DR-BFR (``drbfr/1``) and CLR-Face's
conditional denoiser (``clrface/1``), both SD2.1-base + LoRA + the widened ``conv_in`` of :mod:`.ldrm`.

Tensors:

* ``lora_unet_*`` -- the LoRA on every attention projection in kohya keys (core ``LoraLoaderModelOnly`` loads them);
* ``conv_in_extra.weight`` -- W_extra of :class:`.ldrm.ConcatConvIn`, (320, k, 3, 3): the LQ-latent input channels;
* ``drbfr/1`` also: ``dr_encoder.*`` (E_DR, :class:`.dr_module.DegradationEncoder`) and ``dr_prompt.*``
  (MLP(t) + projection, :class:`.ldrm.DRPrompt`).

Metadata: ``bfr_format``, ``base_model``, ``lora_rank``, ``lora_alpha``, ``extra_channels``, ``unet`` (topology),
``dr_config`` / ``dr_prompt_config`` (``drbfr/1``), ``defaults`` (JSON: inference defaults), ``train_config`` (+ hash),
``dtype``. :func:`read_conditional_checkpoint` checks every tensor before anything is built (the LoRA against the
layer it targets, W_extra against conv_in, each module against a meta-device build of its stored config) and
raises a :class:`.checkpoint.CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import (
    BASE_MODEL,
    CLRFACE_FORMAT,
    DRBFR_FORMAT,
    FACE_AE_FORMAT,
    FLIPNET_FORMAT,
    FLIPNET_LORA_FORMAT,
    CheckpointError,
    _check_lora_shapes,
    _check_module_tensors,
    _config_meta,
    _int_meta,
    _json_meta,
    _read,
    _unet_topology,
    _write,
    check_sd21_unet,
    unet_signature,
)
from .dr_module import DegradationEncoder, DRConfig
from .ldrm import EXTRA_WEIGHT, DRPrompt, DRPromptConfig, install_concat_conv_in
from .lora_targets import ADAPTER_NAME, KOHYA_PREFIX, add_flipnet_lora, kohya_rank_alpha, load_lora_kohya
from .lora_targets import lora_state_dict_kohya

logger = logging.getLogger(__name__)

FORMATS = (DRBFR_FORMAT, CLRFACE_FORMAT)
TITLES = {DRBFR_FORMAT: "DR-BFR", CLRFACE_FORMAT: "CLR-Face"}
TRAIN_COMMANDS = {DRBFR_FORMAT: "bfr train drbfr", CLRFACE_FORMAT: "bfr train clr-face"}
# namespace -> (config metadata key, config class, module class)
MODULES = {"dr_encoder": ("dr_config", DRConfig, DegradationEncoder),
           "dr_prompt": ("dr_prompt_config", DRPromptConfig, DRPrompt)}
FORMAT_MODULES = {DRBFR_FORMAT: ("dr_encoder", "dr_prompt"), CLRFACE_FORMAT: ()}
_OTHER_FORMATS = {FLIPNET_FORMAT: "a FlipNet checkpoint: load it with BFR Load FlipNet (`--method flipnet`)",
                  FLIPNET_LORA_FORMAT: "a FlipNet LoRA export: load it with LoraLoaderModelOnly",
                  FACE_AE_FORMAT: "a FlipNet face-autoencoder file (`bfr train flipnet --face-ae`)",
                  "drbfr-dr/1": "a DR-encoder file from `bfr train dr-encoder`: pass it to `bfr train drbfr "
                                "--dr-encoder`, or use BFR Load DR Encoder"}


@dataclass
class ConditionalCheckpoint:
    """A validated ``drbfr/1`` / ``clrface/1`` file, split by namespace (tensors on the CPU, as stored)."""

    path: str
    fmt: str
    rank: int
    alpha: float
    lora: dict[str, torch.Tensor]
    conv_in_extra: torch.Tensor
    modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    configs: dict[str, object] = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)
    unet: dict = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return TITLES[self.fmt]

    @property
    def extra_channels(self) -> int:
        return int(self.conv_in_extra.shape[1])

    @property
    def conv_in_is_zero(self) -> bool:
        return not bool(self.conv_in_extra.any())

    def build(self, namespace: str) -> nn.Module:
        """The module stored under ``namespace`` (strict load, eval mode, no grad), in the file's dtype."""
        if namespace not in self.modules:
            raise CheckpointError(self.path, f"holds no '{namespace}.*' weights ({self.title} file).")
        _, _, cls = MODULES[namespace]
        sd = self.modules[namespace]
        module = cls(self.configs[namespace])
        try:
            module.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(self.path, f"'{namespace}.*' does not fit its stored config: {exc}") from exc
        dtype = next(iter(sd.values())).dtype
        return module.to(dtype).requires_grad_(False).eval()


def save_conditional_checkpoint(path: str | Path, unet: nn.Module, *, fmt: str,
                                modules: dict[str, nn.Module] | None = None, defaults: dict | None = None,
                                train_config: dict | None = None, base_model: str = BASE_MODEL,
                                dtype: torch.dtype | None = None) -> Path:
    """Write the LoRA (kohya keys) + W_extra of a UNet with :class:`.ldrm.ConcatConvIn` (+ the format's modules)."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}.")
    modules = dict(modules or {})
    want = set(FORMAT_MODULES[fmt])
    if set(modules) != want:
        raise ValueError(f"a {fmt} file holds the modules {sorted(want)}, got {sorted(modules)}.")
    conv = getattr(unet, "conv_in", None)
    if not hasattr(conv, "extra"):
        raise ValueError("The UNet's conv_in is not widened (lora.ldrm.install_concat_conv_in) -- nothing to save.")
    cfg = unet.peft_config[ADAPTER_NAME]
    tensors = dict(lora_state_dict_kohya(unet))
    tensors[EXTRA_WEIGHT] = conv.extra
    sig = unet_signature(unet)
    meta = {"bfr_format": fmt, "base_model": base_model, "lora_rank": str(cfg.r),
            "lora_alpha": repr(float(cfg.lora_alpha)), "extra_channels": str(conv.extra_channels),
            "unet": json.dumps(sig), "defaults": json.dumps(defaults or {}, sort_keys=True)}
    for name, module in modules.items():
        key, cls, _ = MODULES[name]
        tensors.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        meta[key] = json.dumps(module.cfg.to_dict())
    path = _write(path, tensors, meta, train_config, dtype)
    logger.info("Saved %s checkpoint %s (%d tensors, %.1f MB).", TITLES[fmt], path, len(tensors),
                path.stat().st_size / 1e6)
    return path


def read_conditional_checkpoint(path: str | Path, fmt: str | None = None,
                                expected_base_model: str = BASE_MODEL) -> ConditionalCheckpoint:
    """Read and validate a ``drbfr/1`` / ``clrface/1`` file (``fmt``: require that one) before anything is built."""
    tensors, meta = _read(path)
    found = meta.get("bfr_format")
    wanted = (fmt,) if fmt else FORMATS
    if found not in wanted:
        names = " or ".join(repr(w) for w in wanted)
        what = _OTHER_FORMATS.get(found) or (f"a {TITLES[found]} checkpoint" if found in TITLES else None)
        hint = f" It is {what}." if what else " It was not written by `bfr train drbfr` / `bfr train clr-face`."
        raise CheckpointError(path, f"bfr_format is {found!r}, expected {names}.{hint}")
    fix = f"Re-export it with `{TRAIN_COMMANDS[found]}`."
    base = meta.get("base_model")
    if base != expected_base_model:
        raise CheckpointError(path, f"was trained for base model {base!r}, but {expected_base_model!r} is in use.")
    lora, groups, unknown = {}, {name: {} for name in FORMAT_MODULES[found]}, []
    extra = tensors.get(EXTRA_WEIGHT)
    for key, value in tensors.items():
        if key.startswith(KOHYA_PREFIX):
            lora[key] = value
        elif key != EXTRA_WEIGHT:
            prefix, _, rest = key.partition(".")
            if prefix in groups and rest:
                groups[prefix][rest] = value
            else:
                unknown.append(key)
    if unknown:
        raise CheckpointError(path, f"{len(unknown)} tensors outside the {found} namespaces (e.g. {unknown[:3]}).")
    if not lora:
        raise CheckpointError(path, f"holds no LoRA ('{KOHYA_PREFIX}*') weights. {fix}")
    topo = _unet_topology(path, meta)
    _check_lora_shapes(path, lora, topo)
    try:
        rank, alpha = kohya_rank_alpha(lora, Path(path).name)
    except ValueError as exc:
        raise CheckpointError(path, str(exc)) from exc
    if _int_meta(path, meta, "lora_rank", rank, "(the LoRA rank)", lo=1, example="64") != rank:
        raise CheckpointError(path, f"metadata lora_rank {meta.get('lora_rank')} but the weights have rank {rank}.")
    k = _int_meta(path, meta, "extra_channels", 4, "(LQ-latent input channels)", lo=1, example="4")
    width = topo["block_out_channels"][0]
    if extra is None or tuple(extra.shape) != (width, k, 3, 3) or not extra.is_floating_point():
        have = "missing" if extra is None else f"{tuple(extra.shape)} {extra.dtype}"
        raise CheckpointError(path, f"{EXTRA_WEIGHT} is {have}; a {found} file for this UNet needs ({width}, {k}, 3, 3) "
                                    f"floats (conv_in's weights for the {k} LQ-latent channels). {fix}")
    configs = {}
    for name, sd in groups.items():
        key, cls, module_cls = MODULES[name]
        configs[name] = cfg = _config_meta(path, meta, key, cls)
        if not sd:
            raise CheckpointError(path, f"holds no '{name}.*' weights; a {found} file needs them. {fix}")
        with torch.device("meta"):
            module = module_cls(cfg)
        _check_module_tensors(path, name, module, sd, f"{key} {cfg.to_dict()}", fix)
    if found == DRBFR_FORMAT:
        dr, prompt = configs["dr_encoder"], configs["dr_prompt"]
        if (dr.num_tokens, dr.token_dim) != (prompt.num_tokens, prompt.token_dim):
            raise CheckpointError(path, f"E_DR gives {dr.num_tokens} tokens of width {dr.token_dim} but the prompt "
                                        f"takes {prompt.num_tokens} x {prompt.token_dim}. {fix}")
        if prompt.context_dim != topo["cross_attention_dim"]:
            raise CheckpointError(path, f"the DR prompt gives {prompt.context_dim}-wide tokens, SD2.1's context is "
                                        f"{topo['cross_attention_dim']} wide. {fix}")
    defaults = _json_meta(path, meta, "defaults", {})
    if not isinstance(defaults, dict):
        raise CheckpointError(path, f"metadata 'defaults' must be a JSON object, got {meta['defaults'][:80]!r}.")
    return ConditionalCheckpoint(path=str(path), fmt=found, rank=rank, alpha=alpha, lora=lora, conv_in_extra=extra,
                                 modules=groups, configs=configs, defaults=defaults,
                                 unet=_json_meta(path, meta, "unet", {}), metadata=meta)


def apply_conditional_checkpoint(unet: nn.Module, ckpt: ConditionalCheckpoint) -> None:
    """Add the LoRA (the file's rank / alpha) and the widened conv_in (W_extra loaded) to a diffusers SD2.1 UNet."""
    check_sd21_unet(unet, ckpt.title)
    sig = unet_signature(unet)
    diffs = {k: (ckpt.unet.get(k), sig.get(k)) for k in sig if k in ckpt.unet and ckpt.unet[k] != sig[k]}
    if diffs:
        raise CheckpointError(ckpt.path, f"was trained on another UNet topology: (file, this UNet) = {diffs}.")
    if getattr(unet, "peft_config", None) and ADAPTER_NAME in unet.peft_config:
        raise CheckpointError(ckpt.path, "the UNet already carries a LoRA adapter of this pack; start from a clean "
                                         "SD2.1-base UNet.")
    add_flipnet_lora(unet, rank=ckpt.rank, alpha=ckpt.alpha)
    try:
        load_lora_kohya(unet, ckpt.lora, Path(ckpt.path).name)
    except ValueError as exc:
        raise CheckpointError(ckpt.path, str(exc)) from exc
    install_concat_conv_in(unet, ckpt.extra_channels, ckpt.conv_in_extra.float())

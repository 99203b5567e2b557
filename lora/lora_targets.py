"""LoRA on every self- and cross-attention projection of the SD2.1 UNet (FlipNet §3, §5.1: rank 64), with peft,
and the conversion between peft's state dict and kohya ``lora_unet_*`` keys that core ComfyUI loads
(comfyui-notes §4.2).

W = W_0 + (alpha / r) B A with B zero-initialised, so an untrained LoRA leaves the base model unchanged.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

ADAPTER_NAME = "flipnet"
TARGET_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
# Full-match regex on module names: attn1/attn2 projections only, never BoostHub's own layers (``attn1.processor.*``).
TARGET_REGEX = r".*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
KOHYA_PREFIX = "lora_unet_"


def lora_target_names(unet: nn.Module) -> list[str]:
    """Module paths LoRA attaches to: ``<...>.attn1|attn2.to_q|to_k|to_v|to_out.0`` (128 for SD2.1)."""
    names = []
    for name, module in unet.named_modules():
        if re.fullmatch(TARGET_REGEX, name):
            names.append(name)
    if not names:
        raise ValueError(f"{type(unet).__name__} has no attention projections matching {TARGET_REGEX!r}; expected a "
                         "diffusers UNet2DConditionModel.")
    return names


def make_lora_config(rank: int = 64, alpha: float | None = None, dropout: float = 0.0):
    """peft ``LoraConfig`` for FlipNet: rank ``r`` (paper: 64), alpha defaults to the rank (scale 1), B = 0."""
    from peft import LoraConfig

    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer (paper: 64), got {rank!r}.")
    alpha = float(rank if alpha is None else alpha)
    if alpha <= 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha}.")
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=TARGET_REGEX,
    )


def add_flipnet_lora(unet: nn.Module, rank: int = 64, alpha: float | None = None, dropout: float = 0.0) -> None:
    """Inject a rank-``rank`` LoRA (adapter ``"flipnet"``) on all attention projections of a diffusers UNet."""
    cfg = make_lora_config(rank, alpha, dropout)
    if getattr(unet, "peft_config", None) and ADAPTER_NAME in unet.peft_config:
        raise ValueError(f"The UNet already has a LoRA adapter named {ADAPTER_NAME!r}; build a fresh UNet.")
    unet.add_adapter(cfg, adapter_name=ADAPTER_NAME)
    n = len(lora_target_names(unet))
    logger.info("Added LoRA rank %d alpha %g to %d attention projections.", rank, cfg.lora_alpha, n)


def lora_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA A/B parameters of the FlipNet adapter."""
    return [p for n, p in unet.named_parameters() if "lora_" in n and f".{ADAPTER_NAME}." in f"{n}."]


def kohya_name(module_path: str) -> str:
    """``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0`` -> ``lora_unet_down_blocks_0_..._to_out_0``."""
    return KOHYA_PREFIX + module_path.replace(".", "_")


def lora_state_dict_kohya(unet: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA weights in kohya form: ``<name>.lora_down.weight`` (A), ``.lora_up.weight`` (B), ``.alpha`` (0-d).

    ComfyUI scales by ``alpha / rank``, the same as peft's ``lora_alpha / r``.
    """
    cfg = getattr(unet, "peft_config", {}).get(ADAPTER_NAME)
    if cfg is None:
        raise ValueError(f"The UNet has no LoRA adapter {ADAPTER_NAME!r}; call add_flipnet_lora first.")
    out = {}
    for path in lora_target_names(unet):
        module = unet.get_submodule(path)
        if not hasattr(module, "lora_A") or ADAPTER_NAME not in module.lora_A:
            raise ValueError(f"{path} has no {ADAPTER_NAME!r} LoRA layer; the adapter does not cover every target.")
        name = kohya_name(path)
        out[f"{name}.lora_down.weight"] = module.lora_A[ADAPTER_NAME].weight.detach().clone().contiguous()
        out[f"{name}.lora_up.weight"] = module.lora_B[ADAPTER_NAME].weight.detach().clone().contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(module.lora_alpha[ADAPTER_NAME]) if hasattr(module, "lora_alpha")
                                            else float(cfg.lora_alpha))
    return out


def kohya_rank_alpha(sd: dict[str, torch.Tensor], source: str = "state dict") -> tuple[int, float]:
    """The single (rank, alpha) shared by every LoRA pair of a kohya state dict; errors name mismatching keys."""
    ranks, alphas = {}, {}
    for key, value in sd.items():
        if key.endswith(".lora_down.weight"):
            ranks[key] = int(value.shape[0])
        elif key.endswith(".alpha"):
            alphas[key] = float(value)
    if not ranks:
        raise ValueError(f"{source} holds no LoRA weights ('lora_unet_*.lora_down.weight').")
    distinct = sorted(set(ranks.values()))
    if len(distinct) > 1:
        examples = {r: next(k for k, v in ranks.items() if v == r) for r in distinct}
        raise ValueError(f"{source} mixes LoRA ranks {distinct} (e.g. {examples}); a FlipNet checkpoint has one rank.")
    for key in ranks:
        up = key.replace(".lora_down.weight", ".lora_up.weight")
        if up not in sd:
            raise ValueError(f"{source}: {key} has no matching {up}.")
        if int(sd[up].shape[1]) != distinct[0]:
            raise ValueError(f"{source}: {up} has rank {int(sd[up].shape[1])} but {key} has rank {distinct[0]}.")
    alpha_values = sorted(set(alphas.values())) or [float(distinct[0])]
    if len(alpha_values) > 1:
        raise ValueError(f"{source} mixes LoRA alphas {alpha_values}; a FlipNet checkpoint has one alpha.")
    return distinct[0], alpha_values[0]


def require_same_keys(expected: Iterable[str], found: Iterable[str], what: str, fix: str) -> None:
    """Raise ValueError when ``found`` lacks keys of ``expected`` or has extra ones: counts, two examples of each,
    then ``fix``."""
    expected, found = set(expected), set(found)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise ValueError(f"{what}: {len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. "
                         f"{unexpected[:2]}). {fix}")


def load_lora_kohya(unet: nn.Module, sd: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Load kohya LoRA weights into the UNet's FlipNet adapter (created by :func:`add_flipnet_lora`).

    Every target must be present with the adapter's rank; errors list what is missing or mismatched.
    """
    cfg = getattr(unet, "peft_config", {}).get(ADAPTER_NAME)
    if cfg is None:
        raise ValueError(f"Cannot load LoRA from {source}: the UNet has no {ADAPTER_NAME!r} adapter "
                         "(call add_flipnet_lora with the checkpoint's rank first).")
    rank, alpha = kohya_rank_alpha(sd, source)
    if rank != cfg.r:
        raise ValueError(f"LoRA rank mismatch: {source} has rank {rank}, the UNet adapter has rank {cfg.r}. "
                         f"Create the adapter with rank={rank}.")
    if abs(alpha - float(cfg.lora_alpha)) > 1e-6:
        raise ValueError(f"LoRA alpha mismatch: {source} has alpha {alpha:g}, the UNet adapter has "
                         f"{float(cfg.lora_alpha):g}. Create the adapter with alpha={alpha:g}.")
    names = {kohya_name(p): p for p in lora_target_names(unet)}
    present = {k.rsplit(".lora_down.weight", 1)[0] for k in sd if k.endswith(".lora_down.weight")}
    require_same_keys(names, present, f"LoRA in {source} does not match this UNet's targets",
                      "Is it for another base model topology (SD2.1-base expected)?")
    with torch.no_grad():
        for name, path in names.items():
            module = unet.get_submodule(path)
            a, b = module.lora_A[ADAPTER_NAME].weight, module.lora_B[ADAPTER_NAME].weight
            down, up = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
            if down.shape != a.shape or up.shape != b.shape:
                raise ValueError(f"LoRA {name} in {source} has shapes {tuple(down.shape)}/{tuple(up.shape)}, the UNet "
                                 f"needs {tuple(a.shape)}/{tuple(b.shape)}: wrong base model.")
            a.copy_(down.to(a.dtype))
            b.copy_(up.to(b.dtype))

"""CLR-Face's learnable latent mask f_M (CLR-Face §3.3, design.md §3.5) and its checkpoint ``clrface-mask/1``.

``M_l = f_M(z_t)`` in [0, 1]^(4 x h x w): "a stack of a few convolutional layers followed by a sigmoid layer" that
takes the noisy latent of the current step and says which latent features carry identity, so that the identity
gradient regularises only those (the masked guidance itself is :func:`..pipelines.clrface.apply_identity_guidance`).
The input is the UNet's own input scaling ``z_t = x / sqrt(1 + sigma^2)`` of the k-diffusion sample
``x = z0 + sigma eps`` (unit variance at every noise level); the paper gives f_M nothing else, neither do we.

Architecture (ours; the paper gives no sizes): ``conv3x3(4 -> w)``, then ``layers - 2`` x ``SiLU, conv3x3(w -> w)``,
then ``SiLU, conv3x3(w -> 4)``, ``sigmoid``; default w = 32, 3 convolutions (~10.5 k parameters). The last
convolution starts at zero weight and bias ``init_logit`` (default 0: M = 0.5 everywhere), so an untrained mask is a
uniform half-strength mask.

File (``bfr_format = clrface-mask/1``, one ``.safetensors``): tensors ``id_mask.<torch name>``; metadata
``mask_config`` (JSON :class:`IdentityMaskConfig`), ``guidance_scale`` (the s it was trained with, the sampler's
default for it), ``base_model`` and the training config (+ hash) when written by ``bfr train id-mask``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import BASE_MODEL, CheckpointError, _config_meta, _float_meta, _read, _write

logger = logging.getLogger(__name__)

MASK_FORMAT = "clrface-mask/1"
PREFIX = "id_mask."
LATENT_CHANNELS = 4


@dataclass
class IdentityMaskConfig:
    """f_M sizes: ``channels`` (latent channels in and out), ``width`` hidden channels, ``layers`` convolutions
    (>= 2), ``init_logit`` the initial pre-sigmoid value (0: M = 0.5)."""

    channels: int = LATENT_CHANNELS
    width: int = 32
    layers: int = 3
    init_logit: float = 0.0

    def __post_init__(self):
        if int(self.channels) < 1 or int(self.width) < 1:
            raise ValueError(f"IdentityMask channels and width must be >= 1, got {self.channels}, {self.width}.")
        if int(self.layers) < 2:
            raise ValueError(f"IdentityMask needs at least 2 convolutions, got layers={self.layers}.")
        if not math.isfinite(float(self.init_logit)):
            raise ValueError(f"IdentityMask init_logit must be finite, got {self.init_logit}.")

    def to_dict(self) -> dict:
        return asdict(self)


class IdentityMask(nn.Module):
    """f_M: (B, C, h, w) noisy latent z_t (UNet input scaling) -> M_l in [0, 1]^(C, h, w) (CLR-Face §3.3)."""

    def __init__(self, cfg: IdentityMaskConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or IdentityMaskConfig()
        convs: list[nn.Module] = [nn.Conv2d(cfg.channels, cfg.width, 3, padding=1)]
        for _ in range(cfg.layers - 2):
            convs += [nn.SiLU(), nn.Conv2d(cfg.width, cfg.width, 3, padding=1)]
        convs += [nn.SiLU(), nn.Conv2d(cfg.width, cfg.channels, 3, padding=1)]
        self.net = nn.Sequential(*convs)
        last = self.net[-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.fill_(float(cfg.init_logit))

    def forward(self, z_t: torch.Tensor) -> torch.Tensor:
        if z_t.ndim != 4 or z_t.shape[1] != self.cfg.channels:
            raise ValueError(f"the identity mask takes (B, {self.cfg.channels}, h, w) latents, got "
                             f"{tuple(z_t.shape)}.")
        p = self.net[0].weight
        return torch.sigmoid(self.net(z_t.to(p.device, p.dtype)))


@dataclass
class IdentityMaskCheckpoint:
    mask: IdentityMask
    guidance_scale: float
    path: Path
    metadata: dict


def save_mask_checkpoint(path: str | Path, mask: IdentityMask, *, guidance_scale: float,
                         train_config: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write f_M as ``clrface-mask/1`` (atomic, usual permissions; see :func:`.checkpoint._write`)."""
    tensors = {PREFIX + k: v for k, v in mask.state_dict().items()}
    meta = {"bfr_format": MASK_FORMAT, "base_model": BASE_MODEL, "mask_config": json.dumps(mask.cfg.to_dict()),
            "guidance_scale": repr(float(guidance_scale))}
    path = _write(path, tensors, meta, train_config, dtype)
    logger.info("Saved the CLR-Face identity mask to %s (%d parameters).", path,
                sum(p.numel() for p in mask.parameters()))
    return path


def load_mask_checkpoint(path: str | Path) -> IdentityMaskCheckpoint:
    """Read a ``clrface-mask/1`` file; a wrong format, config or tensor set is a :class:`CheckpointError` naming
    the file and the fix."""
    path = Path(path)
    tensors, meta = _read(path)
    fmt = meta.get("bfr_format")
    if fmt != MASK_FORMAT:
        raise CheckpointError(path, f"bfr_format is {fmt!r}, expected {MASK_FORMAT!r}: this is not a CLR-Face "
                                    "identity mask (write one with `bfr train id-mask`).")
    cfg = _config_meta(path, meta, "mask_config", IdentityMaskConfig)
    scale = _float_meta(path, meta, "guidance_scale", 1.0, "the guidance scale s it was trained with", lo=0.0)
    mask = IdentityMask(cfg)
    want = mask.state_dict()
    sd = {k.removeprefix(PREFIX): v for k, v in tensors.items() if k.startswith(PREFIX)}
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(tensors) - {PREFIX + k for k in want})
    if missing or unexpected:
        raise CheckpointError(path, f"tensors do not match the stored mask_config: missing {missing[:3]}, "
                                    f"unexpected {unexpected[:3]}. Re-export it with `bfr train id-mask`.")
    for k, v in want.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(path, f"{PREFIX}{k} is {tuple(sd[k].shape)}, the stored mask_config needs "
                                        f"{tuple(v.shape)}. Re-export it with `bfr train id-mask`.")
    mask.load_state_dict({k: v.float() for k, v in sd.items()})
    return IdentityMaskCheckpoint(mask.eval().requires_grad_(False), scale, path, meta)

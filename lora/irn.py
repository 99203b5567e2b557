"""CLR-Face's Identity Recovery Network f_phi (CLR-Face §3.3, Eq. 11; design.md §3.5) and its file ``clrface-irn/1``.

f_phi maps a degraded FFHQ-aligned face crop x^d in [0, 1] to an estimate x_id of the same size that "primarily
recovers the identity information rather than focusing on visually pleasing sharp results"; CLR-Face starts its
latent refinement from E(x_id) and guides it toward f_arc(x_id). The paper finds the IRN model-agnostic ("any SOTA
restoration network results in a comparable accuracy boost") and uses SwinIR; any IMAGE can be x_id in this pack
(DR2, FlipNet, DR-BFR, a core face model), and this compact network, trained with Eq. 11 by ``bfr train irn``, is for
users who want the paper's full chain.

Architecture (ours): a residual convolutional encoder-decoder (U-Net-like, additive skips, no normalisation, as
restoration nets usually are) with a global skip, ``f_phi(x) = x + tail(body(x))``:

- ``head`` conv3x3 3 -> w0; per level l: ``blocks`` residual blocks ``x + conv3x3(SiLU(conv3x3(x)))`` at width w_l,
  then a stride-2 conv3x3 w_l -> w_{l+1}; ``mid_blocks`` residual blocks at the coarsest level;
- decoder: nearest 2x upsampling + conv3x3 w_{l+1} -> w_l, plus the encoder feature of that level, then ``blocks``
  residual blocks; ``tail`` SiLU + conv3x3 w0 -> 3, **zero-initialised**, so an untrained f_phi is exactly the
  identity map (training starts from x_id = x^d, and every step is a correction of it).

Defaults: widths (32, 64, 128, 256), 2 blocks per level and side, 2 in the middle: 4.69 M parameters (18.7 MB in
fp32), a receptive field of 209 x 209 px (the 1/8 level: severe blur and x32 down-scaling need context), ~86 GMAC
per 512 x 512 face. A convolutional net rather than the paper's SwinIR: it runs at any size (inputs are
replicate-padded to a multiple of 2^(levels - 1) and cropped back) and needs no window / size bookkeeping.

File (``bfr_format = clrface-irn/1``, one ``.safetensors``): tensors ``irn.<torch name>``; metadata ``irn_config``
(JSON :class:`IRNConfig`), ``alpha`` (the L1 weight of Eq. 11 it was trained with), ``identity_model`` (JSON: the
f_arc it was trained against: arch, file name) and the training config (+ hash) when written by ``bfr train irn``.
:func:`load_irn_checkpoint` checks the format, the config and every tensor name and shape before building anything.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import (
    CLRFACE_FORMAT,
    DRBFR_FORMAT,
    FACE_AE_FORMAT,
    FLIPNET_FORMAT,
    FLIPNET_LORA_FORMAT,
    CheckpointError,
    _build_prefixed_module,
    _config_meta,
    _float_meta,
    _json_meta,
    _read,
    _write,
)
from .dr_checkpoint import DR_FORMAT
from .id_mask import MASK_FORMAT

logger = logging.getLogger(__name__)

IRN_FORMAT = "clrface-irn/1"
PREFIX = "irn."
DEFAULT_ALPHA = 1.0  # the paper gives no number ("a small amount of L1"); ours, see train/irn.py
_FIX = "Re-export it with `bfr train irn`."
# the other files of this pack, and where they go instead
_OTHER_FORMATS = {
    FLIPNET_FORMAT: "a FlipNet checkpoint: load it with BFR Load FlipNet (`bfr restore --method flipnet`); its "
                    "output IMAGE can be x_id",
    FLIPNET_LORA_FORMAT: "a FlipNet LoRA export: load it with LoraLoaderModelOnly",
    FACE_AE_FORMAT: "a FlipNet face-autoencoder file (`bfr train flipnet --face-ae`)",
    DRBFR_FORMAT: "a DR-BFR checkpoint: load it with BFR Load DR-BFR (`bfr restore --method drbfr`); its output "
                  "IMAGE can be x_id",
    DR_FORMAT: "a DR-encoder file from `bfr train dr-encoder`: load it with BFR Load DR Encoder",
    CLRFACE_FORMAT: "CLR-Face's conditional denoiser: load it with BFR Load CLR-Face",
    MASK_FORMAT: "CLR-Face's identity mask f_M: load it with BFR Load CLR-Face Mask",
}


@dataclass
class IRNConfig:
    """f_phi sizes: ``channels`` image channels in and out, ``widths`` per level (finest first; each level after the
    first halves the resolution), ``blocks`` residual blocks per level on each side, ``mid_blocks`` at the coarsest
    level."""

    channels: int = 3
    widths: tuple[int, ...] = (32, 64, 128, 256)
    blocks: int = 2
    mid_blocks: int = 2

    def __post_init__(self):
        self.widths = tuple(int(w) for w in self.widths)
        if int(self.channels) < 1:
            raise ValueError(f"IRN channels must be >= 1, got {self.channels}.")
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(f"IRN widths must be one or more positive integers, got {list(self.widths)}.")
        if int(self.blocks) < 0 or int(self.mid_blocks) < 0:
            raise ValueError(f"IRN blocks and mid_blocks must be >= 0, got {self.blocks}, {self.mid_blocks}.")

    @property
    def multiple(self) -> int:
        """Inputs are padded to a multiple of this (2^(levels - 1)) inside :meth:`IRN.forward`."""
        return 2 ** (len(self.widths) - 1)

    def to_dict(self) -> dict:
        return dict(asdict(self), widths=list(self.widths))


class ResBlock(nn.Module):
    """``x + conv3x3(SiLU(conv3x3(x)))`` (no normalisation)."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(x)))


def _stack(width: int, n: int) -> nn.Sequential:
    return nn.Sequential(*[ResBlock(width) for _ in range(n)])


class IRN(nn.Module):
    """f_phi: (B, C, H, W) degraded faces in [0, 1] -> (B, C, H, W) identity estimates x_id (CLR-Face §3.3), any
    H and W; the output is not clamped (Eq. 11 is computed on it; :func:`..pipelines.irn.run_irn` clamps)."""

    def __init__(self, cfg: IRNConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or IRNConfig()
        w = cfg.widths
        self.head = nn.Conv2d(cfg.channels, w[0], 3, padding=1)
        self.encoder = nn.ModuleList([_stack(c, cfg.blocks) for c in w[:-1]])
        self.down = nn.ModuleList([nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(w[:-1], w[1:])])
        self.mid = _stack(w[-1], cfg.mid_blocks)
        self.up = nn.ModuleList([nn.Conv2d(b, a, 3, padding=1) for a, b in zip(w[:-1], w[1:])])
        self.decoder = nn.ModuleList([_stack(c, cfg.blocks) for c in w[:-1]])
        self.tail = nn.Conv2d(w[0], cfg.channels, 3, padding=1)
        with torch.no_grad():  # x_id = x^d before training (module docstring)
            self.tail.weight.zero_()
            self.tail.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.cfg.channels:
            raise ValueError(f"the IRN takes (B, {self.cfg.channels}, H, W) images, got {tuple(x.shape)}.")
        h, w = x.shape[-2:]
        m = self.cfg.multiple
        pad_h, pad_w = (-h) % m, (-w) % m
        p = self.head.weight
        inp = x.to(p.device, p.dtype)
        if pad_h or pad_w:  # replicate: a 1-pixel image can be padded too (reflect needs pad < size)
            inp = F.pad(inp, (0, pad_w, 0, pad_h), mode="replicate")
        feat = self.head(inp)
        skips = []
        for block, down in zip(self.encoder, self.down):
            feat = block(feat)
            skips.append(feat)
            feat = down(feat)
        feat = self.mid(feat)
        for i in reversed(range(len(self.up))):
            feat = self.up[i](F.interpolate(feat, scale_factor=2.0, mode="nearest")) + skips[i]
            feat = self.decoder[i](feat)
        out = inp + self.tail(F.silu(feat))
        return out[..., :h, :w]


def parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@dataclass
class IRNCheckpoint:
    net: IRN
    alpha: float
    identity_model: dict
    path: Path
    metadata: dict


def save_irn_checkpoint(path: str | Path, net: IRN, *, alpha: float, identity_model: dict | None = None,
                        train_config: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write f_phi as ``clrface-irn/1`` (atomic, usual permissions; ``dtype`` bf16 / fp16 halves the file)."""
    tensors = {PREFIX + k: v for k, v in net.state_dict().items()}
    meta = {"bfr_format": IRN_FORMAT, "irn_config": json.dumps(net.cfg.to_dict()), "alpha": repr(float(alpha)),
            "identity_model": json.dumps(identity_model or {}, sort_keys=True)}
    path = _write(path, tensors, meta, train_config, dtype)
    logger.info("Saved the CLR-Face IRN to %s (%d parameters, %.1f MB).", path, parameter_count(net),
                path.stat().st_size / 1e6)
    return path


def load_irn_checkpoint(path: str | Path) -> IRNCheckpoint:
    """Read a ``clrface-irn/1`` file into an :class:`IRN` (float32, eval mode, no grad). A wrong file type or
    format, another file of this pack (named with the loader to use), a bad config or a tensor that does not fit it
    is a :class:`CheckpointError` naming the file, the key and the fix."""
    path = Path(path)
    if path.is_file() and path.suffix != ".safetensors":
        raise CheckpointError(path, f"expected the .safetensors IRN of `bfr train irn`, got a "
                                    f"{path.suffix or 'suffix-less'!r} file. A third-party restorer (.pth/.ckpt: "
                                    "SwinIR, GFPGAN, CodeFormer, ...) is not an IRN file: run it with its own loader "
                                    "(e.g. core Load Upscale Model) and connect its output IMAGE as x_id.")
    tensors, meta = _read(path)
    fmt = meta.get("bfr_format")
    if fmt != IRN_FORMAT:
        what = _OTHER_FORMATS.get(fmt)
        hint = (f" It is {what}." if what else
                " It has no bfr_format: not a comfyui-bfr file (a third-party restorer goes through its own loader; "
                "its output IMAGE can be x_id)." if fmt is None else "")
        raise CheckpointError(path, f"bfr_format is {fmt!r}, expected {IRN_FORMAT!r}: this is not a CLR-Face "
                                    f"IRN (write one with `bfr train irn`).{hint}")
    cfg = _config_meta(path, meta, "irn_config", IRNConfig)
    alpha = _float_meta(path, meta, "alpha", DEFAULT_ALPHA, "the L1 weight of Eq. 11 it was trained with", lo=0.0)
    identity = _json_meta(path, meta, "identity_model", {})
    if not isinstance(identity, dict):
        raise CheckpointError(path, f"metadata 'identity_model' must be a JSON object, got {meta['identity_model']!r}"
                                    f". {_FIX}")
    net = _build_prefixed_module(path, tensors, PREFIX.rstrip("."), IRN, cfg, "irn_config", _FIX, torch.float32)
    logger.info("Loaded the CLR-Face IRN %s (%d parameters, trained with alpha=%g against %s).", path.name,
                parameter_count(net), alpha, identity.get("arch", "an unrecorded identity model"))
    return IRNCheckpoint(net.eval().requires_grad_(False), alpha, identity, path, meta)

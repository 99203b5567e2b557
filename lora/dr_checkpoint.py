"""The DR-encoder file of ``bfr train dr-encoder`` (``bfr_format = drbfr-dr/1``): the whole DR module of DR-BFR §3.1.

Tensors ``dr.encoder.*`` (E_DR), ``dr.projection.*`` (the contrastive MLP of Eq. 5), ``dr.degrader.*`` (G_LQ);
metadata ``dr_config`` (JSON of :class:`.dr_module.DRConfig`), ``patch_size`` (the training patch side) and the
training config. :func:`read_dr_checkpoint` checks the format, the config field by field and every tensor against a
meta-device build before loading; a ``drbfr/1`` file embeds the encoder as ``dr_encoder.*`` with the same config.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .checkpoint import CheckpointError, _build_prefixed_module, _config_meta, _int_meta, _read, _write
from .dr_module import DegradationEncoder, DRConfig, DRModule

logger = logging.getLogger(__name__)

DR_FORMAT = "drbfr-dr/1"
PREFIX = "dr."
_FIX = "Re-export it with `bfr train dr-encoder`."


def save_dr_checkpoint(path: str | Path, module: DRModule, *, patch_size: int, train_config: dict | None = None,
                       dtype: torch.dtype | None = None) -> Path:
    """Write E_DR + projection + G_LQ with their config; ``dtype`` (bf16 / fp16) halves the file."""
    tensors = {PREFIX + k: v for k, v in module.state_dict().items()}
    meta = {"bfr_format": DR_FORMAT, "dr_config": json.dumps(module.cfg.to_dict()), "patch_size": str(int(patch_size))}
    path = _write(path, tensors, meta, train_config, dtype)
    logger.info("Saved the DR module to %s (%d tensors, %.1f MB).", path, len(tensors), path.stat().st_size / 1e6)
    return path


def read_dr_checkpoint(path: str | Path) -> tuple[DRModule, dict[str, str]]:
    """(the DR module in eval mode, metadata) of a ``drbfr-dr/1`` file; every problem is a CheckpointError."""
    if Path(path).suffix != ".safetensors" and Path(path).is_file():
        raise CheckpointError(path, f"expected the .safetensors DR encoder of `bfr train dr-encoder`, got a "
                                    f"{Path(path).suffix or 'suffix-less'!r} file.")
    tensors, meta = _read(path)
    fmt = meta.get("bfr_format")
    if fmt != DR_FORMAT:
        hint = {"drbfr/1": " It is a DR-BFR restoration checkpoint (BFR Load DR-BFR / `--method drbfr`); its E_DR "
                           "is inside, but `bfr train drbfr --dr-encoder` takes the file of `bfr train dr-encoder`.",
                "flipnet/1": " It is a FlipNet checkpoint."}.get(fmt, "")
        raise CheckpointError(path, f"bfr_format is {fmt!r}, expected {DR_FORMAT!r} (written by `bfr train "
                                    f"dr-encoder`).{hint}")
    cfg = _config_meta(path, meta, "dr_config", DRConfig)
    _int_meta(path, meta, "patch_size", None, "(the training patch side in px)", lo=8, example="96")
    module = _build_prefixed_module(path, tensors, PREFIX.rstrip("."), DRModule, cfg, "dr_config", _FIX)
    return module.to(next(iter(tensors.values())).dtype).eval(), meta


def dr_encoder_from_state(sd: dict[str, torch.Tensor], cfg: DRConfig) -> DegradationEncoder:
    """E_DR from its own tensors (strict)."""
    encoder = DegradationEncoder(cfg)
    encoder.load_state_dict(sd, strict=True)
    return encoder.eval()

"""The training core every trainer plugs into: accelerate setup, checkpoint folders (resume, prune), CPU/gloo
detection, batch collation and validation grids."""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import torch

from ..pipelines.image_io import image_grid, save_png

logger = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "fp16", "bf16")


def collate(items: list[dict]) -> dict:
    return {
        "hq": torch.stack([it["hq"] for it in items]),
        "lq": torch.stack([it["lq"] for it in items]),
        "has_lq": torch.tensor([bool(it["has_lq"]) for it in items]),
        "caption": [it["caption"] for it in items],
        "name": [it["name"] for it in items],
    }


# --------------------------------------------------------------------------------------------------------------------
# Checkpoint folders
# --------------------------------------------------------------------------------------------------------------------

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := _CKPT.match(p.name))]
    return sorted(found)


def resolve_resume(output_dir: str | Path, resume: str | None) -> tuple[Path | None, int]:
    """(checkpoint folder, global step) to resume from, or (None, 0)."""
    if resume is None:
        return None, 0
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.warning("--resume-from-checkpoint latest: no checkpoint-* folder in %s; starting fresh.", output_dir)
            return None, 0
        return found[-1][1], found[-1][0]
    path = Path(resume)
    m = _CKPT.match(path.name)
    if not m:
        raise ValueError(f"Resume folder {str(path)!r} is not named checkpoint-<step>.")
    return path, int(m.group(1))


def prune_checkpoints(output_dir: str | Path, limit: int | None) -> None:
    if limit is None:
        return
    found = list_checkpoints(output_dir)
    for _, path in found[: max(0, len(found) - limit)]:
        shutil.rmtree(path, ignore_errors=True)


def use_cpu(force: bool) -> bool:
    """CPU mode: forced, or no CUDA device while launched as several processes (torchrun / accelerate), so that
    accelerate sets up a gloo process group instead of silently training independent copies."""
    if force:
        return True
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return world > 1 and not torch.cuda.is_available()


def _lr_lambda(warmup: int):
    def fn(step: int) -> float:
        return 1.0 if warmup <= 0 else min(1.0, (step + 1) / warmup)

    return fn


# --------------------------------------------------------------------------------------------------------------------
# Validation images
# --------------------------------------------------------------------------------------------------------------------


def save_image_grid(rows: list[list[torch.Tensor]], path: Path) -> None:
    """Rows of (3,H,W) images in [0,1] -> one PNG."""
    save_png(path, image_grid(rows))

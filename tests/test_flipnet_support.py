"""Shared helpers for the FlipNet tests (imported by test_flipnet_*, test_boosthub*, test_checkpoint*, test_train_*).

* ``fixture_components()`` -- the SD2.1-topology tiny models of ``tests/fixtures/tiny_sd.py`` (80 M-parameter UNet),
  built once per process and deep-copied per call; used where the real topology matters (exactness, key names).
* ``micro_components()`` -- the same VAE/text encoder/tokenizer/scheduler with a much smaller UNet that keeps what
  FlipNet checks (context width 1024, 4 latent channels, linear projections, attn1 + attn2 per block), so
  optimisation tests run several steps in seconds on a shared 2-core CPU.
* small image folders written with PIL.
"""

from __future__ import annotations

import copy
import functools
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixtures.tiny_sd import build_tiny_pipeline_components, build_tiny_scheduler, build_tiny_text_encoder, \
    build_tiny_unet, build_tiny_vae, randomize_  # noqa: E402

MICRO_UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=1024, attention_head_dim=(4, 8), use_linear_projection=True, norm_num_groups=8,
)


@functools.lru_cache(maxsize=2)
def _fixture_components(seed: int):
    return build_tiny_pipeline_components(seed)


def fixture_components(seed: int = 0) -> dict:
    """Fresh deep copies of the tiny SD2.1-topology components."""
    comps = _fixture_components(seed)
    out = {k: copy.deepcopy(v) for k, v in comps.items() if k != "tokenizer"}
    out["tokenizer"] = comps["tokenizer"]
    return out


@functools.lru_cache(maxsize=1)
def _fixture_unet(seed: int):
    return build_tiny_unet(seed)


def fixture_unet(seed: int = 0):
    """A fresh deep copy of the tiny SD2.1-topology UNet only."""
    return copy.deepcopy(_fixture_unet(seed))


@functools.lru_cache(maxsize=2)
def _micro_parts(seed: int):
    te, tok = build_tiny_text_encoder(seed)
    return build_tiny_vae(seed), te, tok


def build_micro_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**MICRO_UNET_CONFIG)
    randomize_(unet, seed)
    return unet.eval()


def micro_components(seed: int = 0) -> dict:
    """Micro UNet + the fixture VAE / text encoder / tokenizer / SD2.1 scheduler (fresh copies)."""
    vae, te, tok = _micro_parts(seed)
    return {"unet": build_micro_unet(seed), "vae": copy.deepcopy(vae), "text_encoder": copy.deepcopy(te),
            "tokenizer": tok, "scheduler": build_tiny_scheduler()}


def face_image(seed: int, size: int = 64) -> np.ndarray:
    """A smooth synthetic 'face-like' RGB uint8 image (blobs on a gradient), deterministic from the seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([0.3 + 0.4 * xx, 0.3 + 0.4 * yy, 0.5 + 0.2 * (xx - yy)], -1)
    for _ in range(5):
        cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
        img = img * (1 - blob) + blob * rng.uniform(0, 1, 3)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_faces(folder: Path, n: int, size: int = 64, seed: int = 0, names=None) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        name = names[i] if names else f"{i:05d}.png"
        p = folder / name
        Image.fromarray(face_image(seed + i, size)).save(p)
        paths.append(p)
    return paths


def stub_degrade(hq: torch.Tensor, seed: int) -> torch.Tensor:
    """A cheap deterministic stand-in for classical degradation (blur by average pooling + noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.nn.functional.avg_pool2d(hq, 4)
    up = torch.nn.functional.interpolate(low, size=hq.shape[-2:], mode="bilinear", align_corners=False)
    return (up + 0.05 * torch.randn(up.shape, generator=g).to(up)).clamp(0, 1)


def test_micro_unet_is_sd2_shaped():
    from comfyui_bfr.lora.checkpoint import check_sd21_unet

    unet = build_micro_unet(0)
    check_sd21_unet(unet)
    assert sum(p.numel() for p in unet.parameters()) < 5_000_000


def write_micro_folder(path: Path, seed: int = 0) -> Path:
    """micro_components() saved as a diffusers folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/)."""
    path = Path(path)
    for name, obj in micro_components(seed).items():
        obj.save_pretrained(path / name)
    return path

"""MUSIQ (Ke, Wang, Wang, Milanfar & Yang, "MUSIQ: Multi-scale Image Quality Transformer", ICCV 2021) in plain torch
(no torchvision, no pyiqa at run time), in the key layout of pyiqa's port of the official JAX checkpoints
(``musiq_koniq_ckpt-e95806b9.pth``, ``musiq_spaq_ckpt-358bb6af.pth``, ``musiq_paq2piq_ckpt-364c0c84.pth``,
``musiq_ava_ckpt-e8d3f067.pth``); tests/comfy/test_musiq_parity.py checks the scores against pyiqa's own network on
the same random weights.

Architecture and preprocessing facts (paper Sec. 3, and pyiqa's ``musiq_arch.py`` / ``multiscale_trans_util.py``,
whose numerics are followed):

- Input: RGB in [0, 1] mapped to [-1, 1]. Multi-scale representation (Sec. 3.1): aspect-preserving bicubic resizes
  (``align_corners=False``, no antialias) to longer side 224 and 384 (sizes ``round(h * L / max(h, w))``), then the
  image at its own size. Each is zero-padded TF-"SAME" style to a multiple of 32 and cut into 32x32 patches, row
  by row. A resized scale's sequence is padded to ``ceil(L / 32)^2`` tokens (mask 0); the full-size one keeps all.
- Hash-based 2-D spatial embedding (Sec. 3.2): patch (i, j) of a ``count_h x count_w`` grid takes the learned
  embedding of cell ``(hash(i), hash(j))`` of a G x G grid (G = 10), ``hash`` = nearest-neighbour resize of
  ``0..G-1`` to the count; scale embedding (Sec. 3.3): one learned vector per scale (0, 1 = resized, 2 = full).
- Patch encoder: a ResNet root on each 32x32 patch (weight-standardised 7x7/2 conv with SAME padding, GroupNorm(32,
  eps 1e-6), ReLU, SAME max-pool 3/2), one bottleneck (64 -> 256, GroupNorm eps 1e-4), the 8x8x256 map flattened in
  (h, w, c) order and projected to 384-d. Weight standardisation as pyiqa: ``(w - mean) / (std + 1e-5)`` with the
  unbiased std over each filter.
- Transformer (Sec. 3.4): CLS token first, 14 pre-LN blocks (LayerNorm eps 1e-6, 6 heads, exact GELU MLP 1152),
  attention logits of pairs involving a padded token set to -1000, final LayerNorm, head on the CLS token: one score
  (KonIQ, SPAQ, PaQ-2-PiQ) or a 10-bin softmax whose mean ``sum_k k p_k`` is the score (AVA).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .weights import load_checked, read_state_dict

PATCH = 32
HASH_GRID = 10
LONGER_SIDES = (224, 384)
HIDDEN = 384
MLP_DIM = 1152
HEADS = 6
LAYERS = 14
ROOT_WIDTH = 64
MASKED_LOGIT = -1000.0
# pyiqa's release files of the official checkpoints, by training set (pyiqa metric names musiq, musiq-spaq, ...).
MUSIQ_FILES = {"koniq": "musiq_koniq_ckpt-e95806b9.pth", "spaq": "musiq_spaq_ckpt-358bb6af.pth",
               "paq2piq": "musiq_paq2piq_ckpt-364c0c84.pth", "ava": "musiq_ava_ckpt-e8d3f067.pth"}


class MUSIQWeightsError(ValueError):
    """A MUSIQ file that is missing, unreadable or not in pyiqa's MUSIQ layout."""


def pad_same(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Zero padding of TensorFlow's "SAME" convention: ``ceil(size / stride)`` outputs, the odd pixel at the end."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class StdConv2d(nn.Conv2d):
    """Weight-standardised convolution (Qiao et al. 2019, as in BiT) with SAME padding, bias-free."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1):
        super().__init__(cin, cout, kernel, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(pad_same(x, self.kernel_size[0], self.stride[0]), w, None, self.stride)


class Bottleneck(nn.Module):
    """ResNet-v1 bottleneck with GroupNorm(32): 1x1, 3x3, 1x1 (width = input channels), projected shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1, self.gn1 = StdConv2d(cin, cin, 1), nn.GroupNorm(32, cin, eps=1e-4)
        self.conv2, self.gn2 = StdConv2d(cin, cin, 3), nn.GroupNorm(32, cin, eps=1e-4)
        self.conv3, self.gn3 = StdConv2d(cin, cout, 1), nn.GroupNorm(32, cout, eps=1e-4)
        self.conv_proj = self.gn_proj = None
        if cin != cout or stride != 1:
            self.conv_proj, self.gn_proj = StdConv2d(cin, cout, 1, stride), nn.GroupNorm(32, cout, eps=1e-4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.conv_proj is None else self.gn_proj(self.conv_proj(x))
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))
        return F.relu(self.gn3(self.conv3(y)) + skip)


class Attention(nn.Module):
    """Multi-head self-attention whose logits are set to :data:`MASKED_LOGIT` where either token is padding."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, pair_mask: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        d = dim // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, length, self.heads, d).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        logits = (q @ k.transpose(-2, -1)) * d ** -0.5
        weights = logits.masked_fill(~pair_mask[:, None], MASKED_LOGIT).softmax(-1)
        return self.out((weights @ v).transpose(1, 2).reshape(n, length, dim))


class EncoderBlock(nn.Module):
    """Pre-LN Transformer block: ``x + MHSA(LN(x))``, then ``x + MLP(LN(x))`` with exact GELU."""

    def __init__(self, dim: int, mlp_dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attention = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, mlp_dim), nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor, pair_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x), pair_mask)
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class Encoder(nn.Module):
    """Hashed spatial + scale embeddings, CLS token, the blocks and the final LayerNorm (``transformer_encoder.*``)."""

    def __init__(self, dim: int, mlp_dim: int, heads: int, layers: int, scales: int, grid: int):
        super().__init__()
        self.posembed_input = nn.Module()
        self.posembed_input.position_emb = nn.Parameter(torch.zeros(1, grid * grid, dim))
        self.scaleembed_input = nn.Module()
        self.scaleembed_input.scale_emb = nn.Parameter(torch.zeros(scales, dim))
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.transformer = nn.ModuleDict({f"encoderblock_{i}": EncoderBlock(dim, mlp_dim, heads)
                                          for i in range(layers)})
        self.encoder_norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, spatial: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.posembed_input.position_emb[0][spatial] + self.scaleembed_input.scale_emb[scale]
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1)
        mask = torch.cat([mask.new_ones(len(x), 1), mask], 1)
        pair_mask = mask[:, :, None] & mask[:, None, :]
        for block in self.transformer.values():
            x = block(x, pair_mask)
        return self.encoder_norm(x)


def hashed_positions(count_h: int, count_w: int, grid: int = HASH_GRID) -> torch.Tensor:
    """(count_h * count_w,) row-major indices into the G x G embedding grid (Sec. 3.2): each axis' patch index mapped
    to a grid cell by a nearest-neighbour resize of ``0..G-1`` to the patch count."""
    cells = torch.arange(grid, dtype=torch.float32)[None, None]
    rows = F.interpolate(cells, size=count_h, mode="nearest")[0, 0].long()
    cols = F.interpolate(cells, size=count_w, mode="nearest")[0, 0].long()
    return (rows[:, None] * grid + cols[None, :]).reshape(-1)


def _patches(x: torch.Tensor, scale_id: int, length: int, grid: int) -> tuple[torch.Tensor, ...]:
    """(patches (N, L, 3, P, P), spatial (N, L), scale (N, L), mask (N, L)) of one scale; ``length`` < 0 keeps all
    patches, otherwise the sequence is zero-padded (mask 0) or cut to ``length``."""
    n, c, h, w = x.shape
    x = pad_same(x, PATCH, PATCH)
    ch, cw = x.shape[-2] // PATCH, x.shape[-1] // PATCH
    patches = x.view(n, c, ch, PATCH, cw, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(n, ch * cw, c, PATCH, PATCH)
    spatial = hashed_positions(ch, cw, grid).to(x.device).expand(n, -1)
    scale = torch.full_like(spatial, scale_id)
    mask = torch.ones_like(spatial, dtype=torch.bool)
    if length >= 0:
        extra = length - ch * cw
        if extra > 0:
            patches = torch.cat([patches, patches.new_zeros(n, extra, c, PATCH, PATCH)], 1)
            spatial, scale = (torch.cat([t, t.new_zeros(n, extra)], 1) for t in (spatial, scale))
            mask = torch.cat([mask, mask.new_zeros(n, extra)], 1)
        patches, spatial, scale, mask = (t[:, :length] for t in (patches, spatial, scale, mask))
    return patches, spatial, scale, mask


def multiscale_patches(x: torch.Tensor, longer_sides=LONGER_SIDES, full_size_patches: int | None = -1,
                       grid: int = HASH_GRID) -> tuple[torch.Tensor, ...]:
    """The multi-scale token sequence of (N, 3, H, W) images in [-1, 1] (Sec. 3.1): every aspect-preserving resize
    (longer side ``L``, padded to ``ceil(L/32)^2`` tokens), then the image itself (all its patches when
    ``full_size_patches`` is -1, that many when >= 0, left out when None)."""
    h, w = x.shape[-2:]
    parts = []
    sides = sorted(longer_sides)
    for scale_id, side in enumerate(sides):
        r = side / max(h, w)
        size = (round(h * r), round(w * r))
        resized = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        parts.append(_patches(resized, scale_id, math.ceil(side / PATCH) ** 2, grid))
    if full_size_patches is not None:
        parts.append(_patches(x, len(sides), full_size_patches, grid))
    return tuple(torch.cat(t, 1) for t in zip(*parts))


class MUSIQNet(nn.Module):
    """MUSIQ (Ke et al. 2021); :meth:`forward` takes (N, 3, H, W) RGB in [0, 1] and gives (N,) scores (higher =
    better). ``classes``: 1 for a regressed MOS (KonIQ, SPAQ, PaQ-2-PiQ), 10 for AVA's score distribution."""

    def __init__(self, classes: int = 1, longer_sides=LONGER_SIDES, full_size_patches: int | None = -1,
                 grid: int = HASH_GRID):
        super().__init__()
        if classes < 1:
            raise ValueError(f"classes must be >= 1, got {classes}")
        self.classes, self.longer_sides = classes, tuple(longer_sides)
        self.full_size_patches, self.grid = full_size_patches, grid
        scales = len(self.longer_sides) + 1  # the file always has the full-size scale's embedding
        self.conv_root = StdConv2d(3, ROOT_WIDTH, 7, 2)
        self.gn_root = nn.GroupNorm(32, ROOT_WIDTH, eps=1e-6)
        self.block1 = Bottleneck(ROOT_WIDTH, 4 * ROOT_WIDTH)
        self.embedding = nn.Linear(4 * ROOT_WIDTH * (PATCH // 4) ** 2, HIDDEN)
        self.transformer_encoder = Encoder(HIDDEN, MLP_DIM, HEADS, LAYERS, scales, grid)
        # pyiqa's layout: a bare Linear for one score, Linear + Softmax (``head.0``) for a distribution
        self.head = nn.Linear(HIDDEN, 1) if classes == 1 else nn.Sequential(nn.Linear(HIDDEN, classes))

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, L, 3, 32, 32) -> (N, L, 384): the ResNet root + bottleneck on each patch, flattened (h, w, c)."""
        n, length = patches.shape[:2]
        y = F.relu(self.gn_root(self.conv_root(patches.reshape(n * length, 3, PATCH, PATCH))))
        y = self.block1(F.max_pool2d(pad_same(y, 3, 2), 3, 2))
        return self.embedding(y.permute(0, 2, 3, 1).reshape(n, length, -1))

    def distribution(self, x: torch.Tensor) -> torch.Tensor:
        """(N, classes): the head's output on the CLS token (softmax-ed for several classes)."""
        patches, spatial, scale, mask = multiscale_patches((x - 0.5) * 2, self.longer_sides, self.full_size_patches,
                                                           self.grid)
        tokens = self.transformer_encoder(self.embed_patches(patches), spatial, scale, mask)
        out = self.head(tokens[:, 0])
        return out if self.classes == 1 else out.softmax(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.distribution(x)
        if self.classes == 1:
            return p[:, 0]
        return (p * torch.arange(1, self.classes + 1, device=p.device, dtype=p.dtype)).sum(-1)  # mean of bins 1..K


def _classes_of(sd: dict[str, torch.Tensor]) -> int:
    """1 for a ``head.weight`` file, the bin count for a ``head.0.weight`` (AVA) file."""
    if "head.0.weight" in sd:
        return int(sd["head.0.weight"].shape[0])
    if "head.weight" in sd:
        return int(sd["head.weight"].shape[0])
    return 1


def load_musiq(path: str | Path) -> MUSIQNet:
    """MUSIQ with the weights of ``path`` (``.pth`` read with ``weights_only=True``, or ``.safetensors``) in pyiqa's
    layout; every key of the file must be a key of the network and the reverse."""
    path = Path(path)
    sd = read_state_dict(path, lambda p, what: MUSIQWeightsError(f"MUSIQ weights {p}: {what}"))
    classes = _classes_of(sd)
    if "head.weight" in sd and classes != 1:
        raise MUSIQWeightsError(f"MUSIQ weights {path.name}: a bare head.weight must give one score, it has "
                                f"{classes} outputs")
    return load_checked(MUSIQNet(classes), sd, lambda problem: MUSIQWeightsError(
        f"MUSIQ weights {path.name} are not in pyiqa's MUSIQ layout ({problem}); use one of pyiqa's release files "
        f"{', '.join(MUSIQ_FILES.values())}"))


__all__ = ["HASH_GRID", "LONGER_SIDES", "MUSIQNet", "MUSIQWeightsError", "MUSIQ_FILES", "PATCH", "hashed_positions",
           "load_musiq", "multiscale_patches", "pad_same"]

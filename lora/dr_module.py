"""DR-BFR Degradation Representation Module (DRM, DR-BFR paper §3.1, Eq. 1-7), pure torch.

Training data per image i (Eq. 2): HQ patches (r1, r2) and LQ patches (p1, p2) at the same positions, the LQ image made
by one random degradation phi_i (Eq. 1), so p1 and p2 share a degradation but not content.

* ``DegradationEncoder`` = E_DR (Eq. 3): a VGG-like stack of 3x3 convs with 2x2 max-pooling between blocks
  (default 6 convs, 64 -> 256 channels), then the tokens: adaptive average pooling to a g x g grid, a 1x1 conv to the
  token width d, flattened row-major to l = g^2 tokens. Output (B, l, d) (the paper writes f_DR in R^{d x l}; we keep
  tokens on the second axis, the cross-attention prompt layout). The last layer is linear, so tokens can take the
  signed values the N(0, I) target of Eq. 6 asks for. ``input_norm="standardize"`` (ours, the trainer's default)
  first removes each patch's channel means and divides by its RMS contrast: the degradations of Eq. 11 preserve the
  local mean, so those statistics are content, and they were the shortcut that made an untuned E_DR ~99 % content.
* ``ReDegrader`` = G_LQ (Eq. 4): a small U-Net whose decoder is modulated by AdaIN; (gamma, beta) per channel come from
  an MLP on f_DR mean-pooled over its l tokens. It predicts a residual on the HQ input: p2_hat = r2 + U(r2, f_DR).
* ``info_nce`` (Eq. 5), ``energy_distance`` (Eq. 6), and ``DRModule.loss`` (Eq. 7):
  L_DR = L_recon + lambda1 L_contras + lambda2 L_distribution with
  L_recon = |G_LQ(r2, E(p1)) - p2|_1 (Eq. 4), L_contras on q = MLP(E(p2)), k = MLP(E(p1)) (Eq. 5),
  L_distribution = ED({E(p1)}, {t_j ~ N(0, I)}) (Eq. 6).

The paper states no value for l, d, tau, lambda1, lambda2, the projection MLP or the G_LQ widths; every default below
says where it comes from (DASR / ReDSR code, see algorithm-notes §3) or that it is our choice. Images are
``(B, 3, H, W)`` in ``[0, 1]``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)


@dataclass
class DRConfig:
    """Topology and loss weights of the DRM.

    * ``encoder_blocks``: E_DR conv widths per VGG block, a 2x2 max-pool between blocks. Default (64,64)(128,128)
      (256,256): six 3x3 convs, 64 -> 256 (paper §3.1 "multiple layers of 3x3 kernel and pooling layers, analogous
      to VGG-19"; the six-layer 64 -> 256 widths are DASR's encoder, algorithm-notes §3.1).
    * ``num_tokens`` (l) = 4, a 2x2 grid: ours (the paper gives l no value). Must be a perfect square.
    * ``token_dim`` (d) = 256: DASR's DR width (ours for DR-BFR, which gives none).
    * ``proj_hidden`` / ``proj_dim`` = 256 / 256: the contrastive MLP width, DASR's ``Linear(256,256)-LReLU-Linear``.
    * ``temperature`` (tau) = 0.07: DASR's MoCo T (the paper names tau but not its value).
    * ``lambda_contras`` (lambda1) = 0.1: ours (unstated in the paper), chosen so that at initialisation InfoNCE
      (near log B) does not dwarf the [0,1]-range L1. ``lambda_distribution`` (lambda2) = 0.01: ReDSR's weight of
      the energy distance that Eq. 6 takes from it (the same default as ``bfr train dr-encoder``); at 0.1 the
      N(0, I) pull fights the contrastive term early (held-out InfoNCE after 150 steps of the tiny test model:
      1.14 at 0.1 vs 0.74 at 0.01, mean of 4 batches).
    * ``gen_channels`` = (32, 64, 128): G_LQ U-Net widths per level (ours); H, W of the patches must be divisible by
      2^(levels-1). ``mod_hidden`` = 128: hidden width of each AdaIN MLP (ours).
    * ``negative_slope`` = 0.1: LeakyReLU slope everywhere (DASR's).
    * ``input_norm``: what E_DR does to a patch before its convs. ``"none"`` (the default, so files written before
      the field existed load as they were trained): x -> 2x - 1. ``"standardize"`` (ours; ``bfr train dr-encoder``'s
      default): x -> 0.5 (x - mean_c(x)) / (rms(x - mean_c(x)) + 0.02), per patch, channel means then one RMS over
      all channels (0.02 in [0,1] units keeps flat patches from amplifying quantisation). Blur, resize, noise and
      JPEG (Eq. 11) keep the local mean, so colour and brightness are content only; the contrast divided out is mostly
      content too (a degradation changes the *relative* high-frequency energy, which survives). No parameters: the
      tensors of both layouts are the same.
    """

    encoder_blocks: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256))
    num_tokens: int = 4
    token_dim: int = 256
    proj_hidden: int = 256
    proj_dim: int = 256
    temperature: float = 0.07
    lambda_contras: float = 0.1
    lambda_distribution: float = 0.01
    gen_channels: tuple[int, ...] = (32, 64, 128)
    mod_hidden: int = 128
    negative_slope: float = 0.1
    input_norm: str = "none"

    INPUT_NORMS = ("none", "standardize")

    def __post_init__(self):
        self.encoder_blocks = tuple(tuple(int(c) for c in block) for block in self.encoder_blocks)
        self.gen_channels = tuple(int(c) for c in self.gen_channels)
        if not self.encoder_blocks or any(not block or min(block) <= 0 for block in self.encoder_blocks):
            raise ValueError(f"DR encoder_blocks {self.encoder_blocks} must be non-empty blocks of positive widths.")
        if not self.gen_channels or min(self.gen_channels) <= 0:
            raise ValueError(f"DR gen_channels {self.gen_channels} must be non-empty positive widths.")
        for name in ("num_tokens", "token_dim", "proj_hidden", "proj_dim", "mod_hidden"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"DR {name} must be positive, got {getattr(self, name)}.")
        if math.isqrt(self.num_tokens) ** 2 != self.num_tokens:
            raise ValueError(f"DR num_tokens (l) must be a perfect square (tokens are a g x g pooling grid), got "
                             f"{self.num_tokens}; e.g. 1, 4, 9, 16.")
        if self.input_norm not in self.INPUT_NORMS:
            raise ValueError(f"DR input_norm must be one of {self.INPUT_NORMS}, got {self.input_norm!r}.")
        if not self.temperature > 0:
            raise ValueError(f"DR temperature must be > 0, got {self.temperature}.")
        if self.lambda_contras < 0 or self.lambda_distribution < 0:
            raise ValueError(f"DR loss weights must be >= 0, got lambda_contras={self.lambda_contras}, "
                             f"lambda_distribution={self.lambda_distribution}.")

    @property
    def grid(self) -> int:
        """Side g of the token grid, l = g^2."""
        return math.isqrt(self.num_tokens)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["encoder_blocks"] = [list(b) for b in self.encoder_blocks]
        d["gen_channels"] = list(self.gen_channels)
        return d


def _check_images(images: torch.Tensor, what: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{what} expects images (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}.")


# --------------------------------------------------------------------------------------------------------------------
# E_DR (Eq. 3)
# --------------------------------------------------------------------------------------------------------------------


class DegradationEncoder(nn.Module):
    """E_DR (Eq. 3): LQ patch (B, 3, H, W) in [0, 1] -> degradation tokens f_DR (B, l, d).

    VGG-like: each block is 3x3 conv + LeakyReLU layers, a 2x2 max-pool between blocks. Tokens: adaptive average
    pooling of the last block to a g x g grid (l = g^2), a linear 1x1 conv to width d, flattened row-major.
    No batch norm, so a sample's DR does not depend on the rest of its batch. The input first goes through
    :meth:`normalize_input` (``cfg.input_norm``).
    """

    def __init__(self, cfg: DRConfig):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        in_ch = 3
        for b, block in enumerate(cfg.encoder_blocks):
            if b:
                layers.append(nn.MaxPool2d(2, 2))
            for ch in block:
                layers += [nn.Conv2d(in_ch, ch, 3, padding=1), nn.LeakyReLU(cfg.negative_slope)]
                in_ch = ch
        self.features = nn.Sequential(*layers)
        self.to_tokens = nn.Conv2d(in_ch, cfg.token_dim, 1)
        self.min_size = 2 ** (len(cfg.encoder_blocks) - 1)

    def normalize_input(self, lq: torch.Tensor) -> torch.Tensor:
        """``"none"``: 2x - 1; ``"standardize"`` (ours): per patch, 0.5 (x - mean_c) / (rms + 0.02) (see DRConfig)."""
        if self.cfg.input_norm == "standardize":
            centred = lq - lq.mean((2, 3), keepdim=True)
            rms = centred.pow(2).mean((1, 2, 3), keepdim=True).sqrt()
            return 0.5 * centred / (rms + 0.02)
        return lq * 2.0 - 1.0

    def forward(self, lq: torch.Tensor) -> torch.Tensor:
        _check_images(lq, "DegradationEncoder")
        if min(lq.shape[-2:]) < self.min_size:
            raise ValueError(f"DegradationEncoder needs patches of at least {self.min_size} px per side "
                             f"({len(self.cfg.encoder_blocks) - 1} max-pools), got {tuple(lq.shape[-2:])}.")
        h = self.features(self.normalize_input(lq))
        h = self.to_tokens(F.adaptive_avg_pool2d(h, self.cfg.grid))
        return h.flatten(2).transpose(1, 2)


# --------------------------------------------------------------------------------------------------------------------
# G_LQ (Eq. 4)
# --------------------------------------------------------------------------------------------------------------------


class AdaIN(nn.Module):
    """AdaIN(h, c) = (1 + gamma(c)) * IN(h) + beta(c), per channel, (gamma, beta) = MLP(c).

    IN is instance normalisation without affine parameters (eps 1e-5), so after AdaIN each (sample, channel) map has
    mean beta and (biased) standard deviation |1 + gamma| up to eps.
    """

    def __init__(self, channels: int, cond_dim: int, hidden: int, negative_slope: float = 0.1):
        super().__init__()
        self.channels = channels
        self.mlp = nn.Sequential(nn.Linear(cond_dim, hidden), nn.LeakyReLU(negative_slope),
                                 nn.Linear(hidden, 2 * channels))

    def scale_shift(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cond (B, cond_dim) -> (gamma, beta), each (B, C)."""
        gamma, beta = self.mlp(cond).chunk(2, dim=-1)
        return gamma, beta

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.scale_shift(cond)
        h = F.instance_norm(h, eps=1e-5)
        return h * (1.0 + gamma[:, :, None, None]) + beta[:, :, None, None]


class _DecoderBlock(nn.Module):
    """Upsample x2, concatenate the skip, (conv3x3 -> AdaIN -> LeakyReLU) x 2."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, cond_dim: int, hidden: int, slope: float):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch + skip_ch, out_ch, 3, padding=1)
        self.norm1 = AdaIN(out_ch, cond_dim, hidden, slope)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.norm2 = AdaIN(out_ch, cond_dim, hidden, slope)
        self.slope = slope

    def forward(self, h: torch.Tensor, skip: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
        h = F.leaky_relu(self.norm1(self.conv1(torch.cat([h, skip], dim=1)), cond), self.slope)
        return F.leaky_relu(self.norm2(self.conv2(h), cond), self.slope)


class ReDegrader(nn.Module):
    """G_LQ (Eq. 4): p_hat = G_LQ(hq, f_DR), a U-Net whose decoder is AdaIN-modulated by f_DR.

    Encoder: per level two 3x3 conv + LeakyReLU layers, 2x2 average pooling between levels (no modulation: the
    encoder reads content). The bottleneck's output and every decoder conv go through AdaIN with (gamma, beta) from
    an MLP on f_DR mean-pooled over its l tokens. The output is a residual on the HQ input (ours): p_hat = hq + U.
    """

    def __init__(self, cfg: DRConfig):
        super().__init__()
        self.cfg = cfg
        ch, slope, cond, hid = cfg.gen_channels, cfg.negative_slope, cfg.token_dim, cfg.mod_hidden
        self.slope = slope
        self.enc = nn.ModuleList()
        in_ch = 3
        for c in ch:
            self.enc.append(nn.Sequential(nn.Conv2d(in_ch, c, 3, padding=1), nn.LeakyReLU(slope),
                                          nn.Conv2d(c, c, 3, padding=1), nn.LeakyReLU(slope)))
            in_ch = c
        self.mid_norm = AdaIN(ch[-1], cond, hid, slope)
        self.dec = nn.ModuleList(_DecoderBlock(ch[i + 1], ch[i], ch[i], cond, hid, slope)
                                 for i in reversed(range(len(ch) - 1)))
        self.head = nn.Conv2d(ch[0], 3, 3, padding=1)
        self.multiple = 2 ** (len(ch) - 1)

    def forward(self, hq: torch.Tensor, f_dr: torch.Tensor) -> torch.Tensor:
        """hq (B, 3, H, W) in [0, 1], f_dr (B, l, d) -> re-degraded (B, 3, H, W) (unclamped, so L1 has gradients)."""
        _check_images(hq, "ReDegrader")
        if hq.shape[-1] % self.multiple or hq.shape[-2] % self.multiple:
            raise ValueError(f"ReDegrader (G_LQ) needs H and W divisible by {self.multiple} "
                             f"({len(self.cfg.gen_channels)} U-Net levels), got {tuple(hq.shape[-2:])}.")
        if f_dr.ndim != 3 or f_dr.shape[0] != hq.shape[0] or f_dr.shape[-1] != self.cfg.token_dim:
            raise ValueError(f"ReDegrader expects f_DR tokens (B={hq.shape[0]}, l, d={self.cfg.token_dim}), got "
                             f"shape {tuple(f_dr.shape)}.")
        cond = f_dr.mean(dim=1)
        skips = []
        h = hq * 2.0 - 1.0
        for i, block in enumerate(self.enc):
            if i:
                h = F.avg_pool2d(h, 2)
            h = block(h)
            skips.append(h)
        h = F.leaky_relu(self.mid_norm(skips.pop(), cond), self.slope)
        for block in self.dec:
            h = block(h, skips.pop(), cond)
        return hq + self.head(h)


# --------------------------------------------------------------------------------------------------------------------
# Losses (Eq. 5, Eq. 6)
# --------------------------------------------------------------------------------------------------------------------


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.07, normalize: bool = True) -> torch.Tensor:
    """Symmetric in-batch InfoNCE (Eq. 5, written as the standard loss it intends).

    The printed Eq. 5, -log(q_i k_i^+ / sum_{j != i} q_i k_j^- / tau), is garbled (no exponentials, tau only in the
    denominator, the positive left out of the normaliser). We use the standard InfoNCE (CPC / MoCo / CLIP), as in
    DASR whose scheme the paper extends: with s_ij = <z1_i, z2_j> / tau (cosine similarities when ``normalize``),

        L = 1/2 [ mean_i -log softmax_j(s_ij)[i]  +  mean_j -log softmax_i(s_ij)[j] ],

    i.e. cross-entropy over the B x B logits with the positives on the diagonal (the two patches of one image) and
    the other images of the batch as negatives, averaged over both directions. Mean over i instead of the paper's sum.
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"info_nce expects two (B, D) embeddings of one shape, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}.")
    if z1.shape[0] < 2:
        raise ValueError("info_nce needs a batch of at least 2 (the other images are the negatives).")
    if normalize:
        z1, z2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    logits = z1 @ z2.T / temperature
    labels = torch.arange(z1.shape[0], device=z1.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def energy_distance(x: torch.Tensor, y: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Energy distance between samples x (n, ...) and y (m, ...), each sample flattened (Frobenius norm) (Eq. 6).

    Default: the biased V-statistic that Eq. 6 prints (all pairs, diagonal zeros included, divided by n^2, nm, m^2):

        ED = 2/(nm) sum_ij |x_i - y_j| - 1/n^2 sum_ij |x_i - x_j| - 1/m^2 sum_ij |y_i - y_j|,

    which is >= 0 and exactly 0 for identical sets. ``unbiased=True``: the U-statistic, the within-set sums over
    i != j divided by n(n-1) and m(m-1) (unbiased for 2E|X-Y| - E|X-X'| - E|Y-Y'|; can be negative).
    """
    x = x.reshape(x.shape[0], -1)
    y = y.reshape(y.shape[0], -1)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"energy_distance: samples have {x.shape[1]} and {y.shape[1]} elements; they must match.")
    n, m = x.shape[0], y.shape[0]
    if unbiased and min(n, m) < 2:
        raise ValueError("energy_distance(unbiased=True) needs at least 2 samples per set.")

    def dist(a, b):
        # exact pairwise distances (no |a|^2 + |b|^2 - 2ab cancellation), finite gradients at zero distance
        return torch.cdist(a[None], b[None], compute_mode="donot_use_mm_for_euclid_dist")[0]

    xy = dist(x, y).mean()
    xx, yy = dist(x, x).sum(), dist(y, y).sum()
    if unbiased:
        return 2.0 * xy - xx / (n * (n - 1)) - yy / (m * (m - 1))
    return 2.0 * xy - xx / (n * n) - yy / (m * m)


# --------------------------------------------------------------------------------------------------------------------
# DRM (Eq. 3-7)
# --------------------------------------------------------------------------------------------------------------------


class DRModule(nn.Module):
    """E_DR + contrastive projection MLP + G_LQ, trained with L_DR (Eq. 7). At inference only ``encoder`` is used
    (§3.1: "G_LQ only plays an auxiliary role in training")."""

    def __init__(self, cfg: DRConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or DRConfig()
        self.encoder = DegradationEncoder(cfg)
        self.projection = nn.Sequential(nn.Linear(cfg.num_tokens * cfg.token_dim, cfg.proj_hidden),
                                        nn.LeakyReLU(cfg.negative_slope), nn.Linear(cfg.proj_hidden, cfg.proj_dim))
        self.degrader = ReDegrader(cfg)

    def forward(self, lq: torch.Tensor) -> torch.Tensor:
        """f_DR = E_DR(lq), (B, l, d) (Eq. 3)."""
        return self.encoder(lq)

    def project(self, f_dr: torch.Tensor) -> torch.Tensor:
        """The MLP of Eq. 5 on the flattened tokens: (B, l, d) -> (B, proj_dim)."""
        return self.projection(f_dr.flatten(1))

    def loss(self, p1: torch.Tensor, p2: torch.Tensor, r2: torch.Tensor,
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """L_DR (Eq. 7) for a batch of B images; p1, p2 LQ patches, r2 the HQ patch at p2's position (Eq. 2).

        * f1 = E_DR(p1), f2 = E_DR(p2) (Eq. 3).
        * recon = mean |G_LQ(r2, f1) - p2| (Eq. 4: the *other* patch's DR re-degrades r2, so content cannot leak;
          per-element mean instead of the paper's sum over i).
        * contras = info_nce(MLP(f2), MLP(f1), tau) (Eq. 5: q_i = MLP(f2_i), k_i^+ = MLP(f1_i), k_j^- = MLP(f1_j)).
        * distribution = energy_distance(f1, t) / sqrt(l d) with t_j ~ N(0, I) in R^{l x d}, j = 1..B (Eq. 6, biased
          form as printed). The 1/sqrt(l d) (ours) makes distances per-element RMS, so lambda2 does not depend on the
          token size; it equals the ED of f1 / sqrt(l d) and t / sqrt(l d). ``generator`` draws t.
        * total = recon + lambda1 contras + lambda2 distribution (Eq. 7).
        """
        for name, t in (("p1", p1), ("p2", p2), ("r2", r2)):
            _check_images(t, f"DRModule.loss {name}")
        if not p1.shape == p2.shape == r2.shape:
            raise ValueError(f"DRModule.loss expects p1, p2, r2 of one shape, got {tuple(p1.shape)}, "
                             f"{tuple(p2.shape)}, {tuple(r2.shape)}.")
        if p1.shape[0] < 2:
            raise ValueError("DRModule.loss needs at least 2 images per batch (the other images are the contrastive "
                             "negatives and the Gaussian sample set of Eq. 6 has one sample per image).")
        cfg = self.cfg
        f1 = self.encoder(p1)
        f2 = self.encoder(p2)
        recon = F.l1_loss(self.degrader(r2, f1), p2)
        contras = info_nce(self.project(f2), self.project(f1), cfg.temperature)
        t = torch.randn(f1.shape, generator=generator, device=f1.device, dtype=f1.dtype)
        distribution = energy_distance(f1, t) / math.sqrt(cfg.num_tokens * cfg.token_dim)
        total = recon + cfg.lambda_contras * contras + cfg.lambda_distribution * distribution
        return {"total": total, "recon": recon, "contras": contras, "distribution": distribution}

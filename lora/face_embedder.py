"""BFR-oriented face embeddings (FlipNet §4.1): HQ/LQ autoencoders with continuous latents and the adapter tau(.)
that maps LQ latent tokens to the text width (1024) so they can be appended to the text context.

* Reconstruction stage: each autoencoder reconstructs its own images, L_ae = L_1 + 0.5 L_p + 0.8 L_adv.
* Association stage: HQ/LQ latents flattened to N patch tokens, M = z_x z_y^T, symmetric CE on the diagonal (Eq. 6),
  L_asso = L_ae + (L_CE^x + L_CE^y) / 2.
* Inference: c_id = tau(z_y) with z_y the LQ encoder's tokens (N x d).

The autoencoders are diffusers ``AutoencoderKL`` networks (the paper initialises them from the SD VAE, which this
topology matches); the latent is the posterior mean (continuous, deterministic). Tokens are non-overlapping
``patch_size`` x ``patch_size`` latent patches: ``patch_size = 1`` is the paper's literal N = h x w (4096 tokens of
width 4 at 512 px); the default 4 gives N = 256 tokens of width 64 at 512 px (our choice, to keep the extra
cross-attention keys cheap; stored in the checkpoint metadata).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)


@dataclass
class FaceAEConfig:
    """Topology of one face autoencoder (both HQ and LQ use it) and of the token grid.

    Defaults equal the SD2.1 VAE (so it can be initialised from it, as in the paper).
    """

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    patch_size: int = 4

    def __post_init__(self):
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if not self.block_out_channels or any(c <= 0 or c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"face AE block_out_channels {self.block_out_channels} must be positive multiples of "
                             f"norm_num_groups={self.norm_num_groups}.")
        for name in ("layers_per_block", "latent_channels", "patch_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"face AE {name} must be positive, got {getattr(self, name)}.")

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel (8 for the SD VAE topology)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def token_dim(self) -> int:
        """Width d of one face token: latent_channels * patch_size^2."""
        return self.latent_channels * self.patch_size**2

    def num_tokens(self, image_size: int) -> int:
        """N for a square image of ``image_size`` px."""
        side = image_size // self.downscale // self.patch_size
        return side * side

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d


def build_autoencoder(cfg: FaceAEConfig) -> nn.Module:
    """A diffusers ``AutoencoderKL`` with the face AE topology."""
    from diffusers import AutoencoderKL

    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
    )


def patchify_latent(z: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Flatten a latent (B, d, h, w) into N = (h/p)(w/p) patch tokens of width d p^2 (§4.1b "flattened")."""
    b, c, h, w = z.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"Face latent {h}x{w} is not divisible by patch_size={patch_size}; use image sizes that are "
                         f"multiples of {patch_size} x the autoencoder downscale.")
    t = z.reshape(b, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return t.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch_size) * (w // patch_size), c * patch_size**2)


def _check_images(images: torch.Tensor, what: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{what} expects images (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}.")


class FaceAutoencoder(nn.Module):
    """One face autoencoder: images [0,1] -> continuous latent (posterior mean) -> images."""

    def __init__(self, cfg: FaceAEConfig):
        super().__init__()
        self.cfg = cfg
        self.ae = build_autoencoder(cfg)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B,3,H,W) in [0,1] -> latent (B, d, H/f, W/f)."""
        _check_images(images, "FaceAutoencoder.encode")
        return self.ae.encode(images * 2.0 - 1.0).latent_dist.mean

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent -> images in [0, 1] (unclamped, so L1 has gradients everywhere)."""
        return (self.ae.decode(z).sample + 1.0) * 0.5

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(images)
        return self.decode(z), z


class FaceAutoencoderPair(nn.Module):
    """The HQ and LQ autoencoders trained by ``bfr train face-ae`` (recon then assoc stage)."""

    def __init__(self, cfg: FaceAEConfig):
        super().__init__()
        self.cfg = cfg
        self.hq = FaceAutoencoder(cfg)
        self.lq = FaceAutoencoder(cfg)

    def tokens(self, z: torch.Tensor) -> torch.Tensor:
        return patchify_latent(z, self.cfg.patch_size)

    @torch.no_grad()
    def init_from_vae(self, vae_state_dict: dict[str, torch.Tensor], source: str = "VAE") -> None:
        """Initialise both autoencoders from a diffusers AutoencoderKL state dict (the SD VAE, §5.1)."""
        own = self.hq.ae.state_dict()
        bad = [k for k in own if k not in vae_state_dict or vae_state_dict[k].shape != own[k].shape]
        if bad:
            raise ValueError(f"Cannot initialise the face autoencoders from {source}: {len(bad)} weights missing or "
                             f"shaped differently (e.g. {bad[:3]}). The face AE topology must equal the VAE's "
                             "(default FaceAEConfig is the SD2.1 VAE), or train from scratch (no init).")
        sub = {k: vae_state_dict[k] for k in own}
        self.hq.ae.load_state_dict(sub)
        self.lq.ae.load_state_dict(sub)

    def enable_gradient_checkpointing(self) -> None:
        self.hq.ae.enable_gradient_checkpointing()
        self.lq.ae.enable_gradient_checkpointing()


class LQFaceEncoder(nn.Module):
    """Inference half of the LQ autoencoder: images -> face tokens z_y (B, N, d) (§4.1, "the LQ encoder is used")."""

    def __init__(self, cfg: FaceAEConfig):
        super().__init__()
        self.cfg = cfg
        ae = build_autoencoder(cfg)
        self.encoder = ae.encoder
        self.quant_conv = ae.quant_conv

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, "LQFaceEncoder")
        moments = self.quant_conv(self.encoder(images * 2.0 - 1.0))
        mean = moments[:, : self.cfg.latent_channels]
        return patchify_latent(mean, self.cfg.patch_size)

    @classmethod
    def from_pair(cls, pair: FaceAutoencoderPair) -> LQFaceEncoder:
        enc = cls(pair.cfg)
        enc.encoder.load_state_dict(pair.lq.ae.encoder.state_dict())
        enc.quant_conv.load_state_dict(pair.lq.ae.quant_conv.state_dict())
        return enc.to(next(pair.parameters()).device)


@dataclass
class AdapterConfig:
    """tau(.): ``num_layers`` linear layers (GELU between) + LayerNorm, token width ``in_dim`` -> ``out_dim`` (1024)."""

    in_dim: int = 64
    out_dim: int = 1024
    hidden_dim: int = 1024
    num_layers: int = 2

    def __post_init__(self):
        for name in ("in_dim", "out_dim", "hidden_dim", "num_layers"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"adapter {name} must be positive, got {getattr(self, name)}.")

    def to_dict(self) -> dict:
        return asdict(self)


class FaceAdapter(nn.Module):
    """c_id = tau(z_y): linear layers with LayerNorm mapping face tokens to text-token width (§4.1)."""

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.cfg = cfg
        dims = [cfg.in_dim] + [cfg.hidden_dim] * (cfg.num_layers - 1) + [cfg.out_dim]
        layers: list[nn.Module] = []
        for i in range(cfg.num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < cfg.num_layers - 1:
                layers.append(nn.GELU())
        self.proj = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(cfg.out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[-1] != self.cfg.in_dim:
            raise ValueError(f"Face adapter expects tokens of width {self.cfg.in_dim}, got {tuple(tokens.shape)}; "
                             "the face embedder and adapter come from different configurations.")
        return self.norm(self.proj(tokens))


def append_face_tokens(text_context: torch.Tensor, face_tokens: torch.Tensor) -> torch.Tensor:
    """c = (c_tx, c_id): face tokens appended after the text tokens on the token axis (§4.1, Eq. 7)."""
    if face_tokens.shape[0] != text_context.shape[0] or face_tokens.shape[-1] != text_context.shape[-1]:
        raise ValueError(f"Face tokens {tuple(face_tokens.shape)} do not fit text context "
                         f"{tuple(text_context.shape)}: batch and width (1024 for SD2.1) must match.")
    return torch.cat([text_context, face_tokens.to(text_context.dtype)], dim=1)


def drop_mask(batch: int, p: float, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Per-sample bool mask, True where the condition is dropped (text p=0.5, face embeddings p=0.3, §5.1)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"Drop probability must be in [0, 1], got {p}.")
    return torch.rand(batch, generator=generator, device=device) < p


def face_context_tokens(
    encoder: LQFaceEncoder, adapter: FaceAdapter, lq_images: torch.Tensor, drop: torch.Tensor | None = None
) -> torch.Tensor:
    """tau(z_y) for LQ images; rows in ``drop`` get tau(0) (the null face embedding, also used as CFG uncond).
    z_y comes from :func:`encode_face` at the images' own size, as in :func:`face_tokens`."""
    z = encode_face(encoder, lq_images)
    if drop is not None and bool(drop.any()):
        z = torch.where(drop.view(-1, 1, 1).to(z.device), torch.zeros_like(z), z)
    return adapter(z)


def null_face_tokens(adapter: FaceAdapter, batch: int, num_tokens: int, device=None, dtype=None) -> torch.Tensor:
    """tau(0): the dropped / unconditional face embedding -- the pack's NEUTRAL face-token set.

    Decision: "no face information" is tau(0), the N tokens the adapter makes from an all-zero z_y, because that is
    what the model is trained on for it: face-embedding dropout (p = 0.3) replaces z_y by 0, and CFG's uncond row
    uses the same tokens. The negative prompt therefore always gets tau(0), so cond and uncond carry the same number
    of tokens and batch together in ComfyUI.

    Neutral is not a no-op, and no appended token set can be one: cross-attention is Softmax(q K^T / sqrt d) V over
    the text keys, and appending tokens adds keys. A token's weight exp(q.k_j / sqrt d) is > 0 for every finite k_j,
    so the text tokens' weights shrink by Z / (Z + sum_j exp(q.k_j / sqrt d)) and the appended values mix in; even
    all-zero tokens (k_j = v_j = 0 without biases) scale the attention output by Z / (Z + N) (tested). So a zero-adapter
    checkpoint WITH a face embedder is not plain SD; what is exact is that it equals plain SD run on the same
    token-extended prompts. A checkpoint WITHOUT a face embedder appends nothing, and with zero LoRA and zero BoostHub
    W_o it is plain SD bit for bit (tests/comfy/test_flipnet_nodes.py, tests/test_flipnet_pipeline.py)."""
    p = next(adapter.parameters())
    z = torch.zeros(batch, num_tokens, adapter.cfg.in_dim, device=device or p.device, dtype=dtype or p.dtype)
    return adapter(z)


def reconstruction_images(pair: FaceAutoencoderPair, hq: torch.Tensor, lq: torch.Tensor):
    """Run both autoencoders: returns (x_hat, y_hat, z_x, z_y) for the recon/assoc objectives."""
    x_hat, z_x = pair.hq(hq)
    y_hat, z_y = pair.lq(lq)
    return x_hat, y_hat, z_x, z_y


def resize_for_face_encoder(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize images to the face encoder's training size (antialiased bicubic when shrinking)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def encode_face(encoder: LQFaceEncoder, images: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """z_y = E_LQ(y): images (B,3,H,W) in [0,1], resized to the encoder's training ``size``, on its device/dtype."""
    p = next(encoder.parameters())
    pixels = resize_for_face_encoder(images, size or images.shape[-1])
    return encoder(pixels.to(p.device, p.dtype))


def face_tokens(encoder: LQFaceEncoder, adapter: FaceAdapter, images: torch.Tensor, size: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(tau(z_y), tau(0)): the face tokens for the conditional branch and the null tokens for the unconditional one
    (§4.1); every inference path (diffusers pipeline, ComfyUI node) computes them here."""
    z = encode_face(encoder, images, size)
    return adapter(z), null_face_tokens(adapter, z.shape[0], z.shape[1])

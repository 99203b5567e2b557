"""Losses for FlipNet training (FlipNet paper §3-4), one pure function per equation.

Images are ``(B, 3, H, W)`` in ``[0, 1]`` unless a docstring says otherwise; latents are VAE latents already
multiplied by the VAE scaling factor.

VGG19 (Eq. 8 and the face-autoencoder perceptual term) is defined here in plain torch with torchvision's layer
indexing, so a user-supplied ``vgg19-*.pth`` / ``.safetensors`` with ``features.<i>.weight`` keys loads without
torchvision. Tests use a randomly initialised VGG19.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

logger = logging.getLogger(__name__)


def ldm_loss(model_out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. (2)/(7): L_ldm = E ||eps - eps_theta(z_t, t, c)||^2 (mean over all elements, fp32)."""
    return F.mse_loss(model_out.float(), target.float())


def image_mse(x: torch.Tensor, x0_hat: torch.Tensor) -> torch.Tensor:
    """Eq. (8), first term: L_mse = ||x - x0_hat||^2 (mean)."""
    return F.mse_loss(x0_hat.float(), x.float())


# --------------------------------------------------------------------------------------------------------------------
# VGG19 perceptual loss (Eq. 8, second term; face-AE L_p)
# --------------------------------------------------------------------------------------------------------------------

# torchvision's VGG19 "E" configuration; "M" is a 2x2 max-pool.
_VGG19_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _vgg19_layer_names() -> list[str]:
    """Names of the ``features`` entries in order: conv1_1, relu1_1, ..., pool5 (torchvision indexing)."""
    names, block, conv = [], 1, 1
    for v in _VGG19_CFG:
        if v == "M":
            names.append(f"pool{block}")
            block, conv = block + 1, 1
        else:
            names += [f"conv{block}_{conv}", f"relu{block}_{conv}"]
            conv += 1
    return names


VGG19_LAYER_NAMES = tuple(_vgg19_layer_names())
DEFAULT_PERCEPTUAL_LAYERS = {"relu1_2": 0.1, "relu2_2": 0.1, "relu3_4": 1.0, "relu4_4": 1.0, "relu5_4": 1.0}


class VGG19Features(nn.Module):
    """VGG19 convolutional backbone phi(.) of Eq. (8), truncated after the deepest requested layer.

    The ``features.<i>`` indices match torchvision's ``vgg19`` so its ImageNet weights load unchanged.
    """

    def __init__(self, layers: Sequence[str] = tuple(DEFAULT_PERCEPTUAL_LAYERS)):
        super().__init__()
        unknown = [name for name in layers if name not in VGG19_LAYER_NAMES]
        if unknown or not layers:
            raise ValueError(f"Unknown VGG19 layer(s) {unknown or list(layers)}; choose from {list(VGG19_LAYER_NAMES)}.")
        self.layers = list(layers)
        last = max(VGG19_LAYER_NAMES.index(name) for name in layers)
        modules: list[nn.Module] = []
        in_ch = 3
        for v in _VGG19_CFG:
            if v == "M":
                modules.append(nn.MaxPool2d(2, 2))
            else:
                modules += [nn.Conv2d(in_ch, v, 3, padding=1), nn.ReLU(inplace=False)]
                in_ch = v
        self.features = nn.Sequential(*modules[: last + 1])
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Images in [0, 1] -> {layer name: activation} after ImageNet normalisation."""
        h = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        out = {}
        wanted = set(self.layers)
        for i, module in enumerate(self.features):
            h = module(h)
            name = VGG19_LAYER_NAMES[i]
            if name in wanted:
                out[name] = h
        return out


VGG19_FILE = "vgg19-dcbb9e9d.pth"  # torchvision's ImageNet VGG19 (IMAGENET1K_V1), 548 MB
VGG19_URL = f"https://download.pytorch.org/models/{VGG19_FILE}"


def torch_hub_vgg19() -> Path:
    """Where torchvision caches its VGG19 download (``$TORCH_HOME/hub/checkpoints/vgg19-dcbb9e9d.pth``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG19_FILE


def vgg19_weights_help(zero_flag: str = "--lambda-perceptual 0") -> str:
    """Which VGG19 file the perceptual loss reads, where to get it, the flag that points at it, and the flag that
    trains without it (every message about missing VGG19 weights ends with this)."""
    cached = torch_hub_vgg19()
    found = f" (there is one there now: --vgg-weights {cached})" if cached.is_file() else ""
    return (f"The VGG19 perceptual loss needs torchvision's ImageNet VGG19 weights, {VGG19_FILE} (548 MB, "
            f"{VGG19_URL}), or a .safetensors with its 'features.<i>.weight/.bias' keys; pass the file with "
            f"--vgg-weights FILE. If torchvision downloaded it before (e.g. for a ComfyUI custom node) it is "
            f"{cached}{found}; ComfyUI's Python has torchvision, and `python -c \"import torchvision; "
            f"torchvision.models.vgg19(weights='IMAGENET1K_V1')\"` downloads it there. Or train without the "
            f"perceptual term: {zero_flag}.")


def load_vgg19_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read VGG19 ``features.*`` weights from a local ``.safetensors`` or ``.pth`` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VGG19 weights file {str(path)!r} does not exist. {vgg19_weights_help()}")
    if path.suffix == ".safetensors":
        sd = load_file(str(path))
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors come in many types
            raise ValueError(
                f"Could not read VGG19 weights {str(path)!r} with torch.load(weights_only=True): {exc}. "
                "Convert the file to .safetensors or use torchvision's plain state dict."
            ) from exc
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"VGG19 weights {str(path)!r} hold a {type(sd).__name__}, expected a state dict.")
    feats = {}
    for key, value in sd.items():
        key = key.removeprefix("module.").removeprefix("vgg.")
        if key.startswith("features."):
            feats[key] = value
    if not feats:
        raise ValueError(
            f"VGG19 weights {str(path)!r} contain no 'features.<i>.weight' keys (found e.g. {list(sd)[:3]}). "
            "Use torchvision's VGG19 state dict layout."
        )
    return feats


class VGGPerceptualLoss(nn.Module):
    """Eq. (8): L_p = sum_l w_l ||phi_l(x) - phi_l(x0_hat)||^2 over VGG19 layers (frozen backbone).

    ``criterion`` is ``"mse"`` (the paper's squared norm) or ``"l1"``.
    """

    def __init__(
        self,
        weights_path: str | Path | None = None,
        layer_weights: dict[str, float] | None = None,
        criterion: str = "mse",
    ):
        super().__init__()
        if criterion not in ("mse", "l1"):
            raise ValueError(f"criterion {criterion!r} is not supported; use 'mse' or 'l1'.")
        self.layer_weights = dict(layer_weights or DEFAULT_PERCEPTUAL_LAYERS)
        self.criterion = criterion
        self.vgg = VGG19Features(tuple(self.layer_weights))
        if weights_path is not None:
            sd = load_vgg19_state_dict(weights_path)
            own = self.vgg.state_dict()
            missing = [k for k in own if k not in sd]
            if missing:
                raise ValueError(f"VGG19 weights {str(weights_path)!r} lack {missing[:4]} (a truncated file?).")
            for key in own:
                if tuple(sd[key].shape) != tuple(own[key].shape):
                    raise ValueError(
                        f"VGG19 weights {str(weights_path)!r}: {key} has shape {tuple(sd[key].shape)}, expected "
                        f"{tuple(own[key].shape)}. Is this a VGG19 (not VGG16) file?"
                    )
            self.vgg.load_state_dict({k: sd[k] for k in own})
        else:
            logger.warning("VGG19 perceptual loss uses random weights (no weights file given): fine for tests only.")
        self.vgg.requires_grad_(False)
        self.vgg.eval()

    def train(self, mode: bool = True):
        """Keep the frozen backbone in eval mode."""
        super().train(mode)
        self.vgg.eval()
        return self

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        feats_x = self.vgg(x.float())
        feats_hat = self.vgg(x_hat.float())
        fn = F.mse_loss if self.criterion == "mse" else F.l1_loss
        total = x.new_zeros((), dtype=torch.float32)
        for name, weight in self.layer_weights.items():
            total = total + weight * fn(feats_hat[name], feats_x[name].detach())
        return total


# --------------------------------------------------------------------------------------------------------------------
# Face autoencoder: reconstruction (L_ae) and association (Eq. 6)
# --------------------------------------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (per-patch real/fake logits) for the adversarial term of L_ae.

    GroupNorm instead of BatchNorm so multi-process training needs no SyncBatchNorm.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, n_layers: int = 3):
        super().__init__()
        if n_layers < 1 or base_channels < 8:
            raise ValueError(f"PatchDiscriminator needs n_layers >= 1 and base_channels >= 8, got {n_layers}, "
                             f"{base_channels}.")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = base_channels
        for i in range(1, n_layers + 1):
            out = base_channels * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), nn.GroupNorm(min(32, out // 4), out),
                       nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> patch logits (B, 1, h, w)."""
        return self.net(images * 2.0 - 1.0)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: E[relu(1 - D(x))] + E[relu(1 + D(x_hat))], halved."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def generator_adv_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the adversarial term L_adv = -E[D(x_hat)]."""
    return -logits_fake.float().mean()


def reconstruction_loss(
    images: torch.Tensor,
    recon: torch.Tensor,
    perceptual: torch.Tensor,
    adversarial: torch.Tensor,
    lambda_p: float = 0.5,
    lambda_adv: float = 0.8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L_ae = L_1 + lambda_p L_p + lambda_adv L_adv (FlipNet §4.1a; 0.5 and 0.8). Returns (L_ae, L_1)."""
    l1 = F.l1_loss(recon.float(), images.float())
    return l1 + lambda_p * perceptual + lambda_adv * adversarial, l1


def patch_similarity(z_x: torch.Tensor, z_y: torch.Tensor, temperature: float | None = 0.07) -> torch.Tensor:
    """M = z_x z_y^T per image over flattened patches (B, N, d) -> (B, N, N) (FlipNet §4.1b).

    With ``temperature`` the patch vectors are L2-normalised first and M is divided by it (CLIP); ``None`` gives the
    raw dot product of the paper's text.
    """
    if z_x.shape != z_y.shape or z_x.ndim != 3:
        raise ValueError(f"HQ and LQ patch tokens must both be (B, N, d) and equal, got {tuple(z_x.shape)} and "
                         f"{tuple(z_y.shape)}.")
    if temperature is None:
        return z_x.float() @ z_y.float().transpose(1, 2)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (or None for raw dot products), got {temperature}.")
    zx = F.normalize(z_x.float(), dim=-1)
    zy = F.normalize(z_y.float(), dim=-1)
    return zx @ zy.transpose(1, 2) / temperature


def symmetric_patch_ce(similarity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (6) in both directions: CE with labels on the diagonal over rows (L_CE^x) and columns (L_CE^y)."""
    b, n, _ = similarity.shape
    labels = torch.arange(n, device=similarity.device).repeat(b)
    ce_x = F.cross_entropy(similarity.reshape(b * n, n), labels)
    ce_y = F.cross_entropy(similarity.transpose(1, 2).reshape(b * n, n), labels)
    return ce_x, ce_y


def association_loss(l_ae: torch.Tensor, ce_x: torch.Tensor, ce_y: torch.Tensor) -> torch.Tensor:
    """L_asso = L_ae + (L_CE^x + L_CE^y) / 2 (FlipNet §4.1b)."""
    return l_ae + 0.5 * (ce_x + ce_y)


def restoration_loss(
    l_ldm: torch.Tensor, l_mse: torch.Tensor, l_p: torch.Tensor, lambda_mse: float = 1.0, lambda_p: float = 0.01
) -> torch.Tensor:
    """L_r = L_ldm + lambda_mse L_mse + lambda_p L_p (FlipNet §4.1; 1.0 and 0.01)."""
    return l_ldm + lambda_mse * l_mse + lambda_p * l_p

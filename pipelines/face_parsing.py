"""Face parsing (19 CelebAMask-HQ classes) and the parse-based paste-back mask, our own implementation.

Two networks, written here from their published architecture so that they load, key for key, the weight files that
face-restoration users already have in ``ComfyUI/models/facedetection/`` (the facexlib / CodeFormer release layout,
downloaded there by facerestore_cf, ReActor, CodeFormer, GFPGAN and facexlib):

- ``parsing_parsenet.pth``: ParseNet (from PSFRGAN, Chen et al. 2021): a reflection-padded residual encoder / body /
  decoder at 512x512 with a 19-class parsing head and an image head; RGB input normalised with mean 0.5 / std 0.5.
  This is the network facexlib's and CodeFormer's ``FaceRestoreHelper`` use for ``use_parse=True`` paste-back.
- ``parsing_bisenet.pth``: BiSeNet (Yu et al. 2018) with a ResNet-18 context path (the face-parsing.PyTorch model),
  512x512, 19 classes; RGB input with ImageNet normalisation.

The two were trained with *different* orders of the same 19 CelebAMask-HQ labels. :class:`FaceParser` always
reports the BiSeNet / face-parsing.PyTorch order (:data:`CLASS_NAMES`: 0 background, 1 skin, 2 l_brow, 3 r_brow,
4 l_eye, 5 r_eye, 6 eye_g, 7 l_ear, 8 r_ear, 9 ear_r, 10 nose, 11 mouth, 12 u_lip, 13 l_lip, 14 neck, 15 neck_l,
16 cloth, 17 hair, 18 hat) and remaps ParseNet's output (:data:`PARSENET_CLASS_NAMES`, the order of CelebAMask-HQ's
``g_mask.py`` that PSFRGAN trained on) to it, so a class index means the same thing whichever file is loaded.

The paste-back mask (:func:`labels_to_mask`) is the one facexlib / CodeFormer compute: the kept classes set to 1
(:data:`FACE_CLASSES`: their ``MASK_COLORMAP`` on ParseNet labels, which keeps the face, ears, earrings *and hair*,
and drops background, hat, necklace, neck and cloth), a 101x101 Gaussian blur with sigma 11 applied twice, a 10 px
border set to 0, all at 512 px and scaled proportionally for other sizes.

Files trained under DataParallel carry a ``module.`` prefix on every key; it is stripped. ``.pth`` files are read
with ``torch.load(weights_only=True)`` only, so a pickle that carries code is refused and never executed;
``.safetensors`` copies of the same state dict load too. No dependency on facexlib, basicsr or torchvision.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .weights import layout_problems, read_state_dict, short_list

logger = logging.getLogger(__name__)

__all__ = [
    "CLASS_NAMES", "FACE_CLASSES", "NUM_CLASSES", "PARSENET_CLASS_NAMES", "PARSERS", "BiSeNet", "FaceParser",
    "FaceParsingWeightsError", "ParseNet", "build_parser", "canonical_arch", "labels_to_mask", "load_parser",
]

#: Supported networks and the file name under which their released weights are distributed.
PARSERS: dict[str, str] = {"parsenet": "parsing_parsenet.pth", "bisenet": "parsing_bisenet.pth"}

_ARCH_ALIASES = {
    "parsenet": "parsenet", "parsing_parsenet": "parsenet", "parsing_parsenet.pth": "parsenet",
    "bisenet": "bisenet", "parsing_bisenet": "bisenet", "parsing_bisenet.pth": "bisenet",
}

NUM_CLASSES = 19

#: Class order of every label map this module returns (BiSeNet / face-parsing.PyTorch order of CelebAMask-HQ).
CLASS_NAMES: tuple[str, ...] = (
    "background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r",
    "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat",
)

#: Native output order of ParseNet (CelebAMask-HQ ``g_mask.py`` label list with background first, as PSFRGAN and
#: facexlib's ``inference_parsing_parsenet.py`` document it). Remapped to :data:`CLASS_NAMES` by :class:`FaceParser`.
PARSENET_CLASS_NAMES: tuple[str, ...] = (
    "background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
    "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth",
)

#: Classes (in :data:`CLASS_NAMES` order) that the paste-back mask keeps: skin, brows, eyes, eyeglasses, ears,
#: earrings, nose, mouth, lips and hair. Background, neck, necklace, cloth and hat are dropped. This is facexlib /
#: CodeFormer's ``MASK_COLORMAP`` (255 for ParseNet classes 1..13 and 15) translated from ParseNet's label order.
#: Pass ``classes=`` to :func:`labels_to_mask` / :meth:`FaceParser.face_mask` for another set (e.g. without hair).
FACE_CLASSES: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 17)

# facexlib's paste-mask constants, defined for a 512 px crop.
_REF_SIZE = 512
_BLUR_KERNEL = 101
_BLUR_SIGMA = 11.0
_BORDER = 10

_MEAN_STD = {
    "parsenet": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "bisenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

_FIX = ("put parsing_parsenet.pth or parsing_bisenet.pth (the face-parsing weights facexlib, CodeFormer, "
        "facerestore_cf and ReActor download) into ComfyUI/models/facedetection/")


class FaceParsingWeightsError(ValueError):
    """A face-parsing weight file that is missing, unreadable, unsafe or of the wrong layout; the message names the
    file, its folder, what is wrong and the fix."""


def canonical_arch(arch: str) -> str:
    """``"parsenet"`` or ``"bisenet"`` for any accepted spelling (also the release file names)."""
    key = str(arch).strip().lower()
    if key not in _ARCH_ALIASES:
        raise ValueError(f"unknown face-parsing network {arch!r}; expected one of {sorted(PARSERS)}")
    return _ARCH_ALIASES[key]


# ------------------------------------------------------------------------------------------------------- ParseNet
class _BatchNormSlot(nn.Module):
    """Holds the BatchNorm under the attribute name ``norm`` (the released keys read ``...norm.norm.weight``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class _PadConv(nn.Module):
    """[nearest x2 up] -> reflection pad 1 -> 3x3 conv (stride 2 for "down") -> [BatchNorm] -> [LeakyReLU 0.2].

    With BatchNorm the conv has no bias. Keys: ``conv2d.weight`` (+ ``conv2d.bias``), ``norm.norm.*``.
    """

    def __init__(self, cin: int, cout: int, resample: str | None = None, norm: bool = False,
                 act: bool = False) -> None:
        super().__init__()
        self.upsample = resample == "up"
        self.reflection_pad = nn.ReflectionPad2d(1)
        self.conv2d = nn.Conv2d(cin, cout, 3, stride=2 if resample == "down" else 1, bias=not norm)
        self.norm = _BatchNormSlot(cout) if norm else nn.Identity()
        self.act = nn.LeakyReLU(0.2, inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.act(self.norm(self.conv2d(self.reflection_pad(x))))


class _ParseResBlock(nn.Module):
    """Residual block: conv1 (BN + LeakyReLU; does the upsampling) -> conv2 (BN; does the stride-2 downsampling),
    plus a plain conv shortcut (``shortcut_func``) whenever the size or width changes."""

    def __init__(self, cin: int, cout: int, resample: str | None = None) -> None:
        super().__init__()
        self.shortcut_func = _PadConv(cin, cout, resample) if (resample or cin != cout) else nn.Identity()
        self.conv1 = _PadConv(cin, cout, "up" if resample == "up" else None, norm=True, act=True)
        self.conv2 = _PadConv(cout, cout, "down" if resample == "down" else None, norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut_func(x) + self.conv2(self.conv1(x))


class ParseNet(nn.Module):
    """ParseNet as released for 512x512 faces (in_size = out_size = 512, min_feat_size 32, base width 64, widths
    clipped to [32, 256], 10 body blocks, 19 classes): 4 stride-2 residual blocks down to 32x32, a residual body
    (``feat + body(feat)``), 4 upsampling blocks back to 512x512, then a 3x3 parsing head and a 3x3 image head.

    ``forward(x)`` takes RGB normalised to [-1, 1] and returns the logits (B, 19, H, W) in
    :data:`PARSENET_CLASS_NAMES` order; ``return_image=True`` also returns the reconstructed image.
    """

    class_names = PARSENET_CLASS_NAMES

    def __init__(self, num_classes: int = NUM_CLASSES, size: int = 512, min_feat_size: int = 32, base_ch: int = 64,
                 ch_range: tuple[int, int] = (32, 256), res_depth: int = 10) -> None:
        super().__init__()

        def clip(c: int) -> int:
            return max(ch_range[0], min(c, ch_range[1]))

        steps = int(math.log2(size // min(size, min_feat_size)))
        width = base_ch
        encoder: list[nn.Module] = [_PadConv(3, base_ch)]
        for _ in range(steps):
            encoder.append(_ParseResBlock(clip(width), clip(width * 2), "down"))
            width *= 2
        body = [_ParseResBlock(clip(width), clip(width)) for _ in range(res_depth)]
        decoder: list[nn.Module] = []
        for _ in range(steps):
            decoder.append(_ParseResBlock(clip(width), clip(width // 2), "up"))
            width //= 2
        self.encoder = nn.Sequential(*encoder)
        self.body = nn.Sequential(*body)
        self.decoder = nn.Sequential(*decoder)
        self.out_img_conv = _PadConv(clip(width), 3)
        self.out_mask_conv = _PadConv(clip(width), num_classes)

    def forward(self, x: torch.Tensor, return_image: bool = False):
        feat = self.encoder(x)
        feat = self.decoder(feat + self.body(feat))
        logits = self.out_mask_conv(feat)
        return (logits, self.out_img_conv(feat)) if return_image else logits


# -------------------------------------------------------------------------------------------------------- BiSeNet
class _ConvBNReLU(nn.Module):
    """k x k conv (no bias, "same" padding) -> BatchNorm -> ReLU. Keys ``conv.weight``, ``bn.*``."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class _BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 conv + BN, identity or 1x1-conv + BN ``downsample`` shortcut, ReLU after add)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(out + skip)


class _ResNet18(nn.Module):
    """ResNet-18 trunk without the classifier; returns the stride 8, 16 and 32 features (128, 256, 512 ch)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        widths = (64, 64, 128, 256, 512)
        for i in range(1, 5):
            stride = 1 if i == 1 else 2
            layer = nn.Sequential(_BasicBlock(widths[i - 1], widths[i], stride), _BasicBlock(widths[i], widths[i]))
            self.add_module(f"layer{i}", layer)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        s8 = self.layer2(self.layer1(x))
        s16 = self.layer3(s8)
        return s8, s16, self.layer4(s16)


def _global_pool(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3), keepdim=True)


class _AttentionRefinement(nn.Module):
    """3x3 ConvBNReLU, then a channel gate: sigmoid(BN(1x1 conv(global average)))."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = _ConvBNReLU(cin, cout, 3)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        return feat * torch.sigmoid(self.bn_atten(self.conv_atten(_global_pool(feat))))


class _ContextPath(nn.Module):
    """ResNet-18 + attention refinement at strides 32 and 16 with a global-context term; returns the stride-8
    trunk feature and the refined features at strides 8 and 16 (128 channels each)."""

    def __init__(self) -> None:
        super().__init__()
        self.resnet = _ResNet18()
        self.arm16 = _AttentionRefinement(256, 128)
        self.arm32 = _AttentionRefinement(512, 128)
        self.conv_head32 = _ConvBNReLU(128, 128, 3)
        self.conv_head16 = _ConvBNReLU(128, 128, 3)
        self.conv_avg = _ConvBNReLU(512, 128, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s8, s16, s32 = self.resnet(x)
        top = self.arm32(s32) + self.conv_avg(_global_pool(s32))  # the 1x1 context broadcasts over the map
        up32 = self.conv_head32(F.interpolate(top, size=s16.shape[2:], mode="nearest"))
        mid = self.arm16(s16) + up32
        up16 = self.conv_head16(F.interpolate(mid, size=s8.shape[2:], mode="nearest"))
        return s8, up16, up32


class _FeatureFusion(nn.Module):
    """Concatenate, 1x1 ConvBNReLU, then ``feat + feat * gate`` with a squeeze-excite gate (reduction 4)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.convblk = _ConvBNReLU(cin, cout, 1)
        self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([a, b], dim=1))
        gate = torch.sigmoid(self.conv2(F.relu(self.conv1(_global_pool(feat)))))
        return feat + feat * gate


class _SegHead(nn.Module):
    """3x3 ConvBNReLU to ``mid`` channels, then a 1x1 classifier without bias."""

    def __init__(self, cin: int, mid: int, num_classes: int) -> None:
        super().__init__()
        self.conv = _ConvBNReLU(cin, mid, 3)
        self.conv_out = nn.Conv2d(mid, num_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """BiSeNet with a ResNet-18 context path, the stride-8 trunk feature standing in for the spatial path, feature
    fusion, a main head at stride 8 and two auxiliary (training) heads.

    ``forward(x)`` takes RGB with ImageNet normalisation and returns the main logits (B, 19, H, W), bilinearly
    upsampled (align_corners=True) to the input size, in :data:`CLASS_NAMES` order; ``aux=True`` also returns the
    two auxiliary logits.
    """

    class_names = CLASS_NAMES

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.cp = _ContextPath()
        self.ffm = _FeatureFusion(256, 256)
        self.conv_out = _SegHead(256, 256, num_classes)
        self.conv_out16 = _SegHead(128, 64, num_classes)
        self.conv_out32 = _SegHead(128, 64, num_classes)

    def forward(self, x: torch.Tensor, aux: bool = False):
        size = x.shape[2:]
        s8, cp8, cp16 = self.cp(x)
        out = F.interpolate(self.conv_out(self.ffm(s8, cp8)), size=size, mode="bilinear", align_corners=True)
        if not aux:
            return out
        out16 = F.interpolate(self.conv_out16(cp8), size=size, mode="bilinear", align_corners=True)
        out32 = F.interpolate(self.conv_out32(cp16), size=size, mode="bilinear", align_corners=True)
        return out, out16, out32


def build_parser(arch: str) -> nn.Module:
    """A randomly initialised ParseNet or BiSeNet (eval mode) whose state dict has the released layout."""
    arch = canonical_arch(arch)
    net = ParseNet() if arch == "parsenet" else BiSeNet()
    return net.eval()


# ------------------------------------------------------------------------------------------------- paste-back mask
def _mask_params(crop_size: int) -> tuple[int, float, int]:
    """(kernel, sigma, border) of facexlib's 512 px recipe scaled to ``crop_size``; the kernel stays odd."""
    scale = crop_size / _REF_SIZE
    kernel = 2 * int(round((_BLUR_KERNEL // 2) * scale)) + 1
    return kernel, _BLUR_SIGMA * scale, int(round(_BORDER * scale))


def _gaussian_taps(kernel: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Normalised 1-D Gaussian taps as cv2.getGaussianKernel gives them for sigma > 0."""
    x = torch.arange(kernel, dtype=torch.float64) - (kernel - 1) / 2
    taps = torch.exp(-(x * x) / (2.0 * sigma * sigma))
    return (taps / taps.sum()).to(device=device, dtype=dtype)


def _blur(x: torch.Tensor, kernel: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, H, W) with mirrored borders (cv2's default BORDER_REFLECT_101)."""
    if kernel <= 1 or sigma <= 0:
        return x
    pad = kernel // 2
    taps = _gaussian_taps(kernel, sigma, x.dtype, x.device)
    h, w = x.shape[-2:]
    mode = "reflect" if pad < min(h, w) else "replicate"  # reflection needs the map wider than the pad
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode=mode), taps.view(1, 1, 1, kernel))
    return F.conv2d(F.pad(x, (0, 0, pad, pad), mode=mode), taps.view(1, 1, kernel, 1))


def labels_to_mask(labels: torch.Tensor, crop_size: int, classes: Iterable[int] = FACE_CLASSES) -> torch.Tensor:
    """facexlib / CodeFormer's parse paste-back mask from a label map (:data:`CLASS_NAMES` order).

    Pixels of ``classes`` are 1, the rest 0; then a Gaussian blur (101 x 101, sigma 11) twice, and a 10 px border
    set to 0. The three constants are those of a 512 px crop, multiplied by ``crop_size / 512`` (``crop_size`` is
    the side of the crop in pixels of ``labels``, normally ``labels.shape[-1]``).

    Args:
        labels: (B, H, W) or (H, W) integer class map.
        crop_size: the pixel scale the constants refer to.
        classes: class indices kept in the mask (default :data:`FACE_CLASSES`).

    Returns:
        float32 mask in [0, 1] with the shape of ``labels``.
    """
    if labels.dim() not in (2, 3):
        raise ValueError(f"labels must be (B, H, W) or (H, W), got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be an integer class map, got dtype {labels.dtype}")
    if int(crop_size) <= 0:
        raise ValueError(f"crop_size must be positive, got {crop_size}")
    keep = torch.zeros(max(NUM_CLASSES, int(labels.max()) + 1 if labels.numel() else 0), dtype=torch.bool,
                       device=labels.device)
    kept = sorted({int(c) for c in classes})
    if kept and (kept[0] < 0 or kept[-1] >= NUM_CLASSES):
        raise ValueError(f"classes must lie in 0..{NUM_CLASSES - 1}, got {kept}")
    keep[kept] = True
    squeeze = labels.dim() == 2
    lab = labels.unsqueeze(0) if squeeze else labels
    mask = keep[lab.long().clamp_min(0)].to(torch.float32).unsqueeze(1)
    kernel, sigma, border = _mask_params(int(crop_size))
    mask = _blur(_blur(mask, kernel, sigma), kernel, sigma)
    if border > 0:
        mask[..., :border, :] = 0
        mask[..., -border:, :] = 0
        mask[..., :, :border] = 0
        mask[..., :, -border:] = 0
    mask = mask.squeeze(1).clamp_(0.0, 1.0)
    return mask[0] if squeeze else mask


# ---------------------------------------------------------------------------------------------------- the parser
class FaceParser:
    """Runs a loaded ParseNet / BiSeNet on aligned face crops and turns its output into label maps and masks.

    Args:
        net: a network from :func:`build_parser` (or :func:`load_parser`).
        arch: ``"parsenet"`` or ``"bisenet"`` (selects the input normalisation and the class remapping).
        device, dtype: where and in which precision the network runs (fp16 / bf16 allowed; outputs are fp32).
        input_size: the square size crops are resized to for the network (512 for the released weights).
        batch_size: crops per forward pass.
    """

    def __init__(self, net: nn.Module, arch: str, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, input_size: int = _REF_SIZE, batch_size: int = 8) -> None:
        self.arch = canonical_arch(arch)
        self.device = torch.device(device)
        self.dtype = dtype
        self.net = net.eval().to(device=self.device, dtype=dtype)
        self.input_size = int(input_size)
        self.batch_size = max(1, int(batch_size))
        mean, std = _MEAN_STD[self.arch]
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        native = getattr(net, "class_names", PARSENET_CLASS_NAMES if self.arch == "parsenet" else CLASS_NAMES)
        # channel c of the canonical logits is channel _order[c] of the network's own output
        self._order = None if tuple(native) == CLASS_NAMES else torch.tensor([native.index(n) for n in CLASS_NAMES])

    def __repr__(self) -> str:
        return (f"FaceParser(arch={self.arch!r}, device={str(self.device)!r}, dtype={self.dtype}, "
                f"input_size={self.input_size})")

    def _check(self, crops: torch.Tensor) -> torch.Tensor:
        if not isinstance(crops, torch.Tensor) or crops.dim() != 4 or crops.shape[1] != 3:
            shape = tuple(crops.shape) if isinstance(crops, torch.Tensor) else type(crops).__name__
            raise ValueError(f"crops must be a (B, 3, H, W) RGB tensor, got {shape}")
        if crops.shape[0] == 0 or min(crops.shape[2:]) == 0:
            raise ValueError(f"crops must not be empty, got shape {tuple(crops.shape)}")
        if not crops.is_floating_point():
            crops = crops.float() / 255.0 if crops.dtype == torch.uint8 else crops.float()
        return crops

    def _run(self, crops: torch.Tensor) -> torch.Tensor:
        """Canonical-order fp32 logits (B, 19, S, S) at ``input_size`` on the model's device."""
        size = self.input_size
        outs = []
        with torch.inference_mode():
            for start in range(0, crops.shape[0], self.batch_size):
                x = crops[start:start + self.batch_size].to(self.device, torch.float32).clamp(0.0, 1.0)
                if tuple(x.shape[2:]) != (size, size):
                    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
                x = (x - self._mean.to(x.device)) / self._std.to(x.device)
                logits = self.net(x.to(self.dtype)).float()
                if self._order is not None:
                    logits = logits[:, self._order.to(logits.device)]
                outs.append(logits)
            return torch.cat(outs)

    def logits(self, crops: torch.Tensor) -> torch.Tensor:
        """(B, 19, input_size, input_size) fp32 logits in :data:`CLASS_NAMES` order, on the crops' device."""
        crops = self._check(crops)
        return self._run(crops).to(crops.device).clone()

    def _labels_native(self, crops: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self._run(crops).argmax(dim=1)

    def labels(self, crops: torch.Tensor) -> torch.Tensor:
        """(B, H, W) int64 class map (:data:`CLASS_NAMES` order) of RGB crops (B, 3, H, W) in [0, 1].

        The crops are resized (bilinear) to ``input_size`` for the network and the labels back (nearest)."""
        crops = self._check(crops)
        h, w = crops.shape[2:]
        with torch.inference_mode():
            lab = self._labels_native(crops)
            if tuple(lab.shape[1:]) != (h, w):
                lab = F.interpolate(lab[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
        return lab.to(crops.device).clone()

    def face_mask(self, crops: torch.Tensor, classes: Iterable[int] = FACE_CLASSES) -> torch.Tensor:
        """(B, H, W) fp32 paste-back mask in [0, 1], computed as facexlib / CodeFormer do it.

        The mask is made at the network's resolution by :func:`labels_to_mask` (for the 512 weights exactly the
        101 / 11 / 10 px recipe) and resized bilinearly to (H, W), so blur and border scale with H / 512.
        """
        crops = self._check(crops)
        h, w = crops.shape[2:]
        with torch.inference_mode():
            mask = labels_to_mask(self._labels_native(crops), self.input_size, classes)
            if tuple(mask.shape[1:]) != (h, w):
                mask = F.interpolate(mask[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
            mask = mask.clamp_(0.0, 1.0)
        return mask.to(crops.device).clone()


# ---------------------------------------------------------------------------------------------------- loading
def _fail(path: Path, what: str) -> FaceParsingWeightsError:
    return FaceParsingWeightsError(f"face-parsing weights {path.name!r} in folder {str(path.parent)!r}: {what}. "
                                   f"Fix: {_FIX}.")


def _infer_arch(sd: Mapping[str, torch.Tensor]) -> str | None:
    if "cp.resnet.conv1.weight" in sd or "ffm.convblk.conv.weight" in sd:
        return "bisenet"
    if "encoder.0.conv2d.weight" in sd or "out_mask_conv.conv2d.weight" in sd:
        return "parsenet"
    return None


def load_parser(path: str | Path, arch: str | None = None, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> FaceParser:
    """Load ``parsing_parsenet.pth`` / ``parsing_bisenet.pth`` (``.pth`` via weights_only, or ``.safetensors``).

    ``arch`` is read from the keys when None; when given it must agree with them. Any problem (missing,
    unreadable, pickled code, unknown layout, missing / unexpected keys, wrong shapes) raises
    :class:`FaceParsingWeightsError` naming the file, the folder and the fix.
    """
    path = Path(path)
    sd = read_state_dict(path, _fail)
    found = _infer_arch(sd)
    if found is None:
        raise _fail(path, f"these are not ParseNet or BiSeNet face-parsing weights (keys: {short_list(list(sd))})")
    if arch is not None and canonical_arch(arch) != found:
        raise _fail(path, f"the file holds {found} weights but arch={arch!r} was asked; pass arch={found!r} or None")
    net = build_parser(found)
    expected = net.state_dict()
    problems, optional = layout_problems(sd, expected)
    if problems:
        raise _fail(path, f"not the released {found} layout ({problems})")
    net.load_state_dict({**{k: expected[k] for k in optional}, **sd}, strict=True)
    logger.info("loaded %s face parser from %s (%d tensors; %s, %s)", found, path, len(sd), device, dtype)
    return FaceParser(net, found, device=device, dtype=dtype)

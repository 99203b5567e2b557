"""RetinaFace face detector (boxes, scores and 5 landmarks), our own implementation of the released weight layout.

RetinaFace (Deng et al., 2019, arXiv:1905.00641) with a ResNet-50 or a MobileNet-0.25 backbone, an FPN over
strides 8/16/32, one SSH context module per level and 1x1 class / box / landmark heads with two anchors per
location. The network here is written from the published architecture so that it loads, key for key, the weight
files of the biubug6 Pytorch_Retinaface / facexlib layout that users of facerestore_cf, ReActor, CodeFormer,
GFPGAN and facexlib already have:

- ``detection_Resnet50_Final.pth`` (ResNet-50, ~27.3 M parameters; keys ``body.conv1.*``, ``body.layer1.0.*`` ...
  as torchvision's resnet50 seen through IntermediateLayerGetter),
- ``detection_mobilenet0.25_Final.pth`` (MobileNet-0.25, ~0.43 M parameters; keys ``body.stage1.0.0.*`` ...).

In ComfyUI they live in ``models/facedetection/``. Files trained under DataParallel carry a ``module.`` prefix on
every key; it is stripped. ``.pth`` files are read with ``torch.load(weights_only=True)`` only, so a pickle that
carries code is refused and never executed; ``.safetensors`` copies of the same state dict load too.

Input convention of the weights: BGR pixels in [0, 255] minus the mean (104, 117, 123), no scaling.
``RetinaFaceDetector.detect`` takes RGB images (uint8, or float in [0, 1]) and does that conversion itself.
The five landmarks are, in this order: left eye, right eye, nose tip, left mouth corner, right mouth corner,
"left" meaning the image left (as facexlib uses them), which maps directly onto the FFHQ 5-point template.

No dependency on facexlib, basicsr, insightface, onnxruntime or torchvision: the ResNet-50 body, prior boxes,
decoding and NMS are all here, in torch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .weights import layout_problems, read_state_dict, short_list

logger = logging.getLogger(__name__)

__all__ = [
    "ARCHS", "BGR_MEAN", "MIN_SIZES", "STEPS", "VARIANCES", "RetinaFace", "RetinaFaceDetector",
    "RetinaFaceWeightsError", "build_retinaface", "canonical_arch", "decode_boxes", "decode_landmarks",
    "load_retinaface", "nms", "prior_boxes",
]

#: Supported backbones and the file name under which their released weights are distributed.
ARCHS: dict[str, str] = {"resnet50": "detection_Resnet50_Final.pth", "mobilenet0.25": "detection_mobilenet0.25_Final.pth"}

# Spellings used by other packs / configs for the same two networks.
_ARCH_ALIASES = {
    "resnet50": "resnet50", "resnet-50": "resnet50", "retinaface_resnet50": "resnet50",
    "mobilenet0.25": "mobilenet0.25", "mobile0.25": "mobilenet0.25", "mobilenet": "mobilenet0.25",
    "mobilenet-0.25": "mobilenet0.25", "retinaface_mobile0.25": "mobilenet0.25",
}

# Per-arch settings of the released models (cfg_re50 / cfg_mnet): width of the backbone stage feeding the first FPN
# level divided by two ("in_channel"), FPN/SSH width ("out_channel"). Anchors and decoding are shared.
_ARCH_CFG = {
    "resnet50": {"in_channel": 256, "out_channel": 256},
    "mobilenet0.25": {"in_channel": 32, "out_channel": 64},
}
MIN_SIZES: tuple[tuple[int, ...], ...] = ((16, 32), (64, 128), (256, 512))
STEPS: tuple[int, ...] = (8, 16, 32)
VARIANCES: tuple[float, float] = (0.1, 0.2)
NUM_ANCHORS = 2
BGR_MEAN: tuple[float, float, float] = (104.0, 117.0, 123.0)

# Candidates kept before / after NMS (the values of the reference detect script), so that a noisy score map cannot
# make NMS quadratic in the number of priors.
PRE_NMS_TOP_K = 5000
POST_NMS_TOP_K = 750

_FIX = ("put detection_Resnet50_Final.pth or detection_mobilenet0.25_Final.pth (the files facexlib, CodeFormer, "
        "facerestore_cf and ReActor download) into ComfyUI/models/facedetection/")


class RetinaFaceWeightsError(ValueError):
    """A RetinaFace weight file that is missing, unreadable, unsafe or of the wrong layout; the message names the
    file, its folder, what is wrong and the fix."""


def canonical_arch(arch: str) -> str:
    """``arch`` in the spelling of :data:`ARCHS` ("resnet50" / "mobilenet0.25"); aliases such as facexlib's
    "mobile0.25" are accepted."""
    key = _ARCH_ALIASES.get(str(arch).strip().lower())
    if key is None:
        raise ValueError(f"unknown RetinaFace arch {arch!r}; expected one of {sorted(ARCHS)}")
    return key


# ------------------------------------------------------------------------------------------------- building blocks


def _conv_norm(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
               slope: float | None = None) -> list[nn.Module]:
    """Bias-free conv + BatchNorm (+ LeakyReLU with ``slope`` unless None) as a flat module list."""
    mods: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(cout)]
    if slope is not None:
        mods.append(nn.LeakyReLU(slope, inplace=True))
    return mods


def _cbr(cin: int, cout: int, kernel: int = 3, stride: int = 1, slope: float | None = 0.0) -> nn.Sequential:
    """Keys ``0.weight`` (conv) and ``1.*`` (norm)."""
    return nn.Sequential(*_conv_norm(cin, cout, kernel, stride, slope=slope))


def _depthwise_separable(cin: int, cout: int, stride: int, slope: float = 0.1) -> nn.Sequential:
    """3x3 depthwise conv/BN/act then 1x1 pointwise conv/BN/act: keys ``0``/``1`` and ``3``/``4``."""
    return nn.Sequential(*_conv_norm(cin, cin, 3, stride, groups=cin, slope=slope),
                         *_conv_norm(cin, cout, 1, 1, slope=slope))


class _MobileNetBody(nn.Module):
    """MobileNet-V1 at width 0.25 up to its last 256-channel stage; returns the stride-8/16/32 features."""

    def __init__(self) -> None:
        super().__init__()
        widths1 = [(8, 16, 1), (16, 32, 2), (32, 32, 1), (32, 64, 2), (64, 64, 1)]
        self.stage1 = nn.Sequential(_cbr(3, 8, 3, 2, slope=0.1),
                                    *(_depthwise_separable(a, b, s) for a, b, s in widths1))
        self.stage2 = nn.Sequential(_depthwise_separable(64, 128, 2),
                                    *(_depthwise_separable(128, 128, 1) for _ in range(5)))
        self.stage3 = nn.Sequential(_depthwise_separable(128, 256, 2), _depthwise_separable(256, 256, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c3 = self.stage1(x)
        c4 = self.stage2(c3)
        return [c3, c4, self.stage3(c4)]


class _Bottleneck(nn.Module):
    """ResNet bottleneck (1x1, 3x3 with the stride, 1x1 x4) with the attribute names torchvision uses."""

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        skip = x if self.downsample is None else self.downsample(x)
        return self.relu(y + skip)


class _ResNet50Body(nn.Module):
    """ResNet-50 stem and layer1..layer4 (no pooling head); returns the layer2/3/4 features (strides 8/16/32)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (width, blocks, stride) in enumerate([(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], start=1):
            layer = []
            for b in range(blocks):
                layer.append(_Bottleneck(cin, width, stride if b == 0 else 1))
                cin = width * 4
            setattr(self, f"layer{i}", nn.Sequential(*layer))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        return [c3, c4, self.layer4(c4)]


class _FPN(nn.Module):
    """Lateral 1x1 convs (output1..3) and top-down nearest upsampling merged by 3x3 convs (merge2, then merge1)."""

    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        slope = 0.1 if out_channels <= 64 else 0.0
        self.output1 = _cbr(in_channels[0], out_channels, 1, slope=slope)
        self.output2 = _cbr(in_channels[1], out_channels, 1, slope=slope)
        self.output3 = _cbr(in_channels[2], out_channels, 1, slope=slope)
        self.merge1 = _cbr(out_channels, out_channels, 3, slope=slope)
        self.merge2 = _cbr(out_channels, out_channels, 3, slope=slope)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        p3, p4, p5 = self.output1(feats[0]), self.output2(feats[1]), self.output3(feats[2])
        p4 = self.merge2(p4 + F.interpolate(p5, size=p4.shape[-2:], mode="nearest"))
        p3 = self.merge1(p3 + F.interpolate(p4, size=p3.shape[-2:], mode="nearest"))
        return [p3, p4, p5]


class _SSH(nn.Module):
    """SSH context module: a 3x3 branch (C/2) and a shared 3x3 trunk giving 5x5- and 7x7-receptive branches
    (C/4 each), concatenated and rectified."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        if cout % 4:
            raise ValueError(f"SSH width must be a multiple of 4, got {cout}")
        slope = 0.1 if cout <= 64 else 0.0
        q = cout // 4
        self.conv3X3 = _cbr(cin, cout // 2, 3, slope=None)
        self.conv5X5_1 = _cbr(cin, q, 3, slope=slope)
        self.conv5X5_2 = _cbr(q, q, 3, slope=None)
        self.conv7X7_2 = _cbr(q, q, 3, slope=slope)
        self.conv7x7_3 = _cbr(q, q, 3, slope=None)  # lower-case x: the released key name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trunk = self.conv5X5_1(x)
        b5 = self.conv5X5_2(trunk)
        b7 = self.conv7x7_3(self.conv7X7_2(trunk))
        return F.relu(torch.cat([self.conv3X3(x), b5, b7], dim=1))


class _Head(nn.Module):
    """1x1 conv predicting ``k`` values per anchor; output (B, H*W*anchors, k) in (row, col, anchor) order."""

    def __init__(self, cin: int, k: int, anchors: int = NUM_ANCHORS) -> None:
        super().__init__()
        self.k = k
        self.conv1x1 = nn.Conv2d(cin, anchors * k, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1x1(x).permute(0, 2, 3, 1)
        return y.reshape(y.shape[0], -1, self.k)


class RetinaFace(nn.Module):
    """The RetinaFace network (``arch`` "resnet50" or "mobilenet0.25") with the released state-dict layout.

    ``forward(x)`` takes (B, 3, H, W) float BGR pixels in [0, 255] minus :data:`BGR_MEAN` and returns
    ``(loc (B, P, 4), conf (B, P, 2), landms (B, P, 10))`` over the P priors of :func:`prior_boxes(H, W)`;
    ``conf`` holds raw (background, face) logits, ``softmax(conf, -1)[..., 1]`` is the face score.
    """

    def __init__(self, arch: str = "resnet50") -> None:
        super().__init__()
        self.arch = canonical_arch(arch)
        cfg = _ARCH_CFG[self.arch]
        self.min_sizes, self.steps, self.variances = MIN_SIZES, STEPS, VARIANCES
        self.body = _ResNet50Body() if self.arch == "resnet50" else _MobileNetBody()
        c, out = cfg["in_channel"], cfg["out_channel"]
        self.fpn = _FPN([c * 2, c * 4, c * 8], out)
        self.ssh1, self.ssh2, self.ssh3 = _SSH(out, out), _SSH(out, out), _SSH(out, out)
        self.ClassHead = nn.ModuleList(_Head(out, 2) for _ in range(3))
        self.BboxHead = nn.ModuleList(_Head(out, 4) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(_Head(out, 10) for _ in range(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        levels = self.fpn(self.body(x))
        feats = [self.ssh1(levels[0]), self.ssh2(levels[1]), self.ssh3(levels[2])]
        loc = torch.cat([h(f) for h, f in zip(self.BboxHead, feats)], dim=1)
        conf = torch.cat([h(f) for h, f in zip(self.ClassHead, feats)], dim=1)
        landms = torch.cat([h(f) for h, f in zip(self.LandmarkHead, feats)], dim=1)
        return loc, conf, landms


def build_retinaface(arch: str) -> RetinaFace:
    """A randomly initialised :class:`RetinaFace` in eval mode (tests, shape checks)."""
    return RetinaFace(arch).eval()


# ------------------------------------------------------------------------------------------ priors, decoding, NMS


def prior_boxes(height: int, width: int, min_sizes: Sequence[Sequence[int]] = MIN_SIZES,
                steps: Sequence[int] = STEPS, clip: bool = False) -> torch.Tensor:
    """Anchor boxes for an ``height`` x ``width`` input: (P, 4) float32 ``cx, cy, w, h`` normalised by the image
    size, level by level (stride 8, 16, 32), then row, column and anchor size; the order the heads predict in."""
    out = []
    for sizes, step in zip(min_sizes, steps):
        fh, fw = math.ceil(height / step), math.ceil(width / step)
        cy = (torch.arange(fh, dtype=torch.float64) + 0.5) * step / height
        cx = (torch.arange(fw, dtype=torch.float64) + 0.5) * step / width
        gy, gx = torch.meshgrid(cy, cx, indexing="ij")
        centres = torch.stack([gx, gy], dim=-1)[:, :, None, :].expand(fh, fw, len(sizes), 2)
        wh = torch.tensor([[s / width, s / height] for s in sizes], dtype=torch.float64)
        out.append(torch.cat([centres, wh.expand(fh, fw, len(sizes), 2)], dim=-1).reshape(-1, 4))
    priors = torch.cat(out).to(torch.float32)
    return priors.clamp_(0.0, 1.0) if clip else priors


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor,
                 variances: Sequence[float] = VARIANCES) -> torch.Tensor:
    """Box offsets (..., P, 4) relative to ``priors`` (P, 4) -> corners ``x0, y0, x1, y1`` (normalised)."""
    centre = priors[..., :2] + loc[..., :2] * variances[0] * priors[..., 2:]
    size = priors[..., 2:] * torch.exp(loc[..., 2:] * variances[1])
    top_left = centre - size / 2
    return torch.cat([top_left, top_left + size], dim=-1)


def decode_landmarks(pre: torch.Tensor, priors: torch.Tensor,
                     variances: Sequence[float] = VARIANCES) -> torch.Tensor:
    """Landmark offsets (..., P, 10) -> 5 points ``x, y`` each (..., P, 10), normalised."""
    pts = pre.reshape(*pre.shape[:-1], 5, 2)
    pts = priors[..., None, :2] + pts * variances[0] * priors[..., None, 2:]
    return pts.reshape(*pre.shape)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression: indices (int64) of the boxes kept, highest score first (ties: lower index
    first). A box is dropped when its IoU with an already kept box exceeds ``iou_threshold``. Boxes are
    ``x0, y0, x1, y1``; areas are continuous (no +1 pixel convention)."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    boxes = boxes.float()
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    x0, y0, x1, y1 = boxes.unbind(-1)
    area = (x1 - x0).clamp(min=0) * (y1 - y0).clamp(min=0)
    keep = []
    while order.numel() > 0:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        if rest.numel() == 0:
            break
        iw = (torch.minimum(x1[i], x1[rest]) - torch.maximum(x0[i], x0[rest])).clamp(min=0)
        ih = (torch.minimum(y1[i], y1[rest]) - torch.maximum(y0[i], y0[rest])).clamp(min=0)
        inter = iw * ih
        iou = inter / (area[i] + area[rest] - inter).clamp(min=torch.finfo(torch.float32).tiny)
        order = rest[iou <= iou_threshold]
    return torch.stack(keep)


# ------------------------------------------------------------------------------------------------------ detector

_Detections = tuple[np.ndarray, np.ndarray, np.ndarray]


def _empty() -> _Detections:
    return (np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0, 5, 2), np.float32))


def _as_hwc_float(image, index: int) -> torch.Tensor:
    """One RGB image (numpy or torch, HxWx3 (or x4, alpha dropped), uint8 or float in [0, 1]) -> float32 HxWx3
    tensor of 0..255 values on the CPU."""
    t = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(image))
    if t.ndim != 3 or t.shape[-1] not in (3, 4):
        raise ValueError(f"image {index}: expected an RGB array of shape (H, W, 3), got {tuple(t.shape)}")
    t = t[..., :3].detach().cpu()
    if t.dtype == torch.uint8:
        return t.to(torch.float32)
    if not t.is_floating_point():
        raise ValueError(f"image {index}: expected uint8 or float pixels, got {t.dtype}")
    return t.to(torch.float32) * 255.0


class RetinaFaceDetector:
    """A :class:`RetinaFace` network on a device/dtype plus pre- and post-processing (priors, decode, NMS)."""

    #: Equal-size images are run through the network this many at a time.
    max_batch = 8

    def __init__(self, net: RetinaFace, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype
        self.net = net.to(device=self.device, dtype=dtype).eval()
        self.arch = net.arch
        self._mean = torch.tensor(BGR_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        self._priors: dict[tuple[int, int], torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"RetinaFaceDetector(arch={self.arch!r}, device={str(self.device)!r}, dtype={self.dtype})"

    def _priors_for(self, height: int, width: int) -> torch.Tensor:
        key = (height, width)
        if key not in self._priors:
            if len(self._priors) > 16:
                self._priors.clear()
            self._priors[key] = prior_boxes(height, width, self.net.min_sizes, self.net.steps).to(self.device)
        return self._priors[key]

    @torch.inference_mode()
    def detect(self, images, conf_threshold: float = 0.8, nms_threshold: float = 0.4) -> list[_Detections]:
        """Faces in each RGB image (HxWx3 uint8, or float in [0, 1]; one image, a list, or a BxHxWx3 array).

        Returns per image ``(boxes (N, 4) x0 y0 x1 y1 px, scores (N,), landmarks (N, 5, 2) px)``, float32, sorted
        by score (highest first); empty arrays of those shapes when no face scores above ``conf_threshold``.
        Equal-size images are batched on the model's device, others run one by one; decoding is in float32.
        """
        if isinstance(images, (np.ndarray, torch.Tensor)):
            images = [images] if images.ndim == 3 else list(images)
        hwc = [_as_hwc_float(im, i) for i, im in enumerate(images)]
        results: list[_Detections | None] = [None] * len(hwc)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, t in enumerate(hwc):
            groups.setdefault((int(t.shape[0]), int(t.shape[1])), []).append(i)
        for (h, w), idx in groups.items():
            for start in range(0, len(idx), self.max_batch):
                chunk = idx[start:start + self.max_batch]
                batch = torch.stack([hwc[i] for i in chunk]).permute(0, 3, 1, 2).flip(1)  # RGB -> BGR, BCHW
                batch = (batch - self._mean).to(device=self.device, dtype=self.dtype)
                for i, det in zip(chunk, self._run(batch, conf_threshold, nms_threshold)):
                    results[i] = det
        return results  # type: ignore[return-value]

    def _run(self, batch: torch.Tensor, conf_threshold: float, nms_threshold: float) -> list[_Detections]:
        h, w = batch.shape[-2:]
        loc, conf, landms = self.net(batch)
        priors = self._priors_for(h, w)
        if loc.shape[1] != priors.shape[0]:
            raise RuntimeError(f"network gave {loc.shape[1]} predictions for {priors.shape[0]} priors at {h}x{w}")
        scores = torch.softmax(conf.float(), dim=-1)[..., 1]
        boxes = decode_boxes(loc.float(), priors, self.net.variances)
        points = decode_landmarks(landms.float(), priors, self.net.variances)
        scale = torch.tensor([w, h], dtype=torch.float32, device=boxes.device)
        out = []
        for b in range(batch.shape[0]):
            sel = torch.nonzero(scores[b] > conf_threshold).squeeze(1)
            if sel.numel() == 0:
                out.append(_empty())
                continue
            s = scores[b, sel]
            if sel.numel() > PRE_NMS_TOP_K:
                s, top = torch.topk(s, PRE_NMS_TOP_K)
                sel = sel[top]
            bx = (boxes[b, sel].reshape(-1, 2, 2) * scale).reshape(-1, 4).cpu()
            pt = (points[b, sel].reshape(-1, 5, 2) * scale).cpu()
            s = s.cpu()
            keep = nms(bx, s, nms_threshold)[:POST_NMS_TOP_K]
            out.append((bx[keep].numpy(), s[keep].numpy(), pt[keep].numpy()))
        return out


# ------------------------------------------------------------------------------------------------------- loading


def _fail(path: Path, what: str) -> RetinaFaceWeightsError:
    return RetinaFaceWeightsError(f"RetinaFace weights {path.name!r} in folder {str(path.parent)!r}: {what}. "
                                  f"Fix: {_FIX}.")


def _infer_arch(sd: Mapping[str, torch.Tensor]) -> str | None:
    if "body.stage1.0.0.weight" in sd:
        return "mobilenet0.25"
    if "body.conv1.weight" in sd or "body.layer1.0.conv1.weight" in sd:
        return "resnet50"
    return None


def load_retinaface(path: str | Path, arch: str | None = None, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> RetinaFaceDetector:
    """Load a released RetinaFace weight file (``.pth`` via weights_only, or ``.safetensors``) into a detector.

    ``arch`` ("resnet50" / "mobilenet0.25") is read from the keys when None; when given it must agree with them.
    Any problem (missing, unreadable, pickled code, unknown layout, missing/unexpected keys, wrong shapes) raises
    :class:`RetinaFaceWeightsError` naming the file and what is wrong.
    """
    path = Path(path)
    sd = read_state_dict(path, _fail)
    found = _infer_arch(sd)
    if found is None:
        raise _fail(path, f"these are not RetinaFace weights of the {sorted(ARCHS)} layout "
                          f"(first keys: {short_list(list(sd)[:6])})")
    if arch is not None:
        wanted = canonical_arch(arch)
        if wanted != found:
            raise _fail(path, f"the file holds {found} weights but arch={arch!r} was asked; pass arch={found!r} "
                              "or None")
    net = RetinaFace(found)
    expected = net.state_dict()
    problems, _ = layout_problems(sd, expected)
    if problems:
        raise _fail(path, f"not the {found} RetinaFace layout ({problems})")
    net.load_state_dict(sd, strict=False)  # every non-optional key checked above
    logger.info("loaded RetinaFace %s from %s (%s, %s)", found, path, device, dtype)
    return RetinaFaceDetector(net, device=device, dtype=dtype)

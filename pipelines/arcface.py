"""ArcFace-style identity embeddings (512-d) from an iresnet backbone: our own implementation of the arcface_torch
weight layout, differentiable, for the ``Load Identity Model`` node, identity metrics and CLR-Face's identity loss.

The network is the "improved ResNet" of insightface's ``recognition/arcface_torch`` (``backbones/iresnet.py``;
Deng et al., ArcFace, CVPR 2019; Duta et al., iResNet, arXiv:2004.04989), written here from the published
architecture so that it loads, key for key, the widely shared ``backbone.pth`` files of that layout
(``ms1mv3_arcface_r{18,34,50,100}_fp16``, ``glint360k_cosface_r{18,34,50,100}_fp16``, ``ms1mv2``/``webface`` runs
of the same code; also copies converted to ``.safetensors``):

- stem: ``conv1`` 3x3 3->64 (stride 1, no bias), ``bn1``, ``prelu`` (64 slopes);
- ``layer1``..``layer4`` of widths 64/128/256/512, each starting with a stride-2 block that has a
  ``downsample`` (1x1 stride-2 conv + BatchNorm), blocks per stage r18 (2,2,2,2), r34 (3,4,6,3), r50 (3,4,14,3),
  r100 (3,13,30,3);
- block (``IBasicBlock``, pre-activation style): ``bn1`` -> ``conv1`` 3x3 -> ``bn2`` -> ``prelu`` -> ``conv2`` 3x3
  (carries the stride) -> ``bn3``, plus the identity (or ``downsample(x)``); no activation after the sum;
- head: ``bn2`` (512 channels, on the 7x7 map of a 112x112 input), flatten, dropout (p=0 at inference), ``fc``
  512*7*7 -> 512, ``features`` BatchNorm1d(512), whose weight the reference fixes at 1.0 (it is still stored);
- every BatchNorm has eps 1e-5 in arcface_torch (ports of other repos use 2e-5, MXNet's value; ``eps=`` of
  :func:`build_iresnet` sets it). The reference's ``fp16`` flag only wraps the convolutions in CUDA autocast
  during training; it adds no keys and the released files hold float32 tensors. Here ``dtype=`` chooses.
- input: RGB, 112x112, ``(x / 255 - 0.5) / 0.5`` (arcface_torch ``inference.py``), i.e. ``2 x - 1`` for x in [0, 1].

Files trained under DataParallel carry a ``module.`` prefix; it is stripped. ``.pth`` files are read with
``torch.load(weights_only=True)`` only (:func:`.weights.read_state_dict`), so a pickle that carries code is refused
and never executed. In ComfyUI the files live in ``models/bfr/identity/``. Other "ArcFace" files are a different
layout and are refused with a key listing: TreB1eN/InsightFace_Pytorch ``model_ir_se50.pth`` (``input_layer``/
``body.N.res_layer``), GFPGAN/facexlib ``arcface_resnet18.pth`` (grey 128x128 input), insightface ``.onnx`` models.

Licences: insightface's code is MIT, but its released pretrained recognition models are stated to be for
non-commercial research purposes only, and the training sets behind them (MS1M, Glint360K, WebFace) carry their
own terms. This pack ships no weights: check the licence of the file you use.

From an FFHQ crop to the ArcFace input (:meth:`IdentityModel.preprocess`). ArcFace was trained on 112x112 crops
aligned by a similarity transform to insightface's 5-point template (:data:`ARCFACE_TEMPLATE_112`); an FFHQ crop
places the same five points elsewhere (:data:`.face.FFHQ_TEMPLATE_512`): scaled to 112 px, the FFHQ eyes are
27.5 px apart where ArcFace expects 35.2 px, and the face sits higher. So the default ``align="template"`` warps
every crop by the one fixed least-squares similarity that maps the FFHQ template onto the ArcFace one (the 112 px
window covers the central ~381 px of a 512 crop), which is insightface's own ``norm_crop`` applied to the
template points the crop was aligned to (the two templates differ in shape, so even this best fit leaves the
eyes ~1 px and the mouth corners ~2.5 px from ArcFace's points at 112 px). It needs no detector (a blurry restoration input cannot move any point),
is the same for every crop of a batch, and stays differentiable (antialiased bilinear pre-shrink, then bilinear
``grid_sample``). ``align="resize"`` instead shrinks the whole crop to 112x112 (antialiased bilinear), the cheap
practice of some BFR evaluation scripts; its numbers are only comparable with that practice.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .face import FFHQ_TEMPLATE_512, TEMPLATE_SIZE, fit_similarity
from .metrics import file_record
from .weights import layout_problems, read_state_dict, short_list

logger = logging.getLogger(__name__)

__all__ = [
    "ALIGNS", "ARCFACE_TEMPLATE_112", "ARCHS", "BLOCKS", "EMBEDDING_DIM", "INPUT_SIZE", "IBasicBlock", "IResNet",
    "IdentityModel", "IdentityWeightsError", "angle_degrees", "build_iresnet", "cosine", "ffhq_to_arcface_theta",
    "infer_arch", "load_identity_model",
]

ARCHS = ("r18", "r34", "r50", "r100")
#: Blocks per stage (layer1..layer4) of each arch, as in arcface_torch's iresnet18/34/50/100.
BLOCKS: dict[str, tuple[int, int, int, int]] = {
    "r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3),
}
_ARCH_ALIASES = {f"{p}{n}": a for a in ARCHS for n in (a[1:],) for p in ("r", "iresnet", "ir")}
WIDTHS = (64, 128, 256, 512)
INPUT_SIZE = 112
EMBEDDING_DIM = 512
BN_EPS = 1e-5
#: insightface's 5-point template of a 112x112 ArcFace input (x, y): image-left eye, image-right eye, nose tip,
#: image-left mouth corner, image-right mouth corner (``arcface_dst`` of insightface/utils/face_align.py).
ARCFACE_TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
ALIGNS = ("template", "resize")

_FOLDER = "ComfyUI/models/bfr/identity/"
_FIX = (f"put an arcface_torch iresnet backbone (r18/r34/r50/r100 'backbone.pth', e.g. of ms1mv3_arcface_r50_fp16 "
        f"or glint360k_cosface_r100_fp16, or a .safetensors copy of it) into {_FOLDER}")


class IdentityWeightsError(ValueError):
    """An identity (ArcFace iresnet) weight file that is missing, unreadable, unsafe or of the wrong layout; the
    message names the file, its folder, what is wrong and the fix."""


def canonical_arch(arch: str) -> str:
    """``arch`` in the spelling of :data:`ARCHS`; "iresnet50", "ir50", "R50" ... are accepted."""
    key = _ARCH_ALIASES.get(str(arch).strip().lower())
    if key is None:
        raise ValueError(f"unknown identity arch {arch!r}; expected one of {list(ARCHS)}")
    return key


# ------------------------------------------------------------------------------------------------------- network


def _bn(channels: int, eps: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=eps)


class IBasicBlock(nn.Module):
    """Pre-activation residual block: BN, 3x3 conv, BN, PReLU, 3x3 conv (strided), BN, plus the shortcut.
    Keys ``bn1 conv1 bn2 prelu conv2 bn3`` and, on the first block of a stage, ``downsample.0`` (1x1 conv) /
    ``downsample.1`` (BN)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, eps: float = BN_EPS) -> None:
        super().__init__()
        self.bn1 = _bn(cin, eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = _bn(cout, eps)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = _bn(cout, eps)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout, eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut  # out of place: safe under autograd (the reference adds in place)


class IResNet(nn.Module):
    """The arcface_torch iresnet (``arch`` one of :data:`ARCHS`) with the released state-dict layout.

    ``forward(x)`` takes (B, 3, 112, 112) RGB normalised to [-1, 1] and returns the raw (B, 512) features (the
    ``features`` BatchNorm1d output, not L2-normalised)."""

    def __init__(self, arch: str = "r50", eps: float = BN_EPS, dropout: float = 0.0) -> None:
        super().__init__()
        self.arch = canonical_arch(arch)
        self.conv1 = nn.Conv2d(3, WIDTHS[0], 3, 1, 1, bias=False)
        self.bn1 = _bn(WIDTHS[0], eps)
        self.prelu = nn.PReLU(WIDTHS[0])
        cin = WIDTHS[0]
        for i, (width, n) in enumerate(zip(WIDTHS, BLOCKS[self.arch]), start=1):
            blocks = [IBasicBlock(cin if j == 0 else width, width, 2 if j == 0 else 1, eps) for j in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            cin = width
        side = INPUT_SIZE // 16  # four stride-2 stages: 112 -> 7
        self.bn2 = _bn(WIDTHS[-1], eps)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(WIDTHS[-1] * side * side, EMBEDDING_DIM)
        self.features = nn.BatchNorm1d(EMBEDDING_DIM, eps=eps)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad_(False)  # fixed at 1.0 in the reference; the key is still stored

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def build_iresnet(arch: str, eps: float = BN_EPS) -> IResNet:
    """A randomly initialised :class:`IResNet` in eval mode (tests, shape checks)."""
    return IResNet(arch, eps=eps).eval()


# ------------------------------------------------------------------------------------------------ comparisons


def cosine(a, b) -> torch.Tensor:
    """Cosine similarity along the last axis, clamped to [-1, 1]; differentiable (``1 - cosine`` is an identity
    loss). Arrays are accepted and turned into tensors."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if not a.is_floating_point():
        a = a.double()
    b = b.to(a.dtype)
    return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1).clamp(-1.0, 1.0)


def angle_degrees(a, b) -> torch.Tensor:
    """The angle between embeddings in degrees, ``2 atan2(|u - v|, |u + v|)`` of the unit vectors (exactly 0 for
    equal embeddings, well conditioned near 0 and 180 unlike ``arccos`` of a rounded cosine)."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if not a.is_floating_point():
        a = a.double()
    u, v = F.normalize(a, dim=-1), F.normalize(b.to(a.dtype), dim=-1)
    return torch.rad2deg(2.0 * torch.atan2((u - v).norm(dim=-1), (u + v).norm(dim=-1)))


# ---------------------------------------------------------------------------------------------- preprocessing


def _normalised(points: np.ndarray, size: int) -> np.ndarray:
    """Pixel coordinates (pixel centres at integers, as cv2) -> grid_sample's [-1, 1] (align_corners=False)."""
    return 2.0 * (np.asarray(points, np.float64) + 0.5) / size - 1.0


def ffhq_to_arcface_theta() -> np.ndarray:
    """The 2x3 ``affine_grid`` matrix (ArcFace-input normalised coords -> FFHQ-crop normalised coords): the
    least-squares similarity taking the ArcFace 112 template onto the FFHQ 512 template. Normalised coordinates do
    not depend on the crop's size, so one matrix serves every FFHQ-aligned crop."""
    return fit_similarity(_normalised(ARCFACE_TEMPLATE_112, INPUT_SIZE),
                          _normalised(FFHQ_TEMPLATE_512, TEMPLATE_SIZE))


_THETA = ffhq_to_arcface_theta()
_THETA_SCALE = math.sqrt(abs(float(np.linalg.det(_THETA[:, :2]))))  # ~0.744: the window is ~74% of the crop side


# ---------------------------------------------------------------------------------------------------- the model


class IdentityModel:
    """An :class:`IResNet` on a device/dtype (eval mode, weights frozen) plus the FFHQ-crop preprocessing.

    :meth:`embed` returns L2-normalised (B, 512) float32 embeddings; with ``grad=True`` the gradient flows back to
    the input faces (CLR-Face's identity loss), never into the frozen weights."""

    cosine = staticmethod(cosine)
    angle_degrees = staticmethod(angle_degrees)

    def __init__(self, net: IResNet, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 path: str | Path | None = None, align: str = "template") -> None:
        if align not in ALIGNS:
            raise ValueError(f"align must be one of {ALIGNS}, got {align!r}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.net = net.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.arch = net.arch
        self.align = align
        self.path = None if path is None else Path(path)
        self._info: list[dict[str, str]] | None = None

    def __repr__(self) -> str:
        src = self.path.name if self.path else "random weights"
        return (f"IdentityModel(arch={self.arch!r}, {src}, device={str(self.device)!r}, dtype={self.dtype}, "
                f"align={self.align!r})")

    def preprocess(self, faces: torch.Tensor, align: str | None = None) -> torch.Tensor:
        """FFHQ-aligned RGB crops (B, 3, H, W) in [0, 1] -> the network input (B, 3, 112, 112) in [-1, 1], on the
        model's device and dtype; differentiable. See the module docstring for ``align``."""
        align = self.align if align is None else align
        if align not in ALIGNS:
            raise ValueError(f"align must be one of {ALIGNS}, got {align!r}")
        if not isinstance(faces, torch.Tensor) or faces.ndim != 4 or faces.shape[1] != 3:
            shape = tuple(faces.shape) if isinstance(faces, torch.Tensor) else type(faces).__name__
            raise ValueError(f"faces: expected a (B, 3, H, W) RGB tensor in [0, 1], got {shape}")
        if not faces.is_floating_point():
            raise ValueError(f"faces: expected float pixels in [0, 1], got {faces.dtype}")
        x = faces.to(device=self.device, dtype=torch.float32)
        h, w = x.shape[-2:]
        if align == "resize":
            if (h, w) != (INPUT_SIZE, INPUT_SIZE):
                x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False,
                                  antialias=True)
        else:
            # Shrink first (antialiased) so that the bilinear warp samples at about one input pixel per output
            # pixel; normalised coordinates, hence the warp, are unchanged by the resize.
            side = math.ceil(INPUT_SIZE / _THETA_SCALE)
            if h > side or w > side:
                x = F.interpolate(x, size=(min(h, side), min(w, side)), mode="bilinear", align_corners=False,
                                  antialias=True)
            theta = torch.as_tensor(_THETA, dtype=x.dtype, device=x.device).expand(x.shape[0], 2, 3)
            grid = F.affine_grid(theta, [x.shape[0], 3, INPUT_SIZE, INPUT_SIZE], align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return (x * 2.0 - 1.0).to(self.dtype)  # (x / 255 - 0.5) / 0.5 for x in [0, 255]

    def embed(self, faces: torch.Tensor, grad: bool = False, align: str | None = None) -> torch.Tensor:
        """(B, 3, H, W) FFHQ-aligned RGB crops in [0, 1] -> (B, 512) unit-norm float32 embeddings.

        ``grad=False`` (default) runs under ``torch.inference_mode`` (no graph kept); ``grad=True`` keeps the
        graph so that a loss on the embeddings back-propagates to ``faces``."""
        with nullcontext() if grad else torch.inference_mode():
            feats = self.net(self.preprocess(faces, align))
            return F.normalize(feats.float(), dim=-1)

    def weights_info(self) -> list[dict[str, str]]:
        """``[{file, sha256}]`` of the weight file used (empty for a random-weights model), for a metric report."""
        if self.path is None:
            return []
        if self._info is None:
            self._info = [file_record(self.path)]
        return list(self._info)


# ------------------------------------------------------------------------------------------------------- loading


def _fail(path: Path, what: str) -> IdentityWeightsError:
    return IdentityWeightsError(f"identity weights {path.name!r} in folder {str(path.parent)!r}: {what}. "
                                f"Fix: {_FIX}.")


def _blocks_per_stage(sd: Mapping[str, torch.Tensor]) -> tuple[int, ...] | None:
    counts = [0, 0, 0, 0]
    for key in sd:
        parts = key.split(".")
        if len(parts) >= 3 and parts[0] in ("layer1", "layer2", "layer3", "layer4") and parts[1].isdigit():
            stage = int(parts[0][-1]) - 1
            counts[stage] = max(counts[stage], int(parts[1]) + 1)
    return tuple(counts) if all(counts) else None


def infer_arch(sd: Mapping[str, torch.Tensor]) -> str | None:
    """The arch of an arcface_torch state dict, from the number of blocks in each stage; None when the keys are
    not of that layout or the block counts are not one of :data:`BLOCKS` (e.g. r200's (6, 26, 60, 6))."""
    if "conv1.weight" not in sd or "fc.weight" not in sd:
        return None
    counts = _blocks_per_stage(sd)
    return next((a for a, b in BLOCKS.items() if b == counts), None)


def load_identity_model(path: str | Path, arch: str | None = None, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32, align: str = "template",
                        eps: float = BN_EPS) -> IdentityModel:
    """Load an arcface_torch iresnet ``backbone.pth`` (weights_only) or ``.safetensors`` into an
    :class:`IdentityModel`.

    ``arch`` (one of :data:`ARCHS`) is read from the keys when None; when given it must agree with them. Any
    problem (missing, unreadable, pickled code, unknown layout, missing/unexpected keys, wrong shapes) raises
    :class:`IdentityWeightsError` naming the file and what is wrong."""
    path = Path(path)
    sd = read_state_dict(path, _fail)
    found = infer_arch(sd)
    if found is None:
        counts = _blocks_per_stage(sd)
        what = (f"blocks per stage {counts} are not one of {dict(BLOCKS)}" if counts and "conv1.weight" in sd
                else f"first keys: {short_list(list(sd)[:6])}")
        raise _fail(path, f"these are not arcface_torch iresnet weights of {list(ARCHS)} ({what})")
    if arch is not None and canonical_arch(arch) != found:
        raise _fail(path, f"the file holds {found} weights but arch={arch!r} was asked; pass arch={found!r} or None")
    net = IResNet(found, eps=eps)
    expected = net.state_dict()
    problems, _ = layout_problems(sd, expected)
    if problems:
        raise _fail(path, f"not the arcface_torch {found} layout ({problems})")
    net.load_state_dict(sd, strict=False)  # every non-optional key checked above
    logger.info("loaded identity model %s from %s (%s, %s)", found, path, device, dtype)
    return IdentityModel(net, device=device, dtype=dtype, path=path, align=align)

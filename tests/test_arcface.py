"""Our ArcFace iresnet (pipelines/arcface.py): the arcface_torch state-dict layout, safe loading of .pth/.safetensors,
arch inference, the FFHQ -> ArcFace preprocessing and the differentiable embedding, on random weights (no weight
files in CI).

Architecture facts used below (key names, shapes, block counts, eps, input normalisation) come from the published
reference code: deepinsight/insightface ``recognition/arcface_torch/backbones/iresnet.py`` (IBasicBlock
bn1/conv1/bn2/prelu/conv2/bn3 + downsample = conv1x1 + BN on every stride-2 first block; stem conv1 3x3 3->64 +
bn1 + prelu; layer1..4 of widths 64/128/256/512 with stride 2; iresnet18/34/50/100 = [2,2,2,2] / [3,4,6,3] /
[3,4,14,3] / [3,13,30,3]; bn2(512), dropout, fc 512*7*7 -> 512, features BatchNorm1d(512) with its weight fixed at
1.0; every BatchNorm eps=1e-05), ``recognition/arcface_torch/inference.py`` (BGR -> RGB, ``div(255).sub(0.5)
.div(0.5)``, ``load_state_dict(torch.load(weight))`` of ``backbone.pth``) and insightface's 112x112 5-point
template (``arcface_dst``: (38.2946, 51.6963) ... (70.7299, 92.2041)). The parameter counts are derived below by
hand from those facts, independently of the module (r50 43,590,848 and r100 65,156,160 agree with the "43.6M" /
"65.2M" commonly quoted for iresnet50 / iresnet100).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from comfyui_bfr.pipelines import arcface as af
from comfyui_bfr.pipelines.arcface import (
    ARCFACE_TEMPLATE_112, ARCHS, IBasicBlock, IdentityModel, IdentityWeightsError, angle_degrees, build_iresnet,
    cosine, infer_arch, load_identity_model,
)
from comfyui_bfr.pipelines.face import FFHQ_TEMPLATE_512, apply_affine, fit_similarity

# (key, shape) in the arcface_torch backbone.pth layout, shared by every arch.
COMMON_KEYS = [
    ("conv1.weight", (64, 3, 3, 3)),
    ("bn1.weight", (64,)),
    ("bn1.running_var", (64,)),
    ("prelu.weight", (64,)),
    ("layer1.0.bn1.weight", (64,)),
    ("layer1.0.conv1.weight", (64, 64, 3, 3)),
    ("layer1.0.bn2.bias", (64,)),
    ("layer1.0.prelu.weight", (64,)),
    ("layer1.0.conv2.weight", (64, 64, 3, 3)),
    ("layer1.0.bn3.running_mean", (64,)),
    ("layer1.0.downsample.0.weight", (64, 64, 1, 1)),   # stride 2 even at equal width -> a downsample
    ("layer1.0.downsample.1.weight", (64,)),
    ("layer1.1.conv1.weight", (64, 64, 3, 3)),
    ("layer2.0.bn1.weight", (64,)),                      # bn1 sees the block's input width
    ("layer2.0.conv1.weight", (128, 64, 3, 3)),
    ("layer2.0.conv2.weight", (128, 128, 3, 3)),
    ("layer2.0.downsample.0.weight", (128, 64, 1, 1)),
    ("layer3.0.conv1.weight", (256, 128, 3, 3)),
    ("layer3.1.prelu.weight", (256,)),
    ("layer4.0.downsample.0.weight", (512, 256, 1, 1)),
    ("layer4.1.conv2.weight", (512, 512, 3, 3)),
    ("bn2.weight", (512,)),
    ("bn2.num_batches_tracked", ()),
    ("fc.weight", (512, 512 * 7 * 7)),
    ("fc.bias", (512,)),
    ("features.weight", (512,)),
    ("features.bias", (512,)),
    ("features.running_mean", (512,)),
    ("features.running_var", (512,)),
]
R50_KEYS = [
    ("layer1.2.prelu.weight", (64,)),
    ("layer2.3.conv2.weight", (128, 128, 3, 3)),
    ("layer3.13.conv2.weight", (256, 256, 3, 3)),
    ("layer4.2.bn3.weight", (512,)),
]
ABSENT = {
    "r18": ["layer1.1.downsample.0.weight", "layer1.2.conv1.weight", "layer3.2.conv1.weight"],
    "r50": ["layer3.14.conv1.weight", "layer4.3.conv1.weight", "layer2.1.downsample.0.weight"],
}


def _param_count(blocks) -> int:
    """Parameters of an iresnet, counted by hand from the reference architecture."""
    n = 3 * 64 * 9 + 2 * 64 + 64  # stem conv1, bn1 (weight, bias), prelu
    cin = 64
    for width, count in zip((64, 128, 256, 512), blocks):
        for j in range(count):
            i = cin if j == 0 else width
            n += 2 * i + i * width * 9 + 2 * width + width + width * width * 9 + 2 * width
            if j == 0:
                n += i * width + 2 * width  # downsample conv1x1 + BN
        cin = width
    return n + 2 * 512 + (512 * 49 * 512 + 512) + 2 * 512  # bn2, fc, features


def _meta_state_dict(arch: str) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return dict(af.IResNet(arch).state_dict())


def _randomise(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics / affines and PReLU slopes, so that eval-mode BN is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
            elif isinstance(m, torch.nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5)
    return net


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    return _randomise(build_iresnet("r18"))


@pytest.fixture(scope="module")
def model(r18):
    return IdentityModel(r18)


@pytest.fixture(scope="module")
def faces():
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, 3, 128, 128, generator=g)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, r18):
    """The r18 weights as a plain .pth, a DataParallel (``module.``) .pth and a .safetensors file."""
    folder = tmp_path_factory.mktemp("identity")
    sd = {k: v.clone() for k, v in r18.state_dict().items()}
    paths = {"pth": folder / "backbone.pth", "module": folder / "dp_backbone.pth",
             "safetensors": folder / "backbone.safetensors"}
    torch.save(sd, paths["pth"])
    torch.save({f"module.{k}": v for k, v in sd.items()}, paths["module"])
    save_file(sd, str(paths["safetensors"]))
    return paths


# ----------------------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("arch", ["r18", "r50"])
def test_keys_and_shapes_match_the_arcface_torch_layout(arch):
    sd = _meta_state_dict(arch)
    for key, shape in COMMON_KEYS + (R50_KEYS if arch == "r50" else []):
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, (key, tuple(sd[key].shape))
    for key in ABSENT[arch]:
        assert key not in sd, key
    # 6 tensors of conv/prelu + 3 BNs x 5 entries per block, 1 + 5 more for a downsample; stem 1+5+1; head 5+2+5
    blocks = af.BLOCKS[arch]
    assert len(sd) == 7 + sum(blocks) * 18 + 4 * 6 + 12


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_counts_match_the_hand_count(arch):
    with torch.device("meta"):
        net = af.IResNet(arch)
    n = sum(p.numel() for p in net.parameters())
    assert n == _param_count(af.BLOCKS[arch])
    assert n == {"r18": 24_025_600, "r34": 34_139_328, "r50": 43_590_848, "r100": 65_156_160}[arch]
    assert not net.features.weight.requires_grad  # fixed at 1.0 as in the reference


def test_eps_and_input_size_facts(r18):
    bns = [m for m in r18.modules() if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))]
    assert bns and all(m.eps == 1e-5 for m in bns)
    assert all(m.eps == 2e-5 for m in build_iresnet("r18", eps=2e-5).modules()
               if isinstance(m, torch.nn.BatchNorm2d))
    assert r18(torch.zeros(2, 3, 112, 112)).shape == (2, 512)
    with pytest.raises(RuntimeError):  # the fc fixes the input at 112x112 (7x7 after four stride-2 stages)
        r18(torch.zeros(1, 3, 128, 128))


def _bn(x, m):
    return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)


@pytest.mark.parametrize("cin,cout,stride", [(64, 128, 2), (128, 128, 1)])
def test_one_block_equals_a_hand_written_forward(cin, cout, stride):
    torch.manual_seed(3)
    block = _randomise(IBasicBlock(cin, cout, stride), seed=4).eval()
    assert (block.downsample is not None) == (stride != 1)
    x = torch.randn(2, cin, 14, 14)
    out = _bn(x, block.bn1)
    out = F.conv2d(out, block.conv1.weight, None, 1, 1)
    out = _bn(out, block.bn2)
    slope = block.prelu.weight.view(1, -1, 1, 1)
    out = torch.where(out >= 0, out, out * slope)
    out = F.conv2d(out, block.conv2.weight, None, stride, 1)
    out = _bn(out, block.bn3)
    shortcut = x if stride == 1 else _bn(F.conv2d(x, block.downsample[0].weight, None, stride), block.downsample[1])
    expected = out + shortcut  # no activation after the sum
    with torch.no_grad():
        got = block(x)
    assert got.shape == (2, cout, 14 // stride, 14 // stride)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("arch", ARCHS)
def test_arch_is_inferred_from_the_block_counts(arch):
    assert infer_arch(_meta_state_dict(arch)) == arch


def test_unknown_block_counts_and_layouts_are_not_guessed():
    sd = _meta_state_dict("r18")
    sd["layer1.2.conv1.weight"] = sd["layer1.1.conv1.weight"]  # (3, 2, 2, 2): no such arch
    assert infer_arch(sd) is None
    assert infer_arch({"body.conv1.weight": torch.zeros(1)}) is None
    assert infer_arch({k: v for k, v in _meta_state_dict("r50").items() if k != "fc.weight"}) is None


def test_pth_module_prefix_and_safetensors_give_identical_embeddings(saved, model, faces):
    ref = model.embed(faces)
    for kind, path in saved.items():
        loaded = load_identity_model(path)
        assert loaded.arch == "r18", kind
        assert torch.equal(loaded.embed(faces), ref), kind
    assert torch.equal(load_identity_model(saved["pth"], arch="iresnet18").embed(faces), ref)


def test_weights_info_names_the_file_and_its_sha256(saved, model):
    path = saved["safetensors"]
    info = load_identity_model(path).weights_info()
    assert info == [{"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}]
    assert model.weights_info() == []


class _WritesAFile:
    """A pickled object whose unpickling would create ``marker`` -- the shape of a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


def test_pickle_with_code_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "backbone.pth"
    with torch.device("meta"):
        shapes = af.IResNet("r18").state_dict()
    sd = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in list(shapes.items())[:8]}
    sd["payload"] = _WritesAFile(marker)
    torch.save(sd, path)
    with pytest.raises(IdentityWeightsError) as err:
        load_identity_model(path)
    msg = str(err.value)
    assert path.name in msg and str(tmp_path) in msg and "pickled" in msg and "models/bfr/identity" in msg
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: an unsafe unpickle does run it
    assert marker.exists()


def _save(tmp_path, sd, name="backbone.pth"):
    path = tmp_path / name
    torch.save(sd, path)
    return path


def test_layout_errors_list_the_keys_and_name_the_fix(tmp_path, r18):
    sd = {k: v.clone() for k, v in r18.state_dict().items()}
    with pytest.raises(IdentityWeightsError, match="holds r18 weights but arch='r50'"):
        load_identity_model(_save(tmp_path, sd), arch="r50")
    with pytest.raises(ValueError, match="unknown identity arch"):
        load_identity_model(_save(tmp_path, sd), arch="r200")

    bad = dict(sd)
    bad["fc.weight"] = torch.zeros(512, 512 * 8 * 8)
    with pytest.raises(IdentityWeightsError, match=r"wrong shapes: fc\.weight \(512, 32768\) \(expected \(512, "
                                                   r"25088\)\)"):
        load_identity_model(_save(tmp_path, bad))

    bad = {k: v for k, v in sd.items() if k != "layer2.1.prelu.weight"}
    bad["head.weight"] = torch.zeros(3)
    with pytest.raises(IdentityWeightsError) as err:
        load_identity_model(_save(tmp_path, bad))
    msg = str(err.value)
    assert "missing keys: layer2.1.prelu.weight" in msg and "unexpected keys: head.weight" in msg
    assert "backbone.pth" in msg and str(tmp_path) in msg and "models/bfr/identity" in msg

    # num_batches_tracked may be absent (older saves); everything else is required
    light = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert load_identity_model(_save(tmp_path, light)).arch == "r18"

    with pytest.raises(IdentityWeightsError, match=r"not arcface_torch iresnet weights .*body\.conv1\.weight"):
        load_identity_model(_save(tmp_path, {"body.conv1.weight": torch.zeros(64, 3, 7, 7)}))
    with pytest.raises(IdentityWeightsError, match="file not found"):
        load_identity_model(tmp_path / "none" / "backbone.pth")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(IdentityWeightsError, match="safetensors"):
        load_identity_model(truncated)


# ------------------------------------------------------------------------------------------- preprocessing


def _blobs(size: int, points: np.ndarray, sigma: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing="ij")
    img = sum(torch.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma ** 2)) for x, y in points)
    return img.float().expand(1, 3, size, size).contiguous()


def _centroids(img: np.ndarray, near: np.ndarray, radius: float = 8.0) -> np.ndarray:
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    out = []
    for x, y in near:
        w = img * ((xx - x) ** 2 + (yy - y) ** 2 < radius ** 2)
        out.append([(w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()])
    return np.array(out)


@pytest.mark.parametrize("size", [512, 256])
def test_template_alignment_puts_ffhq_landmarks_on_the_arcface_template(model, size):
    crop = _blobs(size, FFHQ_TEMPLATE_512 * (size / 512), sigma=3.0 * size / 512 * 3)
    x = model.preprocess(crop)
    assert x.shape == (1, 3, 112, 112) and float(x.min()) >= -1.0 - 1e-6 and float(x.max()) <= 1.0 + 1e-6
    img = ((x[0, 0] + 1) / 2).double().numpy()
    # Where the least-squares similarity FFHQ -> ArcFace (fitted here in pixel coordinates, cv2's convention) sends
    # the five FFHQ points. The templates differ in shape, so even the best similarity leaves 1.0 (eyes) to 2.5 px
    # (mouth corners) residuals at 112 px; the warp must reproduce exactly that mapping.
    mapped = apply_affine(fit_similarity(FFHQ_TEMPLATE_512, ARCFACE_TEMPLATE_112), FFHQ_TEMPLATE_512)
    residual = np.linalg.norm(mapped - ARCFACE_TEMPLATE_112, axis=1)
    assert 0.9 < residual.min() and residual.max() < 2.5
    found = _centroids(img, mapped)
    err = np.linalg.norm(found - mapped, axis=1)
    assert err.max() < 0.4, err  # blob tails, resampling and the half-pixel scaling convention: < 0.4 px
    # ... while a plain resize leaves the eyes 27.5 px apart instead of ArcFace's 35.2
    plain = ((model.preprocess(crop, align="resize")[0, 0] + 1) / 2).double().numpy()
    eyes = _centroids(plain, FFHQ_TEMPLATE_512[:2] * 112 / 512, radius=5.0)
    assert abs(np.linalg.norm(eyes[0] - eyes[1]) - 27.5) < 1.0


def test_resize_and_normalisation(model, faces):
    x = model.preprocess(faces[:1], align="resize")
    ref = F.interpolate(faces[:1], size=(112, 112), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(x, ref * 2 - 1)
    exact = torch.rand(1, 3, 112, 112)
    torch.testing.assert_close(model.preprocess(exact, align="resize"), (exact * 255 / 255 - 0.5) / 0.5)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.embed(torch.rand(3, 112, 112))
    with pytest.raises(ValueError, match="float"):
        model.embed(torch.zeros(1, 3, 112, 112, dtype=torch.uint8))
    with pytest.raises(ValueError, match="align"):
        model.embed(faces, align="centre")


# ------------------------------------------------------------------------------------------------ embeddings


def test_embed_is_unit_norm_deterministic_and_batch_independent(model, faces):
    e = model.embed(faces)
    assert e.shape == (3, 512) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3), rtol=0, atol=1e-5)
    assert torch.equal(model.embed(faces), e)
    one_by_one = torch.cat([model.embed(faces[i: i + 1]) for i in range(3)])
    torch.testing.assert_close(one_by_one, e, rtol=1e-4, atol=1e-5)
    # different faces are not collapsed onto one embedding by the random net
    assert float(cosine(e[0], e[1])) < 0.999


def test_embed_is_differentiable_with_grad_and_keeps_no_graph_without(model, faces):
    x = faces[:2].clone().requires_grad_(True)
    e = model.embed(x, grad=True)
    assert e.requires_grad
    loss = (1 - cosine(e[0], e[1].detach())) + e[1].sum()
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert float(x.grad[0].abs().sum()) > 0 and float(x.grad[1].abs().sum()) > 0
    assert all(p.grad is None for p in model.net.parameters())  # weights frozen

    y = faces[:2].clone().requires_grad_(True)
    e = model.embed(y)  # grad=False: inference mode
    assert not e.requires_grad and e.grad_fn is None and e.is_inference()


def test_cosine_and_angle():
    a = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    b = torch.tensor([[0.0, 2.0, 0.0], [2.0, 2.0, 0.0]])
    torch.testing.assert_close(cosine(a, b), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(angle_degrees(a, b), torch.tensor([90.0, 0.0]), atol=1e-4, rtol=0)
    assert float(angle_degrees(np.array([1, 2, 3]), np.array([1, 2, 3]))) == 0.0
    assert math.isclose(float(angle_degrees([1.0, 0.0], [-1.0, 0.0])), 180.0, abs_tol=1e-9)
    assert IdentityModel.cosine is cosine and IdentityModel.angle_degrees is angle_degrees

"""Face parsing: released key layout, safe loading, the facexlib paste-back mask, FaceParser inference.

No weights are downloaded: the networks are randomly initialised (or given forced output layers) at test time.
Architecture facts (layer names, widths, strides) and the mask recipe are from xinntao/facexlib
``facexlib/parsing/{parsenet,bisenet,resnet}.py``, ``facexlib/utils/face_restoration_helper.py`` and
``inference/inference_parsing{,_parsenet}.py`` (identical copies in sczhou/CodeFormer ``facelib/``).
"""

from __future__ import annotations

import pickle

import cv2
import numpy as np
import pytest
import torch

from comfyui_bfr.pipelines import face_parsing as fp
from comfyui_bfr.pipelines.face_parsing import (
    CLASS_NAMES, FACE_CLASSES, PARSERS, FaceParser, FaceParsingWeightsError, build_parser, labels_to_mask,
    load_parser,
)

# facexlib face_restoration_helper.py::paste_faces_to_input_image, applied to ParseNet's argmax.
FACEXLIB_MASK_COLORMAP = [0, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 0, 255, 0, 0, 0]
# facexlib inference/inference_parsing_parsenet.py comment (= CelebAMask-HQ g_mask.py label_list, PSFRGAN order).
PARSENET_ORDER = ["background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
                  "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth"]
# facexlib inference/inference_parsing.py comment (BiSeNet, face-parsing.PyTorch order).
BISENET_ORDER = ["background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r",
                 "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat"]

SMALL = 64  # network input size for the cheap tests (ParseNet needs a multiple of 16, BiSeNet of 32)


# ------------------------------------------------------------------------------------------------------ helpers
def _randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights *and* BatchNorm statistics, so every tensor of the state dict matters to the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("running_mean") or name.endswith(".bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif t.dim() == 1:  # BatchNorm weight
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5)
    return net.eval()


def _crops(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def _facexlib_mask(parsenet_labels: np.ndarray, kernel: int = 101, sigma: float = 11.0, thres: int = 10):
    """The facexlib recipe, step by step with cv2, on a label map in ParseNet order."""
    mask = np.zeros(parsenet_labels.shape)
    for idx, color in enumerate(FACEXLIB_MASK_COLORMAP):
        mask[parsenet_labels == idx] = color
    mask = cv2.GaussianBlur(mask, (kernel, kernel), sigma)
    mask = cv2.GaussianBlur(mask, (kernel, kernel), sigma)
    mask[:thres, :] = 0
    mask[-thres:, :] = 0
    mask[:, :thres] = 0
    mask[:, -thres:] = 0
    return mask / 255.0


def _to_canonical(parsenet_labels: np.ndarray) -> torch.Tensor:
    lut = np.array([BISENET_ORDER.index(n) for n in PARSENET_ORDER])
    return torch.from_numpy(lut[parsenet_labels])


def _blocky_labels(size: int, seed: int) -> np.ndarray:
    """Random classes in blocks of size/32 px: finer than the blur, so the border handling of the blur matters."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 19, size=(32, 32)).astype(np.uint8)
    return cv2.resize(low, (size, size), interpolation=cv2.INTER_NEAREST).astype(np.int64)


# ------------------------------------------------------------------------------------------------ class meaning
def test_class_orders_and_face_classes_follow_facexlib():
    assert list(CLASS_NAMES) == BISENET_ORDER
    assert list(fp.PARSENET_CLASS_NAMES) == PARSENET_ORDER
    kept = {BISENET_ORDER.index(PARSENET_ORDER[i]) for i, c in enumerate(FACEXLIB_MASK_COLORMAP) if c}
    assert set(FACE_CLASSES) == kept
    names = {CLASS_NAMES[c] for c in FACE_CLASSES}
    assert {"skin", "nose", "l_eye", "u_lip", "hair", "ear_r"} <= names
    assert not names & {"background", "neck", "neck_l", "cloth", "hat"}
    assert PARSERS == {"parsenet": "parsing_parsenet.pth", "bisenet": "parsing_bisenet.pth"}


# ---------------------------------------------------------------------------------------------- state-dict layout
# Shapes follow from facexlib/parsing/parsenet.py with ParseNet(in_size=512, out_size=512, parsing_ch=19) (as in
# facexlib/parsing/__init__.py::init_parsing_model): base_ch 64, ch_range [32, 256], min_feat_size 32 -> 4 down /
# 4 up residual blocks, res_depth 10, BN convs without bias, plain (shortcut / head) convs with bias.
PARSENET_KEYS = {
    "encoder.0.conv2d.weight": (64, 3, 3, 3),
    "encoder.0.conv2d.bias": (64,),
    "encoder.1.shortcut_func.conv2d.weight": (128, 64, 3, 3),
    "encoder.1.shortcut_func.conv2d.bias": (128,),
    "encoder.1.conv1.conv2d.weight": (128, 64, 3, 3),
    "encoder.1.conv1.norm.norm.weight": (128,),
    "encoder.1.conv1.norm.norm.bias": (128,),
    "encoder.1.conv1.norm.norm.running_mean": (128,),
    "encoder.1.conv1.norm.norm.running_var": (128,),
    "encoder.1.conv2.conv2d.weight": (128, 128, 3, 3),
    "encoder.2.conv1.conv2d.weight": (256, 128, 3, 3),
    "encoder.3.shortcut_func.conv2d.weight": (256, 256, 3, 3),
    "encoder.4.conv2.conv2d.weight": (256, 256, 3, 3),
    "encoder.4.conv2.norm.norm.running_var": (256,),
    "body.0.conv1.conv2d.weight": (256, 256, 3, 3),
    "body.0.conv1.norm.norm.weight": (256,),
    "body.9.conv2.conv2d.weight": (256, 256, 3, 3),
    "body.9.conv2.norm.norm.bias": (256,),
    "decoder.0.shortcut_func.conv2d.weight": (256, 256, 3, 3),
    "decoder.0.conv1.conv2d.weight": (256, 256, 3, 3),
    "decoder.2.conv1.conv2d.weight": (128, 256, 3, 3),
    "decoder.3.shortcut_func.conv2d.weight": (64, 128, 3, 3),
    "decoder.3.conv2.conv2d.weight": (64, 64, 3, 3),
    "decoder.3.conv2.norm.norm.running_mean": (64,),
    "out_img_conv.conv2d.weight": (3, 64, 3, 3),
    "out_img_conv.conv2d.bias": (3,),
    "out_mask_conv.conv2d.weight": (19, 64, 3, 3),
    "out_mask_conv.conv2d.bias": (19,),
}
PARSENET_ABSENT = ["encoder.1.conv1.conv2d.bias", "body.0.shortcut_func.conv2d.weight", "encoder.5.conv1.conv2d.weight",
                   "body.10.conv1.conv2d.weight", "decoder.4.conv1.conv2d.weight"]

# facexlib/parsing/bisenet.py + resnet.py: BiSeNet(num_class=19), ContextPath (ResNet18 without fc, ARM 256/512 ->
# 128, heads 128, conv_avg 1x1 512 -> 128), FFM(256, 256) with a /4 squeeze, heads (256, 256), (128, 64), (128, 64).
BISENET_KEYS = {
    "cp.resnet.conv1.weight": (64, 3, 7, 7),
    "cp.resnet.bn1.weight": (64,),
    "cp.resnet.bn1.running_var": (64,),
    "cp.resnet.layer1.0.conv1.weight": (64, 64, 3, 3),
    "cp.resnet.layer1.1.bn2.bias": (64,),
    "cp.resnet.layer2.0.conv1.weight": (128, 64, 3, 3),
    "cp.resnet.layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "cp.resnet.layer2.0.downsample.1.running_mean": (128,),
    "cp.resnet.layer3.0.downsample.0.weight": (256, 128, 1, 1),
    "cp.resnet.layer3.1.conv2.weight": (256, 256, 3, 3),
    "cp.resnet.layer4.0.conv1.weight": (512, 256, 3, 3),
    "cp.resnet.layer4.1.bn2.weight": (512,),
    "cp.arm16.conv.conv.weight": (128, 256, 3, 3),
    "cp.arm16.conv.bn.weight": (128,),
    "cp.arm16.conv_atten.weight": (128, 128, 1, 1),
    "cp.arm16.bn_atten.running_var": (128,),
    "cp.arm32.conv.conv.weight": (128, 512, 3, 3),
    "cp.conv_head32.conv.weight": (128, 128, 3, 3),
    "cp.conv_head16.bn.bias": (128,),
    "cp.conv_avg.conv.weight": (128, 512, 1, 1),
    "ffm.convblk.conv.weight": (256, 256, 1, 1),
    "ffm.convblk.bn.running_mean": (256,),
    "ffm.conv1.weight": (64, 256, 1, 1),
    "ffm.conv2.weight": (256, 64, 1, 1),
    "conv_out.conv.conv.weight": (256, 256, 3, 3),
    "conv_out.conv_out.weight": (19, 256, 1, 1),
    "conv_out16.conv.conv.weight": (64, 128, 3, 3),
    "conv_out16.conv_out.weight": (19, 64, 1, 1),
    "conv_out32.conv.bn.weight": (64,),
    "conv_out32.conv_out.weight": (19, 64, 1, 1),
}
BISENET_ABSENT = ["cp.resnet.fc.weight", "cp.resnet.layer1.0.downsample.0.weight", "conv_out.conv_out.bias",
                  "cp.resnet.conv1.bias", "ffm.conv1.bias"]


@pytest.mark.parametrize("arch,keys,absent,n_tensors,n_params", [
    # Totals computed by hand from the architecture facts above (not from this implementation); BiSeNet's trunk
    # is 11,176,512 = torchvision resnet18's 11,689,512 minus its 512*1000+1000 classifier.
    ("parsenet", PARSENET_KEYS, PARSENET_ABSENT, 238, 21_303_254),
    ("bisenet", BISENET_KEYS, BISENET_ABSENT, 191, 13_300_416),
])
def test_state_dict_matches_released_layout(arch, keys, absent, n_tensors, n_params):
    net = build_parser(arch)
    sd = net.state_dict()
    for key, shape in keys.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    for key in absent:
        assert key not in sd, key
    assert len(sd) == n_tensors
    assert sum(p.numel() for p in net.parameters()) == n_params
    assert all(k.endswith(("weight", "bias", "running_mean", "running_var", "num_batches_tracked")) for k in sd)
    if arch == "bisenet":
        assert sum(v.numel() for k, v in sd.items() if k.startswith("cp.resnet.") and "running" not in k
                   and not k.endswith("num_batches_tracked")) == 11_176_512


def test_forward_shapes():
    x = torch.rand(1, 3, SMALL, SMALL)
    pnet, bnet = build_parser("parsenet"), build_parser("bisenet")
    with torch.inference_mode():
        assert pnet(x).shape == (1, 19, SMALL, SMALL)
        logits, image = pnet(x, return_image=True)
        assert logits.shape == (1, 19, SMALL, SMALL) and image.shape == (1, 3, SMALL, SMALL)
        assert bnet(x).shape == (1, 19, SMALL, SMALL)
        assert [t.shape for t in bnet(x, aux=True)] == [(1, 19, SMALL, SMALL)] * 3
    with pytest.raises(ValueError, match="unknown face-parsing network"):
        build_parser("unet")
    assert fp.canonical_arch("parsing_bisenet.pth") == "bisenet"


# ---------------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("arch", ["parsenet", "bisenet"])
def test_round_trips_give_identical_outputs(tmp_path, arch):
    from safetensors.torch import save_file

    net = _randomize(build_parser(arch), seed=1)
    sd = net.state_dict()
    reference = FaceParser(net, arch, input_size=SMALL)
    x = _crops(2, 48, seed=3)
    want = reference.logits(x)
    assert want.shape == (2, 19, SMALL, SMALL)

    files = {
        "plain.pth": sd,
        "dataparallel.pth": {f"module.{k}": v for k, v in sd.items()},
        "weights.safetensors": {k: v.contiguous() for k, v in sd.items()},
    }
    if arch == "bisenet":  # the smaller file also covers the tolerated variants
        files["wrapped.pth"] = {"state_dict": sd}
        files["no_bn_counters.pth"] = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    for name, obj in files.items():
        path = tmp_path / name
        if name.endswith(".safetensors"):
            save_file(obj, str(path))
        else:
            torch.save(obj, path)
        parser = load_parser(path)  # arch inferred from the keys
        assert parser.arch == arch
        parser.input_size = SMALL
        assert torch.equal(parser.logits(x), want), name
    assert load_parser(tmp_path / "plain.pth", arch=PARSERS[arch]).arch == arch
    other = "bisenet" if arch == "parsenet" else "parsenet"
    with pytest.raises(FaceParsingWeightsError, match=f"holds {arch} weights but arch='{other}'"):
        load_parser(tmp_path / "plain.pth", arch=other)


class _CreatesFile:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickle_with_code_is_refused_and_never_executed(tmp_path):
    target = tmp_path / "pwned.txt"
    payload = tmp_path / "parsing_parsenet.pth"
    torch.save({"encoder.0.conv2d.weight": torch.zeros(64, 3, 3, 3), "x": _CreatesFile(target)}, payload)
    with pytest.raises(FaceParsingWeightsError) as err:
        load_parser(payload)
    assert not target.exists()
    msg = str(err.value)
    assert "parsing_parsenet.pth" in msg and "refused" in msg and "models/facedetection" in msg
    # control: the payload is live, an unrestricted unpickler does create the file
    control = tmp_path / "control.txt"
    with open(tmp_path / "control.pkl", "wb") as f:
        pickle.dump(_CreatesFile(control), f)
    with open(tmp_path / "control.pkl", "rb") as f:
        pickle.load(f).close()  # noqa: S301 - deliberately unsafe, on our own payload
    assert control.exists()


def test_bad_files_raise_errors_that_name_the_file(tmp_path):
    missing = tmp_path / "parsing_bisenet.pth"
    with pytest.raises(FaceParsingWeightsError, match="parsing_bisenet.pth.*file not found.*models/facedetection"):
        load_parser(missing)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(FaceParsingWeightsError, match="garbage.pth.*corrupt"):
        load_parser(garbage)

    sd = build_parser("bisenet").state_dict()
    good = tmp_path / "good.pth"
    torch.save(sd, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(FaceParsingWeightsError, match="truncated.pth.*corrupt"):
        load_parser(truncated)

    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(FaceParsingWeightsError, match="bad.safetensors.*safetensors"):
        load_parser(bad_st)

    other = tmp_path / "other.pth"
    torch.save({"features.0.weight": torch.zeros(3)}, other)
    with pytest.raises(FaceParsingWeightsError, match="other.pth.*not ParseNet or BiSeNet"):
        load_parser(other)

    dropped = tmp_path / "dropped.pth"
    torch.save({k: v for k, v in sd.items() if k != "ffm.conv2.weight"}, dropped)
    with pytest.raises(FaceParsingWeightsError, match="dropped.pth.*missing keys: ffm.conv2.weight"):
        load_parser(dropped)

    extra = tmp_path / "extra.pth"
    torch.save({**sd, "cp.resnet.fc.weight": torch.zeros(1000, 512)}, extra)
    with pytest.raises(FaceParsingWeightsError, match="unexpected keys: cp.resnet.fc.weight"):
        load_parser(extra)

    reshaped = tmp_path / "reshaped.pth"
    torch.save({**sd, "conv_out.conv_out.weight": torch.zeros(11, 256, 1, 1)}, reshaped)
    with pytest.raises(FaceParsingWeightsError, match=r"conv_out.conv_out.weight \(11, 256, 1, 1\)"):
        load_parser(reshaped)

    not_tensor = tmp_path / "not_tensor.pth"
    torch.save({**sd, "ffm.conv1.weight": [1, 2, 3]}, not_tensor)
    with pytest.raises(FaceParsingWeightsError, match="not_tensor.pth.*not a tensor"):
        load_parser(not_tensor)


# ------------------------------------------------------------------------------------------------ paste-back mask
def test_mask_of_a_skin_square():
    lab = torch.zeros(1, 512, 512, dtype=torch.long)
    lab[:, 156:356, 156:356] = 1  # 200 px skin square, centred (symmetric about 255.5)
    lab[:, 0:60, 0:60] = 17  # hair block far from the square
    lab[:, 452:, 452:] = 18  # hat block far from the square
    mask = labels_to_mask(lab, 512)
    assert mask.shape == (1, 512, 512) and mask.dtype == torch.float32
    assert float(mask.min()) >= 0.0 and float(mask.max()) <= 1.0
    assert float(mask[0, 256, 256]) > 0.999
    assert float(mask[0, 256, 100]) < 0.01  # 56 px outside the square's edge
    assert float(mask[0, 256, 156]) == pytest.approx(0.5, abs=0.02)  # the edge of the blurred square
    assert float(mask[0, 480, 480]) == 0.0  # hat dropped
    assert float(mask[0, 30, 30]) > 0.9  # hair is kept (facexlib's MASK_COLORMAP keeps ParseNet's hair class)
    assert float(mask[0, 5, 5]) == 0.0  # ... except in the 10 px border band
    no_hair = labels_to_mask(lab, 512, classes=[c for c in FACE_CLASSES if c != 17])
    assert float(no_hair[0, 30, 30]) < 0.01
    square = labels_to_mask((lab == 1).long(), 512)[0]  # the square alone
    assert torch.allclose(square, square.flip(0), atol=1e-5)
    assert torch.allclose(square, square.flip(1), atol=1e-5)
    assert torch.allclose(square, square.t(), atol=1e-5)


@pytest.mark.parametrize("size,border", [(512, 10), (256, 5)])
def test_border_band_scales_with_the_crop(size, border):
    mask = labels_to_mask(torch.ones(size, size, dtype=torch.long), size)
    assert mask.shape == (size, size)
    assert float(mask[:border].abs().max()) == 0.0 and float(mask[:, -border:].abs().max()) == 0.0
    assert float(mask[border:-border, border:-border].min()) > 0.9999
    for cls in (0, 14, 15, 16, 18):  # background, neck, necklace, cloth, hat
        assert float(labels_to_mask(torch.full((1, size, size), cls), size).max()) == 0.0


@pytest.mark.parametrize("size", [512, 256])
def test_mask_equals_the_facexlib_recipe(size):
    """ParseNet-order labels through facexlib's MASK_COLORMAP + cv2 blur vs our remapped labels_to_mask."""
    kernel, sigma, border = {512: (101, 11.0, 10), 256: (51, 5.5, 5)}[size]
    native = _blocky_labels(size, seed=size)
    want = _facexlib_mask(native, kernel, sigma, border)
    got = labels_to_mask(_to_canonical(native)[None], size)[0].double().numpy()
    assert 0.2 < want.mean() < 0.9
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_mask_at_256_is_the_512_mask_scaled_down():
    native = _blocky_labels(512, seed=7)
    m512 = labels_to_mask(_to_canonical(native)[None], 512)
    m256 = labels_to_mask(_to_canonical(native[::2, ::2].copy())[None], 256)
    down = torch.nn.functional.avg_pool2d(m512[:, None], 2)[:, 0]
    assert float((m256 - down).abs().max()) < 0.05
    assert float((m256 - down).abs().mean()) < 0.005


def test_labels_to_mask_rejects_bad_input():
    with pytest.raises(ValueError, match="integer"):
        labels_to_mask(torch.zeros(1, 8, 8), 8)
    with pytest.raises(ValueError, match="classes"):
        labels_to_mask(torch.zeros(1, 8, 8, dtype=torch.long), 8, classes=[19])


# ---------------------------------------------------------------------------------------------------- FaceParser
def _forced_bisenet(cls: int) -> torch.nn.Module:
    """BiSeNet whose main head outputs a constant 256 for ``cls`` and 0 elsewhere."""
    net = build_parser("bisenet")
    with torch.no_grad():
        bn = net.conv_out.conv.bn
        bn.weight.zero_()
        bn.bias.fill_(1.0)  # the head's feature is relu(1) = 1 everywhere
        net.conv_out.conv_out.weight.zero_()
        net.conv_out.conv_out.weight[cls] = 1.0
    return net


def _forced_parsenet(native_cls: int) -> torch.nn.Module:
    net = build_parser("parsenet")
    with torch.no_grad():
        net.out_mask_conv.conv2d.weight.zero_()
        net.out_mask_conv.conv2d.bias.zero_()
        net.out_mask_conv.conv2d.bias[native_cls] = 10.0
    return net


def test_forced_bisenet_face_mask_at_512_and_256():
    parser = FaceParser(_forced_bisenet(1), "bisenet")  # skin everywhere, released input size 512
    x512, x256 = _crops(1, 512), _crops(1, 256)
    lab = parser.labels(x256)
    assert lab.shape == (1, 256, 256) and lab.dtype == torch.int64 and bool((lab == 1).all())
    m512 = parser.face_mask(x512)
    want512 = _facexlib_mask(np.ones((512, 512), np.int64))
    np.testing.assert_allclose(m512[0].double().numpy(), want512, atol=1e-5)
    m256 = parser.face_mask(x256)
    assert m256.shape == (1, 256, 256) and m256.dtype == torch.float32
    want256 = cv2.resize(want512, (256, 256))  # facexlib: mask made at 512, resized to the face size
    np.testing.assert_allclose(m256[0].double().numpy(), want256, atol=1e-4)
    assert float(m256[0, :4].max()) == 0.0 and float(m256[0, 6:-6, 6:-6].min()) > 0.999
    m384 = parser.face_mask(_crops(1, 384))  # a non-integer factor: the resize must be bilinear like cv2's
    np.testing.assert_allclose(m384[0].double().numpy(), cv2.resize(want512, (384, 384)), atol=1e-4)
    m256 += 0  # plain tensors, usable outside inference mode

    cloth = FaceParser(_forced_bisenet(16), "bisenet", input_size=SMALL)
    assert float(cloth.face_mask(x256).max()) == 0.0


class _Probe(torch.nn.Module):
    """Stands in for a network: records what it is given, returns zero logits."""

    def forward(self, x):
        self.seen = x.detach().clone()
        return torch.zeros(x.shape[0], 19, *x.shape[2:], dtype=x.dtype)


@pytest.mark.parametrize("arch,mean,std", [
    ("parsenet", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # face_restoration_helper.py / inference_parsing_parsenet.py
    ("bisenet", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # inference_parsing.py (ImageNet)
])
def test_input_is_resized_and_normalised_as_the_weights_expect(arch, mean, std):
    probe = _Probe()
    parser = FaceParser(probe, arch, input_size=SMALL)
    rgb = torch.tensor([0.2, 0.6, 0.9]).view(1, 3, 1, 1)
    parser.labels(rgb.expand(2, 3, 40, 40).contiguous())
    assert probe.seen.shape == (2, 3, SMALL, SMALL)
    want = (rgb - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(probe.seen, want.expand_as(probe.seen), atol=1e-6)
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(1, 3, 32, 32).contiguous()
    parser.labels(ramp)  # RGB order kept, bilinear resize with half-pixel centres (cv2.INTER_LINEAR)
    want = cv2.resize(ramp[0, 0].numpy(), (SMALL, SMALL), interpolation=cv2.INTER_LINEAR)
    got = probe.seen[0, 0].numpy() * std[0] + mean[0]
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("native,canonical", [(13, 17), (2, 10), (15, 9), (18, 16)])
def test_parsenet_labels_are_remapped_to_the_celebamask_order(native, canonical):
    parser = FaceParser(_forced_parsenet(native), "parsenet", input_size=SMALL)
    x = _crops(1, 96)
    assert bool((parser.labels(x) == canonical).all())
    assert int(parser.logits(x)[0, :, 10, 10].argmax()) == canonical
    mask = parser.face_mask(x)
    assert (float(mask[0, 48, 48]) > 0.99) == (canonical in FACE_CLASSES)


def test_batches_equal_one_by_one_and_sizes_work():
    net = _randomize(build_parser("bisenet"), seed=5)
    parser = FaceParser(net, "bisenet", input_size=128)  # crops of 256 and 512 are resized to it and back
    x = _crops(2, 256, seed=9)
    batch_logits = parser.logits(x)
    single = torch.cat([parser.logits(x[i:i + 1]) for i in range(2)])
    assert torch.allclose(batch_logits, single, rtol=1e-4, atol=1e-3)  # logits reach ~260 here
    lab = parser.labels(x)
    assert lab.shape == (2, 256, 256) and int(lab.min()) >= 0 and int(lab.max()) <= 18
    assert len(torch.unique(lab)) > 1
    parser.batch_size = 1  # chunked path
    assert torch.allclose(parser.face_mask(x), torch.cat([parser.face_mask(x[i:i + 1]) for i in range(2)]),
                          atol=1e-5)
    assert float((parser.labels(x) == lab).float().mean()) > 0.999
    m = parser.face_mask(torch.nn.functional.interpolate(x, size=(512, 512), mode="bilinear"))
    assert m.shape == (2, 512, 512) and float(m.min()) >= 0.0 and float(m.max()) <= 1.0
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        parser.labels(torch.rand(3, 64, 64))


def test_bf16_runs_and_returns_fp32():
    net = _randomize(build_parser("bisenet"), seed=2)
    fp32 = FaceParser(net, "bisenet", input_size=SMALL)
    x = _crops(1, SMALL, seed=4)
    want = fp32.labels(x)
    half = FaceParser(_randomize(build_parser("bisenet"), seed=2), "bisenet", dtype=torch.bfloat16,
                      input_size=SMALL)
    assert half.logits(x).dtype == torch.float32
    assert half.face_mask(x).dtype == torch.float32
    assert float((half.labels(x) == want).float().mean()) > 0.8

"""Our RetinaFace (pipelines/retinaface.py): the released state-dict layout, safe loading of .pth/.safetensors,
prior boxes, decoding, NMS and the detector end to end on random or hand-forced weights (no weight files in CI).

Architecture facts used below (key names, shapes, counts) come from the published reference code and docs:
- biubug6/Pytorch_Retinaface `models/net.py` (conv_bn / conv_dw / SSH / FPN), `models/retinaface.py` (heads as
  ModuleLists of `conv1x1` with 2 anchors, `body` = IntermediateLayerGetter), `data/config.py` (cfg_mnet: in 32 /
  out 64, return stage1..3; cfg_re50: in 256 / out 256, return layer2..4; min_sizes, steps, variance), `detect.py`
  (BGR minus (104, 117, 123)), README ("model size only 1.7M" for mobilenet0.25);
- xinntao/facexlib `facexlib/detection/__init__.py` (strip `module.`, strict load), `retinaface_utils.py`
  (PriorBox, decode, decode_landm) and yinnhao/facexlib `facexlib/detection/retinaface_net.py` (MobileNetV1 stages);
- torchvision resnet50 key names (conv1/bn1/layer{1..4}.{i}.conv{1,2,3}/bn{1,2,3}/downsample.{0,1}) and its
  published parameter count 25,557,032 (23,508,032 without the 2048x1000 fc);
- OpenVINO Open Model Zoo `retinaface-resnet50-pytorch` (the biubug6 model): 27.2646 MParams (counted on the
  converted graph, i.e. with BatchNorm folded into conv biases), a 640x640 input gives 16800 priors.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from comfyui_bfr.pipelines import retinaface as rf
from comfyui_bfr.pipelines.retinaface import (
    ARCHS, RetinaFace, RetinaFaceDetector, RetinaFaceWeightsError, build_retinaface, decode_boxes, decode_landmarks,
    load_retinaface, nms, prior_boxes,
)

H, W = 96, 128  # small test images (height, width)

# (key, shape) in the released detection_mobilenet0.25_Final.pth layout (after stripping `module.`).
MOBILENET_KEYS = [
    ("body.stage1.0.0.weight", (8, 3, 3, 3)),       # conv_bn(3, 8, stride 2)
    ("body.stage1.0.1.weight", (8,)),
    ("body.stage1.0.1.running_var", (8,)),
    ("body.stage1.1.0.weight", (8, 1, 3, 3)),       # conv_dw(8, 16): depthwise 3x3
    ("body.stage1.1.1.bias", (8,)),
    ("body.stage1.1.3.weight", (16, 8, 1, 1)),      # ... pointwise 1x1 at index 3, its BN at 4
    ("body.stage1.1.4.running_mean", (16,)),
    ("body.stage1.2.3.weight", (32, 16, 1, 1)),
    ("body.stage1.5.3.weight", (64, 64, 1, 1)),
    ("body.stage2.0.0.weight", (64, 1, 3, 3)),
    ("body.stage2.0.3.weight", (128, 64, 1, 1)),
    ("body.stage2.5.4.weight", (128,)),
    ("body.stage3.0.3.weight", (256, 128, 1, 1)),
    ("body.stage3.1.0.weight", (256, 1, 3, 3)),
    ("body.stage3.1.3.weight", (256, 256, 1, 1)),
    ("fpn.output1.0.weight", (64, 64, 1, 1)),
    ("fpn.output2.0.weight", (64, 128, 1, 1)),
    ("fpn.output3.0.weight", (64, 256, 1, 1)),
    ("fpn.output3.1.running_var", (64,)),
    ("fpn.merge1.0.weight", (64, 64, 3, 3)),
    ("fpn.merge2.1.bias", (64,)),
    ("ssh1.conv3X3.0.weight", (32, 64, 3, 3)),
    ("ssh1.conv5X5_1.0.weight", (16, 64, 3, 3)),
    ("ssh2.conv5X5_2.0.weight", (16, 16, 3, 3)),
    ("ssh2.conv7X7_2.0.weight", (16, 16, 3, 3)),
    ("ssh3.conv7x7_3.0.weight", (16, 16, 3, 3)),
    ("ssh3.conv7x7_3.1.weight", (16,)),
    ("ClassHead.0.conv1x1.weight", (4, 64, 1, 1)),
    ("ClassHead.2.conv1x1.bias", (4,)),
    ("BboxHead.1.conv1x1.weight", (8, 64, 1, 1)),
    ("BboxHead.2.conv1x1.bias", (8,)),
    ("LandmarkHead.0.conv1x1.weight", (20, 64, 1, 1)),
    ("LandmarkHead.2.conv1x1.weight", (20, 64, 1, 1)),
]
# Absent: IntermediateLayerGetter drops what follows the last returned stage (MobileNetV1's avg / fc).
MOBILENET_ABSENT = ["body.fc.weight", "body.avg.weight", "body.stage4.0.0.weight", "ClassHead.3.conv1x1.weight",
                    "ssh1.conv7X7_3.0.weight"]

RESNET_KEYS = [
    ("body.conv1.weight", (64, 3, 7, 7)),
    ("body.bn1.weight", (64,)),
    ("body.bn1.running_mean", (64,)),
    ("body.layer1.0.conv1.weight", (64, 64, 1, 1)),
    ("body.layer1.0.conv2.weight", (64, 64, 3, 3)),
    ("body.layer1.0.conv3.weight", (256, 64, 1, 1)),
    ("body.layer1.0.bn3.weight", (256,)),
    ("body.layer1.0.downsample.0.weight", (256, 64, 1, 1)),
    ("body.layer1.0.downsample.1.running_var", (256,)),
    ("body.layer1.2.conv1.weight", (64, 256, 1, 1)),
    ("body.layer2.0.conv1.weight", (128, 256, 1, 1)),
    ("body.layer2.0.conv2.weight", (128, 128, 3, 3)),
    ("body.layer2.0.downsample.0.weight", (512, 256, 1, 1)),
    ("body.layer2.3.bn3.bias", (512,)),
    ("body.layer3.0.downsample.0.weight", (1024, 512, 1, 1)),
    ("body.layer3.5.conv3.weight", (1024, 256, 1, 1)),
    ("body.layer4.0.conv2.weight", (512, 512, 3, 3)),
    ("body.layer4.0.downsample.0.weight", (2048, 1024, 1, 1)),
    ("body.layer4.2.conv3.weight", (2048, 512, 1, 1)),
    ("fpn.output1.0.weight", (256, 512, 1, 1)),
    ("fpn.output2.0.weight", (256, 1024, 1, 1)),
    ("fpn.output3.0.weight", (256, 2048, 1, 1)),
    ("fpn.merge1.0.weight", (256, 256, 3, 3)),
    ("ssh1.conv3X3.0.weight", (128, 256, 3, 3)),
    ("ssh1.conv5X5_1.0.weight", (64, 256, 3, 3)),
    ("ssh3.conv7x7_3.0.weight", (64, 64, 3, 3)),
    ("ClassHead.0.conv1x1.weight", (4, 256, 1, 1)),
    ("BboxHead.2.conv1x1.weight", (8, 256, 1, 1)),
    ("LandmarkHead.2.conv1x1.weight", (20, 256, 1, 1)),
    ("LandmarkHead.1.conv1x1.bias", (20,)),
]
RESNET_ABSENT = ["body.fc.weight", "body.avgpool.weight", "body.layer1.1.downsample.0.weight",
                 "body.layer2.4.conv1.weight", "body.layer4.3.conv1.weight"]


def _randomise_bn(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN statistics so that a lost running_mean / running_var would change the outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return net


@pytest.fixture(scope="module")
def mnet() -> RetinaFace:
    torch.manual_seed(0)
    return _randomise_bn(build_retinaface("mobilenet0.25"))


def _image(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _bgr_input(img: np.ndarray) -> torch.Tensor:
    """The reference preprocessing written out: BGR float pixels minus (104, 117, 123), CHW."""
    x = img[:, :, ::-1].astype(np.float32) - np.array([104, 117, 123], np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


# ------------------------------------------------------------------------------------------------ released layout


@pytest.mark.parametrize("arch,keys,absent", [("mobilenet0.25", MOBILENET_KEYS, MOBILENET_ABSENT),
                                              ("resnet50", RESNET_KEYS, RESNET_ABSENT)])
def test_state_dict_keys_and_shapes_match_the_released_layout(arch, keys, absent):
    sd = build_retinaface(arch).state_dict()
    for key, shape in keys:
        assert key in sd, f"{arch}: released key {key} missing"
        assert tuple(sd[key].shape) == shape, f"{arch}: {key} is {tuple(sd[key].shape)}, released {shape}"
    for key in absent:
        assert key not in sd, f"{arch}: {key} is not in the released files"
    # Exactly the three heads, three SSH modules, five FPN convs and the body -- nothing else at top level.
    assert {k.split(".")[0] for k in sd} == {"body", "fpn", "ssh1", "ssh2", "ssh3", "ClassHead", "BboxHead",
                                             "LandmarkHead"}


def test_resnet50_parameter_counts_match_published_figures():
    net = build_retinaface("resnet50")
    body = sum(p.numel() for p in net.body.parameters())
    assert body == 25_557_032 - (2048 * 1000 + 1000)  # torchvision resnet50 without its fc
    total = sum(p.numel() for p in net.parameters())
    bn_channels = sum(m.num_features for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    # OMZ counts the converted graph, where each BN (weight + bias) folds into one conv bias per channel.
    assert 27_264_550 <= total - bn_channels <= 27_264_650
    assert abs(total - 27.3e6) < 0.05e6
    # The stride-8/16/32 levels come out with ceil(n / s) cells through the 7x7/2 stem and the 3x3/2 max pool.
    with torch.no_grad():
        loc, conf, landms = net(torch.zeros(1, 3, 70, 90))
    assert loc.shape == (1, prior_boxes(70, 90).shape[0], 4) and conf.shape[-1] == 2 and landms.shape[-1] == 10


def test_mobilenet_parameter_count_by_hand_and_file_size():
    def conv_bn(cin, cout, k, groups=1):
        return cin // groups * cout * k * k + 2 * cout

    def dw(cin, cout):
        return conv_bn(cin, cin, 3, groups=cin) + conv_bn(cin, cout, 1)

    body = conv_bn(3, 8, 3) + sum(dw(a, b) for a, b in [(8, 16), (16, 32), (32, 32), (32, 64), (64, 64)])
    body += dw(64, 128) + 5 * dw(128, 128) + dw(128, 256) + dw(256, 256)
    c = 64
    fpn = conv_bn(64, c, 1) + conv_bn(128, c, 1) + conv_bn(256, c, 1) + 2 * conv_bn(c, c, 3)
    ssh = conv_bn(c, c // 2, 3) + conv_bn(c, c // 4, 3) + 3 * conv_bn(c // 4, c // 4, 3)
    heads = sum(c * 2 * k + 2 * k for k in (2, 4, 10))  # 1x1 conv with bias, 2 anchors, per level
    expected = body + fpn + 3 * ssh + 3 * heads
    net = build_retinaface("mobilenet0.25")
    assert sum(p.numel() for p in net.parameters()) == expected
    assert 0.40e6 < expected < 0.46e6
    # README: "Model size only 1.7M" -- the float32 state dict (parameters + BN statistics).
    size = sum(v.numel() * v.element_size() for k, v in net.state_dict().items() if "num_batches" not in k)
    assert 1.6e6 < size < 1.8e6


def test_arch_names_and_file_names():
    assert ARCHS == {"resnet50": "detection_Resnet50_Final.pth", "mobilenet0.25": "detection_mobilenet0.25_Final.pth"}
    assert RetinaFace("mobile0.25").arch == "mobilenet0.25"  # facexlib's spelling
    with pytest.raises(ValueError, match="unknown RetinaFace arch"):
        RetinaFace("vgg16")


def _bn_act(x, sd, prefix, slope):
    x = torch.nn.functional.batch_norm(x, sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"],
                                       sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], False, 0.0, 1e-5)
    return x if slope is None else torch.nn.functional.leaky_relu(x, slope)


def _conv(x, sd, prefix, stride=1, groups=1):
    w = sd[f"{prefix}.weight"]
    return torch.nn.functional.conv2d(x, w, sd.get(f"{prefix}.bias"), stride, w.shape[-1] // 2, 1, groups)


def _mobilenet_reference(sd, x):
    """The mobilenet0.25 RetinaFace forward written out functionally from the published facts: conv_bn /
    conv_dw blocks (leaky 0.1), FPN laterals + nearest top-down merges (leaky 0.1 at width 64), SSH with the
    7x7 branch stacked on the 5x5 trunk, relu after the concat, 1x1 heads in (row, col, anchor) order."""
    def cbr(x, p, stride=1, slope=0.1, groups=1):
        return _bn_act(_conv(x, sd, f"{p}.0", stride, groups), sd, f"{p}.1", slope)

    def dw(x, p, stride):
        x = _bn_act(_conv(x, sd, f"{p}.0", stride, groups=x.shape[1]), sd, f"{p}.1", 0.1)
        return _bn_act(_conv(x, sd, f"{p}.3"), sd, f"{p}.4", 0.1)

    x = cbr(x, "body.stage1.0", 2)
    for i, s in enumerate([1, 2, 1, 2, 1], start=1):
        x = dw(x, f"body.stage1.{i}", s)
    c3 = x
    for i, s in enumerate([2, 1, 1, 1, 1, 1]):
        x = dw(x, f"body.stage2.{i}", s)
    c4 = x
    c5 = dw(dw(c4, "body.stage3.0", 2), "body.stage3.1", 1)
    o1, o2, o3 = cbr(c3, "fpn.output1"), cbr(c4, "fpn.output2"), cbr(c5, "fpn.output3")
    up = torch.nn.functional.interpolate
    o2 = cbr(o2 + up(o3, size=o2.shape[-2:], mode="nearest"), "fpn.merge2")
    o1 = cbr(o1 + up(o2, size=o1.shape[-2:], mode="nearest"), "fpn.merge1")
    outs = {"loc": [], "conf": [], "landms": []}
    for lvl, f in enumerate([o1, o2, o3]):
        p = f"ssh{lvl + 1}"
        a = cbr(f, f"{p}.conv3X3", slope=None)
        t = cbr(f, f"{p}.conv5X5_1")
        b = cbr(t, f"{p}.conv5X5_2", slope=None)
        c = cbr(cbr(t, f"{p}.conv7X7_2"), f"{p}.conv7x7_3", slope=None)
        f = torch.relu(torch.cat([a, b, c], 1))
        for name, head, k in (("loc", "BboxHead", 4), ("conf", "ClassHead", 2), ("landms", "LandmarkHead", 10)):
            y = _conv(f, sd, f"{head}.{lvl}.conv1x1")
            outs[name].append(y.permute(0, 2, 3, 1).reshape(y.shape[0], -1, k))
    return tuple(torch.cat(outs[n], 1) for n in ("loc", "conf", "landms"))


def test_mobilenet_forward_matches_a_functional_reference(mnet):
    x = _bgr_input(_image(7, 70, 90))
    with torch.no_grad():
        got = mnet(x)
        want = _mobilenet_reference(mnet.state_dict(), x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_activation_slopes_follow_the_width_rule():
    """Leaky 0.1 in the MobileNet body and, at width <= 64, in FPN/SSH; plain ReLU (slope 0) at width 256;
    the SSH branch ends (conv3X3, conv5X5_2, conv7x7_3) have no activation before the concat."""
    for arch, slope in (("mobilenet0.25", 0.1), ("resnet50", 0.0)):
        net = build_retinaface(arch)
        for mod in (net.fpn.output1, net.fpn.merge2, net.ssh2.conv5X5_1, net.ssh2.conv7X7_2):
            assert isinstance(mod[2], torch.nn.LeakyReLU) and mod[2].negative_slope == slope
        for mod in (net.ssh1.conv3X3, net.ssh1.conv5X5_2, net.ssh1.conv7x7_3):
            assert len(mod) == 2
    body = build_retinaface("mobilenet0.25").body
    assert body.stage1[0][2].negative_slope == 0.1 and body.stage2[3][5].negative_slope == 0.1


# ----------------------------------------------------------------------------------------------------- loading


def _prefixed(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"module.{k}": v.clone() for k, v in sd.items()}


@pytest.mark.parametrize("fmt", ["pth", "pth-legacy", "safetensors", "pth-wrapped"])
def test_load_roundtrip_with_module_prefix_gives_identical_outputs(tmp_path, mnet, fmt):
    sd = _prefixed(mnet.state_dict())
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pth")
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "pth-legacy":  # the pre-1.6 serialisation the 2019 release files use
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    elif fmt == "pth-wrapped":
        torch.save({"state_dict": sd}, path)
    else:
        torch.save(sd, path)
    det = load_retinaface(path)
    assert isinstance(det, RetinaFaceDetector) and det.arch == "mobilenet0.25"
    assert load_retinaface(path, arch="mobilenet0.25").arch == "mobilenet0.25"
    x = _bgr_input(_image(1))
    with torch.no_grad():
        ref = mnet(x)
        got = det.net(x)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)


def test_load_resnet50_arch_inferred_from_fp16_weights(tmp_path):
    torch.manual_seed(1)
    net = build_retinaface("resnet50")
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in net.state_dict().items()}
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}  # old files may lack them
    path = tmp_path / "detection_Resnet50_Final.pth"
    torch.save(_prefixed(sd), path)
    det = load_retinaface(path)
    assert det.arch == "resnet50" and det.dtype == torch.float32
    got = det.net.state_dict()
    for key in ("body.layer3.5.conv3.weight", "fpn.output3.0.weight", "LandmarkHead.2.conv1x1.bias"):
        assert torch.equal(got[key], sd[key].float())
    with pytest.raises(RetinaFaceWeightsError, match="holds resnet50 weights but arch='mobilenet0.25'"):
        load_retinaface(path, arch="mobilenet0.25")


class _WritesAFile:
    """A pickled object whose unpickling would create ``marker`` -- the shape of a malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_with_code_is_refused_and_never_executed(tmp_path, mnet):
    marker = tmp_path / "pwned"
    path = tmp_path / "detection_mobilenet0.25_Final.pth"
    sd = dict(mnet.state_dict())
    sd["payload"] = _WritesAFile(marker)
    torch.save(sd, path)
    with pytest.raises(RetinaFaceWeightsError) as err:
        load_retinaface(path)
    msg = str(err.value)
    assert path.name in msg and str(tmp_path) in msg and "pickled" in msg and "models/facedetection" in msg
    assert not marker.exists()
    # The payload is real: a full (unsafe) unpickle does run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_missing_truncated_and_corrupt_files_name_the_file(tmp_path, mnet):
    missing = tmp_path / "nope" / "detection_Resnet50_Final.pth"
    with pytest.raises(RetinaFaceWeightsError, match="not found") as err:
        load_retinaface(missing)
    assert missing.name in str(err.value) and str(missing.parent) in str(err.value)
    assert "models/facedetection" in str(err.value)
    assert isinstance(err.value, ValueError)

    good = tmp_path / "good.pth"
    torch.save(mnet.state_dict(), good)
    for name, legacy in (("trunc.pth", False), ("trunc_legacy.pth", True)):
        src = tmp_path / f"src_{name}"
        torch.save(mnet.state_dict(), src, _use_new_zipfile_serialization=not legacy)
        data = src.read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(RetinaFaceWeightsError, match="truncated or corrupt") as err:
            load_retinaface(tmp_path / name)
        assert name in str(err.value)

    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(os.urandom(64))
    with pytest.raises(RetinaFaceWeightsError, match="bad.safetensors"):
        load_retinaface(bad_st)
    with pytest.raises(RetinaFaceWeightsError, match="is a folder"):
        load_retinaface(tmp_path)


def test_wrong_keys_and_shapes_are_named(tmp_path, mnet):
    sd = dict(mnet.state_dict())
    other = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, other)
    with pytest.raises(RetinaFaceWeightsError, match="not RetinaFace weights"):
        load_retinaface(other)

    dropped = dict(sd)
    del dropped["ssh2.conv7x7_3.0.weight"]
    dropped["ssh2.conv7X7_3.0.weight"] = sd["ssh2.conv7x7_3.0.weight"]  # the capitalisation trap
    path = tmp_path / "dropped.pth"
    torch.save(dropped, path)
    with pytest.raises(RetinaFaceWeightsError) as err:
        load_retinaface(path)
    assert "missing keys: ssh2.conv7x7_3.0.weight" in str(err.value)
    assert "unexpected keys: ssh2.conv7X7_3.0.weight" in str(err.value)

    reshaped = dict(sd)
    reshaped["ClassHead.1.conv1x1.weight"] = torch.zeros(6, 64, 1, 1)  # 3 anchors instead of 2
    path = tmp_path / "reshaped.safetensors"
    save_file({k: v.contiguous() for k, v in reshaped.items()}, str(path))
    with pytest.raises(RetinaFaceWeightsError, match=r"ClassHead.1.conv1x1.weight \(6, 64, 1, 1\) \(expected \(4, 64"):
        load_retinaface(path)

    notdict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], notdict)
    with pytest.raises(RetinaFaceWeightsError, match="expected a state dict"):
        load_retinaface(notdict)


# -------------------------------------------------------------------------------------------------------- priors


def test_prior_count_and_first_priors():
    h, w = 480, 640
    priors = prior_boxes(h, w)
    expected = sum(math.ceil(h / s) * math.ceil(w / s) * 2 for s in (8, 16, 32))
    assert expected == (60 * 80 + 30 * 40 + 15 * 20) * 2 == 12600
    assert priors.shape == (expected, 4) and priors.dtype == torch.float32
    assert prior_boxes(640, 640).shape[0] == 16800  # OMZ figure for a 640x640 input
    assert prior_boxes(100, 130).shape[0] == (13 * 17 + 7 * 9 + 4 * 5) * 2  # ceil on non-multiples

    def exp(cx, cy, size):
        return [cx / w, cy / h, size / w, size / h]

    torch.testing.assert_close(priors[0], torch.tensor(exp(4, 4, 16)))     # step 8, cell (0, 0), 16 px
    torch.testing.assert_close(priors[1], torch.tensor(exp(4, 4, 32)))     # same cell, 32 px
    torch.testing.assert_close(priors[2], torch.tensor(exp(12, 4, 16)))    # next column
    torch.testing.assert_close(priors[2 * 80], torch.tensor(exp(4, 12, 16)))  # next row
    torch.testing.assert_close(priors[9600], torch.tensor(exp(8, 8, 64)))  # first stride-16 prior
    torch.testing.assert_close(priors[9601], torch.tensor(exp(8, 8, 128)))
    torch.testing.assert_close(priors[12000 + 1], torch.tensor(exp(16, 16, 512)))  # first stride-32 pair
    torch.testing.assert_close(priors[-1], torch.tensor(exp(624, 464, 512)))

    clipped = prior_boxes(h, w, clip=True)
    assert clipped.max() <= 1.0 and clipped.min() >= 0.0 and clipped[-1, 3] == 1.0  # 512 / 480 clipped


def test_net_prediction_count_matches_priors(mnet):
    for h, w in ((H, W), (70, 90), (33, 47)):
        with torch.no_grad():
            loc, conf, landms = mnet(torch.zeros(2, 3, h, w))
        p = prior_boxes(h, w).shape[0]
        assert loc.shape == (2, p, 4) and conf.shape == (2, p, 2) and landms.shape == (2, p, 10)


# -------------------------------------------------------------------------------------------------------- decode


def test_zero_offsets_decode_to_the_priors():
    priors = prior_boxes(H, W)
    boxes = decode_boxes(torch.zeros(len(priors), 4), priors)
    corners = torch.stack([priors[:, 0] - priors[:, 2] / 2, priors[:, 1] - priors[:, 3] / 2,
                           priors[:, 0] + priors[:, 2] / 2, priors[:, 1] + priors[:, 3] / 2], dim=1)
    torch.testing.assert_close(boxes, corners)
    pts = decode_landmarks(torch.zeros(len(priors), 10), priors).reshape(-1, 5, 2)
    torch.testing.assert_close(pts, priors[:, None, :2].expand(-1, 5, 2))


def test_hand_made_offsets():
    prior = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    cases = [
        ([1.0, 0.0, 0.0, 0.0], [0.42, 0.3, 0.62, 0.7]),                       # cx + 0.1 * w
        ([0.0, 0.0, math.log(2) / 0.2, 0.0], [0.3, 0.3, 0.7, 0.7]),           # w * exp(0.2 * t) = 2 w
        ([0.0, -1.0, 0.0, 5 * math.log(0.5)], [0.4, 0.36, 0.6, 0.56]),        # cy - 0.1 * h, h / 2
    ]
    for loc, want in cases:
        torch.testing.assert_close(decode_boxes(torch.tensor([loc]), prior), torch.tensor([want]))
    pre = torch.tensor([[1.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0, -1.0, 2.0, 2.0]])
    want = [0.52, 0.5, 0.5, 0.54, 0.48, 0.5, 0.5, 0.46, 0.54, 0.58]  # centre + 0.1 * (w, h) * offset
    torch.testing.assert_close(decode_landmarks(pre, prior), torch.tensor([want]))
    # Other variances are honoured.
    torch.testing.assert_close(decode_boxes(torch.tensor([[1.0, 0, 0, 0]]), prior, (0.5, 0.2)),
                               torch.tensor([[0.5, 0.3, 0.7, 0.7]]))


def test_decode_is_batched_over_leading_dims():
    priors = prior_boxes(H, W)
    g = torch.Generator().manual_seed(0)
    loc, pre = torch.randn(3, len(priors), 4, generator=g), torch.randn(3, len(priors), 10, generator=g)
    batched_b, batched_l = decode_boxes(loc, priors), decode_landmarks(pre, priors)
    for i in range(3):
        torch.testing.assert_close(batched_b[i], decode_boxes(loc[i], priors))
        torch.testing.assert_close(batched_l[i], decode_landmarks(pre[i], priors))


# ----------------------------------------------------------------------------------------------------------- NMS


def test_nms_hand_made():
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 6], [20, 20, 30, 30]])  # IoU(0, 1) = 60 / 100
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert nms(boxes, scores, 0.4).tolist() == [0, 2]
    assert nms(boxes, scores, 0.7).tolist() == [0, 1, 2]
    scores = torch.tensor([0.5, 0.9, 0.7])
    assert nms(boxes, scores, 0.4).tolist() == [1, 2]
    assert nms(boxes, scores, 0.7).tolist() == [1, 2, 0]
    assert nms(boxes[:0], scores[:0], 0.4).tolist() == []
    assert nms(boxes, scores, 0.4).dtype == torch.long


def test_nms_matches_a_brute_force_reference():
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(60, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(60, 2, generator=g) * 20], dim=1)
    scores = torch.rand(60, generator=g)

    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    for thr in (0.1, 0.3, 0.5):
        kept: list[int] = []
        for i in sorted(range(60), key=lambda k: -float(scores[k])):
            if all(iou(boxes[i].tolist(), boxes[j].tolist()) <= thr for j in kept):
                kept.append(i)
        assert nms(boxes, scores, thr).tolist() == kept


# ------------------------------------------------------------------------------------------------------ detector


def _forced_net() -> RetinaFace:
    """All head convs zero (outputs = biases): background everywhere, boxes = priors; then two hand-set faces."""
    torch.manual_seed(0)
    net = build_retinaface("mobilenet0.25")
    with torch.no_grad():
        for heads in (net.ClassHead, net.BboxHead, net.LandmarkHead):
            for head in heads:
                head.conv1x1.weight.zero_()
                head.conv1x1.bias.zero_()
        for head in net.ClassHead:
            head.conv1x1.bias.copy_(torch.tensor([5.0, -5.0, 5.0, -5.0]))  # (bg, face) per anchor
        # Stride 16, anchor 0 (64 px): box offset (1, 0, 0, 0) and five distinct landmark offsets.
        net.BboxHead[1].conv1x1.bias[0] = 1.0
        offsets = [-1, -1, 1, -1, 0, 0, -1, 1, 1, 1]
        net.LandmarkHead[1].conv1x1.bias[:10] = torch.tensor(offsets, dtype=torch.float32)

    def fire(level_out, r, c, anchor, logit):
        out = level_out.clone()
        out[:, 2 * anchor, r, c] = -logit
        out[:, 2 * anchor + 1, r, c] = logit
        return out

    # Raw conv output is (B, anchors * 2, rows, cols): channel 2a is background, 2a + 1 face.
    net.ClassHead[1].conv1x1.register_forward_hook(lambda m, i, o: fire(o, 2, 5, 0, 5.0))
    net.ClassHead[0].conv1x1.register_forward_hook(lambda m, i, o: fire(o, 9, 3, 0, 0.5))
    return net


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_detector_finds_the_forced_faces_at_the_expected_pixels():
    det = RetinaFaceDetector(_forced_net(), "cpu", torch.float32)
    boxes, scores, points = det.detect(_image(0))[0]
    assert boxes.dtype == scores.dtype == points.dtype == np.float32
    assert boxes.shape == (1, 4) and scores.shape == (1,) and points.shape == (1, 5, 2)  # default threshold 0.8
    boxes, scores, points = det.detect(_image(0), conf_threshold=0.5)[0]
    assert boxes.shape == (2, 4)
    # Face 1: stride 16, cell (row 2, col 5) -> centre (88, 40), 64 px prior; cx shifted by 0.1 * 64.
    np.testing.assert_allclose(boxes[0], [88 + 6.4 - 32, 40 - 32, 88 + 6.4 + 32, 40 + 32], atol=1e-3)
    np.testing.assert_allclose(scores[0], _sigmoid(10.0), rtol=1e-5)
    d = 6.4  # 0.1 * 64 px per unit of landmark offset, relative to the prior centre
    np.testing.assert_allclose(points[0], [[88 - d, 40 - d], [88 + d, 40 - d], [88, 40], [88 - d, 40 + d],
                                           [88 + d, 40 + d]], atol=1e-3)
    # Face 2: stride 8, cell (row 9, col 3) -> centre (28, 76), 16 px prior, no offsets; lower score, second.
    np.testing.assert_allclose(boxes[1], [20, 68, 36, 84], atol=1e-3)
    np.testing.assert_allclose(scores[1], _sigmoid(1.0), rtol=1e-5)
    np.testing.assert_allclose(points[1], np.tile([[28.0, 76.0]], (5, 1)), atol=1e-3)
    # Nothing above the threshold -> empty arrays of the documented shapes.
    boxes, scores, points = det.detect(_image(0), conf_threshold=0.99999)[0]
    assert boxes.shape == (0, 4) and scores.shape == (0,) and points.shape == (0, 5, 2)
    assert boxes.dtype == scores.dtype == points.dtype == np.float32


def test_detector_matches_the_reference_pipeline_written_out(mnet):
    """Random weights, every prior a candidate: our detect equals preprocessing + forward + softmax + decode +
    greedy NMS spelled out here step by step."""
    img = _image(5)
    det = RetinaFaceDetector(mnet, "cpu", torch.float32)
    boxes, scores, points = det.detect(img, conf_threshold=0.5, nms_threshold=0.3)[0]
    with torch.no_grad():
        loc, conf, landms = mnet(_bgr_input(img))
    priors = prior_boxes(H, W)
    s = torch.softmax(conf[0], -1)[:, 1]
    sel = torch.nonzero(s > 0.5).squeeze(1)
    assert 0 < len(sel) < len(priors)
    b = decode_boxes(loc[0, sel], priors[sel]) * torch.tensor([W, H, W, H])
    keep = nms(b, s[sel], 0.3)
    np.testing.assert_allclose(boxes, b[keep].numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(scores, s[sel][keep].numpy(), rtol=1e-5)
    assert np.all(np.diff(scores) <= 0)
    pts = decode_landmarks(landms[0, sel], priors[sel]).reshape(-1, 5, 2) * torch.tensor([W, H])
    np.testing.assert_allclose(points, pts[keep].numpy(), rtol=1e-5, atol=1e-4)


def test_batched_equals_one_by_one_and_uint8_equals_float(mnet):
    det = RetinaFaceDetector(mnet, "cpu", torch.float32)
    calls = []
    handle = det.net.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape)))
    try:
        images = [_image(10), _image(11, 64, 80), _image(12), _image(13)]
        batched = det.detect(images, conf_threshold=0.5)
        assert sorted(calls) == sorted([(3, 3, H, W), (1, 3, 64, 80)])  # equal sizes share one forward
        single = [det.detect(im, conf_threshold=0.5)[0] for im in images]
        stacked = det.detect(np.stack([images[0], images[2], images[3]]), conf_threshold=0.5)  # BxHxWx3
        as_float = det.detect([im.astype(np.float32) / 255.0 for im in images], conf_threshold=0.5)
    finally:
        handle.remove()
    assert len(batched) == 4 and any(len(r[0]) for r in batched)
    for got, ref in zip(batched, single):
        for a, b in zip(got, ref):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
    for got, ref in zip(stacked, [single[0], single[2], single[3]]):
        for a, b in zip(got, ref):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
    for got, ref in zip(as_float, batched):
        for a, b in zip(got, ref):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
    # Batches larger than max_batch are split, results unchanged.
    det.max_batch = 2
    again = det.detect([images[0], images[2], images[3]], conf_threshold=0.5)
    for got, ref in zip(again, [single[0], single[2], single[3]]):
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cpu_is_finite_and_finds_the_forced_face(dtype):
    det = RetinaFaceDetector(_forced_net(), "cpu", dtype)
    assert next(det.net.parameters()).dtype == dtype
    boxes, scores, points = det.detect(_image(0), conf_threshold=0.5)[0]
    assert boxes.dtype == np.float32 and np.isfinite(boxes).all() and np.isfinite(points).all()
    assert boxes.shape == (2, 4)
    np.testing.assert_allclose(boxes[0], [62.4, 8, 126.4, 72], atol=0.5)
    np.testing.assert_allclose(scores[0], _sigmoid(10.0), atol=1e-3)
    torch.manual_seed(2)
    rand = RetinaFaceDetector(_randomise_bn(build_retinaface("mobilenet0.25")), "cpu", dtype)
    for arr in rand.detect(_image(3), conf_threshold=0.0)[0]:
        assert np.isfinite(arr).all()


def test_bad_images_are_refused(mnet):
    det = RetinaFaceDetector(mnet, "cpu", torch.float32)
    with pytest.raises(ValueError, match=r"image 0: expected an RGB array of shape \(H, W, 3\)"):
        det.detect(np.zeros((H, W), np.uint8))
    with pytest.raises(ValueError, match="uint8 or float"):
        det.detect([np.zeros((H, W, 3), np.int32)])


def test_module_has_no_forbidden_imports():
    src = Path(rf.__file__).read_text()
    for name in ("facexlib", "basicsr", "insightface", "onnxruntime", "torchvision", "import comfy", "from comfy",
                 "nodes", "print("):
        lines = [ln for ln in src.splitlines() if name in ln and (ln.lstrip().startswith(("import", "from"))
                                                                 or name == "print(")]
        assert not lines, f"{name}: {lines}"

"""`BFR Degrade (Classical)` node: thin adapter over pipelines.degradation, and the IMAGE / LATENT checks of
nodes/helpers.py that every node runs its inputs through (no ComfyUI needed)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from comfyui_bfr.nodes.helpers import NodeInputError, check_latent, check_megapixels, to_rgb
from comfyui_bfr.nodes.degrade import BFRDegradeClassical
from comfyui_bfr.pipelines import degradation
from comfyui_bfr.pipelines.sample_data import sample_face


@pytest.fixture(scope="module")
def face_bhwc():
    img = sample_face(64)
    return torch.from_numpy(img).float().div(255.0)[None].repeat(2, 1, 1, 1)


def test_node_matches_pipeline_and_reports_params(face_bhwc):
    node = BFRDegradeClassical()
    out, report = node.degrade(face_bhwc, "dr-bfr", 7, "torch", "libjpeg")
    assert out.shape == face_bhwc.shape and out.dtype == face_bhwc.dtype
    ref, params = degradation.degrade(face_bhwc.movedim(-1, 1), degradation.get_preset("dr-bfr"), seed=7,
                                      backend="torch")
    torch.testing.assert_close(out, ref.movedim(1, -1))
    parsed = json.loads(report)
    assert parsed["preset"] == "dr-bfr" and parsed["seed"] == 7
    assert parsed["images"] == json.loads(json.dumps(params))
    assert len(parsed["images"]) == 2


def test_node_is_deterministic_by_seed(face_bhwc):
    node = BFRDegradeClassical()
    a, _ = node.degrade(face_bhwc, "flipnet", 1, "torch", "libjpeg")
    b, _ = node.degrade(face_bhwc, "flipnet", 1, "torch", "libjpeg")
    c, _ = node.degrade(face_bhwc, "flipnet", 2, "torch", "libjpeg")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, face_bhwc)


def test_node_does_not_modify_its_input(face_bhwc):
    before = face_bhwc.clone()
    BFRDegradeClassical().degrade(face_bhwc, "flipnet", 3, "torch", "libjpeg")
    assert torch.equal(before, face_bhwc)


@pytest.mark.parametrize("text, match", [("{not json", "not valid JSON"), ("[1, 2]", "JSON object")])
def test_bad_overrides_text_names_the_node(face_bhwc, text, match):
    with pytest.raises(NodeInputError, match=match) as info:
        BFRDegradeClassical().degrade(face_bhwc, "flipnet", 0, "torch", "libjpeg", overrides=text)
    assert "BFR Degrade (Classical)" in str(info.value)


def test_nan_pixels_give_a_node_error(face_bhwc):
    bad = face_bhwc.clone()
    bad[0, 3, 3, 0] = float("nan")
    with pytest.raises(NodeInputError, match="BFR Degrade"):
        BFRDegradeClassical().degrade(bad, "flipnet", 0, "torch", "libjpeg")


def test_preset_widget_lists_every_preset():
    choices = BFRDegradeClassical.INPUT_TYPES()["required"]["preset"][0]
    assert set(choices) == set(degradation.PRESETS)
    assert {"flipnet", "dr-bfr", "clr-face", "clr-face-x32", "custom"} <= set(choices)
    assert {f"dr2-{s}-x{r}" for s in ("mild", "medium", "severe") for r in (4, 8, 16)} <= set(choices)


def test_sample_face_is_a_real_photo():
    img = sample_face(64)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and img.std() > 20


# ------------------------------------------------------------------ the IMAGE / LATENT checks every node shares
def test_to_rgb_rejects_an_empty_batch(face_bhwc):
    with pytest.raises(NodeInputError, match=r"\[BFR Degrade \(Classical\)\] the IMAGE batch is empty \(0 images\)"):
        BFRDegradeClassical().degrade(face_bhwc[:0], "flipnet", 0, "torch", "libjpeg")
    with pytest.raises(NodeInputError, match="zero size"):
        to_rgb("X", face_bhwc[:, :0])


def test_to_rgb_rejects_0_255_scaled_images(face_bhwc):
    with pytest.raises(NodeInputError, match=r"\[BFR Degrade \(Classical\)\] IMAGE values go up to \d+: it looks "
                                             r"0-255 scaled.*ComfyUI IMAGEs are floats in 0\.\.1.*divide by 255"):
        BFRDegradeClassical().degrade(face_bhwc * 255.0, "flipnet", 0, "torch", "libjpeg")
    with pytest.raises(NodeInputError, match=r"\[N\] reference values go up to"):
        to_rgb("N", face_bhwc * 255.0, "reference")


def test_to_rgb_rejects_minus_one_to_one_scaled_images(face_bhwc):
    with pytest.raises(NodeInputError, match=r"negative values down to -1.*\(x \+ 1\) / 2"):
        to_rgb("N", face_bhwc * 2.0 - 1.0)


def test_to_rgb_clamps_resampling_overshoot_with_a_warning(face_bhwc, caplog):
    ringing = face_bhwc.clone()
    ringing[0, 0, 0] = torch.tensor([1.2, -0.1, 0.5])  # what a bicubic upscale of a hard edge produces
    with caplog.at_level(logging.WARNING, logger="comfyui_bfr.nodes.helpers"):
        out = to_rgb("N", ringing)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    torch.testing.assert_close(out[1], face_bhwc[1])
    assert any("clamped to 0..1" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="comfyui_bfr.nodes.helpers"):
        same = to_rgb("N", face_bhwc)
    assert torch.equal(same, face_bhwc) and same.data_ptr() != face_bhwc.data_ptr()  # a copy, not the input
    assert not caplog.records


def test_to_rgb_converts_gray_and_rgba(face_bhwc):
    gray = to_rgb("N", face_bhwc[..., :1])
    assert gray.shape == face_bhwc.shape and torch.equal(gray[..., 0], gray[..., 2])
    rgba = to_rgb("N", torch.cat([face_bhwc, torch.ones_like(face_bhwc[..., :1])], -1))
    torch.testing.assert_close(rgba, face_bhwc)
    with pytest.raises(NodeInputError, match="5 channels"):
        to_rgb("N", torch.cat([face_bhwc, face_bhwc[..., :2]], -1))
    with pytest.raises(NodeInputError, match=r"expected an IMAGE batch \(B,H,W,C\), got \(64, 64, 3\)"):
        to_rgb("N", face_bhwc[0])


def test_check_latent_names_the_problem():
    ok = torch.zeros(1, 4, 8, 8)
    assert check_latent("N", ok) is ok
    with pytest.raises(NodeInputError, match=r"\[N\] the latent_image is empty"):
        check_latent("N", ok[:0], "latent_image")
    with pytest.raises(NodeInputError, match="NaN or inf"):
        check_latent("N", torch.full((1, 4, 8, 8), float("nan")))
    with pytest.raises(NodeInputError, match=r"shape \(B,C,h,w\)"):
        check_latent("N", torch.zeros(1, 4, 2, 8, 8))


def test_check_megapixels_allows_the_limit_and_rejects_above():
    check_megapixels("N", torch.zeros(1, 2048, 2048, 3), 4.2, "")  # 4.19 MP: the restore default admits it
    with pytest.raises(NodeInputError, match=r"\[N\] IMAGE is 2049x2048 = 4\.2 megapixels per image, above "
                                             r"max_megapixels=4\.19.*Crop the faces first"):
        check_megapixels("N", torch.zeros(1, 2048, 2049, 3), 4.194304, "")
    with pytest.raises(NodeInputError, match="must be a number > 0"):
        check_megapixels("N", torch.zeros(1, 8, 8, 3), 0, "")

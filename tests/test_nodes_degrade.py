"""`BFR Degrade (Classical)` node: thin adapter over pipelines.degradation (no ComfyUI needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from comfyui_bfr.nodes.helpers import NodeInputError
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

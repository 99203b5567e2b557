"""The face nodes called directly (ComfyUI absent: CPU, no progress bar): IMAGE handling, the no-face path, errors.
The same nodes run inside a real ComfyUI in tests/comfy/test_face_nodes.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comfyui_bfr.nodes.face import BFRCropFaces, BFRDetectFaces, BFRPasteFaces
from comfyui_bfr.nodes.helpers import NodeInputError
from comfyui_bfr.pipelines import sample_data

pytest.importorskip("dlib", reason="the [faces] extra (dlib-bin + face-recognition-models) is installed in CI")

DETECT = dict(backend="dlib_cnn", selection="all", indices="0", order="area", min_size=32, max_faces=0,
              score_threshold=-1.0, max_side=1280)


@pytest.fixture(scope="module")
def group():
    return torch.from_numpy(sample_data.sample_group_photo().astype(np.float32) / 255.0)[None]


@pytest.fixture(scope="module")
def detected(group):
    return BFRDetectFaces().detect(group, **DETECT)


def test_detect_crop_paste_identity_keeps_the_photo(group, detected):
    faces, preview, report = detected
    assert len(faces) == 3 and "3 detected, 3 selected" in report
    assert preview.shape == group.shape and not torch.equal(preview, group)  # boxes drawn
    (crops,) = BFRCropFaces().crop(group, faces, 512)
    assert crops.shape == (3, 512, 512, 3)
    out, mask = BFRPasteFaces().paste(group, crops, faces, 1.0, "none")
    assert out.shape == group.shape and mask.shape == group.shape[:3]
    outside = mask == 0
    assert torch.equal(out[outside], group[outside])
    assert (out - group)[mask > 0.5].abs().mean() < 0.01


def test_selection_by_index_and_by_mask_through_the_node(group, detected):
    faces, _, _ = detected
    f1, _, rep = BFRDetectFaces().detect(group, **{**DETECT, "selection": "index", "indices": "1"})
    assert [f.number for f in f1.faces] == [1] and "1 selected" in rep
    box = [int(v) for v in faces.faces[2].box]
    m = torch.zeros(group.shape[:3])
    m[:, box[1]:box[3], box[0]:box[2]] = 1
    f2, _, _ = BFRDetectFaces().detect(group, **{**DETECT, "selection": "mask"}, mask=m)
    assert [f.number for f in f2.faces] == [2]
    assert "whole numbers" in BFRDetectFaces.VALIDATE_INPUTS(selection="index", indices="x")


def test_no_face_passes_the_photo_through_with_a_placeholder_crop(caplog):
    flat = torch.full((1, 200, 300, 3), 0.4)
    faces, preview, report = BFRDetectFaces().detect(flat, **DETECT)
    assert len(faces) == 0 and "0 detected" in report
    (crops,) = BFRCropFaces().crop(flat, faces, 256)
    assert crops.shape == (1, 64, 64, 3)  # a small placeholder: the graph still runs, the restorer costs ~nothing
    out, mask = BFRPasteFaces().paste(flat, crops, faces, 1.0, "wavelet")
    assert torch.equal(out, flat) and not mask.any()
    assert any("no face" in r.message for r in caplog.records)


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_gray_and_alpha_images(channels, group, detected):
    faces, _, _ = detected
    gray = group.mean(-1, keepdim=True)
    img = {1: gray, 2: torch.cat([gray, torch.ones_like(gray)], -1),
           4: torch.cat([group, torch.full_like(gray, 0.5)], -1)}[channels]
    f, _, _ = BFRDetectFaces().detect(img, **DETECT)
    assert len(f) >= 2
    (crops,) = BFRCropFaces().crop(img, f, 256)
    out, _ = BFRPasteFaces().paste(img, crops, f, 1.0, "adain")
    assert out.shape[:3] == img.shape[:3]
    if channels == 4:
        assert torch.equal(out[..., 3], img[..., 3])


def test_bad_inputs_name_the_node_and_the_fix(group, detected):
    faces, _, _ = detected
    with pytest.raises(NodeInputError, match=r"\[BFR Crop Faces\].*not the one the faces were detected on"):
        BFRCropFaces().crop(group[:, :256], faces, 512)
    (crops,) = BFRCropFaces().crop(group, faces, 512)
    with pytest.raises(NodeInputError, match=r"2 restored crops for 3 faces"):
        BFRPasteFaces().paste(group, crops[:2], faces, 1.0, "none")
    with pytest.raises(NodeInputError, match="must be the BFR_FACES"):
        BFRPasteFaces().paste(group, crops, "faces", 1.0, "none")
    with pytest.raises(NodeInputError, match="square"):
        BFRPasteFaces().paste(group, crops[:, :, :256], faces, 1.0, "none")
    with pytest.raises(NodeInputError, match="0-255"):
        BFRDetectFaces().detect(group * 255, **DETECT)
    with pytest.raises(NodeInputError, match=r"detection_Resnet50_Final\.pth"):
        BFRDetectFaces().detect(group, **{**DETECT, "backend": "retinaface_resnet50"})


def test_upscaled_restored_crops_paste_at_the_right_place(group, detected):
    """A restorer that returns 2x crops (e.g. a 2x face model): Paste scales the alignment, the face lands where the
    512 crop's face would."""
    faces, _, _ = detected
    (crops,) = BFRCropFaces().crop(group, faces, 512)
    big = torch.nn.functional.interpolate(crops.movedim(-1, 1), scale_factor=2, mode="bicubic",
                                          align_corners=False).movedim(1, -1).clamp(0, 1)
    out1, _ = BFRPasteFaces().paste(group, crops, faces, 1.0, "none")
    out2, _ = BFRPasteFaces().paste(group, big, faces, 1.0, "none")
    assert (out1 - out2).abs().mean() < 2e-3


def test_paste_with_a_parsing_model_narrows_the_mask(group, detected, tmp_path, monkeypatch):
    """A parsing file in models/facedetection (random BiSeNet weights here) is loaded with weights_only and its mask
    fused into the paste mask: never wider than the plain soft mask; a missing file is a clear error."""
    from comfyui_bfr.nodes import face as face_nodes
    from comfyui_bfr.pipelines import face_parsing

    torch.manual_seed(0)
    torch.save(face_parsing.build_parser("bisenet").state_dict(), tmp_path / "parsing_bisenet.pth")
    monkeypatch.setattr(face_nodes, "folder_dirs", lambda folder: [str(tmp_path)])
    faces, _, _ = detected
    (crops,) = BFRCropFaces().crop(group, faces, 256)
    _, plain = BFRPasteFaces().paste(group, crops, faces, 1.0, "none")
    out, parsed = BFRPasteFaces().paste(group, crops, faces, 1.0, "none", parsing="parsing_bisenet.pth")
    assert (parsed <= plain + 1e-6).all()
    assert torch.equal(out[parsed == 0], group[parsed == 0])
    with pytest.raises(NodeInputError, match="parsing_parsenet.pth"):
        BFRPasteFaces().paste(group, crops, faces, 1.0, "none", parsing="parsing_parsenet.pth")


def test_identity_score_node_agrees_with_a_direct_computation(group, detected):
    """BFR Identity Score on aligned crops: a crop with itself is cosine 1 / 0 deg; the two astronaut crops are
    closer than the astronaut and the cameraman; the numbers equal the pipeline's own descriptor comparison."""
    from comfyui_bfr.nodes.identity import BFRIdentityScore
    from comfyui_bfr.pipelines import identity

    faces, _, _ = detected
    (crops,) = BFRCropFaces().crop(group, faces, 256)  # #0, #1 astronaut (and mirror), #2 cameraman
    cos, ang, report = BFRIdentityScore().score(crops[:1], crops[:1], True)
    assert cos == pytest.approx(1.0, abs=1e-9) and ang == pytest.approx(0.0, abs=1e-6)
    cos01, _, _ = BFRIdentityScore().score(crops[0:1], crops[1:2], True)
    cos02, ang02, report = BFRIdentityScore().score(crops[0:1], crops[2:3], True)
    assert cos01 > cos02
    judge = identity.DlibIdentity()
    e0, e2 = (judge.embed(crops[i].numpy(), aligned=True) for i in (0, 2))
    assert cos02 == pytest.approx(identity.cosine(e0, e2), abs=1e-9)
    assert ang02 == pytest.approx(identity.angle_degrees(e0, e2), abs=1e-6)
    assert "dlib face descriptor" in report and "sha256" in report
    with pytest.raises(NodeInputError, match="image_a has 3 images, image_b 2"):
        BFRIdentityScore().score(crops, crops[:2], True)

"""Whole-photo face pipeline on real photos (scikit-image's astronaut / cameraman, public domain): detection with
dlib (offline), FFHQ alignment, selection, crop -> paste round trips, seams, memory-bounded large photos."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from comfyui_bfr.pipelines import face, face_detect, sample_data

pytest.importorskip("dlib", reason="the [faces] extra (dlib-bin + face-recognition-models) is installed in CI")
from skimage import data  # noqa: E402

BACKEND = "dlib_cnn"


def _f32(img: np.ndarray) -> np.ndarray:
    img = np.repeat(img[..., None], 3, 2) if img.ndim == 2 else img
    return np.ascontiguousarray(img.astype(np.float32) / 255.0)


@pytest.fixture(scope="module")
def astronaut():
    return _f32(data.astronaut())


@pytest.fixture(scope="module")
def group():
    return _f32(sample_data.sample_group_photo())


@pytest.fixture(scope="module")
def group_dets(group):
    return face_detect.detect(group, BACKEND)[1]


def _psnr(a, b):
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return 10 * math.log10(1.0 / max(mse, 1e-12))


# ---------------------------------------------------------------------------------------------------- geometry
def test_template_scales_and_similarity_fit_recovers_a_known_transform():
    assert np.allclose(face.template(256), face.FFHQ_TEMPLATE_512 / 2)
    ang, s, t = math.radians(23), 0.37, np.array([40.0, -12.0])
    rot = s * np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
    src = np.random.default_rng(0).uniform(0, 500, (5, 2))
    dst = src @ rot.T + t
    for fit in (face.fit_similarity, face.alignment_affine):
        m = fit(src, dst)
        assert np.allclose(m[:, :2], rot, atol=1e-4) and np.allclose(m[:, 2], t, atol=1e-2)


def test_roi_warp_equals_the_full_photo_warp_and_antialiases_big_shrinks(astronaut):
    m = np.array([[1.7, 0.3, -250.0], [-0.3, 1.7, -80.0]])
    full = cv2.warpAffine(astronaut, m, (300, 300), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=(0.5, 0.5, 0.5))
    assert np.abs(face.warp(astronaut, m, 300, 300, border_value=0.5) - full).max() < 1e-5
    # a 4x shrink: point sampling aliases the fine stripes of the flag, the prefiltered warp matches an area resize
    shrink = np.array([[0.25, 0.0, -0.375], [0.0, 0.25, -0.375]])  # pixel centres as cv2.resize maps them
    ref = cv2.resize(astronaut, (128, 128), interpolation=cv2.INTER_AREA)
    point = cv2.warpAffine(astronaut, shrink, (128, 128), flags=cv2.INTER_LINEAR)
    ours = face.warp(astronaut, shrink, 128, 128)
    assert _psnr(ours, ref) > _psnr(point, ref) + 3


# ---------------------------------------------------------------------------------------------------- detection
def test_dlib_finds_the_astronaut_with_landmarks_on_her_face(astronaut):
    name, dets = face_detect.detect(astronaut, BACKEND)
    assert name == BACKEND and len(dets) == 1
    d = dets[0]
    x0, y0, x1, y1 = d.box
    assert 150 < x0 < 190 and 50 < y0 < 90 and 80 < d.width < 120  # the face is at about (168, 69)-(264, 165)
    le, re, nose, ml, mr = d.landmarks
    assert le[0] < nose[0] < re[0] and max(le[1], re[1]) < nose[1] < min(ml[1], mr[1])  # face geometry
    assert 30 < re[0] - le[0] < 60


def test_missing_backends_name_the_file_and_folder(tmp_path):
    with pytest.raises(face_detect.FaceDetectorError, match=r"detection_Resnet50_Final\.pth.*" + str(tmp_path)):
        face_detect.get_detector("retinaface_resnet50", [tmp_path])
    with pytest.raises(face_detect.FaceDetectorError, match="must be one of"):
        face_detect.resolve_backend("yolo", [])
    assert face_detect.resolve_backend("auto", [tmp_path]) == "dlib_cnn"
    (tmp_path / "detection_mobilenet0.25_Final.pth").write_bytes(b"")
    assert face_detect.resolve_backend("auto", [tmp_path]) == "retinaface_mobilenet0.25"


def _align_error(photo, dets):
    """Mean distance (px, 512 crop) between the template and the landmarks re-detected on the aligned crop."""
    fs = face.build_faceset([dets], [photo.shape[:2]])
    crop = face.crop_faces([photo], fs, 512)[0]
    _, again = face_detect.detect(crop, BACKEND)
    assert again, "no face found on the aligned crop"
    best = min(again, key=lambda d: np.linalg.norm(d.landmarks - face.FFHQ_TEMPLATE_512, axis=1).mean())
    return float(np.linalg.norm(best.landmarks - face.FFHQ_TEMPLATE_512, axis=1).mean())


@pytest.mark.parametrize("case", ["upright", "rot+30", "rot-30", "scale0.6", "scale2", "flip"])
def test_alignment_lands_landmarks_on_the_template_and_detection_is_equivariant(astronaut, case, record_figure):
    h, w = astronaut.shape[:2]
    if case.startswith("rot"):
        m = cv2.getRotationMatrix2D((w / 2, h / 2), float(case[3:]), 1.0)
        size = (w, h)
    elif case.startswith("scale"):
        s = float(case[5:])
        m = np.array([[s, 0, 0.5 * (s - 1)], [0, s, 0.5 * (s - 1)]])
        size = (int(round(w * s)), int(round(h * s)))
    elif case == "flip":
        m = np.array([[-1.0, 0, w - 1], [0, 1.0, 0]])
        size = (w, h)
    else:
        m = np.array([[1.0, 0, 0], [0, 1.0, 0]])
        size = (w, h)
    photo = cv2.warpAffine(astronaut, m, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    _, dets = face_detect.detect(photo, BACKEND, min_face=50)  # the 0.6x face is ~58 px: needs the upscaled copy
    _, ref = face_detect.detect(astronaut, BACKEND)
    assert len(dets) >= 1
    d = max(dets, key=lambda x: x.area)
    # equivariance: the landmarks found on the transformed photo, mapped back, are those found on the original
    back = face.apply_affine(face.invert_affine(m), d.landmarks)
    if case == "flip":
        back = back[[1, 0, 2, 4, 3]]
    drift = float(np.linalg.norm(back - ref[0].landmarks, axis=1).mean())
    iod = float(np.linalg.norm(ref[0].landmarks[1] - ref[0].landmarks[0]))
    err = _align_error(photo, [d])
    record_figure(f"align {case}", f"re-detected landmarks {err:.1f} px from the template (512 crop); "
                                   f"landmark drift {drift / iod * 100:.1f} % of the eye distance")
    assert drift < 0.15 * iod
    assert err < 12.0  # ~2 % of the crop; the dlib landmark noise alone is a few px


# ---------------------------------------------------------------------------------------------------- selection
def test_order_is_deterministic_and_documented(group, group_dets):
    order = face.order_detections(group_dets, "area")
    assert [round(d.area) for d in order] == sorted((round(d.area) for d in group_dets), reverse=True)
    again = face.order_detections(list(reversed(face_detect.detect(group, BACKEND)[1])), "area")
    assert [d.box for d in again] == [d.box for d in order]
    ltr = face.order_detections(group_dets, "left_to_right")
    xs = [d.center[0] for d in ltr]
    assert xs == sorted(xs)


def test_selection_modes_pick_the_right_faces(group, group_dets):
    size = group.shape[:2]
    ordered = face.order_detections(group_dets, "area")
    assert len(ordered) == 3
    pick = lambda sel, **kw: [n for n, _ in face.select_detections(group_dets, size, sel, **kw)]  # noqa: E731
    assert pick("all") == [0, 1, 2]
    assert pick("largest") == [0]
    centre = min(range(3), key=lambda i: np.hypot(ordered[i].center[0] - 512, ordered[i].center[1] - 256))
    assert pick("center") == [centre]
    assert pick("index", indices=[2, 0]) == [0, 2]
    assert pick("index", indices=[7]) == []
    assert pick("all", max_faces=2) == [0, 1]
    assert pick("all", min_size=90) == [0, 1]  # the cameraman's 80 px face drops out
    mask = np.zeros(size, np.float32)
    x0, y0, x1, y1 = (int(v) for v in ordered[2].box)
    mask[y0:y1, x0:x1] = 1.0
    assert pick("mask", mask=mask) == [2]
    with pytest.raises(face.FaceSelectionError, match="MASK is 10x10"):
        pick("mask", mask=np.zeros((10, 10)))
    with pytest.raises(face.FaceSelectionError, match="whole numbers"):
        face.parse_indices("a,b")
    assert face.parse_indices("index:0, 2") == [0, 2]


def test_faceset_json_round_trip(group, group_dets):
    fs = face.build_faceset([group_dets], [group.shape[:2]], backend=BACKEND)
    back = face.FaceSet.from_json(fs.to_json())
    assert back.image_sizes == fs.image_sizes and back.detected == fs.detected and len(back) == 3
    for a, b in zip(fs.faces, back.faces):
        assert np.allclose(a.affine, b.affine) and a.number == b.number and a.box == b.box


# ---------------------------------------------------------------------------------------------------- paste-back
def test_identity_round_trip_reproduces_the_photo(group, group_dets, record_figure):
    fs = face.build_faceset([group_dets], [group.shape[:2]])
    crops = face.crop_faces([group], fs, 512)
    (out,), (mask,) = face.paste_faces([group], crops, fs)
    assert np.array_equal(out[mask == 0], group[mask == 0])  # bit-identical outside the masks
    inside = mask > 0.5
    psnr = _psnr(out[inside], group[inside])
    record_figure("paste identity round trip", f"PSNR {psnr:.1f} dB inside the masks (3 faces, 512 crops)")
    # crop = up to 5x bilinear upsampling, paste = area-free bilinear downsampling back: the round trip only loses
    # what two bilinear interpolations lose, ~40 dB on these photos; 35 dB is far above any visible seam or shift
    assert psnr > 35.0


def test_unselected_faces_and_background_are_untouched(group, group_dets):
    fs = face.build_faceset([group_dets], [group.shape[:2]], "index", indices=[1])
    assert [f.number for f in fs.faces] == [1]
    crops = face.crop_faces([group], fs, 512)
    (out,), (mask,) = face.paste_faces([group], np.clip(crops * 0.5, 0, 1), fs)
    assert (mask > 0).any()
    assert np.array_equal(out[mask == 0], group[mask == 0])
    for other in (0, 2):
        x0, y0, x1, y1 = (int(v) for v in face.order_detections(group_dets)[other].box)
        assert np.array_equal(out[y0:y1, x0:x1], group[y0:y1, x0:x1])


def _seam_energy(out, photo, mask):
    """Mean squared gradient of what the paste changed (out - photo) on a 5 px band across the footprint boundary:
    a hard paste leaves a step there (the seam), a feathered one a smooth ramp."""
    delta = (out - photo).mean(-1).astype(np.float64)
    gx, gy = np.diff(delta, axis=1)[:-1], np.diff(delta, axis=0)[:, :-1]
    foot = (mask > 0).astype(np.uint8)
    ring = cv2.dilate(foot, np.ones((5, 5), np.uint8)) - cv2.erode(foot, np.ones((5, 5), np.uint8))
    ring = ring[:-1, :-1] > 0
    return float((gx[ring] ** 2 + gy[ring] ** 2).mean())


def test_feathering_hides_the_seam_of_a_colour_shifting_restorer(astronaut, record_figure):
    _, dets = face_detect.detect(astronaut, BACKEND)
    fs = face.build_faceset([dets], [astronaut.shape[:2]])
    crops = face.crop_faces([astronaut], fs, 512)
    shifted = np.clip(crops * np.array([1.0, 0.85, 0.8]) + 0.12, 0, 1)  # brighter and warmer
    (soft,), _ = face.paste_faces([astronaut], shifted, fs, feather=1.0)
    (hard,), (m_hard,) = face.paste_faces([astronaut], shifted, fs, feather=0.0)
    e_soft, e_hard = _seam_energy(soft, astronaut, m_hard), _seam_energy(hard, astronaut, m_hard)
    record_figure("paste seam energy", f"gradient energy of the change on the paste boundary: hard paste "
                                       f"{e_hard:.2e}, feathered {e_soft:.2e} ({e_hard / e_soft:.0f}x lower)")
    assert e_soft < 0.1 * e_hard


def test_overlapping_faces_paste_in_the_documented_order(astronaut):
    _, dets = face_detect.detect(astronaut, BACKEND)
    d = dets[0]
    shifted = face.Detection(tuple(v + 20 for v in d.box), d.score, d.landmarks + 20, d.points + 20, d.template)
    fs = face.build_faceset([[d, shifted]], [astronaut.shape[:2]])
    crops = np.stack([np.full((512, 512, 3), 0.2, np.float32), np.full((512, 512, 3), 0.9, np.float32)])
    (out,), _ = face.paste_faces([astronaut], crops, fs, feather=0.0)
    # both boxes have one area; numbers tie-break left to right, so #0 is the original face, pasted last (on top)
    assert fs.faces[0].box == d.box
    cx, cy = (int(v) for v in face.apply_affine(face.invert_affine(fs.faces[0].affine), [[256, 300]])[0])
    assert np.allclose(out[cy, cx], 0.2, atol=1e-3)


def test_a_6000px_photo_is_detected_downscaled_and_pasted_on_the_face_region_only(astronaut):
    big = cv2.resize(astronaut, (4000, 4000), interpolation=cv2.INTER_LINEAR)
    big = np.ascontiguousarray(np.pad(big, ((0, 0), (0, 2000), (0, 0)), mode="reflect"))  # 6000 x 4000
    _, dets = face_detect.detect(big, BACKEND, max_side=1024)
    dets = [d for d in dets if d.center[0] < 4000]  # the reflected copy's mirror face is a face too
    assert len(dets) == 1
    assert np.allclose(dets[0].box[0] / (4000 / 512), face_detect.detect(astronaut, BACKEND)[1][0].box[0], atol=4)
    fs = face.build_faceset([dets], [big.shape[:2]])
    crops = face.crop_faces([big], fs, 512)
    region = face.soft_mask(fs.faces[0], 512, big.shape[:2])[0]
    x0, y0, x1, y1 = region
    bx0, by0, bx1, by1 = dets[0].box
    assert x0 < bx0 and y0 < by0 and x1 > bx1 and y1 > by1
    assert (x1 - x0) * (y1 - y0) < 0.15 * big.shape[0] * big.shape[1]  # the paste works on the face's region only
    (out,), (mask,) = face.paste_faces([big], crops, fs)
    assert np.array_equal(out[mask == 0], big[mask == 0])


def test_no_face_gives_an_empty_set_and_the_photo_back():
    flat = np.full((256, 320, 3), 0.5, np.float32)
    _, dets = face_detect.detect(flat, BACKEND)
    fs = face.build_faceset([dets], [flat.shape[:2]])
    assert len(fs) == 0 and "0 detected" in fs.report()
    (out,), (mask,) = face.paste_faces([flat], np.zeros((0, 512, 512, 3), np.float32), fs)
    assert np.array_equal(out, flat) and not mask.any()
    with pytest.raises(ValueError, match="1 restored crops for 0 faces"):
        face.paste_faces([flat], np.zeros((1, 512, 512, 3), np.float32), fs)


def test_alpha_channel_is_carried_through_the_crop(astronaut):
    rgba = np.concatenate([astronaut, np.full(astronaut.shape[:2] + (1,), 0.25, np.float32)], -1)
    _, dets = face_detect.detect(astronaut, BACKEND)
    fs = face.build_faceset([dets], [astronaut.shape[:2]])
    crop = face.crop_faces([rgba], fs, 256)[0]
    assert crop.shape == (256, 256, 4) and np.allclose(crop[128, 128, 3], 0.25)
    (out,), (mask,) = face.paste_faces([rgba], crop[None], fs)
    assert np.array_equal(out[..., 3], rgba[..., 3])

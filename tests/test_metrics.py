"""Metric core (pipelines/metrics.py, pipelines/identity.py) on real photos (scikit-image's astronaut, camera,
coffee, chelsea; public domain): PSNR / SSIM held to scikit-image's implementations, the BT.601 luma variant to
scikit-image's rgb2ycbcr, LMD on hand-made points, and dlib's identity descriptor on the sample group photo (the
astronaut, her mirrored face, the cameraman)."""

from __future__ import annotations

import hashlib
import math
import re
import sys

import cv2
import numpy as np
import pytest
import torch
from skimage import color, data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from comfyui_bfr.pipelines import degradation, face, face_detect, identity, metrics, sample_data

TOL = 1e-3  # the brief's agreement bound; the measured difference is ~1e-15


def _rgb01(name: str) -> np.ndarray:
    img = getattr(data, name)()
    img = np.repeat(img[..., None], 3, 2) if img.ndim == 2 else img
    return img.astype(np.float64) / 255.0


def _noisy(img, sigma=0.05, seed=0):
    return np.clip(img + np.random.default_rng(seed).normal(0.0, sigma, img.shape), 0.0, 1.0)


def _blurred(img, sigma=2.0):
    return cv2.GaussianBlur(img, (0, 0), sigma)


def _sk_ssim(a, b, data_range=1.0, channel_axis=-1):
    return structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=data_range, channel_axis=channel_axis)


# ---------------------------------------------------------------------------------------------------- PSNR / SSIM
@pytest.fixture(scope="module")
def photos():
    return {n: _rgb01(n) for n in ("astronaut", "camera", "coffee", "chelsea")}


def test_psnr_and_ssim_equal_scikit_image_on_real_photos(photos, record_figure):
    worst_p = worst_s = 0.0
    seen = []
    for i, (name, ref) in enumerate(photos.items()):
        # two real distortions per photo; the noisy one on the odd photos also blurred
        for dist in (_noisy(ref, seed=i), _blurred(ref) if i % 2 == 0 else _noisy(_blurred(ref, 1.0), 0.02, i)):
            p, s = metrics.psnr(dist, ref), metrics.ssim(dist, ref)
            rp = peak_signal_noise_ratio(ref, dist, data_range=1.0)
            rs = _sk_ssim(dist, ref)
            worst_p, worst_s = max(worst_p, abs(p - rp)), max(worst_s, abs(s - rs))
            assert abs(p - rp) < TOL and abs(s - rs) < TOL, (name, p, rp, s, rs)
            assert 10 < p < 40 and 0.1 < s < 0.99, (name, p, s)  # real distortions, not degenerate cases
            seen.append(s)
    assert len(set(np.round(seen, 3))) == len(seen)  # eight different values, so the agreement means something
    record_figure("psnr/ssim vs scikit-image", f"max |diff| PSNR {worst_p:.1e} dB, SSIM {worst_s:.1e} "
                                               f"(8 noisy/blurred real photos; SSIM {min(seen):.3f}-{max(seen):.3f})")


def test_identical_images_give_inf_psnr_and_ssim_1(photos):
    a = photos["coffee"]
    assert metrics.psnr(a, a) == math.inf
    assert metrics.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    # a one-level change is finite and where the formula puts it
    b = a.copy()
    b[0, 0, 0] += 1 / 255
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(a.size * 255.0 ** 2), rel=1e-9)


def test_y_channel_and_crop_border_match_an_independent_luma(photos):
    ref = photos["chelsea"]
    dist = _noisy(_blurred(ref, 1.5), 0.03, seed=7)
    # scikit-image's rgb2ycbcr: the BT.601 studio-range Y in [16, 235]
    y_ref, y_dist = color.rgb2ycbcr(ref)[..., 0], color.rgb2ycbcr(dist)[..., 0]
    rp = peak_signal_noise_ratio(y_ref, y_dist, data_range=255)
    rs = _sk_ssim(y_dist, y_ref, data_range=255, channel_axis=None)
    assert np.abs(metrics.rgb_to_y(ref)[..., 0] - y_ref / 255.0).max() < 1e-12
    as_torch = metrics.rgb_to_y(torch.from_numpy(ref).permute(2, 0, 1), channel_dim=0)[0].numpy()
    assert np.abs(as_torch - y_ref / 255.0).max() < 1e-12
    assert metrics.psnr(dist, ref, y_channel=True) == pytest.approx(rp, abs=TOL)
    assert metrics.ssim(dist, ref, y_channel=True) == pytest.approx(rs, abs=TOL)
    # the luma result is not the RGB one (the option does something)
    assert abs(metrics.psnr(dist, ref, y_channel=True) - metrics.psnr(dist, ref)) > 0.1
    # data_range 255 on 0..255 floats is the same metric
    assert metrics.psnr(dist * 255, ref * 255, data_range=255, y_channel=True) == pytest.approx(rp, abs=TOL)
    c = 8
    assert metrics.psnr(dist, ref, crop_border=c) == pytest.approx(
        peak_signal_noise_ratio(ref[c:-c, c:-c], dist[c:-c, c:-c], data_range=1.0), abs=TOL)
    assert metrics.ssim(dist, ref, crop_border=c, y_channel=True) == pytest.approx(
        _sk_ssim(y_dist[c:-c, c:-c], y_ref[c:-c, c:-c], data_range=255, channel_axis=None), abs=TOL)


def test_uint8_gray_and_batched_inputs(photos):
    ref = photos["astronaut"][::2, ::2]
    dists = [_noisy(ref, 0.04, 1), _blurred(ref, 1.0), _noisy(ref, 0.1, 2)]
    singles_p = [metrics.psnr(d, ref) for d in dists]
    singles_s = [metrics.ssim(d, ref) for d in dists]
    # ComfyUI IMAGE: a (B, H, W, C) float32 tensor -> one float64 value per image
    batch = torch.from_numpy(np.stack(dists)).float()
    refs = torch.from_numpy(np.stack([ref] * 3)).float()
    p, s = metrics.psnr(batch, refs), metrics.ssim(batch, refs)
    assert isinstance(p, torch.Tensor) and p.shape == (3,) and p.dtype == torch.float64
    assert np.allclose(p.numpy(), singles_p, atol=1e-3) and np.allclose(s.numpy(), singles_s, atol=1e-5)
    assert isinstance(metrics.ssim(np.stack(dists), np.stack([ref] * 3)), np.ndarray)
    # uint8 is read as x / 255
    u8 = (dists[0] * 255).round().astype(np.uint8)
    r8 = (ref * 255).round().astype(np.uint8)
    assert metrics.psnr(u8, r8) == pytest.approx(peak_signal_noise_ratio(r8, u8), abs=TOL)
    assert metrics.ssim(u8, r8) == pytest.approx(_sk_ssim(u8 / 255.0, r8 / 255.0), abs=TOL)
    # a gray (H, W) photo
    cam = photos["camera"][..., 0]
    assert metrics.ssim(_blurred(cam), cam) == pytest.approx(_sk_ssim(_blurred(cam), cam, channel_axis=None), abs=TOL)


def test_bad_inputs_are_refused_with_the_reason():
    a = np.zeros((32, 32, 3))
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(a, np.zeros((32, 31, 3)))
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(np.zeros((8, 8, 3)), np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match="3 channels"):
        metrics.psnr(a[..., :1], a[..., :1], y_channel=True)
    with pytest.raises(TypeError, match="float"):
        metrics.psnr(a.astype(np.int32), a.astype(np.int32))
    with pytest.raises(ValueError, match="crop_border=16"):
        metrics.psnr(a, a, crop_border=16)


# ---------------------------------------------------------------------------------------------------- LMD
def test_lmd_on_hand_made_points():
    ref = face.FFHQ_TEMPLATE_512.copy()
    assert metrics.lmd(ref, ref) == 0.0
    assert metrics.lmd(ref + [3.0, 4.0], ref) == pytest.approx(5.0)  # every point 5 px off
    moved = ref.copy()
    moved[2] += [6.0, 8.0]  # one point of five 10 px off
    assert metrics.lmd(moved, ref) == pytest.approx(2.0)
    iod = float(np.hypot(*(ref[1] - ref[0])))
    assert metrics.lmd(moved, ref, normalize="interocular") == pytest.approx(2.0 / iod)
    # batched: one value per face
    out = metrics.lmd(np.stack([ref + [3.0, 4.0], moved]), np.stack([ref, ref]))
    assert np.allclose(out, [5.0, 2.0])
    # 68 points: interocular = distance of the eye-contour means (36-41, 42-47)
    pts = np.zeros((68, 2))
    pts[36:42] = [100.0, 200.0]
    pts[42:48] = [180.0, 200.0]
    assert metrics.lmd(pts + [0.0, 4.0], pts, normalize="interocular") == pytest.approx(4.0 / 80.0)
    assert metrics.lmd(pts + [0.0, 4.0], pts, normalize="interocular", eyes=(36, 42)) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="eyes=\\(i, j\\)"):
        metrics.lmd(np.ones((7, 2)), np.ones((7, 2)), normalize="interocular")
    with pytest.raises(ValueError, match="'none' or 'interocular'"):
        metrics.lmd(ref, ref, normalize="box")


def test_file_record_is_the_sha256_of_the_file(tmp_path):
    p = tmp_path / "w.bin"
    p.write_bytes(b"weights" * 1000)
    rec = metrics.file_record(p)
    assert rec == {"file": "w.bin", "sha256": hashlib.sha256(b"weights" * 1000).hexdigest()}
    p.write_bytes(b"other")  # a changed file is hashed again (size/mtime in the cache key)
    assert metrics.file_sha256(p) == hashlib.sha256(b"other").hexdigest()


# ---------------------------------------------------------------------------------------------------- identity
def test_descriptor_comparisons():
    a = np.array([1.0, 0.0, 0.0])
    assert identity.distance(a, a) == 0.0 and identity.cosine(a, a) == 1.0 and identity.angle_degrees(a, a) == 0.0
    assert identity.angle_degrees(a, [0.0, 2.0, 0.0]) == pytest.approx(90.0)
    assert identity.angle_degrees(a, -a) == pytest.approx(180.0)
    assert identity.distance(a, [0.0, 3.0, 4.0]) == pytest.approx(math.sqrt(26))
    assert np.allclose(identity.cosine(np.stack([a, a]), np.stack([a, -a])), [1.0, -1.0])


def test_missing_dlib_is_a_clear_install_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)  # `import dlib` -> ImportError
    with pytest.raises(identity.IdentityModelError, match=re.escape("pip install 'comfyui-bfr[faces]'")):
        identity.DlibIdentity()


@pytest.fixture(scope="module")
def judge():
    pytest.importorskip("dlib", reason="the [faces] extra (dlib-bin + face-recognition-models) is installed in CI")
    return identity.DlibIdentity()


@pytest.fixture(scope="module")
def group():
    """The group photo's faces, found once: (photo uint8, {name: Detection}, {name: aligned 512 crop uint8})."""
    pytest.importorskip("dlib")
    photo = sample_data.sample_group_photo()
    dets = face_detect.detect(photo, "dlib_cnn")[1]
    assert len(dets) == 3
    named = {}
    for d in dets:
        x, y = d.center
        named["astronaut" if x < 512 else ("mirrored" if y > 300 else "camera")] = d
    assert set(named) == {"astronaut", "mirrored", "camera"}
    f32 = photo.astype(np.float32) / 255.0
    crops = {}
    for n, d in named.items():
        (f,) = face.build_faceset([[d]], [photo.shape[:2]]).faces
        crops[n] = (np.clip(face.crop_face(f32, f), 0, 1) * 255).round().astype(np.uint8)
    return photo, named, crops


def test_same_image_is_distance_0(judge, group):
    photo, dets, crops = group
    e = judge.embed(photo, dets["astronaut"])
    assert e.shape == (identity.EMBEDDING_DIM,) and e.dtype == np.float64 and np.isfinite(e).all()
    again = judge.embed(photo.astype(np.float32) / 255.0, dets["astronaut"])  # float input, same pixels
    assert judge.distance(e, again) == 0.0 and judge.cosine(e, again) == pytest.approx(1.0, abs=1e-12)
    assert judge.angle_degrees(e, again) == 0.0
    c = judge.embed(torch.from_numpy(crops["astronaut"]), aligned=True)  # torch input
    assert judge.distance(c, judge.embed(crops["astronaut"], aligned=True)) == 0.0


def test_astronaut_is_closer_to_her_mirrored_face_than_to_the_cameraman(judge, group, record_figure):
    photo, dets, crops = group
    by_det = {n: judge.embed(photo, d) for n, d in dets.items()}
    by_crop = {n: judge.embed(c, aligned=True) for n, c in crops.items()}
    lines = []
    for how, e in (("detections", by_det), ("aligned crops", by_crop)):
        same = judge.distance(e["astronaut"], e["mirrored"])
        other = judge.distance(e["astronaut"], e["camera"])
        other2 = judge.distance(e["mirrored"], e["camera"])
        assert same < identity.SAME_PERSON_THRESHOLD < min(other, other2), (how, same, other, other2)
        assert judge.angle_degrees(e["astronaut"], e["mirrored"]) < judge.angle_degrees(e["astronaut"], e["camera"])
        lines.append(f"{how}: astronaut-mirrored {same:.3f}, astronaut-camera {other:.3f}, mirrored-camera "
                     f"{other2:.3f}")
    # the two ways of locating the same face agree far better than any two people differ
    drift = max(judge.distance(by_det[n], by_crop[n]) for n in dets)
    assert drift < 0.3, drift
    record_figure("dlib identity distance", "; ".join(lines) + f" (threshold 0.6; det vs crop <= {drift:.3f})")


def test_a_degraded_astronaut_stays_closer_to_her_than_the_cameraman(judge, group, record_figure):
    _, _, crops = group
    clean = judge.embed(crops["astronaut"], aligned=True)
    camera = judge.embed(crops["camera"], aligned=True)
    cfg = degradation.get_preset("dr2-medium-x4")
    prm = degradation.sample_params(cfg, 1, seed=3, height=512, width=512)[0]
    dr2 = degradation.degrade_numpy(crops["astronaut"], prm)
    ref = crops["astronaut"].astype(np.float32) / 255.0
    blur_noise = np.clip(cv2.GaussianBlur(ref, (0, 0), 3.0) + np.random.default_rng(0).normal(0, 0.08, ref.shape), 0, 1)
    figs, d_cam = [], judge.distance(clean, camera)
    for name, img in (("dr2-medium-x4", dr2), ("blur3+noise0.08", blur_noise)):
        d = judge.distance(judge.embed(img, aligned=True), clean)
        assert 0.0 < d < d_cam, (name, d, d_cam)
        figs.append(f"{name} {d:.3f} (PSNR {metrics.psnr(img, crops['astronaut']):.1f} dB)")
    record_figure("dlib identity under degradation", ", ".join(figs) + f" vs cameraman {d_cam:.3f}")


def test_embed_detects_the_largest_face_and_other_backends_use_the_predictor(judge, group, record_figure):
    photo, dets, _ = group
    ref = judge.embed(photo, dets["astronaut"])
    # no detection: the largest face of the astronaut photo, the same face as in the group photo
    fresh = identity.DlibIdentity()
    d_detect = fresh.distance(fresh.embed(data.astronaut()), ref)
    assert d_detect < 0.05
    assert [w["file"] for w in fresh.weights_info()][-1] == face_detect.DLIB_CNN  # the detector now reported
    # a detection with FFHQ points only (RetinaFace's kind; its boxes reach higher up the forehead): dlib's
    # predictor on its box
    d = dets["astronaut"]
    x0, y0, x1, y1 = d.box
    retina_like = face.Detection((x0 - 4, y0 - 0.15 * (y1 - y0), x1 + 4, y1 + 6), d.score, d.landmarks)
    d_pred = judge.distance(judge.embed(photo, retina_like), ref)
    assert d_pred < 0.15  # measured 0.089; two people differ by > 0.6
    record_figure("dlib identity locating", f"own detection of the astronaut photo {d_detect:.3f}, predictor on the "
                                            f"box (taller) {d_pred:.3f} (vs the group photo's dlib points)")
    with pytest.raises(identity.NoFaceError, match="no face found"):
        fresh.embed(np.full((200, 200, 3), 128, np.uint8))


def test_weights_info_lists_the_two_dat_files_with_sha256(judge):
    info = judge.weights_info()
    assert [w["file"] for w in info] == [identity.RECOGNITION_MODEL, face_detect.DLIB_FIVE_POINT]
    for w in info:
        assert re.fullmatch(r"[0-9a-f]{64}", w["sha256"])
        assert w["sha256"] == hashlib.sha256((judge.model_dir / w["file"]).read_bytes()).hexdigest()
    assert judge.weights_info() == info  # cached, same answer

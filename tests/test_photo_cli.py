"""Whole photos end to end: pipelines.photo.restore_photo_batch, `bfr restore --faces` (resumable folder runs,
per-photo errors, 16-bit / alpha / gray files) and `bfr demo` (the whole-photo panel, honest about a missing SD 2.1).

Real photos (scikit-image's astronaut / cameraman, public domain) and the real dlib CNN detector; each distinct
image is detected once per module (the cache below) because dlib's CNN takes seconds per photo on CPU."""

from __future__ import annotations

import hashlib
import json
import logging
import math

import cv2
import numpy as np
import pytest
from PIL import Image

from comfyui_bfr.cli.main import main
from comfyui_bfr.pipelines import face, face_detect, panel, photo, sample_data

pytest.importorskip("dlib", reason="the [faces] extra (dlib-bin + face-recognition-models) is installed in CI")

_REAL_DETECT = face_detect.detect
_CACHE: dict = {}


def _cached_detect(image, backend="auto", folders=(), **kwargs):
    """face_detect.detect, memoised on the photo's uint8 pixels (a PNG written and read back hits the cache)."""
    pixels = np.rint(np.clip(np.asarray(image, np.float32)[..., :3], 0, 1) * 255).astype(np.uint8)
    key = (hashlib.sha1(pixels.tobytes()).hexdigest(),
           face_detect.resolve_backend(backend, folders))  # the tests keep the threshold and max_side defaults
    if key not in _CACHE:
        _CACHE[key] = _REAL_DETECT(image, backend, folders, **kwargs)
    return _CACHE[key]


@pytest.fixture(autouse=True)
def _detect_once(monkeypatch):
    monkeypatch.setattr(face_detect, "detect", _cached_detect)
    for var in ("BFR_SD21_CHECKPOINT", "COMFYUI_PATH", "BFR_COMFY_MODELS"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def group_u8():
    return sample_data.sample_group_photo()


@pytest.fixture(scope="module")
def group(group_u8):
    return group_u8.astype(np.float32) / np.float32(255.0)


@pytest.fixture(scope="module")
def group_dets(group):
    backend, dets = _cached_detect(group, "auto")
    assert backend == "dlib_cnn" and len(dets) == 3
    return dets


def _psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return 10 * math.log10(1.0 / max(mse, 1e-12))


class _Recorder:
    """A crop restorer that records its calls: identity, or a fixed transform."""

    def __init__(self, fn=lambda x: x):
        self.calls, self.fn = [], fn

    def __call__(self, crops):
        self.calls.append(crops.shape)
        return self.fn(crops)


# ------------------------------------------------------------------------------------------------- the pipeline
def test_identity_restorer_one_batch_background_bit_identical_faces_within_35db(group, group_dets, record_figure):
    rec = _Recorder()
    results = photo.restore_photo_batch([group, group], rec, crop_size=256)  # detection through the pipeline
    assert rec.calls == [(6, 256, 256, 3)], "one restorer call with every face of the batch"
    psnrs = []
    for res in results:
        assert res.photo.dtype == np.float32 and res.photo.shape == group.shape
        assert [f.number for f in res.faces.faces] == [0, 1, 2] and res.backend == "dlib_cnn"
        assert np.array_equal(res.photo[res.mask == 0], group[res.mask == 0])  # bit-identical outside the masks
        inside = res.mask > 0.5
        assert inside.sum() > 3 * 60 * 60
        psnrs.append(_psnr(res.photo[inside], group[inside]))
        assert res.crops.shape == res.restored.shape == (3, 256, 256, 3) and not res.warnings
        back = face.FaceSet.from_json(res.faces.to_json())
        assert back.image_sizes == ((512, 1024),) and all(f.image_index == 0 for f in back.faces)
    record_figure("photo identity round trip", f"PSNR {min(psnrs):.1f} dB inside the masks (wavelet fix, 256 crops)")
    assert min(psnrs) > 35.0
    # a restorer that changes the faces changes exactly the masked pixels
    dark = photo.restore_photo(group, _Recorder(lambda x: x * 0.5), detections=[group_dets], color_fix="none",
                               crop_size=128)
    assert _psnr(dark.photo[dark.mask > 0.5], group[dark.mask > 0.5]) < 20
    assert np.array_equal(dark.photo[dark.mask == 0], group[dark.mask == 0])


def test_selection_alpha_and_gray_are_carried_through(group, group_dets):
    alpha = np.linspace(0, 1, group.shape[1], dtype=np.float32)[None, :, None].repeat(group.shape[0], 0)
    rgba = np.concatenate([group, alpha], 2)
    res = photo.restore_photo(rgba, lambda x: 1.0 - x, selection="index", indices=[1, 7], crop_size=128,
                              color_fix="none")
    assert [f.number for f in res.faces.faces] == [1] and res.photo.shape == (512, 1024, 4)
    assert np.array_equal(res.photo[..., 3:], alpha)
    assert any("[7] do not exist" in w for w in res.warnings)
    x0, y0, x1, y1 = (int(v) for v in face.order_detections(group_dets)[0].box)
    assert np.array_equal(res.photo[y0:y1, x0:x1], rgba[y0:y1, x0:x1])  # face 0 untouched
    gray = group @ np.array([0.299, 0.587, 0.114], np.float32)
    g = photo.restore_photo(gray[..., None], lambda x: x * 0.8, detections=[group_dets], crop_size=128)
    assert g.photo.shape == (512, 1024, 1)
    assert np.array_equal(g.photo[g.mask == 0, 0], gray[g.mask == 0])


def test_no_face_leaves_the_photo_unchanged_with_a_warning():
    rec = _Recorder()
    flat = np.full((96, 128, 3), 0.4, np.float32)
    res = photo.restore_photo(flat, rec)
    assert rec.calls == [] and not res.changed and np.array_equal(res.photo, flat)
    assert res.warnings == ["no face found (dlib_cnn); the photo is unchanged"]
    assert res.to_dict()["detected"] == 0


def test_a_restorer_that_breaks_the_contract_is_named(group, group_dets):
    import torch

    with pytest.raises(TypeError, match="returned a torch.Tensor"):
        photo.restore_photo(group, lambda x: torch.from_numpy(x), detections=[group_dets], crop_size=64)
    with pytest.raises(ValueError, match=r"for the 3 crop\(s\)"):
        photo.restore_photo(group, lambda x: x[:2], detections=[group_dets], crop_size=64)
    with pytest.raises(ValueError, match="NaN"):
        photo.restore_photo(group, lambda x: x * np.nan, detections=[group_dets], crop_size=64)


# ------------------------------------------------------------------------------------------------- files
def test_read_photo_keeps_16_bits_alpha_and_gray(tmp_path, group_u8):
    rng = np.random.default_rng(0)
    deep = rng.integers(0, 65536, (20, 30, 4), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "rgba16.png"), deep[..., [2, 1, 0, 3]])
    img, bits = photo.read_photo(tmp_path / "rgba16.png")
    assert bits == 16 and img.shape == (20, 30, 4)
    assert np.array_equal(np.rint(img * 65535).astype(np.uint16), deep)
    photo.write_photo(tmp_path / "back.png", img, 16)
    again = cv2.imread(str(tmp_path / "back.png"), cv2.IMREAD_UNCHANGED)
    assert again.dtype == np.uint16 and np.array_equal(again[..., [2, 1, 0, 3]], deep)
    Image.fromarray(deep[..., 0]).save(tmp_path / "gray16.png")  # PIL "I;16"
    g, gbits = photo.read_photo(tmp_path / "gray16.png")
    assert gbits == 16 and g.shape == (20, 30, 1) and np.array_equal(np.rint(g[..., 0] * 65535), deep[..., 0])
    la = np.stack([group_u8[:20, :30, 0], np.full((20, 30), 77, np.uint8)], -1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    a, abits = photo.read_photo(tmp_path / "la.png")
    assert abits == 8 and a.shape == (20, 30, 2) and np.array_equal(np.rint(a * 255).astype(np.uint8), la)
    Image.fromarray(group_u8[:20, :30]).convert("P").save(tmp_path / "pal.png", transparency=0)
    assert photo.read_photo(tmp_path / "pal.png")[0].shape == (20, 30, 4)


# ------------------------------------------------------------------------------------------------- bfr restore
DR2_FAST = ["--size", "64", "--steps", "8", "--tau", "2", "--n", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def photo_run(tmp_path_factory, group_u8):
    """One `bfr restore --faces index:1` run over a folder: the group photo (8-bit RGB and 16-bit RGBA), a photo
    without a face, and a corrupt file."""
    src, out = tmp_path_factory.mktemp("photos"), tmp_path_factory.mktemp("restored")
    Image.fromarray(group_u8).save(src / "group.png")
    alpha = np.tile(np.linspace(0, 65535, 1024).astype(np.uint16), (512, 1))
    cv2.imwrite(str(src / "group16.png"), np.dstack([group_u8[..., ::-1].astype(np.uint16) * 257, alpha]))
    Image.fromarray(np.full((120, 160, 3), 90, np.uint8)).save(src / "sky.jpg", quality=95)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(face_detect, "detect", _cached_detect)
        for var in ("BFR_SD21_CHECKPOINT", "COMFYUI_PATH", "BFR_COMFY_MODELS"):
            mp.delenv(var, raising=False)
        rc = main(["restore", str(src), str(out), "--method", "dr2", "--faces", "index:1", "--save-crops",
                   *DR2_FAST])
    return src, out, rc


def _report(out):
    lines = [json.loads(x) for x in (out / "restore_report.jsonl").read_text().splitlines()]
    return lines, {r["input"]: r for r in lines}


def test_restore_faces_touches_only_the_selected_face(photo_run, group, group_dets):
    src, out, rc = photo_run
    assert rc == 1  # one photo failed; the others went on
    _, by = _report(out)
    rec = by["group.png"]
    assert rec["status"] == "restored" and rec["output"] == "group.png" and rec["detected"] == 3
    assert [f["number"] for f in rec["faceset"]["faces"]] == [1]
    assert [d["selected"] for d in rec["detections"]] == [False, True, False]
    assert rec["config"]["method"] == "dr2" and rec["config"]["model"].startswith("tiny random")
    restored = np.asarray(Image.open(out / "group.png").convert("RGB")).astype(np.float32) / 255
    changed = np.abs(restored - group).max(-1) > 0
    fs = face.FaceSet.from_json(json.dumps(rec["faceset"]))
    (x0, y0, x1, y1), m = face.soft_mask(fs.faces[0], 64, group.shape[:2])
    footprint = np.zeros(group.shape[:2], bool)
    footprint[y0:y1, x0:x1] = m > 0
    assert changed.any() and not (changed & ~footprint).any(), "pixels outside face 1's paste mask changed"
    ordered = face.order_detections(group_dets)
    for other in (0, 2):
        bx0, by0, bx1, by1 = (int(v) for v in ordered[other].box)
        assert not changed[by0:by1, bx0:bx1].any()
    for name in ("group_1.png", "group_1_input.png", "group_faces.png"):
        assert (out / "faces" / name).is_file()


def test_16_bit_rgba_photo_keeps_its_depth_and_alpha(photo_run, group):
    src, out, _ = photo_run
    _, by = _report(out)
    assert by["group16.png"]["status"] == "restored" and by["group16.png"]["bits"] == 16
    res = cv2.imread(str(out / "group16.png"), cv2.IMREAD_UNCHANGED)
    ref = cv2.imread(str(src / "group16.png"), cv2.IMREAD_UNCHANGED)
    assert res.dtype == np.uint16 and res.shape == (512, 1024, 4)
    assert np.array_equal(res[..., 3], ref[..., 3])
    changed = (res[..., :3] != ref[..., :3]).any(-1)
    assert 0 < changed.mean() < 0.15


def test_no_face_is_copied_and_a_corrupt_file_is_reported(photo_run):
    src, out, _ = photo_run
    _, by = _report(out)
    sky = by["sky.jpg"]
    assert sky["status"] == "unchanged" and sky["output"] == "sky.png" and sky["selected"] == 0
    assert sky["warnings"] == ["no face found (dlib_cnn); the photo is unchanged"]
    assert np.array_equal(np.asarray(Image.open(out / "sky.png")), np.asarray(Image.open(src / "sky.jpg")))
    broken = by["broken.png"]
    assert broken["status"] == "error" and "broken.png" in broken["error"] and "corrupt" in broken["error"]
    assert not (out / "broken.png").exists()


def test_rerun_skips_done_photos_and_refuses_other_options(photo_run, caplog):
    caplog.set_level(logging.INFO)
    src, out, _ = photo_run
    before = {p: (out / p).stat().st_mtime_ns for p in ("group.png", "group16.png", "sky.png")}
    n_lines = len(_report(out)[0])
    assert main(["restore", str(src), str(out), "--faces", "index:1", *DR2_FAST]) == 1  # broken.png again
    lines, _ = _report(out)
    assert [r["input"] for r in lines[n_lines:]] == ["broken.png"], "only the failed photo is retried"
    assert {p: (out / p).stat().st_mtime_ns for p in before} == before
    assert "4 photo(s), 3 already done" in caplog.text
    caplog.clear()
    assert main(["restore", str(src), str(out), "--faces", "all", *DR2_FAST]) == 2
    assert "other options (faces: 'index:1' -> 'all')" in caplog.text and "--no-resume" in caplog.text


def test_restore_flags_are_checked(tmp_path, caplog):
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    assert main(["restore", str(img), str(tmp_path / "o"), "--faces", "some"]) == 2
    assert "--faces must be one of all | largest | center | index:0,2" in caplog.text
    assert main(["restore", str(img), str(tmp_path / "o"), "--detector", "dlib_hog"]) == 2
    assert "--detector is a whole-photo option; add --faces" in caplog.text
    assert main(["restore", str(img)]) == 2 and "needs an output" in caplog.text


# ------------------------------------------------------------------------------------------------- bfr demo
def test_demo_panel_without_sd21_says_the_restoration_did_not_run(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    rc = main(["demo", "--out", str(tmp_path), "--size", "64", "--tile", "64", "--presets", "flipnet"])
    assert rc == 0
    rep = json.loads((tmp_path / "demo_photo.json").read_text())
    assert rep["backend"] == "dlib_cnn" and rep["faces"]["selected"] == 3
    assert rep["restoration"]["ran"] is False and "no SD 2.1-base" in rep["restoration"]["reason"]
    kinds = {t["label"]: t["kind"] for t in rep["tiles"]}
    assert kinds["restored photo: NOT RUN"] == "note"
    assert [kinds[f"#{k} restored: NOT RUN"] for k in range(3)] == ["note"] * 3
    assert all(kinds[f"#{k} degraded: {p}"] == "image" for k, p in
               enumerate(["dr2-mild-x4", "dr2-medium-x8", "dr2-severe-x8"]))
    assert rep["flat_tiles"] == [] and "NOT RUN" in caplog.text
    img = Image.open(tmp_path / "demo_photo.png")
    assert img.size == (8 * 64, 3 * (64 + 18))  # photos row + 3 faces x 4 tiles, 2 faces per row
    assert (tmp_path / "demo_degradation.png").is_file()


def test_panel_refuses_or_marks_a_flat_tile(group):
    rows = [[("photo", group, 2), ("black", np.zeros((32, 32, 3), np.float32)), ("note", panel.Note("not run"))]]
    with pytest.raises(panel.FlatTileError, match="'black'"):
        panel.labelled_panel(rows, tile=32)
    marked = np.asarray(panel.labelled_panel(rows, tile=32, on_flat="mark"))
    assert marked.shape == (32 + 18, 4 * 32, 3)
    assert (marked[18:, 2 * 32:3 * 32] == (220, 0, 0)).all(-1).any()  # the red frame
    assert panel.is_flat(np.full((8, 8, 3), 0.5)) and not panel.is_flat(group)


@pytest.fixture(scope="module")
def micro_sd(tmp_path_factory):
    from fixtures.flipnet import write_micro_folder

    return write_micro_folder(tmp_path_factory.mktemp("sd21") / "micro")


def test_demo_with_sd21_fills_the_restoration_column_with_dr2(tmp_path, micro_sd, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = main(["demo", "--out", str(tmp_path), "--size", "64", "--tile", "64", "--presets", "flipnet",
               "--base-model", str(micro_sd), "--steps", "8", "--tau", "2", "--n", "1", "--device", "cpu"])
    assert rc == 0
    rep = json.loads((tmp_path / "demo_photo.json").read_text())
    assert rep["restoration"]["ran"] is True and rep["restoration"]["config"]["tau"] == 2
    kinds = {t["label"]: t["kind"] for t in rep["tiles"]}
    assert kinds["restored photo (DR2 N=1 tau=2)"] == "image"
    assert [kinds[f"#{k} restored: DR2 N=1 tau=2"] for k in range(3)] == ["image"] * 3
    assert "note" not in kinds.values() and rep["flat_tiles"] == []


def test_restore_faces_with_flipnet_restores_the_largest_face_only(tmp_path, micro_sd, group_u8, monkeypatch):
    from fixtures.flipnet import write_flipnet_checkpoint

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = write_flipnet_checkpoint(tmp_path / "restore.safetensors", "restore")
    Image.fromarray(group_u8).save(tmp_path / "group.jpg", quality=95)
    out = tmp_path / "out"
    assert main(["restore", "--method", "flipnet", str(tmp_path / "group.jpg"), str(out), "--faces", "largest",
                 "--checkpoint", str(ckpt), "--base-model", str(micro_sd), "--size", "64",
                 "--num-inference-steps", "1", "--device", "cpu"]) == 0
    rec = json.loads((out / "restore_report.jsonl").read_text())
    assert rec["status"] == "restored" and [f["number"] for f in rec["faceset"]["faces"]] == [0]
    assert rec["config"]["method"] == "flipnet" and rec["config"]["checkpoint"] == str(ckpt)
    before = np.asarray(Image.open(tmp_path / "group.jpg"))
    after = np.asarray(Image.open(out / "group.png"))
    changed = (before != after).any(-1)
    x0, y0, x1, y1 = rec["detections"][0]["box"]
    assert changed[int(y0):int(y1), int(x0):int(x1)].mean() > 0.5 and changed.mean() < 0.1

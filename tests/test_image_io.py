"""The one image I/O module (pipelines/image_io.py): listing, reading, the uint8 rounding rule, atomic PNG writes,
and errors that name the path; plus every folder command reading the same extensions (.tif included)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_bfr.pipelines import image_io
from comfyui_bfr.pipelines.image_io import ImageFolderError, list_images, load_image, read_rgb, save_png, to_uint8

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def _rgb(seed: int, h: int = 12, w: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------------- listing


def test_list_images_finds_every_extension_in_any_case_and_nothing_else(tmp_path):
    names = [f"a{i}{ext.upper() if i % 2 else ext}" for i, ext in enumerate(EXTENSIONS)]
    for name in names:
        Image.fromarray(_rgb(0)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    Image.fromarray(_rgb(1)).save(tmp_path / "sub" / "deep.tif")
    assert [p.name for p in list_images(tmp_path)] == sorted(names)
    assert "deep.tif" in [p.name for p in list_images(tmp_path, recursive=True)]
    assert "deep.tif" not in [p.name for p in list_images(tmp_path, recursive=True, exclude=tmp_path / "sub")]
    assert set(image_io.IMAGE_EXTENSIONS) == set(EXTENSIONS)


@pytest.mark.parametrize("case, match", [
    ("missing", "does not exist"),
    ("file", "is a file, not a folder"),
    ("empty", "holds no images"),
])
def test_list_images_errors_name_the_path_and_the_fix(tmp_path, case, match):
    target = tmp_path / "faces"
    if case == "file":
        target.write_bytes(b"")
    elif case == "empty":
        target.mkdir()
        (target / "readme.txt").write_text("no images here")
    with pytest.raises(ImageFolderError, match=match) as info:
        list_images(target, "HQ face folder")
    assert str(target) in str(info.value) and "HQ face folder" in str(info.value)
    if case == "empty":
        assert list_images(target, allow_empty=True) == []


# ------------------------------------------------------------------------------------------------------- reading


@pytest.mark.parametrize("orientation, turns", [(3, 2), (6, -1), (8, 1)])
def test_read_rgb_applies_the_exif_orientation(tmp_path, orientation, turns):
    stored = _rgb(2, 4, 6)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "o.png", exif=exif.tobytes())
    # EXIF 6 = the camera was turned: show the pixels rotated 90 degrees clockwise (np.rot90 k=-1), 8 the other way
    np.testing.assert_array_equal(read_rgb(tmp_path / "o.png"), np.rot90(stored, turns))


def test_read_rgb_drops_alpha_replicates_gray_and_scales_16_bit(tmp_path):
    rgba = np.dstack([_rgb(3), np.random.default_rng(4).integers(0, 256, (12, 10), dtype=np.uint8)])
    rgba[0, 0, 3] = 0  # a fully transparent pixel keeps its colour (dropped, not composited)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "rgba.png"), rgba[..., :3])

    gray = _rgb(5)[..., 0]
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "gray.png"), np.repeat(gray[..., None], 3, axis=-1))

    g16 = np.random.default_rng(6).integers(0, 65536, (12, 10), dtype=np.uint16)
    g16[0, :4] = [0, 128, 129, 65535]
    expected = ((g16.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)  # v*255/65535 never ends in .5
    for ext in (".png", ".tif"):
        Image.fromarray(g16).save(tmp_path / f"g16{ext}")
        out = read_rgb(tmp_path / f"g16{ext}")
        assert out.dtype == np.uint8 and out.shape == (12, 10, 3)
        np.testing.assert_array_equal(out, np.repeat(expected[..., None], 3, axis=-1))
    dark = np.full((4, 4), 200, np.uint16)  # 16-bit data that happens to stay below 256 is still 16-bit
    Image.fromarray(dark).save(tmp_path / "dark.png")
    assert int(read_rgb(tmp_path / "dark.png").max()) == 1

    palette = Image.fromarray(_rgb(7)).convert("P")
    palette.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "palette.png"), np.asarray(palette.convert("RGB")))


def test_read_rgb_resizes_to_a_square_and_returns_writable_arrays(tmp_path):
    Image.fromarray(_rgb(8, 30, 20)).save(tmp_path / "a.png")
    assert read_rgb(tmp_path / "a.png", 16).shape == (16, 16, 3)
    assert read_rgb(tmp_path / "a.png").flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on non-writable numpy arrays
        x = load_image(tmp_path / "a.png")
    assert x.shape == (3, 30, 20) and x.dtype == torch.float32 and 0 <= float(x.min()) <= float(x.max()) <= 1


@pytest.mark.parametrize("content, match", [
    (b"definitely not a PNG", "corrupt or not an image"),
    (None, "does not exist"),
])
def test_read_rgb_errors_name_the_file(tmp_path, content, match):
    path = tmp_path / "face.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageFolderError, match=match) as info:
        read_rgb(path)
    assert str(path) in str(info.value)


def test_truncated_png_is_a_clear_error(tmp_path):
    Image.fromarray(_rgb(9, 64, 64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageFolderError, match="cut.png"):
        read_rgb(tmp_path / "cut.png")


# ------------------------------------------------------------------------------------------- the rounding rule


def _reference_uint8(x: np.ndarray) -> np.ndarray:
    """Python's round() (half to even) of the float32 product x * 255, clipped; NaN -> 0; one value at a time."""
    def one(v: float) -> int:
        if v != v:
            return 0
        if abs(v) == float("inf"):
            return 255 if v > 0 else 0
        return min(255, max(0, round(float(np.float32(v) * np.float32(255.0)))))

    return np.array([one(float(v)) for v in x.astype(np.float32).ravel()], np.uint8).reshape(x.shape)


def test_to_uint8_rounds_half_to_even_clips_and_matches_for_tensors_and_arrays():
    rng = np.random.default_rng(10)
    x = rng.uniform(-0.1, 1.1, (3, 16, 16)).astype(np.float32)
    halves = np.float32([0.5, 1.5, 2.5, 253.5, 254.5]) / np.float32(255.0)
    halves = halves[(halves * np.float32(255.0)) % 1 == 0.5]  # those whose float32 product is exactly k + 1/2
    assert len(halves) >= 2
    x.flat[: len(halves)] = halves
    x.flat[10:14] = [np.nan, np.inf, -np.inf, 1.0]
    expected = np.transpose(_reference_uint8(x), (1, 2, 0))
    np.testing.assert_array_equal(to_uint8(torch.from_numpy(x)), expected)  # tensor (C, H, W)
    np.testing.assert_array_equal(to_uint8(np.transpose(x, (1, 2, 0))), expected)  # array (H, W, C)
    np.testing.assert_array_equal(to_uint8(torch.from_numpy(x).double()), expected)  # float64: same float32 rule
    assert [int(v) for v in to_uint8(torch.from_numpy(x))[0, : len(halves), 0]][:2] == [0, 2]  # 0.5 -> 0, 1.5 -> 2


def test_to_uint8_layouts_and_dtypes():
    u8 = _rgb(11, 3, 5)  # H = 3: still (H, W, C) for an array
    assert np.array_equal(to_uint8(u8), u8)
    gray = np.full((4, 5), 0.5, np.float32)
    assert to_uint8(gray).shape == (4, 5, 3) and int(to_uint8(gray)[0, 0, 0]) == 128
    assert to_uint8(torch.full((1, 4, 5), 1.0)).shape == (4, 5, 3)
    assert to_uint8(torch.zeros(3, 4, 3)).shape == (4, 3, 3)  # a tensor is (C, H, W): width 3
    with pytest.raises(ValueError, match="65535"):
        to_uint8(np.zeros((4, 4, 3), np.uint16))
    with pytest.raises(ValueError, match="batch"):
        to_uint8(torch.zeros(1, 3, 4, 4))


# ------------------------------------------------------------------------------------------------------ writing


def test_save_png_round_trips_exactly_and_leaves_no_temporary_file(tmp_path):
    arr = _rgb(12, 17, 23)
    out = save_png(tmp_path / "deep" / "a.png", arr)
    assert out == tmp_path / "deep" / "a.png"
    np.testing.assert_array_equal(read_rgb(out), arr)
    x = torch.rand(3, 9, 7)
    np.testing.assert_array_equal(read_rgb(save_png(tmp_path / "b.png", x)), to_uint8(x))
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["a.png", "b.png"]


def test_save_png_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = save_png(tmp_path / "a.png", _rgb(13))
    before = target.read_bytes()
    with pytest.raises((TypeError, ValueError)):
        save_png(target, np.zeros((4, 4, 7), np.uint8))  # 7 channels: PIL cannot write it
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_prepare_output_folder_errors_name_the_path(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError, match="existing file"):
        image_io.prepare_output_folder(blocker)
    with pytest.raises(NotADirectoryError, match=f"{blocker} is a file"):
        image_io.prepare_output_folder(blocker / "sub" / "out")
    assert image_io.prepare_output_folder(tmp_path / "new" / "out").is_dir()


# ------------------------------------------------------------------------------- every folder command, one lister


def test_tif_and_webp_inputs_work_for_degrade_and_restore(tmp_path):
    from comfyui_bfr.cli.main import main
    from comfyui_bfr.cli.folders import restore_dr2
    from comfyui_bfr.pipelines import dr2
    from comfyui_bfr.sd.loader import tiny_random_model

    src = tmp_path / "hq"
    src.mkdir()
    Image.fromarray(_rgb(14, 32, 32)).save(src / "a.tif")
    Image.fromarray(_rgb(15, 32, 32)).save(src / "b.webp", lossless=True)
    assert main(["degrade", str(src), str(tmp_path / "lq"), "--preset", "dr-bfr", "--per-image", "1",
                 "--workers", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "lq").glob("*.png")) == ["a_0.png", "b_0.png"]
    lines = (tmp_path / "lq" / "params.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["input"] for line in lines) == ["a.tif", "b.webp"]
    out = restore_dr2(src, tmp_path / "restored", dr2.DR2Config(n=2, tau=1, steps=20), model=tiny_random_model())
    assert sorted(p.name for p in out.iterdir()) == ["a_dr2.png", "b_dr2.png"]

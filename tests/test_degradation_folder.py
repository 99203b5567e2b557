"""Folder-level training-pair synthesis (pipelines/degrade_folder.py): outputs, report, resume, workers, bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from comfyui_bfr.pipelines import degradation as D
from comfyui_bfr.pipelines.degrade_folder import REPORT_NAME, degrade_folder, derive_seed


def _write_faces(folder, n=3, size=(40, 48)):
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    src = data.astronaut()
    paths = []
    for i in range(n):
        crop = src[40 * i:40 * i + 200, 100:300]
        p = folder / f"face{i}.png"
        Image.fromarray(crop).resize(size[::-1], Image.Resampling.BICUBIC).save(p)
        paths.append(p)
    return paths


def _lines(out):
    return [json.loads(line) for line in (out / REPORT_NAME).read_text().splitlines()]


def _bytes(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))}


def test_outputs_and_report_reproduce_each_image(tmp_path):
    _write_faces(tmp_path / "hq")
    out = tmp_path / "lq"
    summary = degrade_folder(tmp_path / "hq", out, preset="dr-bfr", per_image=2, seed=4, workers=1)
    assert summary["written"] == 6 and summary["failed"] == [] and summary["images"] == 3
    assert sorted(_bytes(out)) == [f"face{i}_{k}.png" for i in range(3) for k in range(2)]
    lines = _lines(out)
    assert len(lines) == 6
    for rec in lines:
        assert rec["seed"] == derive_seed(4, rec["input"], rec["k"]) and rec["preset"] == "dr-bfr"
        hq = np.asarray(Image.open(tmp_path / "hq" / rec["input"]).convert("RGB"))
        again = D.degrade_numpy(hq, rec["params"])  # the report alone reproduces the PNG
        np.testing.assert_array_equal(np.asarray(Image.open(out / rec["output"])), again)
        fresh = D.sample_params(D.get_preset("dr-bfr"), 1, rec["seed"], *hq.shape[:2])[0]
        assert fresh == rec["params"]
    json.dumps(summary)


def test_resume_skips_done_outputs_and_repairs_interruptions(tmp_path):
    _write_faces(tmp_path / "hq", n=2)
    out = tmp_path / "lq"
    degrade_folder(tmp_path / "hq", out, preset="flipnet", per_image=2, workers=1)
    first = _bytes(out)
    again = degrade_folder(tmp_path / "hq", out, preset="flipnet", per_image=2, workers=1)
    assert again["written"] == 0 and again["skipped"] == 4 and _bytes(out) == first
    # an interrupted run: one PNG missing and a half-written last line
    (out / "face1_1.png").unlink()
    text = (out / REPORT_NAME).read_text()
    (out / REPORT_NAME).write_text(text + '{"output": "face1_')
    fixed = degrade_folder(tmp_path / "hq", out, preset="flipnet", per_image=2, workers=1)
    assert fixed["written"] == 1 and fixed["skipped"] == 3
    assert _bytes(out) == first
    assert all(isinstance(rec["params"], dict) for rec in _lines(out))
    # another configuration in the same folder is refused; resume=False starts over
    with pytest.raises(ValueError, match="another configuration"):
        degrade_folder(tmp_path / "hq", out, preset="dr-bfr", per_image=2, workers=1)
    fresh = degrade_folder(tmp_path / "hq", out, preset="dr-bfr", per_image=2, workers=1, resume=False)
    assert fresh["written"] == 4 and len(_lines(out)) == 4


def test_results_do_not_depend_on_worker_count(tmp_path):
    _write_faces(tmp_path / "hq", n=3)
    one = degrade_folder(tmp_path / "hq", tmp_path / "w1", preset="flipnet", per_image=2, seed=9, workers=1)
    two = degrade_folder(tmp_path / "hq", tmp_path / "w2", preset="flipnet", per_image=2, seed=9, workers=2)
    assert two["workers"] == 2 and one["written"] == two["written"] == 6
    assert _bytes(tmp_path / "w1") == _bytes(tmp_path / "w2")
    key = sorted(((r["output"], r["seed"], json.dumps(r["params"])) for r in _lines(tmp_path / "w1")))
    assert key == sorted(((r["output"], r["seed"], json.dumps(r["params"])) for r in _lines(tmp_path / "w2")))


def test_bad_and_odd_inputs(tmp_path, caplog):
    hq = tmp_path / "hq"
    _write_faces(hq / "sub", n=1, size=(48, 48))
    (hq / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (hq / "notes.txt").write_text("ignored")
    rgb = np.asarray(Image.open(hq / "sub" / "face0.png"))
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])).save(hq / "rgba.png")
    Image.fromarray(rgb[..., 0]).save(hq / "gray.png")
    Image.fromarray((rgb[..., 1].astype(np.uint16) * 257)).save(hq / "deep16.png")
    Image.fromarray(rgb[:30, :20]).save(hq / "wide.jpg", quality=95)
    out = tmp_path / "lq"
    s = degrade_folder(hq, out, preset="clr-face-x32", per_image=1, workers=1, size=24)
    assert [f["input"] for f in s["failed"]] == ["broken.png"] and "broken.png" in caplog.text
    assert s["written"] == 5
    for name in ("rgba_0.png", "gray_0.png", "deep16_0.png", "sub/face0_0.png"):
        img = Image.open(out / name)
        assert img.mode == "RGB" and img.size == (24, 24)
    assert Image.open(out / "wide_0.png").size == (24, 36)  # shorter side resized to `size`
    assert Image.open(out / "hq" / "wide.png").size == (24, 36)  # the matching HQ image
    rec = {r["output"]: r for r in _lines(out)}["rgba_0.png"]
    assert rec["hq"] == "hq/rgba.png" and rec["hq_size"] == [24, 24]
    # x32 on a 24 px image: clamped to one pixel and reported
    assert rec["params"]["passes"][0]["resize"]["clamped"] is True


def test_missing_empty_and_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        degrade_folder(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        degrade_folder(tmp_path / "empty", tmp_path / "out")
    _write_faces(tmp_path / "hq", n=1)
    with pytest.raises(KeyError, match="dr2-mild-x4"):
        degrade_folder(tmp_path / "hq", tmp_path / "out", preset="nope")
    with pytest.raises(ValueError, match="jpeg_quality"):
        degrade_folder(tmp_path / "hq", tmp_path / "out", overrides={"jpeg_quality": [90, 10]})
    for kw in ({"per_image": 0}, {"workers": 0}, {"size": -3}, {"seed": -1}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            degrade_folder(tmp_path / "hq", tmp_path / "out", **kw)


def test_a_pool_that_cannot_start_falls_back_to_this_process(tmp_path, monkeypatch, caplog):
    from comfyui_bfr.pipelines import degrade_folder as module

    _write_faces(tmp_path / "hq", n=2)
    monkeypatch.setattr(module, "_worker_init", lambda: None)  # a lambda cannot be sent to worker processes
    s = degrade_folder(tmp_path / "hq", tmp_path / "lq", preset="dr-bfr", per_image=1, workers=2)
    assert s["written"] == 2 and s["failed"] == [] and "continuing 2 image(s) in this process" in caplog.text
    ref = degrade_folder(tmp_path / "hq", tmp_path / "lq1", preset="dr-bfr", per_image=1, workers=1)
    assert ref["written"] == 2 and _bytes(tmp_path / "lq") == _bytes(tmp_path / "lq1")

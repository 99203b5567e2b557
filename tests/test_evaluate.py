"""The evaluation harness: test sets, metrics against independent computations on real photos, missing weights,
resume, reports (pipelines/testset.py, pipelines/evaluate.py, cli/evaluate.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from comfyui_bfr.cli import evaluate as cli_eval
from comfyui_bfr.cli.main import main
from comfyui_bfr.pipelines import evaluate, testset
from comfyui_bfr.pipelines.image_io import read_rgb

skimage = pytest.importorskip("skimage")
from skimage import data  # noqa: E402
from skimage.metrics import peak_signal_noise_ratio, structural_similarity  # noqa: E402


@pytest.fixture(scope="module")
def hq_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hq")
    Image.fromarray(data.astronaut()[20:260, 110:350]).resize((128, 128)).save(d / "astronaut.png")
    Image.fromarray(np.repeat(data.camera()[40:300, 150:410, None], 3, 2)).resize((128, 128)).save(d / "camera.png")
    Image.fromarray(data.chelsea()[:300, 50:350]).resize((128, 128)).save(d / "cat.png")
    return d


@pytest.fixture(scope="module")
def pairs(hq_dir, tmp_path_factory):
    return testset.make_testset(hq_dir, tmp_path_factory.mktemp("ts") / "set", "dr2-medium-x4", seed=0, size=128)


@pytest.fixture(scope="module")
def aligned_faces():
    """The sample group photo's aligned faces (dlib CNN, detected once): astronaut, cameraman, mirrored astronaut."""
    from comfyui_bfr.pipelines import face, face_detect
    from comfyui_bfr.pipelines.sample_data import sample_group_photo

    photo = sample_group_photo()
    used, dets = face_detect.detect(photo, "dlib_cnn")
    fs = face.build_faceset([dets], [photo.shape[:2]], "all", order="left_to_right", backend=used)
    crops = face.crop_faces([photo.astype(np.float32) / 255], fs, 256)
    return [np.round(c * 255).astype(np.uint8) for c in crops]


def test_testset_is_seeded_and_reports_parameters(hq_dir, pairs, tmp_path):
    again = testset.make_testset(hq_dir, tmp_path / "again", "dr2-medium-x4", seed=0, size=128)
    other = testset.make_testset(hq_dir, tmp_path / "other", "dr2-medium-x4", seed=1, size=128)
    info = json.loads((pairs.root / testset.TESTSET_JSON).read_text())
    assert [p.name for p in pairs.pairs] == ["astronaut", "camera", "cat"] and pairs.has_hq
    assert info["preset"] == "dr2-medium-x4" and len(info["pairs"]) == 3
    assert all(r["params"] and isinstance(r["seed"], int) for r in info["pairs"])
    for a, b, c in zip(pairs.pairs, again.pairs, other.pairs):
        assert a.lq.read_bytes() == b.lq.read_bytes()
        assert not np.array_equal(read_rgb(a.lq), read_rgb(c.lq))
        assert read_rgb(a.hq).shape == read_rgb(a.lq).shape == (128, 128, 3)


def test_lq_only_folder_is_read(hq_dir):
    ts = testset.read_testset(hq_dir)
    assert len(ts) == 3 and not ts.has_hq and all(p.hq is None for p in ts.pairs)


def test_psnr_ssim_equal_scikit_image(pairs):
    scorer = evaluate.Scorer(evaluate.MetricOptions(metrics=("psnr", "ssim")))
    for p in pairs.pairs:
        lq, hq = read_rgb(p.lq), read_rgb(p.hq)
        values, _ = scorer.score(lq, hq)
        assert values["psnr"] == pytest.approx(peak_signal_noise_ratio(hq, lq, data_range=255), abs=1e-9)
        ref = structural_similarity(hq / 255.0, lq / 255.0, data_range=1.0, channel_axis=-1, gaussian_weights=True,
                                    sigma=1.5, use_sample_covariance=False)
        assert values["ssim"] == pytest.approx(ref, abs=1e-9)


def test_dlib_identity_orders_people(aligned_faces, record_figure):
    astronaut, cameraman, mirrored = aligned_faces
    scorer = evaluate.Scorer(evaluate.MetricOptions(metrics=("dlib",)))
    same = scorer.score(astronaut, astronaut)[0]["dlib"]
    one_person = scorer.score(mirrored, astronaut)[0]["dlib"]
    two_people = scorer.score(cameraman, astronaut)[0]["dlib"]
    record_figure("eval dlib distances", f"self {same:.3f}, astronaut mirrored {one_person:.3f}, "
                                         f"astronaut vs cameraman {two_people:.3f}")
    assert same == pytest.approx(0.0, abs=1e-9)
    assert one_person < 0.6 < two_people


def test_arcface_ids_of_an_image_with_itself(aligned_faces, tmp_path):
    """Deg./IDS plumbing with an r18 file of random weights (no real ArcFace file offline): cos 1, 0 degrees with
    itself, and the file is named in the report."""
    import torch
    from safetensors.torch import save_file

    from comfyui_bfr.pipelines.arcface import build_iresnet

    torch.manual_seed(0)
    save_file(build_iresnet("r18").state_dict(), str(tmp_path / "r18.safetensors"))
    scorer = evaluate.Scorer(evaluate.MetricOptions(metrics=("deg", "ids"), arcface=str(tmp_path / "r18.safetensors")))
    v = scorer.score(aligned_faces[0], aligned_faces[0])[0]
    assert v["ids"] == pytest.approx(1.0, abs=1e-5) and v["deg"] < 0.3
    assert scorer.weights["ids"][0]["file"] == "r18.safetensors"
    other = scorer.score(aligned_faces[1], aligned_faces[0])[0]
    assert other["ids"] < 1.0 - 1e-4


def test_lmd_of_a_shifted_face_is_the_shift(aligned_faces):
    face = aligned_faces[0]
    shifted = np.roll(face, 6, axis=1)
    scorer = evaluate.Scorer(evaluate.MetricOptions(metrics=("lmd",), lmd_detector="dlib_cnn"))
    v, notes = scorer.score(shifted, face)
    assert not notes and v["lmd"] == pytest.approx(6.0, abs=2.0)


def test_eval_missing_weights_skips_and_succeeds(pairs, tmp_path):
    out = tmp_path / "res"
    rc = main(["eval", str(pairs.root), "--out", str(out), "--method", "lq", "--no-lmd", "--lpips-dir",
               str(tmp_path / "no_lpips"), "--arcface", str(tmp_path / "no_arcface.pth")])
    assert rc == 0
    summary = (out / "summary.md").read_text()
    assert "| lq | 3 |" in summary and "PSNR" in summary
    assert "alex.pth" in summary and "no_arcface.pth" in summary and "pt_inception" in summary
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("method,name,status")
    assert (out / "grid.png").is_file() and Image.open(out / "grid.png").size == (128 * 3, 22 + 128 * 3)


def test_eval_resumes_and_refuses_other_settings(pairs, tmp_path):
    calls = []

    def restorer(x):
        calls.append(len(x))
        return x[:, ::-1]  # upside down: a distinct, deterministic "restoration"

    cfg = {"method": "flip"}
    log = evaluate.RunLog(tmp_path, "flip", cfg)
    assert cli_eval.run_method(pairs, log, restorer) == 0 and len(calls) == 3
    log2 = evaluate.RunLog(tmp_path, "flip", cfg)
    assert cli_eval.run_method(pairs, log2, restorer) == 0 and len(calls) == 3
    with pytest.raises(ValueError, match="other settings"):
        evaluate.RunLog(tmp_path, "flip", {"method": "flip", "x": 1})
    got = read_rgb(tmp_path / "flip" / "images" / "cat.png")
    np.testing.assert_array_equal(got, read_rgb(pairs.pairs[2].lq)[::-1])


def test_failing_image_is_recorded_and_the_rest_continue(pairs, tmp_path):
    def restorer(x):
        if x.mean() > 0.45:  # whichever images are bright fail
            raise RuntimeError("boom")
        return x

    log = evaluate.RunLog(tmp_path, "flaky", {"m": 1})
    failed = cli_eval.run_method(pairs, log, restorer)
    bright = [p.name for p in pairs.pairs if read_rgb(p.lq).mean() / 255 > 0.45]
    assert failed == len(bright) and 0 < failed < 3
    assert all(log.records[n]["status"] == "error" and "boom" in log.records[n]["error"] for n in bright)


def test_sweep_writes_plots(pairs, tmp_path):
    rc = main(["sweep", str(pairs.root), "--out", str(tmp_path), "--method", "dr2", "--steps", "4",
               "--grid", "tau=1,2", "--metrics", "psnr", "ssim"])
    assert rc == 0
    aggs = {lb: evaluate.aggregate(list(evaluate.RunLog(tmp_path, lb, json.loads(
        (tmp_path / lb / "run.json").read_text())["config"]).records.values())) for lb in ("dr2_tau1", "dr2_tau2")}
    assert all(a["n"] == 3 for a in aggs.values())
    assert Image.open(tmp_path / "sweep_psnr.png").size == (480, 320)
    assert (tmp_path / "sweep_grid.png").is_file()


def test_markdown_table_is_in_paper_order():
    md = evaluate.markdown_table([("A", {"n": 2, "niqe": 5.0, "psnr": 20.0, "lpips": 0.3})])
    header = md.splitlines()[0]
    assert header.index("PSNR") < header.index("LPIPS") < header.index("NIQE")

"""`bfr analyze-dr` (pipelines/dr_analysis.py, cli/analyze_dr.py): known-degradation grid, leave-one-content-out kNN
probe, exact t-SNE, raw-pixel control, G_LQ re-degradation, report files, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from comfyui_bfr.cli.main import main
from comfyui_bfr.lora.checkpoint import CheckpointError
from comfyui_bfr.lora.dr_checkpoint import save_dr_checkpoint
from comfyui_bfr.lora.dr_module import DRConfig, DRModule
from comfyui_bfr.pipelines import dr_analysis as A
from fixtures.flipnet import face_image, write_faces

TINY = DRConfig(encoder_blocks=((8, 8), (16, 16)), num_tokens=4, token_dim=16, proj_hidden=16, proj_dim=16,
                gen_channels=(8, 16), mod_hidden=16)


def _faces(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.stack([torch.from_numpy(face_image(seed + i, size)).permute(2, 0, 1).float() / 255 for i in range(n)])


def test_grid_applies_one_known_degradation_at_a_time():
    hq = _faces(2)
    cells = A.degradation_grid()
    assert [c.name for c in cells][:4] == ["clean", "blur-1", "blur-2", "blur-3"] and len(cells) == 13
    lq = A.apply_grid(hq, cells).reshape(2, len(cells), 3, 64, 64)
    assert torch.equal(lq[:, 0], hq)  # clean: every stage off; 8-bit input survives the 8-bit rounding exactly
    stats = np.stack([A.pixel_statistics(lq[:, c]) for c in range(len(cells))], 1)  # (2, cells, 8)
    grad = stats[..., 6]
    names = [c.name for c in cells]
    # blur and down-scaling lower the gradient energy monotonically with the level, noise raises it
    for kind in ("blur", "scale"):
        g = [grad[:, names.index(f"{kind}-{i}")] for i in (1, 2, 3)]
        assert np.all(grad[:, 0] > g[0]) and np.all(g[0] > g[1]) and np.all(g[1] > g[2])
    g = [grad[:, names.index(f"noise-{i}")] for i in (1, 2, 3)]
    assert np.all(grad[:, 0] < g[0]) and np.all(g[0] < g[1]) and np.all(g[1] < g[2])
    assert cells[5].label("noise") == "2" and cells[5].label("blur") == "0" and cells[5].label("type") == "noise"


def test_knn_probe_hand_example_and_no_content_leak():
    # 3 contents x 2 cells, 1-D features; k = 1: a hand computation of the leave-one-content-out predictions
    x = np.array([[0.0], [10.0], [1.0], [11.0], [5.0], [5.2]])
    labels = ["a", "b", "a", "b", "a", "b"]
    groups = [0, 0, 1, 1, 2, 2]
    # z-scores cancel in a 1-D nearest-neighbour search; neighbours of 0 / 10 among {1, 11, 5, 5.2} are 1 (a) and
    # 11 (b); of 1 / 11 among {0, 10, 5, 5.2}: 0 (a), 10 (b); of 5 / 5.2 among {0, 10, 1, 11}: 1 (a) both -> 5 of 6
    assert A.knn_probe(x, labels, groups, k=1) == pytest.approx(5 / 6)
    # features that identify only the content: the held-out content has no neighbour of its own -> chance or below
    rng = np.random.default_rng(0)
    content = np.repeat(rng.normal(size=(8, 4)) * 10, 6, axis=0) + rng.normal(size=(48, 4)) * 0.01
    lab = [str(i % 3) for i in range(48)]
    grp = [i // 6 for i in range(48)]
    assert A.knn_probe(content, lab, grp) <= A.chance_level(lab) + 0.1
    assert A.knn_probe(np.eye(3)[[int(v) for v in lab]] + rng.normal(size=(48, 3)) * 0.01, lab, grp) == 1.0
    with pytest.raises(ValueError, match="at least 2 contents"):
        A.knn_probe(x, labels, [0] * 6)


def test_tsne_separates_separated_clusters():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(size=(20, 10)), rng.normal(size=(20, 10)) + 8.0])
    y = A.tsne(x, perplexity=8, iterations=300)
    a, b = y[:20], y[20:]
    spread = max(np.linalg.norm(a - a.mean(0), axis=1).mean(), np.linalg.norm(b - b.mean(0), axis=1).mean())
    assert np.linalg.norm(a.mean(0) - b.mean(0)) > 3 * spread


def test_redegradation_reports_model_baseline_and_other_dr():
    torch.manual_seed(0)
    module = DRModule(TINY).eval()
    with torch.no_grad():  # a G_LQ that returns its HQ input: the model row must equal the baseline row
        module.degrader.head.weight.zero_()
        module.degrader.head.bias.zero_()
    r = A.redegradation(module, _faces(3))
    assert r["model"]["psnr"] == pytest.approx(r["baseline"]["psnr"], abs=1e-6)
    assert r["model"]["ssim"] == pytest.approx(r["baseline"]["ssim"], abs=1e-6)
    assert len(r["other_dr"]["psnr_per_image"]) == 3
    with pytest.raises(ValueError, match="at least 2 images"):
        A.redegradation(module, _faces(1))


def test_cli_writes_the_report_and_rejects_bad_inputs(tmp_path, record_figure):
    torch.manual_seed(0)
    ckpt = save_dr_checkpoint(tmp_path / "dr_encoder.safetensors", DRModule(TINY), patch_size=32,
                              train_config={"resolution": 64})
    faces = tmp_path / "held"
    write_faces(faces, 4, size=64, seed=50)
    out = tmp_path / "report"
    assert main(["analyze-dr", str(ckpt), str(faces), "--out", str(out), "--seed", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["probe"]) == set(A.PROBE_TASKS)
    for row in report["probe"].values():
        assert {"trained E_DR", "random E_DR", "pixel stats", "chance"} <= set(row)
    for name in ("report.md", "tsne_trained.png", "tsne_random.png", "redegradation.png"):
        assert (out / name).stat().st_size > 0
    assert "| type |" in (out / "report.md").read_text()
    record_figure("analyze-dr (untrained tiny E_DR, 4 synthetic faces) type probe",
                  " | ".join(f"{k} {v:.3f}" for k, v in report["probe"]["type"].items()))
    # bad inputs: images smaller than the patch, a file of another format, too few images
    with pytest.raises(ValueError, match="smaller than the DR encoder's 32 px patches"):
        A.analyze(DRModule(TINY), DRModule(TINY), _faces(2, 16), ["a", "b"], 32, tmp_path / "x")
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(1)}, str(other), metadata={"bfr_format": "flipnet/1"})
    with pytest.raises(CheckpointError, match="FlipNet"):
        A_read(other)
    one = tmp_path / "one"
    write_faces(one, 1, size=64)
    assert main(["analyze-dr", str(ckpt), str(one), "--out", str(tmp_path / "y")]) == 2


def A_read(path):
    from comfyui_bfr.lora.dr_checkpoint import read_dr_checkpoint
    return read_dr_checkpoint(path)


def test_dr_file_of_another_format_is_refused_with_the_fix(tmp_path):
    png = tmp_path / "face.png"
    write_faces(tmp_path, 1, size=64, names=["face.png"])
    with pytest.raises(CheckpointError, match="expected the .safetensors DR encoder"):
        A_read(png)
    assert main(["analyze-dr", str(png), str(tmp_path), "--out", str(tmp_path / "r")]) == 2

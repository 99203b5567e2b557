"""The `bfr` command line (runs in-process through cli.main)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from comfyui_bfr.cli import build_parser, main


def test_demo_writes_a_labelled_panel(tmp_path):
    rc = main(["demo", "--out", str(tmp_path), "--size", "64", "--tile", "64", "--presets", "flipnet", "dr-bfr",
               "dr2-severe-x8", "--restore", "none"])
    assert rc == 0
    assert not (tmp_path / "demo_dr2.png").exists()
    panel = Image.open(tmp_path / "demo_degradation.png")
    assert panel.size[0] == 4 * 64  # input + 3 presets in one row
    report = json.loads((tmp_path / "demo_degradation.json").read_text())
    assert set(report) == {"flipnet", "dr-bfr", "dr2-severe-x8"}
    arr = np.asarray(panel.convert("RGB")).astype(float)
    tiles = [arr[18:, i * 64:(i + 1) * 64] for i in range(4)]
    assert all(abs(t - tiles[0]).mean() > 1.0 for t in tiles[1:]), "every preset must change the face"


def test_demo_restores_with_dr2_and_says_when_the_model_is_tiny(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("BFR_SD21_CHECKPOINT", raising=False)
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.delenv("BFR_COMFY_MODELS", raising=False)
    rc = main(["demo", "--out", str(tmp_path), "--size", "64", "--tile", "64", "--presets", "dr-bfr",
               "--restore-presets", "dr2-mild-x4", "--steps", "20", "--tau", "5", "--n", "1"])
    assert rc == 0
    panel = Image.open(tmp_path / "demo_dr2.png")
    assert panel.size == (3 * 64, 64 + 18)  # HQ | degraded | restored
    assert "NOT a real restoration" in caplog.text


def test_restore_cli_rejects_bad_parameters(tmp_path, caplog):
    img = tmp_path / "face.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(img)
    rc = main(["restore", str(img), "--out", str(tmp_path / "o.png"), "--tau", "50", "--omega", "40"])
    assert rc == 2
    assert "tau" in caplog.text


def test_degrade_cli_builds_pairs_and_resumes(tmp_path):
    src = tmp_path / "hq"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(src / f"face{i}.png")
    out = tmp_path / "lq"
    assert main(["degrade", str(src), str(out), "--preset", "dr-bfr", "--per-image", "2", "--workers", "1"]) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["face0_0.png", "face0_1.png", "face1_0.png", "face1_1.png"]
    first = {p: (out / p).read_bytes() for p in pngs}
    assert main(["degrade", str(src), str(out), "--preset", "dr-bfr", "--per-image", "2", "--workers", "1"]) == 0
    assert {p: (out / p).read_bytes() for p in pngs} == first


def test_degrade_cli_missing_folder_is_a_clear_error(tmp_path, caplog):
    rc = main(["degrade", str(tmp_path / "nope"), str(tmp_path / "out")])
    assert rc == 2
    assert "nope" in caplog.text


def test_unknown_subcommand_exits():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["nope"])


def test_train_and_synthesize_subcommands_validate_their_config(tmp_path, caplog):
    # no --face-ae for restore mode, no data folder: the config's own validation names the flag to fix
    rc = main(["train", "flipnet", "--mode", "restore", "--base-model", str(tmp_path / "sd21"),
               "--output-dir", str(tmp_path / "run")])
    assert rc == 2
    assert "--hq-dir" in caplog.text
    caplog.clear()
    rc = main(["synthesize", str(tmp_path / "hq"), str(tmp_path / "out")])
    assert rc == 2 and "--checkpoint is required" in caplog.text


def test_restore_flipnet_needs_its_checkpoint(tmp_path, caplog):
    img = tmp_path / "face.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(img)
    rc = main(["restore", "--method", "flipnet", str(img), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "checkpoint" in caplog.text


def test_help_lists_every_subcommand():
    text = build_parser([]).format_help()
    for name in ("demo", "degrade", "restore", "train", "synthesize", "run-workflow"):
        assert name in text

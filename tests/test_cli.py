"""The `bfr` command line (runs in-process through cli.main)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from comfyui_bfr.cli.main import build_parser, main


def test_demo_writes_the_degradation_gallery(tmp_path, monkeypatch):
    """The preset gallery of `bfr demo` (the whole-photo panel is tested in test_photo_cli.py); no detection here."""
    from comfyui_bfr.pipelines import face_detect

    monkeypatch.setattr(face_detect, "detect", lambda *a, **k: ("dlib_cnn", []))
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
    photo = json.loads((tmp_path / "demo_photo.json").read_text())
    assert photo["faces"]["detected"] == 0 and photo["restoration"]["ran"] is False
    assert [t["kind"] for t in photo["tiles"]][-1] == "note"  # 'no face': said, not shown as an empty result


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
    for name in ("demo", "degrade", "restore", "train", "synthesize", "export-lora", "run-workflow"):
        assert name in text


def test_export_lora_help_and_missing_arguments(capsys, tmp_path, caplog):
    with pytest.raises(SystemExit) as info:
        main(["export-lora", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "LoraLoaderModelOnly" in text and "lora_unet_" in text and "BoostHub" in text
    with pytest.raises(SystemExit):
        main(["export-lora", str(tmp_path / "only_one.safetensors")])
    assert main(["export-lora", str(tmp_path / "nope.safetensors"), str(tmp_path / "o.safetensors")]) == 2
    assert "nope.safetensors" in caplog.text and "does not exist" in caplog.text


# ---------------------------------------------------------------------------------------------- -v anywhere
@pytest.mark.parametrize("argv", [["-v", "train", "flipnet", "--help"], ["train", "flipnet", "-v", "--help"],
                                  ["train", "flipnet", "--help"]])
def test_trainer_help_keeps_its_flags_with_verbose_before_or_after(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--hq-dir" in text and "--mode" in text and "--base-model" in text


@pytest.mark.parametrize("argv, verbose", [
    (["-v", "train", "flipnet", "--mode", "degrade", "--output-dir", "run"], True),
    (["train", "flipnet", "--mode", "degrade", "--output-dir", "run", "-v"], True),
    (["train", "flipnet", "--mode", "degrade", "--output-dir", "run"], False),
    (["-v", "restore", "--method", "flipnet", "face.png", "--out", "o", "--phi", "0.5"], True),
    (["restore", "face.png", "--out", "o", "--method", "flipnet", "--phi", "0.5", "--verbose"], True),
])
def test_verbose_before_or_after_the_command_parses_the_subcommand_flags(argv, verbose):
    ns = build_parser(argv).parse_args(argv)
    assert ns.verbose is verbose
    if ns.command == "train":
        assert ns.what == "flipnet" and ns.mode == "degrade" and ns.output_dir == "run"
    else:
        assert ns.method == "flipnet" and ns.phi == 0.5


def test_positionals_skip_options_before_the_command():
    from comfyui_bfr.cli.main import _positionals

    assert _positionals(["-v", "train", "flipnet", "--mode", "restore"])[:2] == ["train", "flipnet"]
    assert _positionals(["--verbose", "restore", "x.png", "--method", "flipnet"])[:1] == ["restore"]


# ------------------------------------------------------------------------------------------ degrade presets
def test_degrade_list_presets_prints_every_preset_and_help_mentions_it(capsys):
    from comfyui_bfr.pipelines.degradation import PRESETS

    assert main(["degrade", "--list-presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:len(PRESETS)]] == list(PRESETS)
    flipnet = next(line for line in lines if line.startswith("flipnet "))
    assert "2 passes, shuffled" in flipnet and "blur sigma [0.1, 15]" in flipnet and "jpeg q [30, 95]" in flipnet
    assert "--overrides" in lines[-1]
    with pytest.raises(SystemExit):
        main(["degrade", "--help"])
    assert "--list-presets" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- error reporting
def _error_records(caplog):
    return [r for r in caplog.records if r.levelname == "ERROR"]


def test_runtime_errors_show_a_traceback_only_under_verbose(tmp_path, monkeypatch, caplog):
    import comfyui_bfr.cli.main as cli

    def boom(*args, **kwargs):
        raise RuntimeError("worker pool exploded")

    monkeypatch.setattr(cli, "degrade_folder", boom)
    args = ["degrade", str(tmp_path), str(tmp_path / "out")]
    assert main(args) == 2
    (rec,) = _error_records(caplog)
    assert rec.getMessage() == "RuntimeError: worker pool exploded" and not rec.exc_info
    assert "Traceback" not in caplog.text
    for argv in (["-v", *args], [*args, "-v"]):
        caplog.clear()
        assert main(argv) == 2
        (rec,) = _error_records(caplog)
        assert rec.exc_info is not None and rec.exc_info[0] is RuntimeError
        assert "Traceback (most recent call last)" in caplog.text and "in boom" in caplog.text


@pytest.fixture
def hq_folder(tmp_path):
    src = tmp_path / "hq"
    src.mkdir()
    Image.fromarray(np.full((24, 24, 3), 100, np.uint8)).save(src / "face.png")
    return src


@pytest.mark.parametrize("case, expected", [
    ("file_as_in_dir", ["NotADirectoryError", "face.png", "folder of images"]),
    ("out_dir_under_a_file", ["NotADirectoryError", "blocker.txt is a file", "not inside a file"]),
    ("file_as_out_dir", ["NotADirectoryError", "blocker.txt is an existing file", "pass a folder path"]),
    ("bad_json", ["--overrides is not valid JSON", "'{jpeg_quality: 30}'", "give an object such as"]),
    ("array_json", ["--overrides must be a JSON object", "got an array: '[30, 60]'", "give an object such as"]),
    ("null_json", ["--overrides must be a JSON object", "got null", "give an object such as"]),
    ("unknown_field", ["has no field 'jpeg'", "Valid fields:"]),
])
def test_degrade_folder_errors_are_one_line_with_the_path_and_the_fix(tmp_path, hq_folder, caplog, case, expected):
    blocker = tmp_path / "blocker.txt"
    blocker.write_text("a file, not a folder")
    out = tmp_path / "out"
    argv = {
        "file_as_in_dir": ["degrade", str(hq_folder / "face.png"), str(out)],
        "out_dir_under_a_file": ["degrade", str(hq_folder), str(blocker / "lq")],
        "file_as_out_dir": ["degrade", str(hq_folder), str(blocker)],
        "bad_json": ["degrade", str(hq_folder), str(out), "--overrides", "{jpeg_quality: 30}"],
        "array_json": ["degrade", str(hq_folder), str(out), "--overrides", "[30, 60]"],
        "null_json": ["degrade", str(hq_folder), str(out), "--overrides", "null"],
        "unknown_field": ["degrade", str(hq_folder), str(out), "--overrides", '{"jpeg": 30}'],
    }[case]
    assert main([*argv, "--workers", "1"]) == 2
    (rec,) = _error_records(caplog)
    message = rec.getMessage()
    assert "\n" not in message and not rec.exc_info, message
    for part in expected:
        assert part in message, message
    assert not out.exists() or not any(out.iterdir())


def test_degrade_into_a_read_only_folder_is_a_clear_error(tmp_path, hq_folder, caplog):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: chmod 0o500 does not stop writes (the path-under-a-file case still runs)")
        assert main(["degrade", str(hq_folder), str(locked / "lq"), "--workers", "1"]) == 2
    finally:
        locked.chmod(0o700)
    (rec,) = _error_records(caplog)
    assert rec.getMessage().startswith("PermissionError: cannot write into the output folder")
    assert "choose a folder you can write to" in rec.getMessage()


def test_the_real_command_prints_one_line_and_no_traceback(tmp_path, hq_folder):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "comfyui_bfr.cli", "degrade", str(hq_folder / "face.png"),
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines == [f"ERROR bfr: NotADirectoryError: input must be a folder of images, got a file: "
                     f"{hq_folder / 'face.png'}."], res.stderr


# ------------------------------------------------------------------------------ the same flags for every method
@pytest.mark.parametrize("method", ["dr2", "flipnet"])
def test_restore_takes_base_model_and_defaults_device_to_auto_for_every_method(method):
    argv = ["restore", "--method", method, "face.png", "--out", "o", "--base-model", "sd21.safetensors",
            "--download", "--repo", "someone/sd21"]
    ns = build_parser(argv).parse_args(argv)
    assert ns.base_model == "sd21.safetensors" and ns.device == "auto"
    assert ns.download is True and ns.repo == "someone/sd21"
    argv = ["restore", "--method", method, "face.png", "--out", "o"]
    ns = build_parser(argv).parse_args(argv)
    assert ns.base_model is None and ns.device == "auto"


def test_restore_flipnet_takes_its_checkpoint_and_dr2_refuses_one(capsys):
    argv = ["restore", "--method", "flipnet", "face.png", "--out", "o", "--checkpoint", "flipnet.safetensors"]
    assert build_parser(argv).parse_args(argv).checkpoint == "flipnet.safetensors"
    for argv in (["restore", "--method", "dr2", "face.png", "--out", "o", "--checkpoint", "sd21.safetensors"],
                 ["restore", "face.png", "--out", "o", "--checkpoint", "sd21.safetensors"]):
        with pytest.raises(SystemExit) as info:
            build_parser(argv).parse_args(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "--checkpoint is a FlipNet checkpoint" in err and "--base-model sd21.safetensors" in err


def test_restore_flipnet_finds_sd21_through_the_same_lookup_as_dr2(tmp_path, monkeypatch):
    """No --base-model: FlipNet takes SD 2.1 from $BFR_SD21_CHECKPOINT, as DR2 and the demo do."""
    from fixtures.flipnet import write_faces, write_flipnet_checkpoint, write_micro_folder

    for var in ("BFR_COMFY_MODELS", "COMFYUI_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("BFR_SD21_CHECKPOINT", str(write_micro_folder(tmp_path / "sd21")))
    ckpt = write_flipnet_checkpoint(tmp_path / "restore.safetensors", "restore")
    write_faces(tmp_path / "lq", 1, size=64, names=["face.tif"])
    assert main(["restore", "--method", "flipnet", str(tmp_path / "lq"), "--out", str(tmp_path / "out"),
                 "--checkpoint", str(ckpt), "--size", "64", "--num-inference-steps", "1", "--device", "cpu"]) == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["face.png"]

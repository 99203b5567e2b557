"""End-to-end training runs on tiny models and folders: face-AE recon -> assoc -> FlipNet restore (validation images,
checkpoint, resume), the README's two face-AE commands into one folder with ``--resume-from-checkpoint latest``,
refused resumes (another stage / config / an unrecorded folder), export dtype and file modes, log lines and the
progress bar, FlipNet degrade on paired + face folders, a two-process CPU run through ``torchrun`` (gloo), config
validation errors and the grouped ``--help``."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from comfyui_bfr.cli.main import main as bfr_main
from comfyui_bfr.cli.args import add_dataclass_arguments, dataclass_from_namespace
from comfyui_bfr.lora import checkpoint as ck
from comfyui_bfr.pipelines.image_io import ImageFolderError
from comfyui_bfr.train import core
from comfyui_bfr.train.core import TrainConfig, list_checkpoints, load_trainable_state_dict, trainable_state_dict
from comfyui_bfr.train.face_ae import FaceAETrainConfig, train_face_ae
from comfyui_bfr.train.flipnet import FlipNetTrainConfig, train_flipnet
from fixtures.flipnet import micro_components, write_faces, write_micro_folder, TINY_FACE

ROOT = Path(__file__).resolve().parents[1]
TINY_AE = dict(block_out_channels=TINY_FACE.block_out_channels, layers_per_block=TINY_FACE.layers_per_block,
               norm_num_groups=TINY_FACE.norm_num_groups, patch_size=TINY_FACE.patch_size)  # as trainer flags


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    write_faces(root / "hq", 4, size=64)
    (root / "captions.json").write_text(json.dumps({"00000.png": "a photo of a face", "00001.png": "old man"}))
    return root


@pytest.fixture(scope="module")
def face_ae(faces, tmp_path_factory):
    out = tmp_path_factory.mktemp("face_ae")
    common = dict(hq_dir=str(faces / "hq"), output_dir=str(out), resolution=64, train_batch_size=2,
                  max_train_steps=1, checkpointing_steps=1, validation_steps=1, num_validation_images=2,
                  dataloader_num_workers=0, allow_random_vgg=True, disc_channels=16, disc_layers=2, **TINY_AE)
    recon = train_face_ae(FaceAETrainConfig(stage="recon", **common))
    assoc = train_face_ae(FaceAETrainConfig(stage="assoc", init_from=str(recon), **common))
    return recon, assoc, out


def test_face_ae_stages_write_their_checkpoints(face_ae):
    recon, assoc, out = face_ae
    _, meta_r = ck.load_face_ae_checkpoint(recon)
    pair, meta_a = ck.load_face_ae_checkpoint(assoc)
    assert meta_r["stage"] == "recon" and meta_a["stage"] == "assoc" and meta_a["image_size"] == "64"
    assert json.loads(meta_a["train_config"])["init_from"] == str(recon)
    assert (out / "validation" / "recon_step_0000001.png").is_file()
    # one folder, one resumable checkpoint per stage (namespaced), each with its run record
    assert (out / "checkpoint-recon-1" / "face_ae_recon.safetensors").is_file()
    assert (out / "checkpoint-assoc-1" / "face_ae_assoc.safetensors").is_file()
    record = json.loads((out / "checkpoint-assoc-1" / core.RUN_RECORD).read_text())
    assert record["trainer"] == "train face-ae" and record["run"] == "assoc" and record["step"] == 1
    assert record["config"]["stage"] == "assoc" and "output_dir" not in record["config"]


def test_restore_training_validation_checkpoint_and_resume(faces, face_ae, tmp_path):
    _, assoc, _ = face_ae
    out = tmp_path / "restore"
    cfg = dict(mode="restore", output_dir=str(out), hq_dir=str(faces / "hq"), captions=str(faces / "captions.json"),
               face_ae=str(assoc), resolution=64, train_batch_size=2, max_train_steps=2, lora_rank=4,
               checkpointing_steps=2, validation_steps=2, num_validation_images=2, validation_inference_steps=2,
               dataloader_num_workers=0, allow_random_vgg=True, learning_rate=1e-4, seed=3)
    final = train_flipnet(FlipNetTrainConfig(**cfg), components=micro_components(0))
    ckpt = ck.read_flipnet_checkpoint(final)
    assert ckpt.mode == "restore" and ckpt.rank == 4 and ckpt.has_face_embedder and ckpt.face_image_size == 64
    assert json.loads(ckpt.metadata["train_config"])["seed"] == 3
    grid = Image.open(out / "validation" / "restore_step_0000002.png")
    assert grid.size == (3 * 64, 2 * 64)  # rows: [LQ condition | restored | HQ target]
    assert [s for s, _ in list_checkpoints(out, "restore")] == [2]
    assert (out / "checkpoint-restore-2" / "trainable_0.safetensors").is_file()
    assert (out / "checkpoint-restore-2" / "flipnet_restore.safetensors").is_file()
    # resume from the latest state and continue to step 3: schedule / validation knobs may change on a resume
    resumed = train_flipnet(FlipNetTrainConfig(**dict(cfg, max_train_steps=3, checkpointing_steps=1,
                                                      validation_steps=0, resume_from_checkpoint="latest")),
                            components=micro_components(0))
    assert [s for s, _ in list_checkpoints(out, "restore")] == [2, 3]
    with safe_open(str(resumed), framework="pt") as f:
        assert f.metadata()["bfr_format"] == "flipnet/1"


def test_degrade_training_on_paired_and_face_folders(faces, tmp_path):
    lol = tmp_path / "LOL"
    write_faces(lol / "low", 3, size=80, seed=10)
    write_faces(lol / "high", 3, size=80, seed=20)
    (lol / "captions.json").write_text(json.dumps({"00000": "a dark photo"}))
    out = tmp_path / "degrade"
    final = train_flipnet(FlipNetTrainConfig(
        mode="degrade", output_dir=str(out), paired_dirs=[f"{lol}:lol:2"], hq_dir=str(faces / "hq"),
        max_face_images=2, resolution=64, train_batch_size=2, max_train_steps=2, lora_rank=4,
        checkpointing_steps=5, validation_steps=2, num_validation_images=1, validation_inference_steps=2,
        dataloader_num_workers=0), components=micro_components(0))
    ckpt = ck.read_flipnet_checkpoint(final)
    assert ckpt.mode == "degrade" and not ckpt.has_face_embedder
    assert (out / "validation" / "degrade_step_0000002.png").is_file()


@pytest.mark.slow
def test_two_process_cpu_training_writes_the_same_format(faces, tmp_path):
    """Two CPU processes (torchrun running the ``bfr`` module, gloo via accelerate's MULTI_CPU) train 2 steps and
    export the same format."""
    base = write_micro_folder(tmp_path / "base")
    lol = tmp_path / "LOL"
    write_faces(lol / "low", 4, size=64, seed=10)
    write_faces(lol / "high", 4, size=64, seed=20)
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    with socket.socket() as sock:  # a free port for the rendezvous (torchrun does not accept 0)
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           "-m", "comfyui_bfr.cli", "train", "flipnet", "--mode", "degrade", "--base-model", str(base),
           "--output-dir", str(out), "--paired-dirs", str(lol), "--hq-dir", str(faces / "hq"),
           "--resolution", "64", "--train-batch-size", "1", "--max-train-steps", "2", "--lora-rank", "4",
           "--checkpointing-steps", "2", "--validation-steps", "0", "--dataloader-num-workers", "0"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    assert "on 2 processes" in log and "on 1 processes" not in log
    ckpt = ck.read_flipnet_checkpoint(out / "flipnet_degrade.safetensors")
    assert ckpt.mode == "degrade" and ckpt.rank == 4
    assert (out / "checkpoint-degrade-2" / "trainable_0.safetensors").is_file()
    assert (out / "checkpoint-degrade-2" / "random_states_1.pkl").is_file()  # both ranks saved their RNG state
    assert (out / "checkpoint-degrade-2" / core.RUN_RECORD).is_file()
    assert log.count("step 2/2 loss=") == 1  # one log line per logging step: the main process only
    single = ck.read_flipnet_checkpoint(out / "checkpoint-degrade-2" / "flipnet_degrade.safetensors")
    assert set(single.lora) == set(ckpt.lora) and set(single.boosthub) == set(ckpt.boosthub)


def test_config_errors_name_the_flag_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"--hq-dir=None is required in restore mode"):
        FlipNetTrainConfig(mode="restore", output_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"--face-ae=None is required .*bfr train face-ae"):
        FlipNetTrainConfig(mode="restore", hq_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"--vgg-weights=None is required for the perceptual loss"):
        FlipNetTrainConfig(mode="restore", hq_dir=str(tmp_path), face_ae="x.safetensors")
    with pytest.raises(ValueError, match=r"--export-dtype='fp8' must be one of"):
        FlipNetTrainConfig(mode="degrade", paired_dirs=["x"], export_dtype="fp8")
    with pytest.raises(ValueError, match=r"--paired-dirs=\[\] is empty"):
        FlipNetTrainConfig(mode="degrade")
    with pytest.raises(ValueError, match=r"--mode='restoration' must be one of"):
        FlipNetTrainConfig(mode="restoration")
    with pytest.raises(ValueError, match=r"--resolution=500 must be a multiple of 64"):
        FlipNetTrainConfig(mode="degrade", paired_dirs=["x"], resolution=500)
    with pytest.raises(ValueError, match=r"--text-drop-prob=1.5 must be a probability"):
        FlipNetTrainConfig(mode="degrade", paired_dirs=["x"], text_drop_prob=1.5)
    with pytest.raises(ValueError, match=r"--lora-rank=0 must be a positive integer"):
        FlipNetTrainConfig(mode="degrade", paired_dirs=["x"], lora_rank=0)
    with pytest.raises(ValueError, match=r"--init-from=None is required for --stage assoc"):
        FaceAETrainConfig(stage="assoc", hq_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"--patch-size=3 must divide the latent side"):
        FaceAETrainConfig(stage="recon", hq_dir=str(tmp_path), patch_size=3, allow_random_vgg=True)
    assert FaceAETrainConfig(stage="assoc", hq_dir="x", init_from="y", allow_random_vgg=True).max_train_steps == 80_000
    assert FlipNetTrainConfig(mode="degrade", paired_dirs=["x"]).learning_rate == 5e-5


def test_resume_state_must_fit_the_model():
    a = torch.nn.Linear(2, 3)
    b = torch.nn.Linear(2, 4)
    sd = trainable_state_dict(a)
    load_trainable_state_dict(torch.nn.Linear(2, 3), sd, "s")
    with pytest.raises(ValueError, match=r"weight has shape \(3, 2\), expected \(4, 2\)"):
        load_trainable_state_dict(b, sd, "s")
    with pytest.raises(ValueError, match=r"does not fit this model: 0 missing .* 1 unexpected .*'extra'.*same mode"):
        load_trainable_state_dict(a, dict(sd, extra=torch.zeros(1)), "s")


def test_training_on_an_empty_folder_fails_clearly(tmp_path):
    (tmp_path / "hq").mkdir()
    with pytest.raises(ImageFolderError, match="holds no images"):
        train_flipnet(FlipNetTrainConfig(mode="degrade", output_dir=str(tmp_path / "o"), hq_dir=str(tmp_path / "hq"),
                                         lora_rank=4, resolution=64), components=micro_components(0))


def test_argparse_wiring_round_trips_the_config():
    p = argparse.ArgumentParser()
    add_dataclass_arguments(p, FlipNetTrainConfig)
    ns = p.parse_args(["--mode", "degrade", "--paired-dirs", "/a:lol", "/b:sidd:1000", "--no-use-face-embedding",
                       "--lora-alpha", "32", "--gradient-checkpointing"])
    cfg = dataclass_from_namespace(FlipNetTrainConfig, ns)
    assert cfg.paired_dirs == ["/a:lol", "/b:sidd:1000"] and cfg.lora_alpha == 32.0 and cfg.gradient_checkpointing
    assert cfg.use_face_embedding is False and cfg.lora_rank == 64 and cfg.validation_guidance_scale == 1.5
    p2 = argparse.ArgumentParser()
    add_dataclass_arguments(p2, FaceAETrainConfig)
    ns2 = p2.parse_args(["--stage", "recon", "--hq-dir", "x", "--block-out-channels", "32", "64",
                         "--lambda-perceptual", "0"])
    cfg2 = dataclass_from_namespace(FaceAETrainConfig, ns2)
    assert cfg2.block_out_channels == (32, 64) and cfg2.max_train_steps == 200_000
    # subclass defaults override the shared ones (face-AE's Adam betas); the rest are inherited
    assert (cfg2.adam_beta1, cfg2.adam_beta2, cfg2.adam_epsilon) == (0.5, 0.9, 1e-8)
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon) == (0.9, 0.999, 1e-8)


@pytest.mark.parametrize("which,own", [("flipnet", "--lora-rank"), ("face-ae", "--disc-learning-rate")])
def test_train_help_lists_shared_and_own_flags(which, own, capsys):
    with pytest.raises(SystemExit) as exc:
        bfr_main(["train", which, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    shared = ["--" + f.name.replace("_", "-") for f in dataclasses.fields(TrainConfig)]
    missing = [f for f in shared + [own] if f not in out]
    assert not missing, missing
    assert "--resume-from-checkpoint" in shared and "--mixed-precision" in shared


# ------------------------------------------------------------------------------------- issue 8: what a new user hit
def _face_ae_argv(stage: str, hq: Path, out: Path, *extra: str) -> list[str]:
    """The README's `bfr train face-ae` command at toy scale (tiny AE, 64 px, 2 steps, a checkpoint every step)."""
    return ["train", "face-ae", "--stage", stage, "--hq-dir", str(hq), "--output-dir", str(out),
            "--resolution", "64", "--train-batch-size", "2", "--max-train-steps", "2", "--checkpointing-steps", "1",
            "--validation-steps", "0", "--dataloader-num-workers", "0", "--allow-random-vgg", "--disc-channels", "16",
            "--disc-layers", "2", "--block-out-channels", "32", "64", "--layers-per-block", "1",
            "--norm-num-groups", "8", "--patch-size", "2", "--log-every", "1", *extra]


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o644
    os.umask(old)


def test_readme_two_stage_face_ae_flow_in_one_folder_with_resume_latest(faces, tmp_path, caplog, umask_022):
    """Both README commands with --resume-from-checkpoint latest into one --output-dir: assoc starts fresh from the
    recon file (it used to resume recon's state, train 0 steps and write a copy of the recon file labelled assoc),
    trains its own steps and leaves recon's resumable checkpoints untouched."""
    out = tmp_path / "face_ae"
    latest = ("--resume-from-checkpoint", "latest")
    caplog.set_level(logging.INFO)
    assert bfr_main(_face_ae_argv("recon", faces / "hq", out, *latest)) == 0
    recon_ckpts = {p.name: _digest(p) for _, p in list_checkpoints(out, "recon")}
    assert sorted(recon_ckpts) == ["checkpoint-recon-1", "checkpoint-recon-2"]
    caplog.clear()
    assert bfr_main(_face_ae_argv("assoc", faces / "hq", out, *latest, "--init-from",
                                  str(out / "face_ae_recon.safetensors"))) == 0
    assert "no checkpoint-assoc-<step> folder" in caplog.text and "Resumed" not in caplog.text
    steps = [line for line in caplog.messages if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["1/2", "2/2"]  # the assoc stage ran its own two steps
    assert [s for s, _ in list_checkpoints(out, "assoc")] == [1, 2]
    assert {p.name: _digest(p) for _, p in list_checkpoints(out, "recon")} == recon_ckpts  # not clobbered
    recon_t, assoc_t = _tensors(out / "face_ae_recon.safetensors"), _tensors(out / "face_ae_assoc.safetensors")
    assert set(recon_t) == set(assoc_t)
    assert any(not torch.equal(recon_t[k], assoc_t[k]) for k in recon_t)  # trained on, not a relabelled copy
    # running the assoc command again (now to step 3) resumes assoc's own latest state
    caplog.clear()
    assert bfr_main(_face_ae_argv("assoc", faces / "hq", out, *latest, "--init-from",
                                  str(out / "face_ae_recon.safetensors"), "--max-train-steps", "3")) == 0
    assert "Resumed `bfr train face-ae --stage assoc`" in caplog.text and "checkpoint-assoc-2" in caplog.text
    assert [s for s, _ in list_checkpoints(out, "assoc")] == [2, 3]
    # exported files and checkpoint folders are readable by other users (umask 022 -> 0644), not 0600
    for path in [out / "face_ae_recon.safetensors", out / "face_ae_assoc.safetensors",
                 *(out / "checkpoint-assoc-3").iterdir()]:
        assert path.stat().st_mode & 0o777 == umask_022, path


def test_resume_refuses_another_stage_config_or_an_unrecorded_folder(faces, tmp_path):
    out = tmp_path / "run"
    assert bfr_main(_face_ae_argv("recon", faces / "hq", out)) == 0
    recon_dir = out / "checkpoint-recon-2"
    base = dict(hq_dir=str(faces / "hq"), output_dir=str(out), resolution=64, train_batch_size=2,
                allow_random_vgg=True, disc_channels=16, disc_layers=2, dataloader_num_workers=0, **TINY_AE)
    # another stage: explicitly pointed at recon's folder
    cfg = FaceAETrainConfig(stage="assoc", init_from=str(out / "face_ae_recon.safetensors"),
                            resume_from_checkpoint=str(recon_dir), **base)
    with pytest.raises(ValueError) as exc:
        train_face_ae(cfg)
    msg = str(exc.value)
    assert "belongs to `bfr train face-ae --stage recon`" in msg and "this run is `bfr train face-ae --stage assoc`" in msg
    assert "another --output-dir" in msg and "drop --resume-from-checkpoint" in msg
    # the same stage with another config (learning rate): named with both values
    with pytest.raises(ValueError, match=r"differ in --learning-rate 5e-05 -> 0\.001.*another --output-dir"):
        train_face_ae(FaceAETrainConfig(stage="recon", learning_rate=1e-3, resume_from_checkpoint="latest", **base))
    # schedule / output / logging knobs are not part of the run: the same run may change them on resume
    same = FaceAETrainConfig(stage="recon", resume_from_checkpoint="latest", **dict(base, dataloader_num_workers=1),
                             max_train_steps=9, log_every=7, checkpoints_total_limit=5, validation_steps=0)
    assert core.check_run_record(recon_dir, same)["step"] == 2
    # a folder without a run record (an older version, or interrupted while saving)
    (recon_dir / core.RUN_RECORD).unlink()
    with pytest.raises(ValueError, match=r"has no bfr_run\.json .*another --output-dir"):
        core.check_run_record(recon_dir, same)
    assert core.resolve_resume(out, "latest", "recon")[0].name == "checkpoint-recon-1"  # the complete one


def test_export_dtype_follows_mixed_precision(faces, tmp_path):
    """bf16 training exports bf16 (half the bytes); fp32 training keeps fp32; --export-dtype overrides."""
    from accelerate.state import AcceleratorState

    def run(out, *extra):
        AcceleratorState._reset_state()  # one process, several precisions (the CLI runs one per process)
        assert bfr_main(_face_ae_argv("recon", faces / "hq", out, "--max-train-steps", "1", *extra)) == 0
        path = out / "face_ae_recon.safetensors"
        with safe_open(str(path), framework="pt") as f:
            return path, f.metadata(), {f.get_tensor(k).dtype for k in f.keys()}

    p32, meta32, dt32 = run(tmp_path / "fp32")
    p16, meta16, dt16 = run(tmp_path / "bf16", "--mixed-precision", "bf16")
    pov, metaov, dtov = run(tmp_path / "override", "--mixed-precision", "bf16", "--export-dtype", "fp32")
    assert dt32 == {torch.float32} and meta32["dtype"] == "fp32"
    assert dt16 == {torch.bfloat16} and meta16["dtype"] == "bf16"
    assert dtov == {torch.float32} and metaov["dtype"] == "fp32"
    assert p16.stat().st_size < 0.55 * p32.stat().st_size
    AcceleratorState._reset_state()
    pair, _ = ck.load_face_ae_checkpoint(p16)  # a bf16 file loads into the fp32 pair
    assert next(pair.parameters()).dtype == torch.float32
    # the resumable state keeps fp32 master weights
    with safe_open(str(tmp_path / "bf16" / "checkpoint-recon-1" / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_face_ae_size_is_two_sd_vaes_and_fewer_checkpoints_are_kept():
    """The paper initialises both autoencoders from the SD VAE, so each has exactly the SD VAE's parameters
    (83.65 M): 167.3 M for the pair, 669 MB in fp32. Two resumable checkpoints are kept by default (was 3)."""
    from diffusers import AutoencoderKL

    from comfyui_bfr.lora.face_embedder import FaceAEConfig, FaceAutoencoderPair
    from comfyui_bfr.sd.convert import SD21_BASE_VAE_CONFIG

    trained = FaceAETrainConfig(stage="recon", hq_dir="x", allow_random_vgg=True).ae_config()  # the CLI defaults
    assert trained == FaceAEConfig()
    with torch.device("meta"):
        pair = FaceAutoencoderPair(trained)
        vae = AutoencoderKL.from_config(dict(SD21_BASE_VAE_CONFIG))
    n_pair, n_vae = sum(p.numel() for p in pair.parameters()), sum(p.numel() for p in vae.parameters())
    assert n_pair == 2 * n_vae == 167_307_726
    assert TrainConfig.__dataclass_fields__["checkpoints_total_limit"].default == 2


def test_log_lines_and_progress_bar():
    """A line per logging step with loss, lr, it/s and ETA; a tqdm bar only on a terminal and the main process."""
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, pipe = Tty(), io.StringIO()
    with core.TrainingProgress(10, 0, "face autoencoders", log_every=5, stream=tty) as prog:
        assert prog.bar is not None
        lines = [prog.update(s, {"loss": 0.5, "l1_x": 0.25}, 5e-5) for s in range(1, 11)]
    assert [bool(x) for x in lines] == [True, False, False, False, True, False, False, False, False, True]
    assert lines[4].startswith("step 5/10 loss=0.5000 l1_x=0.2500 lr=5.00e-05 | ") and "it/s, ETA 0:00:0" in lines[4]
    assert "10/10" in tty.getvalue()  # the bar was drawn on the terminal
    with core.TrainingProgress(10, 0, "x", log_every=5, stream=pipe) as prog:
        assert prog.bar is None and prog.update(5, {"loss": 1.0}, 1e-4) is not None
    with core.TrainingProgress(10, 0, "x", log_every=5, main_process=False, stream=tty) as prog:
        assert prog.bar is None and prog.update(5, {"loss": 1.0}, 1e-4) is None
    assert pipe.getvalue() == ""
    assert [core.format_eta(x) for x in (59, 3661, 90061, float("inf"))] == ["0:00:59", "1:01:01", "1d 1:01:01", "?"]


@pytest.mark.parametrize("which,config_cls", [("face-ae", FaceAETrainConfig), ("flipnet", FlipNetTrainConfig)])
def test_train_help_is_grouped_by_topic_and_says_what_a_first_run_needs(which, config_cls, capsys):
    with pytest.raises(SystemExit):
        bfr_main(["train", which, "--help"])
    out = capsys.readouterr().out
    titles = list(core.ARG_GROUPS.values())
    positions = [out.index(f"\n{t}:\n") for t in titles]
    assert positions == sorted(positions)  # data, model, optimisation, schedule, hardware, logging
    assert "A first run needs" in out and "--output-dir" in out.split("options:")[0]
    for f in dataclasses.fields(config_cls):
        assert f.metadata.get("group") in core.ARG_GROUPS, f.name
        listed = out.index("\n  --" + f.name.replace("_", "-"))  # where the flag is listed (not the description)
        section = out[:listed].rsplit("\n\n", 1)[-1].split(":")[0]
        assert section.strip() == core.ARG_GROUPS[f.metadata["group"]], (f.name, section)
    assert "(default: None)" not in out and out.count("--vgg-weights") >= 2
    # the run identity is data + model + optimisation, never output / schedule / hardware / logging knobs
    identity = {f.name for f in dataclasses.fields(config_cls) if f.metadata["identity"]}
    assert {"resolution", "learning_rate", "seed", config_cls.RUN_FIELD} <= identity
    assert not identity & {"output_dir", "max_train_steps", "resume_from_checkpoint", "mixed_precision", "log_every",
                           "checkpoints_total_limit", "dataloader_num_workers", "vgg_weights"}


def test_vgg19_error_says_which_file_where_and_how_to_do_without(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ValueError) as exc:
        FaceAETrainConfig(stage="recon", hq_dir=str(tmp_path))
    msg = str(exc.value)
    for part in ("vgg19-dcbb9e9d.pth", "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth", "features.<i>",
                 "--vgg-weights FILE", "--lambda-perceptual 0", str(tmp_path / "torch" / "hub" / "checkpoints"),
                 "ComfyUI"):
        assert part in msg, part
    assert "there is one there now" not in msg
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    with pytest.raises(ValueError, match=r"there is one there now: --vgg-weights .*vgg19-dcbb9e9d\.pth"):
        FlipNetTrainConfig(mode="restore", hq_dir=str(tmp_path), face_ae="x.safetensors")
    # the flag that trains without it: no VGG19 needed, none built
    cfg = FaceAETrainConfig(stage="recon", hq_dir=str(tmp_path), lambda_perceptual=0.0)
    assert core.perceptual_loss(cfg) is None
    assert FlipNetTrainConfig(mode="restore", hq_dir=str(tmp_path), face_ae="x", lambda_perceptual=0).vgg_weights is None
    # and through the command line: one line naming the file and the flags
    rc = bfr_main(["train", "face-ae", "--stage", "recon", "--hq-dir", str(tmp_path), "--output-dir", str(tmp_path)])
    assert rc == 2 and "vgg19-dcbb9e9d.pth" in caplog.text and "--lambda-perceptual 0" in caplog.text
    from comfyui_bfr.lora.losses import load_vgg19_state_dict

    with pytest.raises(FileNotFoundError, match=r"gone\.pth' does not exist\. The VGG19 perceptual loss needs"):
        load_vgg19_state_dict(tmp_path / "gone.pth")

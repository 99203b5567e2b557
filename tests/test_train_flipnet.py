"""End-to-end training runs on tiny models and folders: face-AE recon -> assoc -> FlipNet restore (validation images,
checkpoint, resume), FlipNet degrade on paired + face folders, a two-process CPU run through ``accelerate launch``
(gloo), and config validation errors."""

from __future__ import annotations

import argparse
import dataclasses
import json
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
    assert (out / "checkpoint-1" / "face_ae_assoc.safetensors").is_file()


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
    grid = Image.open(out / "validation" / "step_0000002.png")
    assert grid.size == (3 * 64, 2 * 64)  # rows: [LQ condition | restored | HQ target]
    assert [s for s, _ in list_checkpoints(out)] == [2]
    assert (out / "checkpoint-2" / "trainable_0.safetensors").is_file()
    assert (out / "checkpoint-2" / "flipnet_restore.safetensors").is_file()
    # resume from the latest state and continue to step 3
    resumed = train_flipnet(FlipNetTrainConfig(**dict(cfg, max_train_steps=3, checkpointing_steps=1,
                                                      validation_steps=0, resume_from_checkpoint="latest")),
                            components=micro_components(0))
    assert [s for s, _ in list_checkpoints(out)] == [2, 3]
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
    assert (out / "validation" / "step_0000002.png").is_file()


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
    assert (out / "checkpoint-2" / "trainable_0.safetensors").is_file()
    assert (out / "checkpoint-2" / "random_states_1.pkl").is_file()  # both ranks saved their RNG state
    single = ck.read_flipnet_checkpoint(out / "checkpoint-2" / "flipnet_degrade.safetensors")
    assert set(single.lora) == set(ckpt.lora) and set(single.boosthub) == set(ckpt.boosthub)


def test_config_errors_name_the_flag_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"--hq-dir=None is required in restore mode"):
        FlipNetTrainConfig(mode="restore", output_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"--face-ae=None is required .*bfr train face-ae"):
        FlipNetTrainConfig(mode="restore", hq_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"--vgg-weights=None is required for the perceptual loss"):
        FlipNetTrainConfig(mode="restore", hq_dir=str(tmp_path), face_ae="x.safetensors")
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

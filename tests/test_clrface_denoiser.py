"""CLR-Face's conditional denoiser (train/clrface.py): EDM noise levels, a training run, the clrface/1 file."""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_bfr.lora import cond_checkpoint as cc
from comfyui_bfr.sd.diffusion import sigmas_from_alphas_cumprod
from comfyui_bfr.train.clrface import CLRFaceTrainConfig, edm_timesteps, train_clrface
from fixtures.flipnet import micro_components, write_faces
from fixtures.tiny_sd import build_tiny_scheduler


def test_edm_timesteps_follow_the_log_normal_noise_distribution():
    alphas = build_tiny_scheduler().alphas_cumprod
    sigmas = sigmas_from_alphas_cumprod(alphas)
    t = edm_timesteps(alphas, 20000, generator=torch.Generator().manual_seed(0))
    log_s = torch.log(sigmas[t])
    inside = (log_s > math.log(sigmas[0]) + 0.05) & (log_s < math.log(sigmas[-1]) - 0.05)
    # P(ln sigma < -1.2) = 0.5 and P(ln sigma < 0) = Phi(1) = 0.841 under N(-1.2, 1.2^2); nearest-sigma rounding only
    assert abs(float((log_s < -1.2).float().mean()) - 0.5) < 0.02
    assert abs(float((log_s < 0.0).float().mean()) - 0.8413) < 0.02
    assert inside.float().mean() > 0.9 and t.min() >= 0 and t.max() < len(alphas)


def test_training_run_writes_a_clrface_file(tmp_path):
    faces = tmp_path / "faces"
    write_faces(faces, 4, size=64)
    final = train_clrface(CLRFaceTrainConfig(hq_dir=str(faces), output_dir=str(tmp_path / "run"), resolution=64,
                                             train_batch_size=2, max_train_steps=2, lora_rank=4,
                                             checkpointing_steps=2, dataloader_num_workers=0),
                          components=micro_components(0))
    ckpt = cc.read_conditional_checkpoint(final, cc.CLRFACE_FORMAT)
    assert ckpt.rank == 4 and not ckpt.modules and ckpt.defaults["scheduler"] == "karras"
    assert not ckpt.conv_in_is_zero  # the degraded-latent channels were trained
    with pytest.raises(ValueError, match="--hq-dir"):
        CLRFaceTrainConfig(output_dir=str(tmp_path))

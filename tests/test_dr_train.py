"""`bfr train dr-encoder` (train/dr_encoder.py) and what a trained E_DR knows, on real photos."""

from __future__ import annotations

import pytest
import torch

from comfyui_bfr.lora.dr_checkpoint import read_dr_checkpoint
from comfyui_bfr.train.core import list_checkpoints
from comfyui_bfr.train.dr_encoder import DREncoderTrainConfig, patch_pairs, train_dr_encoder
from fixtures.flipnet import write_faces



def test_patches_sit_at_the_same_position_in_hq_and_lq():
    hq = torch.randint(0, 200, (3, 3, 40, 40)).float()  # integers: the difference below is exact
    lq = hq + 1.0  # a known offset: an LQ patch minus its HQ twin is exactly 1 where the positions agree
    p1, p2, r1, r2 = patch_pairs(hq, lq, 16, torch.Generator().manual_seed(0))
    assert p1.shape == (3, 3, 16, 16)
    assert torch.equal(p1 - r1, torch.ones_like(p1)) and torch.equal(p2 - r2, torch.ones_like(p2))
    assert not torch.equal(p1, p2)  # two different windows
    with pytest.raises(ValueError, match="smaller than the 48 px patches"):
        patch_pairs(hq, lq, 48)


def test_training_run_exports_resumes_and_validates(tmp_path):
    faces = tmp_path / "faces"
    write_faces(faces, 4, size=64)
    out = tmp_path / "run"
    cfg = dict(hq_dir=str(faces), output_dir=str(out), resolution=64, patch_size=32, train_batch_size=4,
               max_train_steps=2, checkpointing_steps=2, validation_steps=2, num_validation_images=2,
               dataloader_num_workers=0, token_dim=32)
    final = train_dr_encoder(DREncoderTrainConfig(**cfg))
    module, meta = read_dr_checkpoint(final)
    assert meta["patch_size"] == "32" and module.cfg.token_dim == 32
    assert (out / "validation" / "dr_step_0000002.png").is_file()
    train_dr_encoder(DREncoderTrainConfig(**dict(cfg, max_train_steps=3, checkpointing_steps=1, validation_steps=0,
                                                 resume_from_checkpoint="latest")))
    assert [s for s, _ in list_checkpoints(out)] == [2, 3]
    with pytest.raises(ValueError, match="--patch-size.*larger than --resolution"):
        DREncoderTrainConfig(**dict(cfg, patch_size=96))
    with pytest.raises(ValueError, match="--train-batch-size.*negatives"):
        DREncoderTrainConfig(**dict(cfg, train_batch_size=1))

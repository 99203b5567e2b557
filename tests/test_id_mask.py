"""``bfr train id-mask`` (train/id_mask.py) on the micro UNet, the tiny VAE and a random r18: the objective on a fixed
batch falls from the untrained f_M to the trained one, the guided identity loss ends below the unguided one, the
export loads as clrface-mask/1, and bad flags are clear errors."""

from __future__ import annotations

import pytest
import torch

from comfyui_bfr.cli.main import main as bfr_main
from comfyui_bfr.lora.id_mask import IdentityMask, IdentityMaskConfig, load_mask_checkpoint
from comfyui_bfr.pipelines.arcface import IdentityModel, build_iresnet
from comfyui_bfr.train import id_mask as tm
from fixtures.flipnet import micro_components, stub_degrade, write_faces


def _cfg(tmp_path, faces, **kw):
    base = dict(hq_dir=str(faces), output_dir=str(tmp_path / "run"), resolution=64, train_batch_size=2,
                max_train_steps=12, checkpointing_steps=100, dataloader_num_workers=0, allow_random_identity=True,
                lambda_perceptual=0.0, lambda_sparsity=0.05, guidance_scale=40.0, learning_rate=3e-2,
                validation_steps=0, log_every=100, mask_width=8)
    base.update(kw)
    return tm.IdMaskTrainConfig(**base)


def test_training_lowers_the_objective(tmp_path, record_figure):
    faces = tmp_path / "faces"
    write_faces(faces, 4, size=64)
    cfg = _cfg(tmp_path, faces)
    comps = micro_components(0)
    torch.manual_seed(0)  # the random r18 the trainer builds
    path = tm.train_id_mask(cfg, components=comps)
    trained = load_mask_checkpoint(path)
    assert trained.guidance_scale == 40.0 and trained.mask.cfg.width == 8

    torch.manual_seed(0)
    frozen = tm.IdMaskFrozen(comps["unet"], comps["vae"], IdentityModel(build_iresnet("r18")),
                             torch.zeros(1, 77, 1024))
    from fixtures.flipnet import face_image

    hq = torch.stack([torch.from_numpy(face_image(i, 64)).permute(2, 0, 1).float() / 255 for i in range(4)])
    lq = stub_degrade(hq, 0)

    def objective(mask):
        out = [tm.id_mask_loss(mask, frozen, hq, lq, cfg, torch.Generator().manual_seed(s)) for s in range(3)]
        return (sum(float(loss.detach()) for loss, _ in out) / 3, sum(logs["l_id"] for _, logs in out) / 3,
                sum(logs["l_id_unguided"] for _, logs in out) / 3)

    before, l_id_before, unguided = objective(IdentityMask(IdentityMaskConfig(width=8)))
    after, l_id_after, _ = objective(trained.mask)
    assert after < before, (before, after)
    assert l_id_after < l_id_before
    assert l_id_after < unguided  # the trained mask's guidance still lowers L_arc
    record_figure("id-mask objective (12 steps)", f"{before:.4f} -> {after:.4f}; l_id {l_id_before:.4f} -> "
                  f"{l_id_after:.4f} (unguided {unguided:.4f})")


def test_bad_flags_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"--identity-model=None is required"):
        tm.IdMaskTrainConfig(hq_dir=str(tmp_path), output_dir=str(tmp_path), lambda_perceptual=0.0)
    with pytest.raises(ValueError, match=r"--start='mid' must be one of"):
        _cfg(tmp_path, tmp_path, start="mid")
    with pytest.raises(ValueError, match=r"--sigma-min=3.0 must be > 0 and below --sigma-max"):
        _cfg(tmp_path, tmp_path, sigma_min=3.0)
    with pytest.raises(ValueError, match=r"--vgg-weights=None is required"):
        _cfg(tmp_path, tmp_path, lambda_perceptual=1.0)


def test_cli_lists_the_trainer(capsys):
    with pytest.raises(SystemExit):
        bfr_main(["train", "id-mask", "--help"])
    out = capsys.readouterr().out
    assert "--identity-model" in out and "--lambda-sparsity" in out and "clrface-mask/1" in out

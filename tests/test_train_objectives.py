"""A few optimisation steps on a fixed tiny batch lower each objective: face-AE recon (L_ae) and assoc (L_asso),
FlipNet restore (L_ldm + MSE + VGG) and degrade (L_ldm). Randomness (noise, timesteps, drops) is re-seeded for every
evaluation so before/after compare the same objective. Also: the degrade-mode batch is the flip of the restore one."""

from __future__ import annotations

import pytest
import torch

from comfyui_bfr.lora.face_embedder import AdapterConfig, FaceAdapter, FaceAutoencoderPair, LQFaceEncoder
from comfyui_bfr.lora.losses import VGGPerceptualLoss
from comfyui_bfr.sd.vae import encode as vae_encode
from comfyui_bfr.train.face_ae import (
    DiscriminatorPair,
    FaceAETrainConfig,
    FaceAETrainModule,
    face_ae_discriminator_loss,
    face_ae_generator_loss,
)
from comfyui_bfr.train.flipnet import (
    FlipNetTrainConfig,
    FlipNetTrainModule,
    FrozenParts,
    flipnet_loss,
    joint_clean_latents,
    prepare_flipnet_unet,
)
from fixtures.flipnet import micro_components, stub_degrade

STEPS = 4


def _images(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, size // 8, size // 8, generator=g)
    hq = torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)
    return hq, stub_degrade(hq, seed)


def _descend(objective, opt, steps=STEPS):
    """(before, logs before, after, logs after) of ``objective() -> (loss, logs)`` around ``steps`` optimizer steps;
    the objective re-seeds its own randomness so both ends measure the same function."""
    with torch.no_grad():
        before, logs_before = objective()
    for _ in range(steps):
        loss, _ = objective()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after, logs_after = objective()
    return float(before), logs_before, float(after), logs_after


def _figure(before: float, after: float) -> str:
    return f"{before:.4f} -> {after:.4f} after the optimizer steps"


def _face_cfg(stage, tmp_path, **kw):
    return FaceAETrainConfig(stage=stage, hq_dir=str(tmp_path), output_dir=str(tmp_path), init_from=(
        str(tmp_path / "x.safetensors") if stage == "assoc" else None), block_out_channels=(32, 64),
        layers_per_block=1, norm_num_groups=8, patch_size=2, resolution=64, allow_random_vgg=True, **kw)


@pytest.mark.parametrize("stage", ["recon", "assoc"])
def test_face_ae_objective_decreases(stage, tmp_path, record_figure):
    torch.manual_seed(0)
    cfg = _face_cfg(stage, tmp_path)
    pair = FaceAutoencoderPair(cfg.ae_config())
    module = FaceAETrainModule(pair)
    disc = DiscriminatorPair(16, 2).requires_grad_(False)  # fixed D: the generator objective is well defined
    perceptual = VGGPerceptualLoss(None, {"relu1_2": 1.0, "relu2_2": 1.0}, criterion="l1")
    hq, lq = _images(2, 32)
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)

    def objective():
        return face_ae_generator_loss(module(hq, lq), hq, lq, disc, perceptual, cfg, True, 2)

    before, logs, after, logs_after = _descend(objective, opt)
    record_figure(f"face-ae {stage}", _figure(before, after))
    l1_before, l1_after = logs["l1_x"] + logs["l1_y"], logs_after["l1_x"] + logs_after["l1_y"]
    record_figure(f"face-ae {stage} (L1 part)", _figure(l1_before, l1_after))
    assert after < 0.9 * before
    if stage == "recon":
        assert l1_after < l1_before  # not only the adversarial term against the fixed discriminator
    else:
        ce_before, ce_after = logs["ce_x"] + logs["ce_y"], logs_after["ce_x"] + logs_after["ce_y"]
        record_figure("face-ae assoc (CE part)", _figure(ce_before, ce_after))
        assert ce_after < ce_before


def test_face_ae_discriminator_objective_decreases(record_figure):
    torch.manual_seed(0)
    disc = DiscriminatorPair(16, 2)
    hq, lq = _images(2, 32)
    fake_x, fake_y = hq.flip(-1) * 0.5, lq.flip(-2) * 0.5
    opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    before, _, after, _ = _descend(lambda: (face_ae_discriminator_loss(disc, hq, lq, fake_x, fake_y), {}), opt, 5)
    record_figure("face-ae discriminator", _figure(before, after))
    assert after < before


def _flipnet_setup(mode, tmp_path):
    torch.manual_seed(0)
    comps = micro_components(0)
    unet = comps["unet"]
    prepare_flipnet_unet(unet, rank=4, alpha=None, phi=1.0)
    face_encoder = adapter = None
    kw = {}
    if mode == "restore":
        pair = FaceAutoencoderPair(_face_cfg("recon", tmp_path).ae_config())
        face_encoder = LQFaceEncoder.from_pair(pair).requires_grad_(False)
        adapter = FaceAdapter(AdapterConfig(in_dim=pair.cfg.token_dim, out_dim=1024, hidden_dim=64))
        kw = dict(hq_dir=str(tmp_path), face_ae="unused", allow_random_vgg=True)
    else:
        kw = dict(paired_dirs=[str(tmp_path)])
    cfg = FlipNetTrainConfig(mode=mode, output_dir=str(tmp_path), resolution=64, lora_rank=4, **kw)
    frozen = FrozenParts(vae=comps["vae"].requires_grad_(False), text_encoder=comps["text_encoder"].requires_grad_(False),
                         tokenizer=comps["tokenizer"], alphas_cumprod=comps["scheduler"].alphas_cumprod,
                         face_encoder=face_encoder, face_image_size=32,
                         perceptual=VGGPerceptualLoss(None, {"relu1_2": 1.0, "relu2_2": 1.0}) if mode == "restore"
                         else None)
    return FlipNetTrainModule(unet, adapter).train(), frozen, cfg


@pytest.mark.parametrize("mode", ["restore", "degrade"])
def test_flipnet_objective_decreases(mode, tmp_path, record_figure):
    module, frozen, cfg = _flipnet_setup(mode, tmp_path)
    hq, lq = _images(2, 64, seed=1)
    captions = ["a photo of a face", "old man"]
    params = [p for p in module.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    opt = torch.optim.AdamW(params, lr=2e-3)

    def objective():
        return flipnet_loss(module, frozen, hq, lq, captions, cfg, torch.Generator().manual_seed(123))

    before, logs_before, after, _ = _descend(objective, opt)
    record_figure(f"flipnet {mode}", _figure(before, after))
    assert after < 0.95 * before
    if mode == "restore":
        assert logs_before["l_mse"] > 0 and logs_before["l_p"] > 0
    else:
        assert set(logs_before) == {"l_ldm"}
    # only LoRA / BoostHub / adapter parameters were trained; the base UNet is frozen
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    assert all("lora_" in n or ".processor.hub." in n or n.startswith("adapter.") for n in trained)
    if mode == "degrade":
        assert not any(n.startswith("adapter.") for n in trained)


def test_degrade_batch_is_the_flip_of_the_restore_batch():
    z_hq, z_lq = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    restore = joint_clean_latents("restore", z_hq, z_lq)
    degrade = joint_clean_latents("degrade", z_hq, z_lq)
    assert torch.equal(restore[:3], z_hq) and torch.equal(restore[3:], z_lq)
    assert torch.equal(degrade, torch.cat([restore[3:], restore[:3]]))
    with pytest.raises(ValueError, match="mode must be one of"):
        joint_clean_latents("restoration", z_hq, z_lq)


def test_degrade_loss_sees_the_flipped_streams(tmp_path):
    """The UNet input of degrade mode is restore mode's with the halves swapped (same noise draws per row)."""
    seen = {}

    class Recorder(torch.nn.Module):
        def __init__(self, mode):
            super().__init__()
            self.mode = mode
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, z_t, t, text, face=None):
            seen[self.mode] = (z_t.detach(), t.detach())
            return z_t * self.w

    module, frozen, cfg_r = _flipnet_setup("degrade", tmp_path)
    cfg_d = cfg_r
    hq, lq = _images(2, 64, seed=2)
    frozen.face_encoder = None
    flipnet_loss(Recorder("degrade"), frozen, hq, lq, ["", ""], cfg_d, torch.Generator().manual_seed(0))
    cfg_r = FlipNetTrainConfig(mode="restore", output_dir=str(tmp_path), hq_dir=str(tmp_path), resolution=64,
                               use_face_embedding=False, lambda_mse=0.0, lambda_perceptual=0.0)
    flipnet_loss(Recorder("restore"), frozen, hq, lq, ["", ""], cfg_r, torch.Generator().manual_seed(0))
    (zd, td), (zr, tr) = seen["degrade"], seen["restore"]
    assert torch.equal(td, tr)
    # same noise and timestep per row, clean latents flipped: z_t(degrade) - z_t(restore) is a function of the flip
    z_hq, z_lq = vae_encode(frozen.vae, hq), vae_encode(frozen.vae, lq)
    a = frozen.alphas_cumprod[tr].view(-1, 1, 1, 1).sqrt()
    torch.testing.assert_close(zd - zr, a * (torch.cat([z_lq, z_hq]) - torch.cat([z_hq, z_lq])), atol=1e-5, rtol=1e-4)


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


# ------------------------------------------------------------------------------------------------ real photos
def _photo_crops(names, per, seed, size=64) -> torch.Tensor:
    """``per`` random ``size`` crops of each skimage photo (resized to a 256 px short side): distinct contents."""
    import numpy as np
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(seed)
    out = []
    for name in names:
        a = np.asarray(getattr(data, name)())
        a = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]
        im = Image.fromarray(a.astype(np.uint8))
        scale = 256 / min(im.size)
        a = np.asarray(im.resize((round(im.size[0] * scale), round(im.size[1] * scale)), Image.BICUBIC))
        for _ in range(per):
            y, x = rng.integers(0, a.shape[0] - size + 1), rng.integers(0, a.shape[1] - size + 1)
            out.append(torch.from_numpy(a[y:y + size, x:x + size].copy()).permute(2, 0, 1).float() / 255)
    return torch.stack(out)


TRAIN_PHOTOS = ("coffee", "chelsea", "rocket", "immunohistochemistry", "retina", "camera", "brick", "grass", "gravel",
                "text")
HELD_OUT_PHOTOS = ("astronaut", "coins", "moon", "clock", "cell", "hubble_deep_field")  # never in training


@pytest.mark.parametrize("term", ["recon", "contras", "distribution"])
def test_each_objective_falls_on_a_fixed_batch(term):
    """A few Adam steps on one term of L_DR (Eq. 7) lower that term on a fixed batch of real photos with their own
    dr-bfr degradations (the Gaussian sample t of Eq. 6 fixed by the generator)."""
    from comfyui_bfr.lora.dr_module import DRConfig, DRModule
    from comfyui_bfr.train.data import degrade_on_the_fly

    hq = _photo_crops(TRAIN_PHOTOS[:8], 1, 0)
    lq = degrade_on_the_fly(hq, seed=3)
    p1, p2, _, r2 = patch_pairs(hq, lq, 32, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    module = DRModule(DRConfig(encoder_blocks=((16, 16), (32, 32)), token_dim=32, proj_hidden=32, proj_dim=32,
                               gen_channels=(16, 32), mod_hidden=32))
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)

    def value():
        return module.loss(p1, p2, r2, generator=torch.Generator().manual_seed(1))[term]

    with torch.no_grad():
        before = float(value())
    for _ in range(15):
        opt.zero_grad()
        value().backward()
        opt.step()
    with torch.no_grad():
        after = float(value())
    assert after < 0.9 * before, (term, before, after)


@pytest.fixture(scope="module")
def trained_on_photos(tmp_path_factory):
    """300 CPU steps of `bfr train dr-encoder` on 40 crops of 10 real photos (64 px, 32 px patches, a small E_DR,
    4 same-content copies per image, the trainer's defaults otherwise: `--input-norm standardize`, lambda2 0.01),
    ~50-60 s on one core."""
    from PIL import Image

    from comfyui_bfr.lora.dr_module import DRModule

    root = tmp_path_factory.mktemp("dr_photos")
    faces = root / "train"
    faces.mkdir()
    for i, img in enumerate(_photo_crops(TRAIN_PHOTOS, 4, 0)):
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(faces / f"{i:03d}.png")
    cfg = DREncoderTrainConfig(hq_dir=str(faces), output_dir=str(root / "run"), resolution=64, patch_size=32,
                               train_batch_size=8, content_repeats=4, max_train_steps=300, checkpointing_steps=300,
                               validation_steps=0, dataloader_num_workers=0, token_dim=64,
                               encoder_channels=(16, 32, 64), gen_channels=(16, 32), learning_rate=1e-3, log_every=100)
    module, _ = read_dr_checkpoint(train_dr_encoder(cfg))
    torch.manual_seed(123)
    return module, DRModule(module.cfg).eval(), _photo_crops(HELD_OUT_PHOTOS, 2, 1)


def test_probe_on_held_out_content_beats_a_random_encoder(trained_on_photos, record_figure):
    """Stated margin: +0.05 accuracy on the degradation type (5 classes incl. clean, chance 0.23), leave-one-content-
    out, over BOTH controls: a randomly initialised E_DR of the same config and raw-pixel statistics. Measured (1 or 2
    threads alike): trained 0.526 vs random 0.436 vs pixels 0.417 (other training seeds: 0.49-0.50); before
    `--input-norm standardize` and lambda2 0.01 it was 0.256 / 0.372 / 0.417."""
    from comfyui_bfr.pipelines import dr_analysis as A

    module, random_module, held = trained_on_photos
    cells = A.degradation_grid()
    lq = A.apply_grid(held, cells)
    per = [c for _ in range(len(held)) for c in cells]
    groups = [n for n in range(len(held)) for _ in cells]
    feats = {"trained": A.dr_features(module.encoder, lq, 32), "random": A.dr_features(random_module.encoder, lq, 32),
             "pixel": A.pixel_statistics(lq)}
    acc = {k: A.knn_probe(v, [c.label("type") for c in per], groups) for k, v in feats.items()}
    record_figure("DR probe (type) on held-out photos after 300 CPU steps",
                  " | ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    assert acc["trained"] > acc["random"] + 0.05, acc
    assert acc["trained"] > acc["pixel"] + 0.05, acc


def test_two_patches_of_one_image_are_closer_than_one_content_under_two_degradations(trained_on_photos,
                                                                                       record_figure):
    """Measured: 0.69 vs 2.38 (other training seeds 0.4-1.0 vs 1.6-2.9); before: 2.68 vs 2.70. Asserted with a
    0.75 factor."""
    from comfyui_bfr.train.data import degrade_on_the_fly

    module, _, held = trained_on_photos
    lq_a, lq_b = degrade_on_the_fly(held, seed=11), degrade_on_the_fly(held, seed=12)
    with torch.no_grad():
        f = lambda x: module.encoder(x).flatten(1)  # noqa: E731
        same_image = (f(lq_a[..., :32, :32]) - f(lq_a[..., 32:, 32:])).norm(dim=1)  # same LQ, other content
        same_content = (f(lq_a[..., :32, :32]) - f(lq_b[..., :32, :32])).norm(dim=1)  # same pixels, other LQ
    record_figure("f_DR distance: two patches of one LQ vs one patch under two degradations",
                  f"{float(same_image.mean()):.3f} vs {float(same_content.mean()):.3f}")
    assert float(same_image.mean()) < 0.75 * float(same_content.mean())

"""DR2 on diffusers (pipelines/dr2.py, sd/loader.py, cli/folders.py) with the tiny SD2.1-topology fixture, CPU,
offline."""

from __future__ import annotations

import logging
import math
import shutil

import numpy as np
import pytest
import torch

from comfyui_bfr.cli.folders import restore_dr2
from comfyui_bfr.pipelines import dr2, ilvr
from comfyui_bfr.sd import diffusion
from comfyui_bfr.sd import loader as sd_models
from comfyui_bfr.sd import vae as codec
from fixtures import tiny_sd

FAST = dict(steps=20)  # T=20: omega auto = tau + 5, so a run costs 6 UNet calls


@pytest.fixture(scope="module")
def tiny():
    return sd_models.SDModel(tiny_sd.build_tiny_unet(0), tiny_sd.build_tiny_vae(0), source="tiny fixture")


@pytest.fixture(scope="module")
def face():
    """skimage's astronaut face, 64 px, (1, 3, 64, 64) in [0, 1]."""
    from comfyui_bfr.pipelines.sample_data import sample_face

    return torch.from_numpy(sample_face(64).copy()).permute(2, 0, 1)[None].float() / 255.0


def psnr(a, b):
    return 10 * math.log10(1.0 / float((a - b).pow(2).mean()))


def test_same_seed_same_output_other_seed_differs(tiny, face):
    cfg = dr2.DR2Config(n=2, tau=3, seed=5, **FAST)
    a = dr2.restore(tiny, face, cfg)
    b = dr2.restore(tiny, face, cfg)
    c = dr2.restore(tiny, face, dr2.DR2Config(n=2, tau=3, seed=6, **FAST))
    assert torch.equal(a.latents, b.latents) and torch.equal(a.images, b.images)
    assert not torch.allclose(a.latents, c.latents)
    assert a.images.shape == face.shape and a.latents.shape == (1, 4, 8, 8)


def test_n1_small_tau_reproduces_the_input_up_to_the_vae_round_trip(tiny, face):
    """N=1 replaces x_t by y_t, so the output is Eq. 11 on y_tau: y + sigma_tau (eps - eps_theta(y_tau)).

    That is the input up to the model's noise-prediction error at sigma_tau (0.03 at tau=0) and the VAE round
    trip; the random tiny UNet predicts noise badly, so the image check is relative to a far setting.
    """
    cfg = dr2.DR2Config(n=1, tau=0, omega=2, steps=100, seed=3)
    out = dr2.restore(tiny, face, cfg)
    with torch.no_grad():
        y = codec.encode(tiny.vae, face)
        noise = ilvr.DR2Noise(cfg.seed, y.shape)
        for _ in range(2):  # two transitions omega=2 -> 1 -> 0; the last eps diffuses y to tau
            _z, eps = noise.step(y)
        sigma0 = float(diffusion.sigmas_from_alphas_cumprod(diffusion.sd_alphas_cumprod())[0])
        y_tau = ilvr.diffuse(y, eps, sigma0, "ddpm")
        torch.testing.assert_close(out.x_tau, y_tau)
        eps_theta = tiny.unet(y_tau, torch.tensor([0]), encoder_hidden_states=torch.zeros(1, 77, 1024)).sample
        torch.testing.assert_close(out.latents, ilvr.predict_x0(y_tau, eps_theta, sigma0, "ddpm"))
        round_trip = codec.decode(tiny.vae, y)
    far = dr2.restore(tiny, face, dr2.DR2Config(n=4, tau=12, **FAST)).images
    assert psnr(out.images, round_trip) > 20
    assert psnr(out.images, round_trip) > psnr(far, round_trip) + 10


def test_larger_n_and_tau_move_the_output_further_from_the_input(tiny, face):
    with torch.no_grad():
        y = codec.encode(tiny.vae, face)

    def dist(n, tau):
        return float((dr2.restore(tiny, face, dr2.DR2Config(n=n, tau=tau, seed=1, **FAST)).latents - y)
                     .pow(2).mean())

    assert dist(2, 1) < dist(2, 4) < dist(2, 10)
    assert dist(1, 4) < dist(2, 4) < dist(8, 4)


def test_pixel_space_n1_equals_latent_space_n1(tiny, face):
    """With N=1 the pixel-space split re-encodes the input itself: x_{t-1} := y_{t-1} exactly as in latent space."""
    lat = dr2.restore(tiny, face, dr2.DR2Config(n=1, tau=2, space="latent", **FAST))
    pix = dr2.restore(tiny, face, dr2.DR2Config(n=1, tau=2, space="pixel", **FAST))
    torch.testing.assert_close(pix.latents, lat.latents, atol=1e-5, rtol=1e-5)


def test_pixel_space_runs_and_keeps_odd_sizes(tiny, face):
    img = torch.nn.functional.interpolate(face, size=(60, 68), mode="bilinear")
    out = dr2.restore(tiny, img, dr2.DR2Config(n=8, tau=2, space="pixel", **FAST))
    lat = dr2.restore(tiny, img, dr2.DR2Config(n=1, tau=2, space="latent", **FAST))
    assert out.images.shape == img.shape and out.latents.shape == (1, 4, 8, 9)
    assert torch.isfinite(out.images).all() and not torch.allclose(out.latents, lat.latents)


def test_progress_callback_and_cancel(tiny, face):
    seen = []
    dr2.restore(tiny, face, dr2.DR2Config(n=2, tau=3, **FAST), progress=lambda d, t: seen.append((d, t)))
    assert seen == [(i, 6) for i in range(1, 7)]

    class Cancelled(Exception):
        pass

    def cancel(done, total):
        raise Cancelled

    with pytest.raises(Cancelled):
        dr2.restore(tiny, face, dr2.DR2Config(n=2, tau=3, **FAST), progress=cancel)


@pytest.mark.parametrize("cfg,match", [
    (dict(n=2, tau=30, omega=30), "greater than tau"),
    (dict(n=2, tau=22, omega=100), "exceeds the last level"),
    (dict(n=0.5, tau=22), "N must be"),
    (dict(n=2, tau=22, steps=0), "steps must be"),
    (dict(n=2, tau=22, space="fourier"), "space must be"),
])
def test_bad_parameters_are_clear_errors(tiny, face, cfg, match):
    with pytest.raises(ilvr.DR2ParameterError, match=match):
        dr2.restore(tiny, face, dr2.DR2Config(**cfg))


def test_bad_images_are_clear_errors(tiny, face):
    with pytest.raises(ValueError, match="RGB"):
        dr2.restore(tiny, face[:, :1], dr2.DR2Config(**FAST))
    bad = face.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        dr2.restore(tiny, bad, dr2.DR2Config(**FAST))


# ------------------------------------------------------------------------------------- loading and resolution


def _unet_out(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 1024, generator=g)
    with torch.no_grad():
        return model.unet(x, torch.tensor([500]), encoder_hidden_states=ctx).sample


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny_sd21_base.safetensors"
    return tiny_sd.write_comfy_checkpoint(path, seed=0, with_text_encoder=False)


def test_single_file_loads_offline_with_the_same_weights(tiny, face, single_file, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = sd_models.load_sd(single_file)
    torch.testing.assert_close(_unet_out(loaded), _unet_out(tiny), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(codec.encode(loaded.vae, face), codec.encode(tiny.vae, face))
    assert loaded.prediction_type == "epsilon" and loaded.is_real


def test_diffusers_folder_loads_offline(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny.unet.save_pretrained(tmp_path / "unet")
    tiny.vae.save_pretrained(tmp_path / "vae")
    tiny_sd.build_tiny_scheduler().save_pretrained(tmp_path / "scheduler")
    loaded = sd_models.load_sd(tmp_path)
    torch.testing.assert_close(_unet_out(loaded), _unet_out(tiny))
    torch.testing.assert_close(loaded.alphas_cumprod, diffusion.sd_alphas_cumprod())
    assert type(loaded.vae).__name__ == "AutoencoderTiny" and loaded.vae_scale_factor == 8
    with pytest.raises(sd_models.ModelNotFoundError, match="unet/config.json"):
        sd_models.load_sd(tmp_path / "unet")


def test_resolution_order(tmp_path, monkeypatch):
    for var in (sd_models.ENV_CHECKPOINT, sd_models.ENV_COMFY_MODELS, sd_models.ENV_COMFY_PATH,
                sd_models.ENV_REPO):
        monkeypatch.delenv(var, raising=False)
    calls = []
    monkeypatch.setattr(sd_models, "download_snapshot",
                        lambda repo, cache=None, parts=(): calls.append((repo, parts)) or tmp_path)
    assert sd_models.resolve_base_model() is None and not calls  # nothing found, no implicit download

    comfy = tmp_path / "comfy" / "checkpoints"
    comfy.mkdir(parents=True)
    (comfy / "sd_xl_base_1.0.safetensors").write_bytes(b"")
    (comfy / "v2-1_512-ema-pruned.safetensors").write_bytes(b"")
    monkeypatch.setenv(sd_models.ENV_COMFY_MODELS, str(tmp_path / "comfy"))
    assert sd_models.resolve_base_model() == comfy / "v2-1_512-ema-pruned.safetensors"

    env_file = tmp_path / "mine.safetensors"
    env_file.write_bytes(b"")
    monkeypatch.setenv(sd_models.ENV_CHECKPOINT, str(env_file))
    assert sd_models.resolve_base_model() == env_file
    explicit = tmp_path / "explicit.safetensors"
    explicit.write_bytes(b"")
    assert sd_models.resolve_base_model(explicit) == explicit

    with pytest.raises(sd_models.ModelNotFoundError, match="does not exist"):
        sd_models.resolve_base_model(tmp_path / "missing.safetensors")
    monkeypatch.setenv(sd_models.ENV_CHECKPOINT, str(tmp_path / "gone"))
    with pytest.raises(sd_models.ModelNotFoundError, match=sd_models.ENV_CHECKPOINT):
        sd_models.resolve_base_model()

    monkeypatch.delenv(sd_models.ENV_CHECKPOINT)
    monkeypatch.delenv(sd_models.ENV_COMFY_MODELS)
    assert sd_models.resolve_base_model(download=True, repo_id="someone/sd21-mirror") == tmp_path
    assert calls == [("someone/sd21-mirror", sd_models.MODEL_PARTS)]


def _clear_model_env(monkeypatch):
    for var in (sd_models.ENV_CHECKPOINT, sd_models.ENV_COMFY_MODELS, sd_models.ENV_COMFY_PATH, sd_models.ENV_REPO):
        monkeypatch.delenv(var, raising=False)


def test_load_components_follows_the_same_order_as_load_model(tmp_path, single_file, monkeypatch):
    """env var -> ComfyUI checkpoints folder, explicit path first, download only when asked, for both loaders."""
    from fixtures.flipnet import write_micro_folder

    _clear_model_env(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(sd_models.ModelNotFoundError, match="--base-model"):
        sd_models.load_components()  # nothing anywhere: no tiny fallback, no implicit download
    calls, empty_download = [], tmp_path / "download"
    empty_download.mkdir()
    monkeypatch.setattr(sd_models, "download_snapshot",
                        lambda repo, cache=None, parts=(): calls.append(parts) or empty_download)
    with pytest.raises(sd_models.ModelNotFoundError):
        sd_models.load_components(download=True)
    assert calls == [sd_models.COMPONENT_PARTS]  # the download would fetch the text encoder and tokenizer too

    env_folder = write_micro_folder(tmp_path / "env_sd21")
    monkeypatch.setenv(sd_models.ENV_CHECKPOINT, str(env_folder))
    comps = sd_models.load_components()
    assert set(comps) == {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    assert tuple(comps["unet"].config.block_out_channels) == (32, 64)  # the micro UNet of that folder
    assert sd_models.load_model().source == str(env_folder)

    # the ComfyUI folder comes after the env var, and then serves both loaders
    comfy = tmp_path / "comfy" / "checkpoints"
    comfy.mkdir(parents=True)
    in_comfy = comfy / "v2-1_512-ema-pruned.safetensors"
    in_comfy.write_bytes(single_file.read_bytes())
    monkeypatch.setenv(sd_models.ENV_COMFY_MODELS, str(tmp_path / "comfy"))
    assert sd_models.load_model().source == str(env_folder)
    monkeypatch.delenv(sd_models.ENV_CHECKPOINT)
    assert sd_models.load_model().source == str(in_comfy)
    with pytest.raises(sd_models.ModelNotFoundError, match="--tokenizer"):
        sd_models.load_components()  # a single file has no BPE vocabulary
    # this single file has no text encoder (the full-size SD2 one is 0.7 GB): the error names the file found there
    with pytest.raises(ValueError, match="v2-1_512-ema-pruned.safetensors.*lacks a VAE or text encoder"):
        sd_models.load_components(tokenizer=env_folder / "tokenizer")
    # an explicit path beats the ComfyUI folder
    comps = sd_models.load_components(env_folder)
    assert tuple(comps["unet"].config.block_out_channels) == (32, 64)

    dr2_only = tmp_path / "unet_vae_only"  # enough for DR2, not for FlipNet or training
    for part in ("unet", "vae", "scheduler"):
        shutil.copytree(env_folder / part, dr2_only / part)
    assert sd_models.load_model(dr2_only).source == str(dr2_only)
    with pytest.raises(sd_models.ModelNotFoundError, match="lacks text_encoder/config.json, tokenizer/tokenizer_config.json:"):
        sd_models.load_components(dr2_only)


def test_no_model_falls_back_to_a_loud_tiny_random_model(monkeypatch, caplog):
    for var in (sd_models.ENV_CHECKPOINT, sd_models.ENV_COMFY_MODELS, sd_models.ENV_COMFY_PATH):
        monkeypatch.delenv(var, raising=False)
    with caplog.at_level(logging.WARNING):
        model = sd_models.load_model()
    assert not model.is_real and "NOT a real restoration" in caplog.text
    with pytest.raises(sd_models.ModelNotFoundError):
        sd_models.load_model(allow_tiny=False)


# ------------------------------------------------------------------------------------------------ CLI helpers


def test_restore_dr2_file_and_folder(tiny, face, tmp_path):
    from PIL import Image

    src = tmp_path / "in"
    src.mkdir()
    arr = (face[0].permute(1, 2, 0).numpy() * 255).astype("uint8")
    Image.fromarray(arr[:60, :52]).save(src / "a.png")
    Image.fromarray(arr).save(src / "b.jpg")
    cfg = dr2.DR2Config(n=2, tau=3, **FAST)
    one = restore_dr2(src / "a.png", tmp_path / "a_out.png", cfg, model=tiny)
    assert Image.open(one).size == (52, 60)
    folder = restore_dr2(src, tmp_path / "out", cfg, model=tiny)
    assert sorted(p.name for p in folder.iterdir()) == ["a_dr2.png", "b_dr2.png"]
    with pytest.raises(FileNotFoundError, match="missing.png"):
        restore_dr2(tmp_path / "out" / "missing.png", tmp_path / "x.png", cfg, model=tiny)


def test_restore_dr2_loads_the_base_model_it_is_given(tiny, face, single_file, tmp_path, monkeypatch):
    """``base_model=`` (CLI --base-model) is the SD 2.1 file: same result as restoring with that model in memory."""
    from PIL import Image

    _clear_model_env(monkeypatch)
    src = tmp_path / "a.png"
    Image.fromarray((face[0].permute(1, 2, 0).numpy() * 255).astype("uint8")).save(src)
    cfg = dr2.DR2Config(n=2, tau=3, **FAST)
    from_file = restore_dr2(src, tmp_path / "file.png", cfg, base_model=single_file, device="cpu")
    in_memory = restore_dr2(src, tmp_path / "mem.png", cfg, model=tiny)
    a = np.asarray(Image.open(from_file), dtype=np.int16)
    b = np.asarray(Image.open(in_memory), dtype=np.int16)
    assert np.abs(a - b).max() <= 1


def test_demo_rows(tiny, face):
    rows = dr2.demo_rows(tiny, face[0], {"blurred": face * 0.5}, dr2.DR2Config(n=2, tau=3, **FAST))
    assert len(rows) == 1 and [label for label, _ in rows[0]][:2] == ["input (HQ)", "blurred"]
    assert rows[0][2][0].startswith("DR2 N=2 tau=3") and rows[0][2][1].shape == (3, 64, 64)

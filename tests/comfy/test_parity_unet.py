"""ComfyUI's own loader and models vs our diffusers fixtures and conversions, in-process, same weights.

- the tiny single-file checkpoint loads through ``comfy.sd.load_checkpoint_guess_config`` as SD20 / EPS with MODEL,
  CLIP and VAE and no missing keys;
- UNet: ComfyUI's ``diffusion_model`` forward and ``BaseModel.apply_model`` equal the diffusers tiny UNet;
- VAE: ComfyUI's TAESD encode/decode equal diffusers' ``AutoencoderTiny`` (the DR2 parity tests rely on this);
  a full-size random SD AutoencoderKL converted by ``lora.convert`` equals ComfyUI's ldm VAE;
- text encoder: ComfyUI's SD2 CLIP (layer -2) equals a ``CLIPTextModel`` built by ``lora.convert`` (23 layers);
- our key maps equal ComfyUI's own maps (``unet_to_diffusers``, ``convert_vae_state_dict``) on the full SD2.1
  topology.
"""

from __future__ import annotations

import logging

import pytest
import torch

from fixtures import tiny_sd
from fixtures.tiny_sd import build_tiny_unet, build_tiny_vae, convert

pytestmark = pytest.mark.comfy

ATOL = 1e-5
RTOL = 1e-4


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    import comfy.sd

    rec = _Records()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(rec)
    root.setLevel(logging.DEBUG)
    try:
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint), output_vae=True,
                                                                     output_clip=True, embedding_directory=None)
    finally:
        root.removeHandler(rec)
        root.setLevel(old_level)
    return {"model": model, "clip": clip, "vae": vae, "log": rec.messages}


@pytest.fixture(scope="module")
def unet():
    return build_tiny_unet(0)


@pytest.fixture(scope="module")
def taesd():
    return build_tiny_vae(0)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_detected_as_sd20_eps_with_model_clip_vae(loaded):
    import comfy.model_base
    import comfy.supported_models
    import comfy.taesd.taesd

    model = loaded["model"]
    assert type(model.model.model_config) is comfy.supported_models.SD20
    assert model.model.model_type == comfy.model_base.ModelType.EPS
    cfg = model.model.model_config.unet_config
    assert cfg["model_channels"] == 320 and cfg["context_dim"] == 1024 and cfg["use_linear_in_transformer"]
    assert loaded["clip"] is not None
    assert isinstance(loaded["vae"].first_stage_model, comfy.taesd.taesd.TAESD)
    assert float(loaded["vae"].first_stage_model.vae_scale.detach()) == 1.0
    assert float(loaded["vae"].first_stage_model.vae_shift.detach()) == 0.0


def test_no_missing_or_left_over_keys(loaded):
    bad = [m for m in loaded["log"] if m.startswith(("clip missing", "Missing VAE keys", "left over keys",
                                                      "unet missing", "unet unexpected"))]
    # "left over keys" is logged as dict_keys([]) when empty
    bad = [m for m in bad if not m.endswith("dict_keys([])")]
    assert not bad, bad


def test_unet_weights_identical(loaded, unet):
    comfy_sd = loaded["model"].model.diffusion_model.state_dict()
    ours = convert.unet_diffusers_to_ldm_state_dict(unet.state_dict(), tiny_sd.TINY_UNET_CONFIG, prefix="")
    assert set(comfy_sd) == set(ours)
    for k, v in ours.items():
        assert torch.equal(comfy_sd[k].float(), v), k


@torch.no_grad()
def test_unet_forward_parity(loaded, unet):
    dm = loaded["model"].model.diffusion_model
    x = torch.randn(2, 4, 16, 16, generator=_gen(1))
    ctx = torch.randn(2, 77, 1024, generator=_gen(2)) * 0.5
    t = torch.tensor([10.0, 613.0])
    ours = unet(x, t, encoder_hidden_states=ctx).sample
    theirs = dm(x, timesteps=t, context=ctx)
    assert ours.abs().mean() > 1e-2  # a real, non-degenerate output
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_apply_model_parity(loaded, unet):
    """BaseModel.apply_model (k-diffusion sigma form) == x - sigma * eps_diffusers(x / sqrt(1 + sigma^2), t)."""
    bm = loaded["model"].model
    ms = bm.model_sampling
    idx = torch.tensor([37, 801])
    sigma = ms.sigmas[idx].float()
    x = torch.randn(2, 4, 16, 16, generator=_gen(3)) * sigma.view(-1, 1, 1, 1)
    ctx = torch.randn(2, 77, 1024, generator=_gen(4)) * 0.5
    denoised = bm.apply_model(x, sigma, c_crossattn=ctx)
    s = sigma.view(-1, 1, 1, 1)
    eps = unet(x / torch.sqrt(s ** 2 + 1), idx, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(denoised, x - s * eps, atol=ATOL * 20, rtol=RTOL)
    # and ComfyUI's schedule is SD2.1's DDPM schedule
    sched = tiny_sd.build_tiny_scheduler()
    ab = sched.alphas_cumprod[idx].double()
    torch.testing.assert_close(sigma.double(), ((1 - ab) / ab).sqrt(), atol=1e-4, rtol=1e-4)


def _astronaut(size: int = 64) -> torch.Tensor:
    from skimage import data, transform

    img = transform.resize(data.astronaut(), (size, size), anti_aliasing=True)
    return torch.from_numpy(img).float()[None]  # B,H,W,C in [0,1]


@torch.no_grad()
def test_taesd_encode_decode_parity(loaded, taesd):
    vae = loaded["vae"]
    img = _astronaut(64)
    lat_comfy = vae.encode(img)
    lat_ours = taesd.encode(img.permute(0, 3, 1, 2) * 2 - 1).latents
    torch.testing.assert_close(lat_comfy.float(), lat_ours, atol=ATOL, rtol=RTOL)
    assert lat_ours.std() > 0.1
    dec_comfy = vae.decode(lat_comfy)  # B,H,W,C clamped to [0,1]
    dec_ours = ((taesd.decode(lat_ours).sample + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    torch.testing.assert_close(dec_comfy.float(), dec_ours, atol=ATOL, rtol=RTOL)
    assert 0.02 < dec_ours.std() and 0.05 < dec_ours.mean() < 0.95
    # model-space latents agree too: ComfyUI multiplies its LATENT by 0.18215, diffusers by scaling_factor
    bm = loaded["model"].model
    torch.testing.assert_close(bm.process_latent_in(lat_comfy.float()), lat_ours * taesd.config.scaling_factor)


@torch.no_grad()
def test_clip_encodes_and_matches_converted_text_encoder(loaded):
    clip = loaded["clip"]
    tokens = clip.tokenize("a photo of a face, high quality")
    cond = clip.encode_from_tokens_scheduled(tokens)[0][0]
    assert cond.shape == (1, 77, 1024) and torch.isfinite(cond).all()
    ids = torch.tensor([[t for t, _w in tokens["h"][0]]])

    from safetensors.torch import load_file

    te_sd = {convert.LDM_TEXT_PREFIX + "transformer." + k: v.float()
             for k, v in load_file(str(tiny_sd.sd2_text_encoder_cache())).items()}
    hf = convert.load_hf_text_encoder(convert.openclip_to_hf_text_state_dict(te_sd))
    assert hf.config.num_hidden_layers == 23
    ours = hf(ids).last_hidden_state
    torch.testing.assert_close(cond.float(), ours, atol=2e-4, rtol=1e-3)


def test_unet_key_map_matches_comfy_on_full_sd21():
    import comfy.model_detection
    import comfy.utils
    from diffusers import UNet2DConditionModel

    cfg = dict(convert.SD21_BASE_UNET_CONFIG)
    with torch.device("meta"):
        dsd = UNet2DConditionModel.from_config(cfg).state_dict()
    ldm = convert.unet_diffusers_to_ldm_state_dict(dsd, cfg, prefix="")
    comfy_cfg = comfy.model_detection.detect_unet_config(ldm, "")
    assert comfy_cfg["model_channels"] == 320 and comfy_cfg["context_dim"] == 1024
    comfy_map = comfy.utils.unet_to_diffusers(comfy_cfg)  # {diffusers_key: ldm_key}
    ours = convert.unet_key_map(cfg, dsd.keys())
    assert set(ours) == set(dsd)
    for d_key, l_key in ours.items():
        assert comfy_map[d_key] == l_key, d_key
    # the inferred config round-trips
    inferred = convert.infer_unet_config_from_ldm(ldm, prefix="")
    for k, v in cfg.items():
        assert inferred[k] == v, k


@torch.no_grad()
def test_full_kl_vae_conversion_parity():
    """Random full-size SD AutoencoderKL: diffusers vs ComfyUI's ldm VAE from our converted keys."""
    import comfy.diffusers_convert
    import comfy.sd
    from diffusers import AutoencoderKL

    vae_d = AutoencoderKL.from_config(dict(convert.SD21_BASE_VAE_CONFIG))
    tiny_sd.randomize_(vae_d, 11)
    dsd = vae_d.state_dict()
    ldm = convert.vae_diffusers_to_ldm_state_dict(dsd, convert.SD21_BASE_VAE_CONFIG, prefix="")
    reference = comfy.diffusers_convert.convert_vae_state_dict(dict(dsd))
    assert set(reference) == set(ldm)
    for k in ldm:
        assert torch.equal(reference[k], ldm[k]), k
    back = convert.vae_ldm_to_diffusers_state_dict(ldm, prefix="")
    assert set(back) == set(dsd) and all(torch.equal(back[k], dsd[k]) for k in dsd)

    vae_c = comfy.sd.VAE(sd=ldm)
    img = _astronaut(64)
    lat_c = vae_c.encode(img).float()
    lat_d = vae_d.encode(img.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mode()
    torch.testing.assert_close(lat_c, lat_d, atol=1e-4, rtol=1e-4)
    dec_c = vae_c.decode(lat_d).float()
    dec_d = ((vae_d.decode(lat_d).sample + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    torch.testing.assert_close(dec_c, dec_d, atol=1e-4, rtol=1e-4)


def test_single_file_loads_back_into_diffusers(tiny_checkpoint, unet, taesd):
    comps = convert.load_single_file_components(tiny_checkpoint, text_encoder=False)
    sd = comps["unet"].state_dict()
    ref = unet.state_dict()
    assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    vsd = comps["vae"].state_dict()
    vref = taesd.state_dict()
    assert set(vsd) == set(vref) and all(torch.equal(vsd[k], vref[k]) for k in vref)
    assert comps["vae"].config.scaling_factor == pytest.approx(taesd.config.scaling_factor)

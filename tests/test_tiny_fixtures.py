"""Tiny SD2.1 fixtures (tests/fixtures/tiny_sd.py) and the offline ldm <-> diffusers conversions (lora/convert.py).

CPU, no downloads, no ComfyUI (the ComfyUI side of the same weights is checked in tests/comfy/test_parity_unet.py).
"""

from __future__ import annotations

import copy

import pytest
import torch

from fixtures import tiny_sd
from fixtures.tiny_sd import TINY_UNET_CONFIG, build_tiny_text_encoder, build_tiny_unet, build_tiny_vae, convert


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def unet0():
    return build_tiny_unet(0)


# ---------------------------------------------------------------------------------------------- determinism
def test_unet_deterministic_by_seed(unet0):
    again = build_tiny_unet(0).state_dict()
    other = build_tiny_unet(1).state_dict()
    ref = unet0.state_dict()
    assert _same(ref, again)
    assert all(not torch.equal(ref[k], other[k]) for k in ref)


def test_vae_and_text_encoder_deterministic_by_seed():
    assert _same(build_tiny_vae(0).state_dict(), build_tiny_vae(0).state_dict())
    assert not _same(build_tiny_vae(0).state_dict(), build_tiny_vae(1).state_dict())
    te0, _ = build_tiny_text_encoder(0)
    te0b, _ = build_tiny_text_encoder(0)
    te1, _ = build_tiny_text_encoder(1)
    assert _same(te0.state_dict(), te0b.state_dict())
    assert not _same(te0.state_dict(), te1.state_dict())


def test_weights_are_not_trivial(unet0):
    for name, p in unet0.named_parameters():
        assert p.std() > 0 if p.numel() > 1 else p.abs() > 0, name
        assert not torch.all(p == 1) and not torch.all(p == 0), name


def test_unet_is_sd2_topology(unet0):
    cfg = unet0.config
    assert cfg.block_out_channels[0] == 320 and cfg.cross_attention_dim == 1024 and cfg.use_linear_projection
    assert cfg.class_embed_type is None and cfg.addition_embed_type is None
    # heads 64 wide on every transformer (ComfyUI's SD20 uses num_head_channels = 64)
    for name, mod in unet0.named_modules():
        if name.endswith("attn1"):
            assert mod.inner_dim // mod.heads == 64, name
    assert sum(p.numel() for p in unet0.parameters()) < 100e6


@torch.no_grad()
def test_unet_output_depends_on_inputs(unet0):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 77, 1024, generator=g)
    a = unet0(x, 10, encoder_hidden_states=ctx).sample
    assert torch.isfinite(a).all() and a.std() > 1e-2
    assert not torch.allclose(a, unet0(x, 900, encoder_hidden_states=ctx).sample)
    assert not torch.allclose(a, unet0(x, 10, encoder_hidden_states=ctx * 0).sample)


@torch.no_grad()
def test_vae_scaling_and_ranges():
    vae = build_tiny_vae(0)
    assert vae.config.scaling_factor == pytest.approx(0.18215)
    img = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = vae.encode(img).latents
    assert z.shape == (1, 4, 8, 8) and 0.05 < z.std() < 3
    y = vae.decode(z).sample
    assert y.shape == img.shape and y.std() > 0.02
    assert ((y > -1) & (y < 1)).float().mean() > 0.9  # mostly inside the image range, not clamped flat


def test_tokenizer_offline():
    _, tok = build_tiny_text_encoder(0)
    assert tok.model_max_length == 77
    ids = tok("a photo of a face").input_ids
    vocab = tok.get_vocab()
    assert ids[0] == vocab["<|startoftext|>"] and ids[-1] == vocab["<|endoftext|>"]
    assert ids[1:-1] == [vocab["a</w>"], vocab["photo</w>"], vocab["of</w>"], vocab["a</w>"], vocab["face</w>"]]
    # unknown words fall back to byte symbols
    assert len(tok("zebra").input_ids) == 2 + 5


@torch.no_grad()
def test_text_encoder_width_1024():
    te, tok = build_tiny_text_encoder(0)
    ids = tok(["a face", "blurry"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    h = te(ids).last_hidden_state
    assert h.shape == (2, 77, 1024) and torch.isfinite(h).all()
    assert not torch.allclose(h[0], h[1])


def test_scheduler_is_sd21():
    s = tiny_sd.build_tiny_scheduler()
    assert type(s).__name__ == "DDPMScheduler"
    assert s.config.beta_schedule == "scaled_linear" and s.config.num_train_timesteps == 1000
    assert s.config.beta_start == 0.00085 and s.config.beta_end == 0.012
    assert s.config.prediction_type == "epsilon"


# ----------------------------------------------------------------------------------------------- conversion
def test_unet_round_trip_every_key_and_value(unet0):
    dsd = unet0.state_dict()
    ldm = convert.unet_diffusers_to_ldm_state_dict(dsd, TINY_UNET_CONFIG)
    assert len(ldm) == len(dsd) and all(k.startswith("model.diffusion_model.") for k in ldm)
    back = convert.unet_ldm_to_diffusers_state_dict(ldm, TINY_UNET_CONFIG)
    assert _same(back, dsd)
    # without a config: read off the weights
    assert _same(convert.unet_ldm_to_diffusers_state_dict(ldm), dsd)
    inferred = convert.infer_unet_config_from_ldm(ldm)
    for k in ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block", "attention_head_dim",
              "cross_attention_dim", "use_linear_projection", "in_channels", "out_channels"):
        assert list(inferred[k]) == list(TINY_UNET_CONFIG[k]) if isinstance(inferred[k], list) \
            else inferred[k] == TINY_UNET_CONFIG[k], k


def test_unet_ldm_names_follow_sd_structure(unet0):
    ldm = convert.unet_diffusers_to_ldm_state_dict(unet0.state_dict(), TINY_UNET_CONFIG, prefix="")
    # level 0: ResBlock + transformer; downsample; level 1: ResBlock (320 -> 640 with a skip conv)
    assert ldm["input_blocks.1.1.proj_in.weight"].shape == (320, 320)
    assert "input_blocks.2.0.op.weight" in ldm
    assert ldm["input_blocks.3.0.skip_connection.weight"].shape == (640, 320, 1, 1)
    assert ldm["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape == (640, 1024)
    assert "output_blocks.1.1.conv.weight" in ldm  # upsampler after the attention-free level
    assert ldm["output_blocks.3.1.transformer_blocks.0.attn1.to_q.weight"].shape == (320, 320)
    assert ldm["out.2.weight"].shape == (4, 320, 3, 3) and "time_embed.2.weight" in ldm


def test_unet_full_sd21_keys_round_trip():
    from diffusers import UNet2DConditionModel

    cfg = copy.deepcopy(convert.SD21_BASE_UNET_CONFIG)
    with torch.device("meta"):
        dsd = UNet2DConditionModel.from_config(cfg).state_dict()
    ldm = convert.unet_diffusers_to_ldm_state_dict(dsd, cfg)
    assert len(ldm) == len(dsd) == 686
    assert "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias" in ldm
    assert "model.diffusion_model.input_blocks.8.1.proj_out.weight" in ldm
    back = convert.unet_ldm_to_diffusers_state_dict(ldm)
    assert set(back) == set(dsd) and all(back[k] is dsd[k] for k in dsd)
    inferred = convert.infer_unet_config_from_ldm(ldm)
    assert {k: inferred[k] for k in cfg} == cfg


def test_unet_conversion_rejects_unknown_keys(unet0):
    dsd = dict(unet0.state_dict())
    dsd["down_blocks.0.bogus.weight"] = torch.zeros(1)
    with pytest.raises(convert.ConversionError, match="bogus"):
        convert.unet_diffusers_to_ldm_state_dict(dsd, TINY_UNET_CONFIG)


def test_kl_vae_round_trip_small_config():
    from diffusers import AutoencoderKL

    cfg = dict(convert.SD21_BASE_VAE_CONFIG, block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
               up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=8)
    vae = tiny_sd.randomize_(AutoencoderKL.from_config(cfg), 5)
    dsd = vae.state_dict()
    ldm = convert.vae_diffusers_to_ldm_state_dict(dsd, cfg)
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert "first_stage_model.decoder.up.1.upsample.conv.weight" in ldm  # up.l counts from low resolution
    assert "first_stage_model.encoder.down.0.downsample.conv.weight" in ldm
    assert "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight" in ldm
    back = convert.vae_ldm_to_diffusers_state_dict(ldm)
    assert _same(back, dsd)
    inferred = convert.infer_vae_config_from_ldm(ldm)
    assert inferred["block_out_channels"] == [32, 64] and inferred["layers_per_block"] == 1
    rebuilt = convert.ldm_to_diffusers_vae(ldm, config=cfg)
    assert _same(rebuilt.state_dict(), dsd)


def test_taesd_round_trip_and_comfy_layout():
    vae = build_tiny_vae(0)
    dsd = vae.state_dict()
    comfy = convert.taesd_diffusers_to_comfy(dsd, prefix="first_stage_model.")
    assert "first_stage_model.taesd_decoder.0.weight" not in comfy  # layer 0 is ComfyUI's parameter-free clamp
    assert comfy["first_stage_model.taesd_decoder.1.weight"].shape == (64, 4, 3, 3)
    assert comfy["first_stage_model.taesd_encoder.0.weight"].shape == (64, 3, 3, 3)
    assert float(comfy["first_stage_model.vae_scale"]) == 1.0 and float(comfy["first_stage_model.vae_shift"]) == 0
    back, scale, shift = convert.taesd_comfy_to_diffusers(comfy, prefix="first_stage_model.")
    assert _same(back, dsd) and (scale, shift) == (1.0, 0.0)
    rebuilt = convert.comfy_taesd_to_diffusers_vae(comfy)
    assert rebuilt.config.scaling_factor == pytest.approx(0.18215)


@torch.no_grad()
def test_text_encoder_openclip_round_trip():
    te, tok = build_tiny_text_encoder(0)
    hf = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in te.state_dict().items()
          if not k.endswith("position_ids")}
    oc = convert.hf_text_to_openclip_state_dict(hf)
    assert oc["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"].shape == (3 * 1024, 1024)
    assert "cond_stage_model.model.positional_embedding" in oc
    back = convert.openclip_to_hf_text_state_dict(oc, num_layers=None)
    assert _same(back, hf)
    rebuilt = convert.load_hf_text_encoder(back, config=te.config.to_dict())
    ids = tok(["a photo of a face"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    torch.testing.assert_close(rebuilt(ids).last_hidden_state, te(ids).last_hidden_state)
    # the SD2 diffusers layout keeps the first 23 of 24 layers
    assert not any(".layers.1." in k for k in convert.openclip_to_hf_text_state_dict(oc, num_layers=1))


def test_comfy_checkpoint_round_trip_without_text_encoder(tmp_path, unet0):
    from safetensors.torch import load_file

    path = tiny_sd.write_comfy_checkpoint(tmp_path / "tiny.safetensors", seed=0, with_text_encoder=False)
    sd = load_file(str(path))
    groups = convert.split_single_file(sd)
    assert groups["unet"] and groups["vae"] and not groups["text_encoder"] and not groups["other"]
    comps = convert.load_single_file_components(path)
    assert _same(comps["unet"].state_dict(), unet0.state_dict())
    assert _same(comps["vae"].state_dict(), build_tiny_vae(0).state_dict())
    assert comps["text_encoder"] is None
    assert comps["scheduler"].config.beta_schedule == "scaled_linear"


@torch.no_grad()
def test_diffusers_folder_loads_and_runs(tmp_path, unet0):
    from diffusers import StableDiffusionPipeline

    folder = tiny_sd.write_diffusers_folder(tmp_path / "tiny_sd", seed=0)
    assert {p.name for p in folder.iterdir()} >= {"model_index.json", "unet", "vae", "text_encoder", "tokenizer",
                                                  "scheduler"}
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    assert _same(pipe.unet.state_dict(), unet0.state_dict())
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    out = pipe("a photo of a face", num_inference_steps=2, height=64, width=64, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 64, 64, 3) and out.std() > 0.01

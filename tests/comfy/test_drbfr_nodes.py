"""DR-BFR nodes inside a real ComfyUI (in-process) on the tiny SD2 checkpoint, held to the diffusers DR-BFR path.

The DR-BFR file is written with the pack's own save function from the diffusers twin of the tiny ComfyUI UNet (same
weights) with non-zero random LoRA, conv_in extra channels, E_DR and DR prompt (MLP(t) perturbed away from its
alpha = 1, beta = 0 start), so every comparison can fail. The ComfyUI side runs ComfyUI's sampler machinery (conds
with noise_concat -> c_concat, CFG batching, the DIFFUSION_MODEL wrapper, the conv_in object patch, the LoRA merged
by ComfyUI's loader); the diffusers side is lora.ldrm.concat_unet_eps, as pipelines/drbfr.py runs it.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from comfyui_bfr.lora.ldrm import concat_unet_eps
from comfyui_bfr.nodes import drbfr as dn
from comfyui_bfr.nodes import flipnet as fn
from comfyui_bfr.nodes.helpers import NodeInputError
from comfyui_bfr.pipelines.drbfr import DRBFRPipeline
from fixtures import tiny_sd
from fixtures.drbfr import write_tiny_drbfr_checkpoint

from test_flipnet_nodes import _conds, _fingerprint, _images, _sample, _sigma, _write_flipnet, comfy_denoised

pytestmark = pytest.mark.comfy

SIZE = 32
EPS_TOL = 3e-5


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("drbfr")
    return {"drbfr": write_tiny_drbfr_checkpoint(d / "drbfr.safetensors"),
            "zero": write_tiny_drbfr_checkpoint(d / "drbfr_zero.safetensors", zero=True),
            "flipnet": _write_flipnet(d / "flipnet_restore.safetensors")}


@pytest.fixture(scope="module")
def drbfr(files):
    return dn.load_drbfr(str(files["drbfr"]))


@pytest.fixture(scope="module")
def pipe(files):
    comps = tiny_sd.build_tiny_pipeline_components(0)
    return DRBFRPipeline.from_checkpoint(None, files["drbfr"], components=copy.deepcopy(comps))


def _apply(comfy_models, value, image, **kw):
    model, vae = comfy_models
    pos, neg = _conds()
    return dn.BFRApplyDRBFR().apply(model, value, vae, image, pos, neg, **kw)


@pytest.mark.parametrize("cfg", [1.5, 1.0], ids=["cfg", "nocfg"])
def test_comfy_path_equals_the_diffusers_drbfr_path(comfy_models, drbfr, pipe, cfg, record_figure):
    """eps of ComfyUI's sampler stack vs concat_unet_eps on the diffusers twin, batch 2, three timesteps."""
    image = _images(2, seed=1)
    m, pos, neg, latent = _apply(comfy_models, drbfr, image)
    assert latent["samples"].shape == (2, 4, SIZE // 8, SIZE // 8)
    lq = pos[0][1]["noise_concat"]
    assert torch.equal(neg[0][1]["noise_concat"], lq) and lq.shape == (2, 4, SIZE // 8, SIZE // 8)
    # the same f_DR as the diffusers E_DR, and an LQ latent that is the VAE encoding in model space
    f_dr = pipe.degradation_tokens(image.movedim(-1, 1))
    wrapper = m.wrappers["diffusion_model"][dn.WRAPPER_KEY][0]
    torch.testing.assert_close(wrapper.f_dr, f_dr, atol=1e-5, rtol=0)
    from comfyui_bfr.sd.vae import encode as vae_encode

    torch.testing.assert_close(lq, vae_encode(pipe.vae, image.movedim(-1, 1)), atol=2e-4, rtol=1e-3)
    base_pos, base_neg = _conds()
    context = torch.cat([base_neg[0][0], base_neg[0][0], base_pos[0][0], base_pos[0][0]])
    worst = 0.0
    for t in (100, 500, 900):
        sigma = _sigma(m, t)
        x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(t)) * math.sqrt(1 + sigma**2)
        got = comfy_denoised(m, pos, neg, x, sigma, cfg=cfg)
        x_in = x / math.sqrt(1 + sigma**2)
        with torch.no_grad():
            if cfg == 1.0:
                eps = concat_unet_eps(pipe.unet, x_in, torch.full((2,), t), context[2:], lq, pipe.dr_prompt, f_dr)
            else:
                out = concat_unet_eps(pipe.unet, x_in.repeat(2, 1, 1, 1), torch.full((4,), t), context,
                                      lq.repeat(2, 1, 1, 1), pipe.dr_prompt, f_dr.repeat(2, 1, 1))
                uncond, cond = out.chunk(2)
                eps = uncond + cfg * (cond - uncond)
        eps_got = (x - got) / sigma
        torch.testing.assert_close(eps_got, eps, atol=EPS_TOL, rtol=0)
        worst = max(worst, (eps_got - eps).abs().max().item())
    record_figure(f"DR-BFR parity cfg {cfg:g}", f"max|eps diff| {worst:.1e} over t = 100, 500, 900, batch 2")


def test_the_dr_prompt_and_the_lq_latent_both_reach_the_output(comfy_models, drbfr):
    image = _images(1, seed=2)
    other = _images(1, seed=3)
    sigma = _sigma(comfy_models[0], 400)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * math.sqrt(1 + sigma**2)
    m_on, pos, neg, _ = _apply(comfy_models, drbfr, image)
    m_off, pos_off, neg_off, _ = _apply(comfy_models, drbfr, image, use_dr_prompt=False)
    assert dn.WRAPPER_KEY not in m_off.wrappers.get("diffusion_model", {})
    on = comfy_denoised(m_on, pos, neg, x, sigma)
    off = comfy_denoised(m_off, pos_off, neg_off, x, sigma)
    assert (on - off).abs().max() > 1e-4  # DR tokens change eps
    m2, pos2, neg2, _ = _apply(comfy_models, drbfr, other, use_dr_prompt=False)
    assert (comfy_denoised(m2, pos2, neg2, x, sigma) - off).abs().max() > 1e-4  # the LQ latent changes eps


def test_zero_drbfr_without_prompt_is_the_plain_model_and_the_base_stays_untouched(comfy_models, files):
    model, _ = comfy_models
    zero = dn.load_drbfr(str(files["zero"]))
    assert zero.checkpoint.conv_in_is_zero
    image = _images(2, seed=4)
    base_pos, base_neg = _conds()
    latent = torch.zeros(2, 4, 4, 4)
    plain = _sample(model, base_pos, base_neg, latent, steps=2)
    before = _fingerprint(model)  # the plain model as loaded for sampling (ComfyUI unpatches lazily)
    m, pos, neg, _ = _apply(comfy_models, zero, image, use_dr_prompt=False)
    assert torch.equal(_sample(m, pos, neg, latent, steps=2), plain)  # zero LoRA + zero W_extra: bit-identical
    m_on, pos_on, neg_on, _ = _apply(comfy_models, zero, image)
    assert (_sample(m_on, pos_on, neg_on, latent, steps=2) - plain).abs().max() > 1e-5  # appended tokens matter
    # after patched runs the input MODEL samples exactly as before, with its own weights and conv_in
    assert torch.equal(_sample(model, base_pos, base_neg, latent, steps=2), plain)
    assert _fingerprint(model) == before


def test_full_sampling_is_finite_and_deterministic(comfy_models, drbfr):
    m, pos, neg, latent = _apply(comfy_models, drbfr, _images(2, seed=5))
    a = _sample(m, pos, neg, latent["samples"], seed=9, steps=3)
    b = _sample(m, pos, neg, latent["samples"], seed=9, steps=3)
    assert torch.isfinite(a).all() and torch.equal(a, b)


def test_bad_inputs_are_refused_with_the_fix(comfy_models, drbfr, files):
    with pytest.raises(NodeInputError, match="FlipNet checkpoint: load it with BFR Load FlipNet"):
        dn.load_drbfr(str(files["flipnet"]))
    with pytest.raises(NodeInputError, match="DR-BFR checkpoint: load it with BFR Load DR-BFR"):
        fn.load_flipnet(str(files["drbfr"]))
    with pytest.raises(NodeInputError, match="multiples of 8"):
        _apply(comfy_models, drbfr, torch.rand(1, 30, 32, 3))
    m, *_ = _apply(comfy_models, drbfr, _images(1))
    pos, neg = _conds()
    with pytest.raises(NodeInputError, match="already carries a widened conv_in"):
        dn.BFRApplyDRBFR().apply(m, drbfr, comfy_models[1], _images(1), pos, neg)
    with pytest.raises(NodeInputError, match="must come from BFR Load DR-BFR"):
        _apply(comfy_models, "drbfr.safetensors", _images(1))

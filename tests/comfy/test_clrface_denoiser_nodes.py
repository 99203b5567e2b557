"""BFR Load / Apply CLR-Face in a real ComfyUI, held to the diffusers conditional denoiser (concat_unet_eps)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from comfyui_bfr.lora.ldrm import concat_unet_eps
from comfyui_bfr.nodes import clrface_denoiser as cn
from comfyui_bfr.nodes.helpers import NodeInputError
from fixtures.clrface import write_tiny_clrface_checkpoint
from fixtures.drbfr import write_tiny_drbfr_checkpoint
from test_flipnet_nodes import _conds, _images, _sample, _sigma, comfy_denoised

pytestmark = pytest.mark.comfy


def _write_clrface(path, zero=False):
    return write_tiny_clrface_checkpoint(path, zero=zero)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("clrface")
    return {"clrface": _write_clrface(d / "clrface.safetensors"),
            "zero": _write_clrface(d / "clrface_zero.safetensors", zero=True),
            "drbfr": write_tiny_drbfr_checkpoint(d / "drbfr.safetensors")}


def _apply(comfy_models, value, image):
    model, vae = comfy_models
    pos, neg = _conds()
    return cn.BFRApplyCLRFace().apply(model, value, vae, image, pos, neg)


def test_comfy_eps_equals_the_diffusers_conditional_denoiser(comfy_models, files, record_figure):
    path, unet = files["clrface"]
    value = cn.load_clrface(str(path))
    image = _images(2, seed=7)
    m, pos, neg = _apply(comfy_models, value, image)
    lq = pos[0][1]["noise_concat"]
    base_pos, base_neg = _conds()
    context = torch.cat([base_neg[0][0], base_neg[0][0], base_pos[0][0], base_pos[0][0]])
    worst = 0.0
    for t in (50, 400, 850):
        sigma = _sigma(m, t)
        x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(t)) * math.sqrt(1 + sigma**2)
        got = (x - comfy_denoised(m, pos, neg, x, sigma, cfg=1.5)) / sigma
        with torch.no_grad():
            out = concat_unet_eps(unet, (x / math.sqrt(1 + sigma**2)).repeat(2, 1, 1, 1), torch.full((4,), t),
                                  context, lq.repeat(2, 1, 1, 1))
        uncond, cond = out.chunk(2)
        want = uncond + 1.5 * (cond - uncond)
        torch.testing.assert_close(got, want, atol=3e-5, rtol=0)
        worst = max(worst, (got - want).abs().max().item())
    record_figure("CLR-Face denoiser parity cfg 1.5", f"max|eps diff| {worst:.1e} over t = 50, 400, 850, batch 2")


def test_zero_file_samples_like_the_plain_model(comfy_models, files):
    model, _ = comfy_models
    value = cn.load_clrface(str(files["zero"][0]))
    m, pos, neg = _apply(comfy_models, value, _images(1, seed=8))
    base_pos, base_neg = _conds()
    latent = torch.zeros(1, 4, 4, 4)
    assert torch.equal(_sample(m, pos, neg, latent, steps=2), _sample(model, base_pos, base_neg, latent, steps=2))


def test_wrong_files_are_refused(files):
    with pytest.raises(NodeInputError, match="DR-BFR checkpoint"):
        cn.load_clrface(str(files["drbfr"]))
    with pytest.raises(NodeInputError, match="must come from BFR Load CLR-Face"):
        cn.BFRApplyCLRFace().apply(None, copy.copy("x"), None, None, None, None)

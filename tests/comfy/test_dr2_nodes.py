"""DR2 nodes inside a real ComfyUI (in-process), and parity with the diffusers pipeline on the same tiny weights.

The ComfyUI side loads the tiny single-file checkpoint through ComfyUI's own loader; the diffusers side builds the
same UNet/TAESD from the fixture. Both run ``ilvr.dr2_sample`` (ComfyUI in sigma form, diffusers in DDPM form)
with the same seed, so their x0-hat latents must agree to float precision.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from comfyui_bfr.nodes import dr2 as dr2_nodes
from comfyui_bfr.nodes.helpers import NodeInputError
from comfyui_bfr.pipelines import dr2
from comfyui_bfr.sd import loader as sd_models
from fixtures import tiny_sd

pytestmark = pytest.mark.comfy

FAST = dict(omega_mode="auto", omega=60, steps=20)  # T=20: omega = tau + 5



@pytest.fixture(scope="module")
def comfy_models(tiny_checkpoint):
    import comfy.sd

    model, _clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint), output_vae=True,
                                                                  output_clip=False, embedding_directory=None)
    return model, vae


@pytest.fixture(scope="module")
def diffusers_model():
    return sd_models.SDModel(tiny_sd.build_tiny_unet(0), tiny_sd.build_tiny_vae(0), source="tiny fixture")


@pytest.fixture(scope="module")
def face():
    """skimage's astronaut face as a ComfyUI IMAGE (1, 64, 64, 3) in [0, 1]."""
    from comfyui_bfr.pipelines.sample_data import sample_face

    return torch.from_numpy(sample_face(64).copy())[None].float() / 255.0


def run_restore(comfy_models, image, **kw):
    model, vae = comfy_models
    params = dict(n=2.0, tau=3, space="latent", seed=11, **FAST)
    params.update(kw)
    return dr2_nodes.BFRDR2Restore().restore(model, vae, image, **params)


@pytest.mark.parametrize("space,n", [("latent", 2.0), ("pixel", 8.0)])
def test_comfy_and_diffusers_give_the_same_latents(comfy_models, diffusers_model, face, space, n):
    image, latent = run_restore(comfy_models, face, n=n, space=space)
    ref = dr2.restore(diffusers_model, face.movedim(-1, 1), dr2.DR2Config(n=n, tau=3, steps=20, space=space,
                                                                            seed=11))
    comfy_model_space = latent["samples"] * tiny_sd.LATENT_SCALE  # ComfyUI's LATENT is the raw VAE latent
    torch.testing.assert_close(comfy_model_space, ref.latents, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(image.movedim(-1, 1), ref.images, atol=2e-3, rtol=1e-3)


def test_sampler_node_in_sampler_custom_advanced_equals_restore(comfy_models, face):
    from comfy_extras import nodes_custom_sampler as ncs

    model, vae = comfy_models
    _image, expected = run_restore(comfy_models, face, n=2.0, seed=4)
    latent = {"samples": vae.encode(face)}  # what core VAEEncode returns
    (sigmas,) = dr2_nodes.BFRDR2Sigmas().get_sigmas(model, 2.0, 3, **FAST)
    assert len(sigmas) == 6 and sigmas[-1] > 0
    (sampler,) = dr2_nodes.BFRDR2Sampler().get_sampler(2.0, "latent")
    noise = ncs.RandomNoise.execute(noise_seed=4).result[0]
    guider = ncs.BasicGuider.execute(model=model, conditioning=dr2_nodes.null_conditioning("test", model)).result[0]
    output, denoised = ncs.SamplerCustomAdvanced.execute(noise=noise, guider=guider, sampler=sampler,
                                                         sigmas=sigmas, latent_image=latent).result
    torch.testing.assert_close(output["samples"], expected["samples"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(denoised["samples"], expected["samples"], atol=1e-5, rtol=1e-5)


def _fingerprint(model):
    h = hashlib.sha256()
    for k, v in sorted(model.model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def test_running_leaves_the_base_model_untouched(comfy_models, face):
    model, _vae = comfy_models
    before = (_fingerprint(model), repr(model.model_options), dict(model.object_patches), len(model.patches))
    first = run_restore(comfy_models, face, seed=2)[1]["samples"]
    second = run_restore(comfy_models, face, seed=2)[1]["samples"]
    assert (_fingerprint(model), repr(model.model_options), dict(model.object_patches), len(model.patches)) == before
    assert torch.equal(first, second)  # same seed, same output, and nothing leaked into the next run
    assert not torch.equal(first, run_restore(comfy_models, face, seed=3)[1]["samples"])


def test_batches_odd_sizes_gray_and_rgba(comfy_models, face):
    batch = torch.cat([face, face.flip(2)])[:, :60, :52]  # not multiples of 8
    image, latent = run_restore(comfy_models, batch)
    assert image.shape == (2, 60, 52, 3) and latent["samples"].shape == (2, 4, 8, 7)
    gray = run_restore(comfy_models, face[..., :1])[0]
    rgba = run_restore(comfy_models, torch.cat([face, torch.ones_like(face[..., :1])], -1))[0]
    assert gray.shape == rgba.shape == (1, 64, 64, 3)
    torch.testing.assert_close(rgba, run_restore(comfy_models, face)[0])


@pytest.mark.parametrize("kw,match", [
    (dict(tau=30, omega_mode="explicit", omega=30, steps=100), "greater than tau"),
    (dict(tau=22, omega_mode="explicit", omega=100, steps=100), "exceeds the last level"),
    (dict(n=0.5), "N must be"),
    (dict(steps=0), "steps must be"),
])
def test_bad_parameters_name_node_value_and_fix(comfy_models, face, kw, match):
    with pytest.raises(NodeInputError, match=rf"\[BFR DR2 Restore\].*{match}"):
        run_restore(comfy_models, face, **kw)


def test_validate_inputs():
    v = dr2_nodes.BFRDR2Restore.VALIDATE_INPUTS
    ok = dict(n=2.0, tau=22, omega_mode="auto", omega=60, steps=100, space="latent")
    assert v(**ok) is True
    assert v(**dict(ok, n=None)) is True  # linked input: checked at run time
    assert "greater than tau" in v(**dict(ok, omega_mode="explicit", omega=10))
    assert "space must be" in v(**dict(ok, space="fourier"))
    assert "N must be" in dr2_nodes.BFRDR2Sampler.VALIDATE_INPUTS(0.5, "latent")
    assert dr2_nodes.BFRDR2Sigmas.VALIDATE_INPUTS(2.0, 22, "official", 0, 100) is True


def test_bad_images_are_clear_errors(comfy_models, face):
    bad = face.clone()
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(NodeInputError, match="NaN or inf"):
        run_restore(comfy_models, bad)
    with pytest.raises(NodeInputError, match="too small"):
        run_restore(comfy_models, face[:, :8, :8])
    with pytest.raises(NodeInputError, match="channels"):
        run_restore(comfy_models, torch.cat([face, face], -1))


def test_pixel_sampler_needs_a_vae():
    with pytest.raises(NodeInputError, match="needs the VAE"):
        dr2_nodes.BFRDR2Sampler().get_sampler(4.0, "pixel")


def test_cancel_interrupts_the_run(comfy_models, face):
    import comfy.model_management as mm

    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run_restore(comfy_models, face)
    finally:
        mm.interrupt_current_processing(False)


def test_v_prediction_models_match_too(comfy_models, diffusers_model, face):
    """Training-free on other SD models: a v-prediction model (SD2.1-768-v style) through both wrappers."""
    import comfy.model_sampling as cms

    model, vae = comfy_models

    class VPred(cms.ModelSamplingDiscrete, cms.V_PREDICTION):
        pass

    m = model.clone()
    m.add_object_patch("model_sampling", VPred(model.model.model_config))
    _image, latent = dr2_nodes.BFRDR2Restore().restore(m, vae, face, n=2.0, tau=3, space="latent", seed=1, **FAST)
    v_model = sd_models.SDModel(diffusers_model.unet, diffusers_model.vae, prediction_type="v_prediction")
    ref = dr2.restore(v_model, face.movedim(-1, 1), dr2.DR2Config(n=2.0, tau=3, steps=20, seed=1))
    torch.testing.assert_close(latent["samples"] * tiny_sd.LATENT_SCALE, ref.latents, atol=2e-4, rtol=1e-3)
    eps = run_restore(comfy_models, face, n=2.0, seed=1)[1]["samples"]
    assert not torch.allclose(eps, latent["samples"])


def test_flow_models_are_rejected(comfy_models):
    import comfy.model_sampling as cms

    model, _vae = comfy_models

    class Flow(cms.ModelSamplingDiscreteFlow, cms.CONST):
        pass

    m = model.clone()
    m.add_object_patch("model_sampling", Flow())
    with pytest.raises(NodeInputError, match="not a discrete DDPM schedule"):
        dr2_nodes.BFRDR2Sigmas().get_sigmas(m, 2.0, 3, **FAST)

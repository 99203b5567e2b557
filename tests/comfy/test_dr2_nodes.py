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


# ------------------------------------------------------------------------------------- doors: inputs that used to
# crash or be silently wrong, each now a clear NodeInputError (or a documented rule) — design.md §8
def _tiny_model(config_cls, **unet):
    """A tiny ComfyUI model of another family (SD1.5, SDXL), bypassing detection, random weights from a seed."""
    import comfy.model_management as mm
    import comfy.model_patcher

    config = dict(image_size=32, use_spatial_transformer=True, legacy=False, in_channels=4, out_channels=4,
                  model_channels=64, num_res_blocks=[1], channel_mult=[1], transformer_depth=[1],
                  transformer_depth_output=[1, 1], transformer_depth_middle=1, use_temporal_resblock=False,
                  use_temporal_attention=False, use_checkpoint=False, num_heads=-1, num_head_channels=64,
                  adm_in_channels=None)
    config.update(unet)
    model_config = config_cls(config)
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(base.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05 + (1.0 if "norm" in name and name.endswith("weight")
                                                                    else 0.0))
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


@pytest.fixture(scope="module")
def sd15_model():
    import comfy.supported_models as sm

    return _tiny_model(sm.SD15, context_dim=768, use_linear_in_transformer=False, num_heads=8, num_head_channels=-1)


@pytest.fixture(scope="module")
def sdxl_model():
    import comfy.supported_models as sm

    return _tiny_model(sm.SDXL, context_dim=2048, adm_in_channels=2816, num_classes="sequential",
                       use_linear_in_transformer=True)


class _RecordingVAE:
    """A ComfyUI VAE that records its encode/decode calls and can run a hook on a decode."""

    def __init__(self, vae, on_decode=None):
        self.vae, self.on_decode, self.calls = vae, on_decode, []

    def spacial_compression_encode(self):
        return self.vae.spacial_compression_encode()

    def encode(self, pixels):
        self.calls.append("encode")
        return self.vae.encode(pixels)

    def decode(self, samples):
        self.calls.append("decode")
        if self.on_decode is not None:
            self.on_decode(self.calls.count("decode"))
        return self.vae.decode(samples)


def test_empty_and_wrongly_scaled_images_are_clear_errors(comfy_models, face):
    with pytest.raises(NodeInputError, match=r"\[BFR DR2 Restore\] the IMAGE batch is empty \(0 images\)"):
        run_restore(comfy_models, face[:0])
    with pytest.raises(NodeInputError, match=r"\[BFR DR2 Restore\] IMAGE values go up to .* 0-255 scaled.*"
                                             r"divide by 255 upstream"):
        run_restore(comfy_models, face * 255.0)
    with pytest.raises(NodeInputError, match=r"\[BFR DR2 Restore\] IMAGE has negative values.*\(x \+ 1\) / 2"):
        run_restore(comfy_models, face * 2.0 - 1.0)


def test_size_guard_rejects_before_any_work(comfy_models, face):
    model, vae = comfy_models
    recording = _RecordingVAE(vae)
    with pytest.raises(NodeInputError, match=r"\[BFR DR2 Restore\] IMAGE is 64x64 = 0\.0041 megapixels per image, "
                                             r"above max_megapixels=0\.004.*Crop the faces first"):
        run_restore((model, recording), face, max_megapixels=0.004)  # 64 * 64 = 0.0041 MP
    assert recording.calls == []  # rejected before the VAE (or the model) ran
    image, _ = run_restore((model, recording), face, max_megapixels=0.0041)
    assert image.shape == face.shape
    torch.testing.assert_close(image, run_restore(comfy_models, face)[0])  # default guard: 4.2 MP


def test_cancel_during_pixel_refinement_stops_before_the_next_vae_call(comfy_models, face):
    import comfy.model_management as mm

    model, vae = comfy_models

    def press_cancel(n_decodes):
        if n_decodes == 2:
            mm.interrupt_current_processing(True)

    recording = _RecordingVAE(vae, on_decode=press_cancel)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run_restore((model, recording), face, n=8.0, space="pixel")
    finally:
        mm.interrupt_current_processing(False)
    # encode (input), then per step decode -> encode; Cancel during the 2nd step's decode stops it right there
    assert recording.calls == ["encode", "decode", "encode", "decode"], recording.calls


def _sampler_run(comfy_models, latent_images, reference, seed=4):
    from comfy_extras import nodes_custom_sampler as ncs

    model, vae = comfy_models
    latent = {"samples": vae.encode(latent_images)}
    (sigmas,) = dr2_nodes.BFRDR2Sigmas().get_sigmas(model, 8.0, 3, **FAST)
    (sampler,) = dr2_nodes.BFRDR2Sampler().get_sampler(8.0, "pixel", vae=vae, reference=reference)
    noise = ncs.RandomNoise.execute(noise_seed=seed).result[0]
    guider = ncs.BasicGuider.execute(model=model, conditioning=dr2_nodes.null_conditioning("test", model)).result[0]
    return ncs.SamplerCustomAdvanced.execute(noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                                             latent_image=latent).result[0]["samples"]


def test_sampler_reference_batch_must_match_the_latent_or_be_one(comfy_models, face):
    pair = torch.cat([face, face.flip(2)])
    with pytest.raises(NodeInputError, match=r"\[BFR DR2 Sampler\] reference has 2 images but latent_image has 1"):
        _sampler_run(comfy_models, face, pair)
    twice = torch.cat([face, face])
    broadcast = _sampler_run(comfy_models, twice, face)  # one reference image for every latent
    explicit = _sampler_run(comfy_models, twice, twice)
    assert broadcast.shape[0] == 2
    torch.testing.assert_close(broadcast, explicit, atol=0, rtol=0)


def test_sampler_reference_is_cropped_like_vae_encode(comfy_models, face):
    odd = face[:, :60, :52]  # VAEEncode centre-crops this to 56x48
    cropped = odd[:, 2:58, 2:50]
    torch.testing.assert_close(_sampler_run(comfy_models, odd, odd), _sampler_run(comfy_models, odd, cropped),
                               atol=0, rtol=0)
    with pytest.raises(NodeInputError, match=r"reference image is 40x40 but latent_image decodes to 48x56"):
        _sampler_run(comfy_models, odd, face[:, :40, :40])
    with pytest.raises(NodeInputError, match=r"\[BFR DR2 Sampler\] reference values go up to"):
        _sampler_run(comfy_models, odd, odd * 255.0)


def test_prompt_width_must_match_the_model(comfy_models, sd15_model, face):
    sd2_prompt = [[torch.zeros(1, 77, 1024), {"pooled_output": torch.zeros(1, 1024)}]]
    sd15_prompt = [[torch.zeros(1, 77, 768), {"pooled_output": torch.zeros(1, 768)}]]
    _model, vae = comfy_models
    with pytest.raises(NodeInputError, match=r"\[BFR DR2 Restore\] positive CONDITIONING is 1024 wide \(SD2\.x, "
                                             r"OpenCLIP-H\) but this MODEL \(SD15\) expects 768 wide \(SD1\.x, "
                                             r"CLIP-L\): encode the prompt with the CLIP of the MODEL's own"):
        run_restore((sd15_model, vae), face, positive=sd2_prompt)
    with pytest.raises(NodeInputError, match=r"768 wide \(SD1\.x, CLIP-L\) but this MODEL \(SD20\) expects 1024"):
        run_restore(comfy_models, face, positive=sd15_prompt)
    image, _ = run_restore((sd15_model, vae), face, positive=sd15_prompt)  # the matching pair runs
    assert image.shape == face.shape and torch.isfinite(image).all()
    torch.testing.assert_close(run_restore(comfy_models, face, positive=sd2_prompt)[0],
                               run_restore(comfy_models, face)[0])  # a zero prompt equals the null prompt


def test_sdxl_model_runs_with_a_zero_pooled_null_prompt(comfy_models, sdxl_model, face):
    _model, vae = comfy_models
    image, latent = run_restore((sdxl_model, vae), face)
    assert image.shape == face.shape and torch.isfinite(image).all() and image.std() > 1e-3
    cond = dr2_nodes.null_conditioning("test", sdxl_model)
    assert cond[0][0].shape == (1, 77, 2048) and cond[0][1]["pooled_output"].shape == (1, 1280)
    with_pooled = [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]]
    torch.testing.assert_close(run_restore((sdxl_model, vae), face, positive=with_pooled)[1]["samples"],
                               latent["samples"])  # the explicit zero prompt is the null prompt
    with pytest.raises(NodeInputError, match=r"this MODEL \(SDXL\) needs the prompt's pooled output.*"
                                             r"CLIPTextEncode on the SDXL checkpoint's CLIP"):
        run_restore((sdxl_model, vae), face, positive=[[torch.zeros(1, 77, 2048), {}]])
    with pytest.raises(NodeInputError, match=r"1024 wide \(SD2\.x, OpenCLIP-H\) but this MODEL \(SDXL\) expects "
                                             r"2048 wide"):
        run_restore((sdxl_model, vae), face, positive=[[torch.zeros(1, 77, 1024), {}]])

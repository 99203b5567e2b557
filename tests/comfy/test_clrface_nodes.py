"""CLR-Face nodes inside a real ComfyUI (in-process), against ComfyUI's own heun and the diffusers pipeline on the same
tiny weights: unguided bit-exact vs core 'heun', diffusers/ComfyUI parity of D (eps) and of one full guided Heun step,
the guidance working on weights loaded under torch.inference_mode (as the server runs prompts), Cancel mid-guidance,
the loaders from registered model folders, and the restore node's schedule = BasicScheduler(karras, denoise)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from comfyui_bfr.lora.id_mask import IdentityMask, IdentityMaskConfig, save_mask_checkpoint
from comfyui_bfr.nodes import clrface as nodes
from comfyui_bfr.nodes.dr2 import null_conditioning
from comfyui_bfr.nodes.helpers import NodeInputError
from comfyui_bfr.pipelines import clrface as cf
from comfyui_bfr.pipelines.arcface import IdentityModel, build_iresnet
from fixtures import tiny_sd

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def face():
    from comfyui_bfr.pipelines.sample_data import sample_face

    return torch.from_numpy(sample_face(64).copy())[None].float() / 255.0  # (1, 64, 64, 3)


@pytest.fixture(scope="module")
def identity():
    torch.manual_seed(0)
    return nodes.identity_handle(IdentityModel(build_iresnet("r18")))


def _run(comfy_models, sampler, face, sigmas, add_noise=True, model=None, seed=3):
    from comfy_extras import nodes_custom_sampler as ncs

    m, vae = comfy_models
    m = model or m
    noise = (ncs.RandomNoise.execute(noise_seed=seed) if add_noise else ncs.DisableNoise.execute()).result[0]
    guider = ncs.BasicGuider.execute(model=m, conditioning=null_conditioning("test", m)).result[0]
    latent = {"samples": vae.encode(face)}
    return ncs.SamplerCustomAdvanced.execute(noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                                             latent_image=latent).result[0]["samples"]


def _karras(model, steps=4, denoise=0.5):
    from comfy_extras import nodes_custom_sampler as ncs

    return ncs.BasicScheduler.execute(model=model, scheduler="karras", steps=steps, denoise=denoise).result[0]


def test_scale_zero_is_core_heun_bit_for_bit(comfy_models, identity, face):
    import comfy.samplers

    model, vae = comfy_models
    sigmas = _karras(model)
    (ours, _info) = nodes.BFRCLRFaceSampler().get_sampler(vae, identity, face, 0.0)
    core = comfy.samplers.sampler_object("heun")
    assert torch.equal(_run(comfy_models, ours, face, sigmas), _run(comfy_models, core, face, sigmas))


def test_comfy_and_diffusers_agree_on_eps_and_a_guided_heun_step(comfy_models, identity, face):
    model, vae = comfy_models
    unet, dvae = tiny_sd.build_tiny_unet(0), tiny_sd.build_tiny_vae(0)
    x = vae.encode(face) * tiny_sd.LATENT_SCALE  # model space; DisableNoise starts exactly here
    ctx = torch.zeros(1, 77, 1024)
    denoiser = cf.diffusers_denoiser(unet, ctx)
    sigma = _karras(model)[1]
    (plain, _) = nodes.BFRCLRFaceSampler().get_sampler(vae, identity, face, 0.0)
    d_comfy = _run(comfy_models, plain, face, torch.stack([sigma, sigma.new_zeros(())]), add_noise=False)
    d_comfy = d_comfy * tiny_sd.LATENT_SCALE  # one Euler step to 0 returns D(x, sigma)
    with torch.no_grad():
        d_ours = denoiser(x, sigma)
    torch.testing.assert_close((x - d_comfy) / sigma, (x - d_ours) / sigma, atol=2e-5, rtol=1e-4)  # eps

    scale = 40.0
    two = _karras(model)[1:3]
    (guided, _) = nodes.BFRCLRFaceSampler().get_sampler(vae, identity, face, scale)
    step_comfy = _run(comfy_models, guided, face, two, add_noise=False) * tiny_sd.LATENT_SCALE
    idm = identity.model
    guidance = cf.IdentityGuidance(cf.vae_decoder(dvae), idm, cf.reference_embedding(idm, face.movedim(-1, 1)),
                                   scale)
    with torch.no_grad():
        step_ours = cf.guided_heun(denoiser, x, two, guidance)
        unguided = cf.guided_heun(denoiser, x, two)
    effect = float((step_ours - unguided).abs().max())
    assert effect > 1e-2  # the guidance did something measurable
    # The random r18's gradient is ill-conditioned: the 7e-7 difference of the two UNets' D grows to ~1e-3 of the
    # guidance's effect after the second (corrector) gradient; an error in the guided update itself would be O(1).
    assert float((step_comfy - step_ours).abs().max()) < 0.05 * effect
    # the guidance pieces themselves agree exactly on the same latent: ComfyUI's VAE object vs the diffusers VAE
    ref = cf.reference_embedding(idm, face.movedim(-1, 1))
    l_c, g_c = cf.identity_gradient(x, nodes.comfy_decoder(vae, model.model.process_latent_out), idm, ref)
    l_d, g_d = cf.identity_gradient(x, cf.vae_decoder(dvae), idm, ref)
    torch.testing.assert_close(g_c, g_d, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(l_c, l_d)


def test_guidance_under_inference_mode_lowers_l_arc(tiny_checkpoint, identity, face, record_figure):
    """As in the server: the checkpoint and the identity model are loaded inside torch.inference_mode."""
    import comfy.sd

    with torch.inference_mode():
        model, _clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint), output_vae=True,
                                                                      output_clip=False, embedding_directory=None)
        sigmas = _karras(model, steps=4, denoise=0.5)
        out = {}
        for scale in (0.0, 60.0):
            (sampler, info) = nodes.BFRCLRFaceSampler().get_sampler(vae, identity, face, scale)
            out[scale] = vae.decode(_run((model, vae), sampler, face, sigmas)).movedim(-1, 1)
        assert "uniform mask" in info
    idm = identity.model
    ref = idm.embed(face.movedim(-1, 1))
    loss = {s: float(1 - cf.cosine(idm.embed(img.clone()), ref).mean()) for s, img in out.items()}
    assert loss[60.0] < loss[0.0], loss
    record_figure("clrface comfy L_arc", f"unguided {loss[0.0]:.4f} -> guided s=60 {loss[60.0]:.4f}")


class _CountingStage(nn.Module):
    def __init__(self, inner, on_decode):
        super().__init__()
        self.inner, self.on_decode, self.calls = inner, on_decode, 0

    def decode(self, z):
        self.calls += 1
        self.on_decode(self.calls)
        return self.inner.decode(z)


class _VAE:
    def __init__(self, vae, stage):
        self._vae, self.first_stage_model = vae, stage

    def __getattr__(self, name):
        return getattr(self._vae, name)


def test_cancel_mid_guidance_stops_before_the_next_gradient(comfy_models, identity, face):
    import comfy.model_management as mm

    model, vae = comfy_models

    def press_cancel(n):
        if n == 2:
            mm.interrupt_current_processing(True)

    stage = _CountingStage(vae.first_stage_model, press_cancel)
    (sampler, _) = nodes.BFRCLRFaceSampler().get_sampler(_VAE(vae, stage), identity, face, 10.0)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _run(comfy_models, sampler, face, _karras(model, steps=6))
    finally:
        mm.interrupt_current_processing(False)
    assert stage.calls == 2


def test_restore_node_schedule_mask_and_report(comfy_models, identity, face, tmp_path):
    import folder_paths

    model, vae = comfy_models
    torch.testing.assert_close(nodes.model_sigmas(model, 5, 0.4), _karras(model, steps=5, denoise=0.4))
    image, latent, report = nodes.BFRCLRFaceRestore().restore(model, vae, identity, face, 3, 0.5, 30.0, 1)
    assert image.shape == face.shape and latent["samples"].shape == (1, 4, 8, 8)
    assert "uniform mask" in report and "L_arc" in report
    zero = IdentityMask(IdentityMaskConfig(init_logit=-200.0))
    save_mask_checkpoint(tmp_path / "bfr" / "zero_mask.safetensors", zero, guidance_scale=30.0)
    folder_paths.add_model_folder_path("bfr", str(tmp_path / "bfr"))
    (mask,) = nodes.BFRLoadCLRFaceMask().load("zero_mask.safetensors")
    masked, _, report = nodes.BFRCLRFaceRestore().restore(model, vae, identity, face, 3, 0.5, 30.0, 1, mask=mask)
    plain, _, _ = nodes.BFRCLRFaceRestore().restore(model, vae, identity, face, 3, 0.5, 0.0, 1)
    assert torch.equal(masked, plain) and "learned mask zero_mask.safetensors" in report
    with pytest.raises(NodeInputError, match=r"\[BFR CLR-Face Restore\] denoise must be in"):
        nodes.BFRCLRFaceRestore().restore(model, vae, identity, face, 3, 0.0, 1.0, 1)


def test_identity_loader_reads_the_registered_folder_and_refuses_bad_files(tmp_path):
    import folder_paths

    folder = tmp_path / "identity"
    folder.mkdir()
    net = build_iresnet("r18")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "r18.safetensors"))
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3)}, str(folder / "partial.pth"))
    folder_paths.add_model_folder_path(nodes.IDENTITY_FOLDER, str(folder))
    assert "r18.safetensors" in nodes.BFRLoadIdentityModel.INPUT_TYPES()["required"]["identity_name"][0]
    with torch.inference_mode():  # as in a prompt: the loaded weights must still be usable by autograd
        (handle,) = nodes.BFRLoadIdentityModel().load("r18.safetensors")
    assert handle.model.arch == "r18" and handle.patcher is not None
    assert not any(p.is_inference() for p in handle.model.net.parameters())
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(handle.model.embed(x), IdentityModel(net).embed(x))
    with pytest.raises(NodeInputError, match=r"\[BFR Load Identity Model\].*partial.pth"):
        nodes.BFRLoadIdentityModel().load("partial.pth")
    with pytest.raises(NodeInputError, match="not in models/bfr/identity"):
        nodes.BFRLoadIdentityModel().load("missing.pth")


def test_window_decode_matches_the_diffusers_window_and_samples(comfy_models, identity):
    """decode='window' (only the latent cells the identity network reads): the gradient through ComfyUI's VAE object
    equals the diffusers VAE's on the same window; the sampler runs with it and the window is a strict sub-area at
    256 px; a bad mode is refused by the node."""
    from comfyui_bfr.pipelines.sample_data import sample_face

    model, vae = comfy_models
    face = torch.from_numpy(sample_face(256).copy())[None].float() / 255.0
    dvae = tiny_sd.build_tiny_vae(0)
    x = vae.encode(face) * tiny_sd.LATENT_SCALE
    idm = identity.model
    hw = tuple(x.shape[-2:])
    box = cf.latent_window(cf.template_pixel_box(idm, 256, 256), hw, 8)
    assert (box[1] - box[0]) * (box[3] - box[2]) < hw[0] * hw[1], box
    ref = cf.reference_embedding(idm, face.movedim(-1, 1))
    win_c = cf.guidance_decoder(nodes.comfy_decoder(vae, model.model.process_latent_out), idm, hw, 8, "window")
    win_d = cf.guidance_decoder(cf.vae_decoder(dvae), idm, hw, 8, "window")
    l_c, g_c = cf.identity_gradient(x, win_c, idm, ref)
    l_d, g_d = cf.identity_gradient(x, win_d, idm, ref)
    torch.testing.assert_close(g_c, g_d, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(l_c, l_d)
    (sampler, _) = nodes.BFRCLRFaceSampler().get_sampler(vae, identity, face, 40.0, decode="window")
    (plain, _) = nodes.BFRCLRFaceSampler().get_sampler(vae, identity, face, 0.0)
    sigmas = _karras(model, steps=2)
    guided, unguided = _run(comfy_models, sampler, face, sigmas), _run(comfy_models, plain, face, sigmas)
    assert torch.isfinite(guided).all() and float((guided - unguided).abs().max()) > 1e-3
    with pytest.raises(NodeInputError, match="decode must be one of full, window"):
        nodes.BFRCLRFaceSampler().get_sampler(vae, identity, face, 1.0, decode="crop")

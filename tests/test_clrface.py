"""CLR-Face guided Heun (pipelines/clrface.py) on a micro SD2-shaped UNet, the tiny TAESD-topology VAE and a random
r18 identity model: the Heun update against an ODE with a closed-form solution, s = 0 / all-zero mask bit-exact
against the unguided sampler, the uniform mask against plain classifier guidance written out here, guidance lowering
L_arc, no autograd graph or tensors kept across steps, the schedules against their definitions, and the mask file."""

from __future__ import annotations

import gc
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from comfyui_bfr.lora.checkpoint import CheckpointError
from comfyui_bfr.lora.id_mask import IdentityMask, IdentityMaskConfig, load_mask_checkpoint, save_mask_checkpoint
from comfyui_bfr.pipelines import clrface as cf
from comfyui_bfr.pipelines.arcface import IdentityModel, build_iresnet
from fixtures.flipnet import face_image, micro_components

STEPS = 4


@pytest.fixture(scope="module")
def parts():
    comps = micro_components(0)
    torch.manual_seed(0)  # the random r18, independent of which fixtures ran before
    identity = IdentityModel(build_iresnet("r18"))
    x_id = torch.stack([torch.from_numpy(face_image(s, 64)).permute(2, 0, 1).float() / 255 for s in (3, 4)])
    return comps["unet"], comps["vae"], identity, x_id


def _pipe(parts, mask=None):
    unet, vae, identity, _ = parts
    return cf.CLRFacePipeline(unet, vae, identity, mask=mask)


def _run(parts, scale, mask=None, seed=1, steps=STEPS):
    return _pipe(parts, mask)(parts[3], cf.CLRFaceConfig(steps=steps, denoise=0.5, guidance_scale=scale, seed=seed))


def _l_arc(parts, images):
    identity, x_id = parts[2], parts[3]
    with torch.no_grad():
        return 1 - F.cosine_similarity(identity.embed(images), identity.embed(x_id), dim=-1)


# ------------------------------------------------------------------------------------------------ the sampler


def test_heun_solves_the_gaussian_probability_flow_ode():
    """Data ~ N(0, v): D(x, sigma) = x v / (v + sigma^2), and the ODE dx/dsigma = (x - D)/sigma has the solution
    x(sigma) = x0 sqrt((v + sigma^2) / (v + sigma0^2)). Heun's error falls ~4x per halving of the step (2nd order)."""
    v = 0.5
    x0 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def denoiser(x, sigma):
        return x * v / (v + sigma ** 2)

    def error(n):
        sigmas = torch.linspace(10.0, 0.05, n + 1, dtype=torch.float64)  # ends above 0: Heun on every step
        x = cf.guided_heun(denoiser, x0, sigmas)
        exact = x0 * math.sqrt((v + 0.05 ** 2) / (v + 10.0 ** 2))
        return float((x - exact).abs().max())

    e1, e2 = error(50), error(100)
    assert e2 < 1e-3 * float(x0.abs().max())
    assert 3.0 < e1 / e2 < 5.0  # second order


def test_last_step_to_zero_is_an_euler_step_and_the_callback_sees_every_step():
    seen = []

    def denoiser(x, sigma):
        return 0.5 * x

    x = torch.ones(1, 1, 1, 1)
    out = cf.guided_heun(denoiser, x, torch.tensor([2.0, 0.0]), callback=seen.append)
    # one Euler step: x + (x - D)/sigma * (0 - sigma) = D
    assert float(out) == 0.5 and [s["i"] for s in seen] == [0] and float(seen[0]["denoised"]) == 0.5


def test_zero_scale_and_all_zero_mask_are_bit_exact_unguided(parts):
    unguided = cf.CLRFacePipeline(parts[0], parts[1], identity=None)(
        parts[3], cf.CLRFaceConfig(steps=STEPS, denoise=0.5, seed=1)).latents
    assert torch.equal(_run(parts, 0.0).latents, unguided)
    zero = IdentityMask(IdentityMaskConfig(init_logit=-200.0))  # sigmoid(-200) == 0 exactly in float32
    out = _run(parts, 50.0, mask=zero)
    assert torch.equal(out.latents, unguided)
    assert all(h.mask_mean == 0 for h in out.guidance.history)  # the gradient was never taken


def test_uniform_mask_is_plain_classifier_guidance(parts):
    """Written out here: Heun on D - s grad_{z0} sum_b (1 - cos(f(G(z0)), f(x_id))) with G the VAE decoder."""
    unet, vae, identity, x_id = parts
    scale = 20.0
    with torch.no_grad():
        ref = F.normalize(identity.net(identity.preprocess(x_id)), dim=-1)
        latent = vae.encode(x_id * 2 - 1).latents * 0.18215
    table = cf.sigmas_from_alphas_cumprod(cf.sd_alphas_cumprod()).float()
    sigmas = cf.start_sigmas(STEPS, 0.5, float(table[0]), float(table[-1]))
    x = latent + sigmas[0] * torch.randn(latent.shape, generator=torch.manual_seed(1))
    ctx = torch.zeros(2, 77, 1024)

    def guided_denoised(x, sigma):
        t = (sigma.log() - table.log()).abs().argmin().float().expand(2)
        with torch.no_grad():
            d = x - sigma * unet(x / (sigma ** 2 + 1) ** 0.5, t, encoder_hidden_states=ctx).sample
        z = d.clone().requires_grad_(True)
        img = (vae.decode(z / 0.18215).sample + 1) / 2
        loss = (1 - F.cosine_similarity(F.normalize(identity.net(identity.preprocess(img)), dim=-1), ref)).sum()
        (g,) = torch.autograd.grad(loss, z)
        return d - scale * g

    for i in range(STEPS):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - guided_denoised(x, s)) / s
        if s_next == 0:
            x = x + d * (s_next - s)
        else:
            x2 = x + d * (s_next - s)
            x = x + (d + (x2 - guided_denoised(x2, s_next)) / s_next) / 2 * (s_next - s)
    ours = _run(parts, scale).latents
    torch.testing.assert_close(ours, x, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(ours, _run(parts, 0.0).latents, atol=1e-3)


def test_a_learned_mask_scales_the_gradient_elementwise():
    d, g = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    m = torch.rand(2, 4, 3, 3)
    torch.testing.assert_close(cf.apply_identity_guidance(d, g, m, 3.0), d - 3.0 * m * g)
    torch.testing.assert_close(cf.apply_identity_guidance(d, g, None, 3.0), d - 3.0 * g)


def test_guidance_lowers_l_arc(parts, record_figure):
    unguided = _l_arc(parts, _run(parts, 0.0).images)
    guided = _l_arc(parts, _run(parts, 60.0).images)
    assert (guided < unguided).all(), (guided, unguided)
    record_figure("clrface L_arc (r18 random)", f"unguided {unguided.mean():.4f} -> guided s=60 {guided.mean():.4f}")


def test_no_graph_and_no_tensors_kept_across_steps(parts):
    unet, vae, identity, x_id = parts
    pipe = _pipe(parts)
    denoiser = cf.diffusers_denoiser(unet, pipe.context)
    guidance = pipe.guidance(x_id, 30.0)
    sigmas = cf.start_sigmas(8, 0.5, float(pipe.sigma_table[0]), float(pipe.sigma_table[-1]))
    x = torch.randn(2, 4, 8, 8)
    counts = []

    def count(state):
        assert state["denoised"].grad_fn is None and not state["denoised"].requires_grad
        gc.collect()
        with warnings.catch_warnings():  # isinstance() on torch.distributed's deprecated aliases warns
            warnings.simplefilter("ignore")
            counts.append(sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor)))

    with torch.no_grad():
        out = cf.guided_heun(denoiser, x, sigmas, guidance, callback=count)
    assert out.grad_fn is None and not out.requires_grad
    assert len(guidance.history) == 15  # 8 steps, the last one Euler
    assert counts[-1] <= counts[1], counts  # flat after the first step
    assert all(p.grad is None for p in list(identity.net.parameters()) + list(vae.parameters()))


def test_interrupt_stops_mid_run(parts):
    pipe = _pipe(parts)
    calls = []

    class Cancel(Exception):
        pass

    def interrupt():
        calls.append(1)
        if len(calls) == 3:
            raise Cancel

    guidance = pipe.guidance(parts[3], 10.0)
    guidance.interrupt = interrupt
    with pytest.raises(Cancel), torch.no_grad():
        cf.guided_heun(cf.diffusers_denoiser(parts[0], pipe.context), torch.randn(2, 4, 8, 8),
                       cf.start_sigmas(6, 0.5, 0.03, 14.6), guidance)
    assert len(guidance.history) == 2  # cancelled before the third gradient


def test_weights_made_in_inference_mode_get_an_autograd_copy(parts):
    with torch.inference_mode():
        net = torch.nn.Conv2d(4, 3, 3)
    ready = cf.autograd_ready(net)
    assert ready is not net and not any(p.is_inference() for p in ready.parameters())
    torch.testing.assert_close(ready.weight, net.weight.clone())
    plain = torch.nn.Conv2d(4, 3, 3)
    assert cf.autograd_ready(plain) is plain
    with torch.inference_mode():  # inputs made in inference mode (ComfyUI's prompt) still get a gradient
        z = torch.randn(1, 4, 8, 8)
        loss, grad = cf.identity_gradient(z, cf.vae_decoder(parts[1]), parts[2],
                                          cf.reference_embedding(parts[2], parts[3][:1]))
    assert grad.shape == z.shape and float(grad.abs().sum()) > 0 and loss.shape == (1,)


def test_reference_batch_must_be_one_or_the_latent_batch(parts):
    with pytest.raises(cf.CLRFaceParameterError, match="3 reference embeddings for a batch of 2"):
        cf.identity_gradient(torch.randn(2, 4, 8, 8), cf.vae_decoder(parts[1]), parts[2], torch.randn(3, 512))


# ------------------------------------------------------------------------------------------------ schedules


def test_karras_and_denoise_schedules_follow_their_definitions():
    s = cf.karras_sigmas(5, 0.03, 14.6)
    expected = [(14.6 ** (1 / 7) + i / 4 * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7 for i in range(5)] + [0.0]
    torch.testing.assert_close(s, torch.tensor(expected), rtol=1e-5, atol=0)
    half = cf.start_sigmas(5, 0.5, 0.03, 14.6)  # the last 6 of a 10-step schedule
    torch.testing.assert_close(half, cf.karras_sigmas(10, 0.03, 14.6)[-6:])
    assert cf.noised_start(torch.zeros(1), torch.ones(1), 14.6, 14.6).item() == pytest.approx(math.sqrt(1 + 14.6 ** 2))
    assert cf.noised_start(torch.zeros(1), torch.ones(1), 2.0, 14.6).item() == 2.0
    for bad in (0.0, 1.5):
        with pytest.raises(cf.CLRFaceParameterError, match="denoise must be in"):
            cf.start_sigmas(5, bad, 0.03, 14.6)


def test_timestep_is_the_nearest_in_log_sigma():
    table = cf.sigmas_from_alphas_cumprod(cf.sd_alphas_cumprod()).float()
    t = cf.timestep_from_sigma(torch.stack([table[354], table[0] * 0.5, table[-1] * 2]), table)
    assert t.tolist() == [354.0, 0.0, 999.0]


# ------------------------------------------------------------------------------------------------ mask file


def test_mask_checkpoint_round_trip_and_refusals(tmp_path):
    mask = IdentityMask(IdentityMaskConfig(width=8, layers=3))
    with torch.no_grad():
        for p in mask.parameters():
            p.normal_()
    path = save_mask_checkpoint(tmp_path / "m.safetensors", mask, guidance_scale=7.5, train_config={"a": 1})
    back = load_mask_checkpoint(path)
    z = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(back.mask(z), mask(z))
    assert back.guidance_scale == 7.5 and back.mask.cfg == mask.cfg
    m = back.mask(z)
    assert m.shape == z.shape and (m >= 0).all() and (m <= 1).all()
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(other), metadata={"bfr_format": "flipnet/1"})
    with pytest.raises(CheckpointError, match="expected 'clrface-mask/1'"):
        load_mask_checkpoint(other)
    sd = {f"id_mask.{k}": v for k, v in mask.state_dict().items()}
    sd["id_mask.net.0.weight"] = torch.zeros(8, 4, 1, 1)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad), metadata={"bfr_format": "clrface-mask/1", "mask_config": '{"width": 8}'})
    with pytest.raises(CheckpointError, match=r"id_mask.net.0.weight is \(8, 4, 1, 1\)"):
        load_mask_checkpoint(bad)


# ------------------------------------------------------------------------------------------------ window decode
def _local_decoder(factor=8):
    """A decoder where each latent cell makes its own factor x factor pixels (no context), so a window decode equals
    the full decode inside the window exactly."""
    weight = torch.linspace(-1.0, 1.0, 12).view(3, 4, 1, 1)

    def decode(z):
        return torch.sigmoid(F.conv2d(z, weight.to(z))).repeat_interleave(factor, -2).repeat_interleave(factor, -1)

    return decode


def test_template_box_is_exactly_what_the_identity_network_reads():
    """Pixels outside the box do not change the identity network's input (bit for bit); a pixel just inside does;
    the resize alignment reads the whole crop."""
    torch.manual_seed(0)
    identity = IdentityModel(build_iresnet("r18"))
    r0, r1, c0, c1 = cf.template_pixel_box(identity, 512, 512)
    assert 0 < r0 < r1 < 512 and 0 < c0 < c1 < 512 and (r1 - r0) * (c1 - c0) < 0.7 * 512 * 512
    img = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(1))
    outside = img.clone()
    outside[..., :r0, :] = 0.0
    outside[..., r1:, :] = 1.0
    outside[..., :, :c0] = 0.3
    outside[..., :, c1:] = 0.7
    assert torch.equal(identity.preprocess(img), identity.preprocess(outside))
    inside = img.clone()
    inside[..., (r0 + r1) // 2, (c0 + c1) // 2] += 0.5
    assert not torch.equal(identity.preprocess(img), identity.preprocess(inside))
    identity.align = "resize"
    assert cf.template_pixel_box(identity, 96, 80) == (0, 96, 0, 80)


def test_window_decode_gives_the_full_gradient_for_a_local_decoder():
    """With a decoder without context the window's L_arc and latent gradient equal the full decode's (up to float);
    the gradient outside the window is zero, and the window covers all the full gradient's support."""
    torch.manual_seed(0)
    identity = IdentityModel(build_iresnet("r18"))
    decode = _local_decoder()
    z = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(2))
    ref = cf.reference_embedding(identity, torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(3)))
    windowed = cf.guidance_decoder(decode, identity, (64, 64), 8, "window")
    assert windowed is not decode
    loss_f, grad_f = cf.identity_gradient(z, decode, identity, ref)
    loss_w, grad_w = cf.identity_gradient(z, windowed, identity, ref)
    assert torch.allclose(loss_f, loss_w, atol=1e-6)
    assert torch.allclose(grad_f, grad_w, atol=1e-6 * float(grad_f.abs().max()))
    r0, r1, c0, c1 = cf.latent_window(cf.template_pixel_box(identity, 512, 512), (64, 64), 8)
    outside = grad_w.clone()
    outside[..., r0:r1, c0:c1] = 0
    assert float(outside.abs().max()) == 0.0 and float(grad_w.abs().max()) > 0
    assert cf.guidance_decoder(decode, identity, (64, 64), 8, "full") is decode
    with pytest.raises(cf.CLRFaceParameterError, match="decode must be one of full, window"):
        cf.guidance_decoder(decode, identity, (64, 64), 8, "half")


def test_pipeline_runs_with_the_window_decode(parts):
    """decode="window" through the pipeline guides too (L_arc below the unguided run); a bad mode is refused."""
    base = _l_arc(parts, _run(parts, 0.0).images)
    pipe = _pipe(parts)
    out = pipe(parts[3], cf.CLRFaceConfig(steps=STEPS, denoise=0.5, guidance_scale=60.0, seed=1, decode="window"))
    assert torch.isfinite(out.images).all() and out.guidance is not None
    assert float(_l_arc(parts, out.images).mean()) < float(base.mean())
    with pytest.raises(cf.CLRFaceParameterError, match="decode"):
        cf.CLRFaceConfig(decode="crop")

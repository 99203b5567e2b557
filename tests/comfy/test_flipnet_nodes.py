"""FlipNet nodes inside a real ComfyUI (in-process) on the tiny SD2 checkpoint, held to the diffusers FlipNet path.

A tiny FlipNet checkpoint is written here with the pack's own save function from the diffusers twin of the tiny
ComfyUI UNet (same weights), with non-zero random LoRA, BoostHub (W_o included) and face-adapter weights, so every
comparison below can fail. The ComfyUI side runs through ComfyUI's sampler machinery (a one-evaluation KSAMPLER:
conds, CFG, wrappers, transformer patches, LoRA merged by ComfyUI's loader); the diffusers side runs the UNet with
the pipeline's BoostHub processors on the joint batch, as ``pipelines/flipnet.py`` does.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from comfyui_bfr.lora import checkpoint as ck
from comfyui_bfr.lora.face_embedder import AdapterConfig, FaceAdapter, FaceAutoencoderPair, LQFaceEncoder
from comfyui_bfr.sd.diffusion import q_sample
from comfyui_bfr.train.flipnet import prepare_flipnet_unet
from comfyui_bfr.nodes import flipnet as fn
from comfyui_bfr.nodes.helpers import NodeInputError
from comfyui_bfr.pipelines.flipnet import FlipNetPipeline
from comfyui_bfr.sd.vae import encode as vae_encode
from fixtures import tiny_sd
from fixtures.flipnet import TINY_FACE

pytestmark = pytest.mark.comfy
logger = logging.getLogger(__name__)

SIZE = 32  # image px -> 4x4 latents
T_IDX = 500  # discrete timestep of the parity checks


# ---------------------------------------------------------------------------------------------- fixtures


def _write_flipnet(path, mode="restore", zero_boosthub=False, phi=1.0, policy="same", t_y=60, *, zero_lora=False,
                   face=None):
    """``zero_boosthub``: W_o = 0 (W_q/W_k/W_v stay non-zero); ``zero_lora``: every LoRA A/B zero; ``face``: with the
    LQ face encoder + adapter (default: restore mode)."""
    unet = tiny_sd.build_tiny_unet(0)
    prepare_flipnet_unet(unet, 4, None, phi)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if not p.requires_grad:
                continue
            if zero_boosthub and ".processor.hub.out_proj." in name:
                p.zero_()
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
                if zero_lora:
                    p.zero_()
            else:  # BoostHub q/k/v (start = self-attention weights) and W_o (starts at zero)
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    kw = {}
    if mode == "restore" if face is None else face:
        torch.manual_seed(3)
        ada = FaceAdapter(AdapterConfig(in_dim=TINY_FACE.token_dim, out_dim=1024, hidden_dim=64))
        with torch.no_grad():  # LayerNorm starts at (1, 0): make it non-trivial too
            ada.norm.weight.add_(0.1 * torch.randn(ada.norm.weight.shape, generator=g))
            ada.norm.bias.add_(0.1 * torch.randn(ada.norm.bias.shape, generator=g))
        kw = dict(face_encoder=LQFaceEncoder.from_pair(FaceAutoencoderPair(TINY_FACE)), adapter=ada,
                  face_image_size=16)
    return ck.save_flipnet_checkpoint(path, unet, mode=mode, defaults=ck.FlipNetDefaults(phi, policy, t_y), **kw)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bfr")
    return {
        "restore": _write_flipnet(d / "flipnet_restore.safetensors"),
        "zero_hub": _write_flipnet(d / "flipnet_zero_hub.safetensors", zero_boosthub=True),
        "degrade": _write_flipnet(d / "flipnet_degrade.safetensors", mode="degrade", policy="fixed"),
        # restore files without a face embedder (no tokens appended): BoostHub is the condition's only way in
        "restore_noface": _write_flipnet(d / "flipnet_restore_noface.safetensors", face=False),
        "noface_zero": _write_flipnet(d / "flipnet_noface_zero.safetensors", face=False, zero_lora=True,
                                      zero_boosthub=True),
        "noface_zero_lora": _write_flipnet(d / "flipnet_noface_zero_lora.safetensors", face=False, zero_lora=True),
        # zero LoRA and W_o but a (non-zero) face encoder + adapter: only the face tokens are left
        "face_zero": _write_flipnet(d / "flipnet_face_zero.safetensors", zero_lora=True, zero_boosthub=True),
    }


@pytest.fixture(scope="module")
def flipnet(files):
    return fn.load_flipnet(str(files["restore"]))


@pytest.fixture(scope="module")
def flipnets(files):
    return {k: fn.load_flipnet(str(v)) for k, v in files.items()}


@pytest.fixture(scope="module")
def pipes(files):
    """The diffusers FlipNet pipelines on the same tiny weights, one per mode."""
    comps = tiny_sd.build_tiny_pipeline_components(0)
    return {mode: FlipNetPipeline.from_checkpoint(None, files[mode], components=copy.deepcopy(comps))
            for mode in ("restore", "degrade")}


@pytest.fixture(scope="module")
def pipe(pipes):
    return pipes["restore"]


def _images(n=1, seed=0):
    return torch.rand(n, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(seed))


def _conds(seed=0):
    g = torch.Generator().manual_seed(100 + seed)
    pos = [[torch.randn(1, 77, 1024, generator=g), {"pooled_output": None}]]
    neg = [[torch.randn(1, 77, 1024, generator=g), {"pooled_output": None}]]
    return pos, neg


def _apply(comfy_models, flipnet, image, **kw):
    model, vae = comfy_models
    pos, neg = _conds()
    params = dict(phi=1.0, t_y_policy="same", t_y=60, seed=5)
    params.update(kw)
    return fn.BFRApplyFlipNet().apply(model, flipnet, vae, image, pos, neg, **params)


def _sigma(model, t=T_IDX) -> float:
    return float(model.get_model_object("model_sampling").sigmas[t])


def comfy_denoised(model, positive, negative, x, sigma, cfg=1.5):
    """One model evaluation through ComfyUI's sampler stack (conds, CFG, wrappers, patches): denoised at sigma."""
    import comfy.sample
    import comfy.samplers

    seen = {}

    def one_eval(mdl, x_in, sigmas, extra_args=None, callback=None, disable=None):
        seen["denoised"] = mdl(x.to(x_in), sigma * x_in.new_ones([x_in.shape[0]]), **(extra_args or {}))
        return seen["denoised"]

    zeros = torch.zeros(x.shape)
    comfy.sample.sample_custom(model, zeros, cfg, comfy.samplers.KSAMPLER(one_eval), torch.tensor([sigma, 0.0]),
                               positive, negative, zeros, disable_pbar=True, seed=0)
    return seen["denoised"].float().cpu()


@torch.no_grad()
def diffusers_denoised(pipe, x, sigma, t, cond_latent, eps_y, t_y, pos, neg, cfg=1.5, cache=False):
    """The pipeline's step math on the diffusers UNet: joint batch cat([x_t, y_{t_y}]) (or, ``cache``, the pipeline's
    LQ cache: a recorded condition-only pass, then x_t alone), CFG (None: the positive rows only, as ComfyUI runs
    cfg 1), x0 = x - sigma eps."""
    b = x.shape[0]
    alphas = pipe.train_alphas
    reps = 1 if cfg is None else 2
    x_in = (x / math.sqrt(1.0 + sigma**2)).repeat(reps, 1, 1, 1)
    y = q_sample(cond_latent, eps_y, alphas, torch.full((b,), t_y, dtype=torch.long)).repeat(reps, 1, 1, 1)
    context = pos if cfg is None else torch.cat([neg, pos])
    tt = torch.full((reps * b,), t)
    ty = torch.full((reps * b,), t_y)
    state = pipe.state
    if cache:
        state.kv_cache.clear()
        try:
            state.cache_mode = "record"
            pipe.unet(y, ty, context)
            state.cache_mode = "replay"
            out = pipe.unet(x_in, tt, context).sample
        finally:
            state.cache_mode = "off"
            state.kv_cache.clear()
    elif pipe.boosthub_active(state.phi):
        out = pipe.unet(torch.cat([x_in, y]), torch.cat([tt, ty]), torch.cat([context, context])).sample[: reps * b]
    else:  # phi = 0: the pipeline runs the input stream alone
        out = pipe.unet(x_in, tt, context).sample
    if cfg is None:
        return x - sigma * out
    uncond, cond = out.chunk(2)
    eps = uncond + cfg * (cond - uncond)
    return x - sigma * eps


def _fingerprint(model):
    h = hashlib.sha256()
    for k, v in sorted(model.model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _sample(model, pos, neg, latent, seed=3, steps=2, cfg=1.5):
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", pos, neg, latent, seed=seed,
                               disable_pbar=True)


# ---------------------------------------------------------------------------------------------- parity


PARITY_TIMESTEPS = (100, 500, 900)
PARITY_PHIS = (0.0, 1.0, 2.0)
# fp32 on CPU: |eps diff| <= EPS_TOL (measured <= 1e-5, see the figures the run prints); denoised = x - sigma eps,
# so its tolerance is EPS_TOL * sigma (sigma reaches ~10 at t = 900)
EPS_TOL = 3e-5


@pytest.mark.parametrize("cfg", [1.5, 1.0], ids=["cfg", "nocfg"])
@pytest.mark.parametrize("policy,t_y,cache", [("same", None, False), ("fixed", 60, False), ("fixed", 60, True)],
                         ids=["same", "fixed", "fixed-cache"])
@pytest.mark.parametrize("mode", ["restore", "degrade"])
def test_comfy_path_equals_the_diffusers_flipnet_path(comfy_models, flipnets, pipes, mode, policy, t_y, cache, cfg,
                                                      record_figure):
    """eps and denoised of ComfyUI's sampler stack (conds, CFG or cfg-1 skip, wrappers, patches, LoRA merged by
    ComfyUI) vs the diffusers pipeline's step math, batch 2, at three timesteps and phi 0/1/2. Degrade mode: no face
    tokens, the condition is the clean image; restore mode: face tokens from the same encoder + adapter."""
    flip, pipe = flipnets[mode], pipes[mode]
    image = _images(2)
    base_pos, base_neg = _conds()
    worst = {"eps": 0.0, "denoised": 0.0}
    for phi in PARITY_PHIS:
        m, pos, neg, latent = _apply(comfy_models, flip, image, phi=phi, t_y_policy=policy, t_y=t_y or 0,
                                     lq_cache=cache)
        assert latent["samples"].shape == (2, 4, SIZE // 8, SIZE // 8) and not latent["samples"].any()
        wrapper = fn.joint_batch_wrapper(m)
        assert (wrapper is None) == (phi == 0)  # phi = 0: the condition stream is not run at all
        if mode == "restore":
            c_id, c_null = pipe.face_tokens(image.movedim(-1, 1))
            ref_pos = torch.cat([base_pos[0][0].expand(2, -1, -1), c_id], 1)
            ref_neg = torch.cat([base_neg[0][0].expand(2, -1, -1), c_null], 1)
            torch.testing.assert_close(pos[0][0], ref_pos, atol=1e-5, rtol=1e-5)  # same encoder + adapter
            torch.testing.assert_close(neg[0][0], ref_neg, atol=1e-5, rtol=1e-5)
        else:
            # degrade: the prompts unchanged
            assert torch.equal(pos[0][0], base_pos[0][0]) and torch.equal(neg[0][0], base_neg[0][0])
            ref_pos, ref_neg = base_pos[0][0].expand(2, -1, -1), base_neg[0][0].expand(2, -1, -1)
        # the condition latent is the VAE encoding of the image in model space, as the diffusers pipeline makes it
        cond_latent = vae_encode(pipe.vae, image.movedim(-1, 1))
        eps_y = fn.condition_noise(cond_latent.shape, 5)
        if wrapper is not None:
            torch.testing.assert_close(wrapper.condition, cond_latent, atol=2e-4, rtol=1e-3)
            assert torch.equal(wrapper.noise, eps_y)
            cond_latent = wrapper.condition
        pipe.state.phi = phi
        for t in PARITY_TIMESTEPS:
            sigma = _sigma(m, t)
            g = torch.Generator().manual_seed(t)
            x = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=g) * math.sqrt(1 + sigma**2)
            got = comfy_denoised(m, pos, neg, x, sigma, cfg=cfg)
            ref = diffusers_denoised(pipe, x, sigma, t, cond_latent, eps_y, t_y or t, ref_pos, ref_neg,
                                     cfg=None if cfg == 1.0 else cfg, cache=cache and phi > 0)
            eps_got, eps_ref = (x - got) / sigma, (x - ref) / sigma
            torch.testing.assert_close(eps_got, eps_ref, atol=EPS_TOL, rtol=0)
            torch.testing.assert_close(got, ref, atol=EPS_TOL * max(1.0, sigma), rtol=0)
            worst["denoised"] = max(worst["denoised"], (got - ref).abs().max().item())
            worst["eps"] = max(worst["eps"], (eps_got - eps_ref).abs().max().item())
        if wrapper is not None:
            assert wrapper.condition_passes == (1 if cache else 0) * len(PARITY_TIMESTEPS)
    record_figure(f"parity {mode} {policy}{'+cache' if cache else ''} cfg {cfg:g}",
                  f"max|eps diff| {worst['eps']:.1e}, max|denoised diff| {worst['denoised']:.1e}")


def test_phi_and_boosthub_matter_and_reduce_to_lora_only(comfy_models, flipnet, files):
    import comfy.sd

    model, _vae = comfy_models
    image = _images(1, seed=4)
    lora_only, _ = comfy.sd.load_lora_for_models(model, None, flipnet.checkpoint.lora, 1.0, 0)
    sigma = _sigma(model, 300)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2)) * math.sqrt(1 + sigma**2)

    m0, pos, neg, _ = _apply(comfy_models, flipnet, image, phi=0.0)
    m1, *_ = _apply(comfy_models, flipnet, image, phi=1.0)
    reference = comfy_denoised(lora_only, pos, neg, x, sigma)
    assert torch.equal(comfy_denoised(m0, pos, neg, x, sigma), reference)  # bit-exact: no condition stream
    assert (comfy_denoised(m1, pos, neg, x, sigma) - reference).abs().max() > 1e-3  # BoostHub does something

    zero = fn.load_flipnet(str(files["zero_hub"]))
    assert zero.boosthub_is_zero and not flipnet.boosthub_is_zero
    mz, pos_z, neg_z, _ = _apply(comfy_models, zero, image, phi=2.0)
    assert fn.joint_batch_wrapper(mz) is None and fn.WRAPPER_KEY not in mz.additional_models
    lora_z, _ = comfy.sd.load_lora_for_models(model, None, zero.checkpoint.lora, 1.0, 0)
    assert torch.equal(comfy_denoised(mz, pos_z, neg_z, x, sigma), comfy_denoised(lora_z, pos_z, neg_z, x, sigma))
    # and the LoRA itself is applied (base model differs)
    assert (comfy_denoised(model, pos, neg, x, sigma) - reference).abs().max() > 1e-3


def test_lq_cache_equals_the_joint_batch_and_halves_the_unet_rows(comfy_models, flipnet):
    import comfy.patcher_extension as pe

    image = _images(2, seed=6)
    outs, rows, passes = {}, {}, {}
    for cache in (False, True):
        m, pos, neg, latent = _apply(comfy_models, flipnet, image, t_y_policy="fixed", t_y=40, lq_cache=cache)
        seen = []

        def count(executor, x, *args, _seen=seen, **kwargs):
            _seen.append(x.shape[0])
            return executor(x, *args, **kwargs)

        m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "count", count)
        outs[cache] = _sample(m, pos, neg, latent["samples"], steps=3)
        rows[cache] = list(seen)
        wrapper = fn.joint_batch_wrapper(m)
        assert wrapper.cache == {}  # cleared after the run
        passes[cache] = wrapper.condition_passes
        _sample(m, pos, neg, latent["samples"], steps=3)  # a second run records again (fresh cache per run)
        passes[cache] = (passes[cache], wrapper.condition_passes)
    torch.testing.assert_close(outs[True], outs[False], atol=1e-5, rtol=1e-5)
    assert rows[False] == [8, 8, 8]  # (cond + uncond) x (input + condition) x 2 images, every step
    assert rows[True] == [4, 4, 4, 4]  # one condition-only pass, then the input rows alone
    assert passes == {False: (0, 0), True: (1, 2)}


# ---------------------------------------------------------------------------------------------- condition, no-ops


@pytest.mark.parametrize("which", ["degrade", "restore_noface", "restore"])
@pytest.mark.parametrize("policy", ["same", "fixed"])
def test_the_output_depends_on_the_condition_image(comfy_models, flipnets, which, policy):
    """Two condition images, same sampler seed, full KSampler runs: different outputs with phi = 1 in both modes. With
    phi = 0 the two are bit-identical when no face tokens are appended (BoostHub is the image's only way in), and
    still differ in restore mode with a face embedder (the tokens tau(z_y) carry the image)."""
    a, b = _images(1, seed=20), _images(1, seed=21)
    outs = {}
    for phi in (0.0, 1.0):
        for name, image in (("a", a), ("b", b)):
            m, pos, neg, latent = _apply(comfy_models, flipnets[which], image, phi=phi, t_y_policy=policy, t_y=60)
            outs[phi, name] = _sample(m, pos, neg, latent["samples"], steps=2)
    assert (outs[1.0, "a"] - outs[1.0, "b"]).abs().max() > 1e-3
    if which == "restore":
        assert (outs[0.0, "a"] - outs[0.0, "b"]).abs().max() > 1e-3
    else:
        assert torch.equal(outs[0.0, "a"], outs[0.0, "b"])


def _comparisons(model, pos, neg, image_latent, cfgs=(1.5, 1.0)):
    """What the no-op tests compare: denoised at two sigmas (with and without CFG) and a 2-step KSampler run."""
    out = []
    for t, cfg in ((300, cfgs[0]), (800, cfgs[1])):
        sigma = _sigma(model, t)
        x = torch.randn(image_latent.shape, generator=torch.Generator().manual_seed(t)) * math.sqrt(1 + sigma**2)
        out.append(comfy_denoised(model, pos, neg, x, sigma, cfg=cfg))
    out.append(_sample(model, pos, neg, image_latent, steps=2))
    return out


def _max_diff(xs, ys) -> float:
    return max((a - b).abs().max().item() for a, b in zip(xs, ys))


def test_no_face_embedder_zero_lora_and_zero_boosthub_is_the_base_model(comfy_models, flipnets, record_figure):
    """A checkpoint WITHOUT a face embedder, zero LoRA and zero W_o: the patched MODEL is the base MODEL bit for bit
    (prompts unchanged; no condition stream, since BoostHub provably adds 0), for every policy and phi."""
    model, _vae = comfy_models
    zero = flipnets["noface_zero"]
    assert zero.boosthub_is_zero and not zero.has_face_embedder
    image = _images(2, seed=3)
    base_pos, base_neg = _conds()
    for policy, phi, cache in (("same", 1.0, False), ("fixed", 2.0, True), ("fixed", 0.5, False)):
        m, pos, neg, latent = _apply(comfy_models, zero, image, phi=phi, t_y_policy=policy, lq_cache=cache)
        assert torch.equal(pos[0][0], base_pos[0][0]) and torch.equal(neg[0][0], base_neg[0][0])  # no face tokens
        got = _comparisons(m, pos, neg, latent["samples"])
        ref = _comparisons(model, base_pos, base_neg, latent["samples"])
        record_figure(f"no-face zero ckpt vs base ({policy})", f"max|diff| {_max_diff(got, ref):.1e}")
        assert all(torch.equal(g, r) for g, r in zip(got, ref))


def test_phi_zero_with_zero_lora_is_the_base_model(comfy_models, flipnets, record_figure):
    """phi = 0 + zero LoRA (W_o NOT zero) and no face tokens: the base MODEL bit for bit; phi = 1 is not (the test
    can fail)."""
    model, _vae = comfy_models
    flip = flipnets["noface_zero_lora"]
    assert not flip.boosthub_is_zero
    image = _images(2, seed=4)
    base_pos, base_neg = _conds()
    ref = _comparisons(model, base_pos, base_neg, torch.zeros(2, 4, 4, 4))
    m0, pos, neg, latent = _apply(comfy_models, flip, image, phi=0.0)
    got = _comparisons(m0, pos, neg, latent["samples"])
    record_figure("phi=0 zero-LoRA vs base", f"max|diff| {_max_diff(got, ref):.1e}")
    assert all(torch.equal(g, r) for g, r in zip(got, ref))
    m1, *_ = _apply(comfy_models, flip, image, phi=1.0)
    assert _max_diff(_comparisons(m1, pos, neg, latent["samples"]), ref) > 1e-3


def test_neutral_face_tokens_are_the_null_tokens_and_the_only_difference(comfy_models, flipnets, record_figure):
    """Zero LoRA and W_o, but a face embedder: the negative prompt gets tau(0) (the null tokens of training's
    face-embedding dropout and of CFG's uncond), the positive tau(z_y). The patched MODEL equals the base MODEL run
    on those token-extended prompts bit for bit; it does NOT equal the base MODEL on the plain prompts, and cannot:
    any appended tokens add keys to every cross-attention softmax (see lora/face_embedder.py)."""
    model, _vae = comfy_models
    flip = flipnets["face_zero"]
    image = _images(2, seed=5)
    base_pos, base_neg = _conds()
    m, pos, neg, latent = _apply(comfy_models, flip, image, phi=1.0)
    n_tok = pos[0][0].shape[1] - 77
    assert n_tok > 0 and neg[0][0].shape == pos[0][0].shape
    null = flip.adapter(torch.zeros(1, n_tok, flip.adapter.cfg.in_dim))
    torch.testing.assert_close(neg[0][0][:, 77:], null.expand(2, -1, -1), atol=1e-6, rtol=0)  # tau(0)
    assert torch.equal(pos[0][0][:, :77], base_pos[0][0].expand(2, -1, -1))
    got = _comparisons(m, pos, neg, latent["samples"])
    same_tokens = _comparisons(model, pos, neg, latent["samples"])
    plain = _comparisons(model, base_pos, base_neg, latent["samples"])
    record_figure("face-token zero ckpt vs base", f"same tokens {_max_diff(got, same_tokens):.1e}; plain prompts "
                                                  f"{_max_diff(got, plain):.2e}")
    assert all(torch.equal(g, r) for g, r in zip(got, same_tokens))
    assert _max_diff(got, plain) > 1e-4


# ---------------------------------------------------------------------------------------------- dtype, offload

BF16_TOL = 0.05  # max |denoised(bf16) - denoised(fp32)| / max |denoised(fp32)|; bf16 keeps 8 mantissa bits (4e-3)


def _load_bf16(tiny_checkpoint, monkeypatch, compute: str):
    """The tiny checkpoint through ComfyUI's loader with bf16 weights (``model_options={"dtype": bf16}``). ``compute``
    "bf16": as on a GPU with bf16 compute (``unet_manual_cast`` says no cast, so the UNet computes in bf16);
    "manual_cast": what ComfyUI does on this CPU (bf16 weights, cast per layer, fp32 compute)."""
    import comfy.model_management as mm
    import comfy.sd

    with monkeypatch.context() as mp:
        if compute == "bf16":
            mp.setattr(mm, "unet_manual_cast", lambda *args, **kwargs: None)
        model, _clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(tiny_checkpoint), output_vae=True, output_clip=False, embedding_directory=None,
            model_options={"dtype": torch.bfloat16})
    return model, vae


@pytest.mark.parametrize("compute", ["bf16", "manual_cast"])
def test_a_bf16_unet_runs_boosthub_and_face_tokens_in_its_compute_dtype(comfy_models, flipnets, tiny_checkpoint,
                                                                         monkeypatch, compute, record_figure):
    import comfyui_bfr.lora.boosthub as bh

    model16, vae16 = _load_bf16(tiny_checkpoint, monkeypatch, compute)
    want = torch.bfloat16 if compute == "bf16" else torch.float32
    assert model16.model.get_dtype() == torch.bfloat16 and fn.unet_compute_dtype(model16) == want
    flip = flipnets["restore"]
    seen = set()
    dispatch = bh.boosthub_forward

    def spy(out, normed, hub, *args, **kwargs):
        result = dispatch(out, normed, hub, *args, **kwargs)
        seen.add((out.dtype, normed.dtype, hub.q_proj.weight.dtype, result[0].dtype))
        return result

    monkeypatch.setattr(bh, "boosthub_forward", spy)
    image = _images(2, seed=8)
    worst = 0.0
    for policy, cache in (("same", False), ("fixed", True)):
        m32, pos32, neg32, _ = _apply(comfy_models, flip, image, t_y_policy=policy, lq_cache=cache)
        m16, pos16, neg16, _ = _apply((model16, vae16), flip, image, t_y_policy=policy, lq_cache=cache)
        (bank,) = m16.additional_models[fn.WRAPPER_KEY]
        assert {p.dtype for p in bank.model.parameters()} == {want}  # the bank follows the UNet's compute dtype
        assert {p.dtype for p in flip.face_patcher(want).model.parameters()} == {want}
        assert pos16[0][0].dtype == torch.float32  # CONDITIONING stays fp32; ComfyUI casts it per call
        torch.testing.assert_close(pos16[0][0], pos32[0][0], atol=0.1, rtol=0.05)  # tokens computed in `want`
        for t in (200, 700):
            sigma = _sigma(m32, t)
            x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(t)) * math.sqrt(1 + sigma**2)
            seen.clear()
            ref = comfy_denoised(m32, pos32, neg32, x, sigma)
            assert seen == {(torch.float32,) * 4}
            seen.clear()
            got = comfy_denoised(m16, pos16, neg16, x, sigma)
            assert seen == {(want,) * 4}  # BoostHub computed in the UNet's compute dtype, nothing cast per call
            assert torch.isfinite(got).all()
            worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
    record_figure(f"bf16 ({compute}) vs fp32", f"max|diff| / max|fp32| = {worst:.1e} (tol {BF16_TOL})")
    assert worst <= BF16_TOL


def test_unload_and_reload_give_the_same_result_and_the_bank_moves_with_the_unet(comfy_models, flipnet):
    """The BoostHub bank is one of the models ComfyUI loads for sampling (set_additional_models) and unloads with
    the UNet; after ``unload_all_models()`` a new run reloads both and gives the same numbers bit for bit."""
    import comfy.model_management as mm

    def loaded(module) -> bool:
        return any(p is not None and p.model is module for p in mm.loaded_models())

    m, pos, neg, latent = _apply(comfy_models, flipnet, _images(2, seed=2), t_y_policy="fixed", lq_cache=True)
    (hub_patcher,) = m.additional_models[fn.WRAPPER_KEY]
    bank = hub_patcher.model
    assert loaded(flipnet.face_patcher(torch.float32).model)  # the face modules were loaded by model management
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * math.sqrt(1 + _sigma(m) ** 2)
    first = (comfy_denoised(m, pos, neg, x, _sigma(m)), _sample(m, pos, neg, latent["samples"]))
    assert loaded(bank) and loaded(m.model)
    assert {p.device for p in bank.parameters()} == {torch.device(hub_patcher.load_device)}

    mm.unload_all_models()
    assert not loaded(bank) and not loaded(m.model) and not loaded(flipnet.face_patcher(torch.float32).model)
    assert {p.device for p in bank.parameters()} == {torch.device(hub_patcher.offload_device)}

    second = (comfy_denoised(m, pos, neg, x, _sigma(m)), _sample(m, pos, neg, latent["samples"]))
    assert loaded(bank) and loaded(m.model)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    m2, pos2, neg2, _ = _apply(comfy_models, flipnet, _images(2, seed=2), t_y_policy="fixed", lq_cache=True)
    assert torch.equal(pos2[0][0], pos[0][0])  # face tokens after the face modules were reloaded
    assert torch.equal(comfy_denoised(m2, pos2, neg2, x, _sigma(m)), first[0])


# ---------------------------------------------------------------------------------------------- below the floor

SHARED_TOL = 1e-5  # |denoised(shared) - denoised(every row)|: the same math, one chunk's float rounding for both


def _shared_patch(m):
    replace = m.model_options["transformer_options"]["patches_replace"]["attn1"]
    assert list(replace) == [("input", 1, 0)]  # the first transformer block only (before any cross-attention)
    return replace[("input", 1, 0)]


@pytest.mark.parametrize("policy,cache", [("same", False), ("fixed", False), ("fixed", True)],
                         ids=["same", "fixed", "fixed-cache"])
def test_cfg_rows_share_the_first_self_attention_layer(comfy_models, flipnet, monkeypatch, policy, cache,
                                                       record_figure):
    """Under CFG the first self-attention layer (and its BoostHub branch) runs once for the equal cond/uncond rows:
    the same numbers as computing every row, within SHARED_TOL; cfg 1 (one chunk) is untouched, bit for bit."""
    import comfy.patcher_extension as pe

    image = _images(2, seed=11)
    m, pos, neg, latent = _apply(comfy_models, flipnet, image, t_y_policy=policy, lq_cache=cache)
    monkeypatch.setattr(fn, "SHARE_CFG_ROWS", False)
    plain, *_ = _apply(comfy_models, flipnet, image, t_y_policy=policy, lq_cache=cache)
    assert "patches_replace" not in plain.model_options["transformer_options"]
    shared = _shared_patch(m)
    rows = []
    attention = shared.attention

    def spy(q, k, v, heads, extra_options):
        rows.append(q.shape[0])
        return attention(q, k, v, heads, extra_options)

    monkeypatch.setattr(shared, "attention", spy)
    worst = 0.0
    for t in (150, 650):
        sigma = _sigma(m, t)
        x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(t)) * math.sqrt(1 + sigma**2)
        before, rows[:] = shared.shared_calls, []
        got = comfy_denoised(m, pos, neg, x, sigma, cfg=1.5)
        assert shared.shared_calls > before
        # joint batch: 2 streams x 2 chunks x 2 images -> 2 x 2 rows; LQ cache: a record and a replay pass of 4 -> 2
        assert rows == ([2, 2] if cache else [4])
        worst = max(worst, (got - comfy_denoised(plain, pos, neg, x, sigma, cfg=1.5)).abs().max().item())
        rows[:] = []
        calls = shared.shared_calls
        assert torch.equal(comfy_denoised(m, pos, neg, x, sigma, cfg=1.0), comfy_denoised(plain, pos, neg, x, sigma,
                                                                                          cfg=1.0))
        assert shared.shared_calls == calls and rows == ([2, 2] if cache else [4])  # one chunk: nothing shared
    out = _sample(m, pos, neg, latent["samples"], steps=3)
    ref = _sample(plain, pos, neg, latent["samples"], steps=3)
    worst = max(worst, (out - ref).abs().max().item())
    record_figure(f"shared CFG rows vs every row ({policy}{'+cache' if cache else ''})", f"max|diff| {worst:.1e}")
    assert worst <= SHARED_TOL

    # rows that differ between chunks (another latent per chunk, as area conds would give) are computed one by one
    seen = []

    def different_chunks(executor, x, *args, **kwargs):
        seen.append(True)
        return executor(x + torch.linspace(0, 0.1, x.shape[0]).view(-1, 1, 1, 1).to(x), *args, **kwargs)

    m2 = m.clone()
    m2.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "perturb", different_chunks)
    calls = shared.shared_calls
    comfy_denoised(m2, pos, neg, x, sigma, cfg=1.5)
    assert seen and shared.shared_calls == calls


# ---------------------------------------------------------------------------------------------- patch, never mutate


def test_apply_and_sample_leave_the_input_model_untouched(comfy_models, flipnet, tiny_checkpoint):
    model, _vae = comfy_models
    pos, neg = _conds()
    latent = torch.zeros(1, 4, 4, 4)
    # ComfyUI unpatches lazily: the shared module holds the weights of whichever clone was loaded last, so the
    # fingerprints are taken right after sampling with the input MODEL (which loads it)
    plain_before = _sample(model, pos, neg, latent)
    before = (_fingerprint(model), repr(model.model_options), dict(model.object_patches), len(model.patches),
              {k: dict(v) for k, v in model.wrappers.items()}, dict(model.additional_models))

    m, fpos, fneg, flat = _apply(comfy_models, flipnet, _images(1))
    restored = _sample(m, fpos, fneg, flat["samples"])
    assert torch.isfinite(restored).all() and restored.shape == (1, 4, 4, 4)
    assert torch.equal(restored, _sample(m, fpos, fneg, flat["samples"]))  # deterministic
    assert not torch.equal(restored, _sample(m, fpos, fneg, flat["samples"], seed=4))
    assert not torch.allclose(restored, _sample(model, fpos, fneg, flat["samples"]), atol=1e-4)

    plain_after = _sample(model, pos, neg, latent)
    after = (_fingerprint(model), repr(model.model_options), dict(model.object_patches), len(model.patches),
             {k: dict(v) for k, v in model.wrappers.items()}, dict(model.additional_models))
    assert after == before
    assert torch.equal(plain_after, plain_before)
    with safe_open(str(tiny_checkpoint), framework="pt") as f:  # and those are the checkpoint's own weights
        sd = model.model.diffusion_model.state_dict()
        for key in [k for k in f.keys() if k.startswith("model.diffusion_model.") and "attn1" in k]:
            assert torch.equal(sd[key[len("model.diffusion_model."):]], f.get_tensor(key).to(torch.float32)), key
    assert pos[0][0].shape == (1, 77, 1024)  # conditioning inputs not modified either


def test_clones_share_the_patch_objects_and_weights(comfy_models, flipnet):
    m, *_ = _apply(comfy_models, flipnet, _images(1))
    c = m.clone()
    deep = copy.deepcopy(m.model_options)
    for opts in (c.model_options, deep):
        for name in ("attn1_patch", "attn1_output_patch"):
            assert [id(p) for p in opts["transformer_options"]["patches"][name]] == \
                [id(p) for p in m.model_options["transformer_options"]["patches"][name]]
        assert opts["transformer_options"]["patches_replace"]["attn1"][("input", 1, 0)] is _shared_patch(m)
    out_patch = c.model_options["transformer_options"]["patches"]["attn1_output_patch"][0]
    assert out_patch.hubs is flipnet.hubs and out_patch.source == flipnet.name  # fp32 UNet: the file's bank itself
    (hub_patcher,) = c.additional_models[fn.WRAPPER_KEY]
    assert hub_patcher.model is flipnet.hubs
    assert fn.joint_batch_wrapper(c) is fn.joint_batch_wrapper(m)
    ptrs = {p.data_ptr() for p in flipnet.hubs.parameters()}
    assert {p.data_ptr() for p in hub_patcher.model.parameters()} == ptrs


# ---------------------------------------------------------------------------------------------- modes, batches


def test_degrade_mode_uses_no_face_tokens_and_the_fixed_condition(comfy_models, files):
    degrade = fn.load_flipnet(str(files["degrade"]))
    pos, neg = _conds()
    m, p2, n2, latent = _apply(comfy_models, degrade, _images(1), t_y_policy="checkpoint")
    assert p2[0][0] is pos[0][0] or torch.equal(p2[0][0], pos[0][0])
    assert p2[0][0].shape == (1, 77, 1024) and n2[0][0].shape == (1, 77, 1024)
    assert fn.joint_batch_wrapper(m).sigma_y == pytest.approx(_sigma(m, 60))  # checkpoint: fixed, t_y = 60
    out = _sample(m, p2, n2, latent["samples"], cfg=1.0)
    assert torch.isfinite(out).all()


def test_one_image_serves_a_latent_batch_and_gray_rgba_inputs(comfy_models, flipnet):
    image = _images(1, seed=9)
    m, pos, neg, _ = _apply(comfy_models, flipnet, image)
    out = _sample(m, pos, neg, torch.zeros(2, 4, 4, 4))
    assert out.shape == (2, 4, 4, 4) and torch.isfinite(out).all()
    rgba = torch.cat([image, torch.ones_like(image[..., :1])], -1)
    assert _apply(comfy_models, flipnet, rgba)[1][0][0].shape == pos[0][0].shape
    assert _apply(comfy_models, flipnet, image[..., :1])[1][0][0].shape == pos[0][0].shape


# ---------------------------------------------------------------------------------------------- bad input


def _sd15_like_model(comfy_models):
    """A real ComfyUI MODEL whose UNet has 768-wide cross-attention (SD1.x-style), built without weights."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    model, _ = comfy_models
    cfg = dict(model.model.model_config.unet_config, context_dim=768)
    config = comfy.supported_models.SD15(cfg)
    base = config.get_model({})
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def test_non_sd21_model_is_a_clear_error(comfy_models, flipnet):
    sd15 = _sd15_like_model(comfy_models)
    _, vae = comfy_models
    pos, neg = _conds()
    with pytest.raises(NodeInputError, match=r"\[BFR Apply FlipNet\].*context_dim=768.*SD2\.1-base"):
        fn.BFRApplyFlipNet().apply(sd15, flipnet, vae, _images(1), pos, neg, 1.0, "same", 60, True, 0)


def test_wrong_files_are_clear_errors(tmp_path, files, tiny_checkpoint):
    with pytest.raises(NodeInputError, match=r"\[BFR Load FlipNet\] .*tiny.*bfr_format is None.*flipnet/1.*models/bfr"):
        fn.load_flipnet(str(tiny_checkpoint))
    pair = tmp_path / "face_ae.safetensors"
    ck.save_face_ae_checkpoint(pair, FaceAutoencoderPair(TINY_FACE), stage="assoc", image_size=16)
    with pytest.raises(NodeInputError, match=r"face_ae\.safetensors: bfr_format is 'flipnet-face-ae/1'"):
        fn.load_flipnet(str(pair))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(files["restore"].read_bytes()[:5000])
    with pytest.raises(NodeInputError, match=r"broken\.safetensors: cannot be read.*corrupt or truncated"):
        fn.load_flipnet(str(broken))
    odd = tmp_path / "odd.safetensors"
    save_file({"something.weight": torch.zeros(2)}, str(odd), metadata={"bfr_format": "flipnet/1",
                                                                         "base_model": "sd2.1-base",
                                                                         "mode": "restore"})
    with pytest.raises(NodeInputError, match=r"odd\.safetensors: .*outside the known namespaces"):
        fn.load_flipnet(str(odd))


def test_loader_node_reads_models_bfr(files):
    import folder_paths

    saved = copy.deepcopy(folder_paths.folder_names_and_paths.get("bfr"))
    try:
        fn.BFRLoadFlipNet.INPUT_TYPES()  # registers models/bfr
        folder_paths.add_model_folder_path("bfr", str(files["restore"].parent))
        names = fn.BFRLoadFlipNet.INPUT_TYPES()["required"]["flipnet_name"][0]
        assert "flipnet_restore.safetensors" in names
        (loaded,) = fn.BFRLoadFlipNet().load("flipnet_restore.safetensors")
        assert loaded.mode == "restore" and loaded.has_face_embedder
        assert len(loaded.hubs.paths()) == 4  # tiny UNet: input 1, middle 0, output 2 and 3
        with pytest.raises(NodeInputError, match=r"\[BFR Load FlipNet\] 'missing.safetensors' is not in models/bfr"):
            fn.BFRLoadFlipNet().load("missing.safetensors")
    finally:
        if saved is None:
            folder_paths.folder_names_and_paths.pop("bfr", None)
        else:
            folder_paths.folder_names_and_paths["bfr"] = saved


@pytest.mark.parametrize("kw,match", [
    (dict(t_y_policy="sometimes"), r"t_y_policy must be one of"),
    (dict(phi=-0.5), r"phi must be in \[0, 2\]"),
    (dict(t_y=1000, t_y_policy="fixed"), r"t_y must be an integer timestep"),
])
def test_bad_parameters_name_node_value_and_fix(comfy_models, flipnet, kw, match):
    with pytest.raises(NodeInputError, match=rf"\[BFR Apply FlipNet\].*{match}"):
        _apply(comfy_models, flipnet, _images(1), **kw)


def test_bad_images_and_batches(comfy_models, flipnet):
    with pytest.raises(NodeInputError, match="multiples of 8"):
        _apply(comfy_models, flipnet, _images(1)[:, :30])
    bad = _images(1)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NodeInputError, match="NaN or inf"):
        _apply(comfy_models, flipnet, bad)
    m, pos, neg, _ = _apply(comfy_models, flipnet, _images(2))
    # raised inside ComfyUI's sampler (the APPLY_MODEL wrapper): a NodeInputError naming the node, shown by ComfyUI
    # as its str() (execution.py: "exception_message": "{}\n{}".format(ex, tips))
    with pytest.raises(NodeInputError, match=r"^\[BFR Apply FlipNet\] the sampled latent has batch 3 but the "
                                             r"condition IMAGE has 2 images; sample the LATENT output of BFR Apply "
                                             r"FlipNet"):
        _sample(m, pos, neg, torch.zeros(3, 4, 4, 4))
    with pytest.raises(NodeInputError, match=r"^\[BFR Apply FlipNet\] the sampled latent \(4, 8, 8\) does not match "
                                             r"the condition"):
        _sample(m, pos, neg, torch.zeros(2, 4, 8, 8))


def test_validate_inputs():
    v = fn.BFRApplyFlipNet.VALIDATE_INPUTS
    assert v(phi=1.0, t_y_policy="same", t_y=100) is True
    assert v(phi=None, t_y_policy=None, t_y=None) is True  # linked inputs: checked at run time
    assert "phi must be" in v(phi=2.5)
    assert "t_y_policy must be" in v(t_y_policy="sometimes")
    # the mode is the checkpoint's: no widget can override it
    inputs = fn.BFRApplyFlipNet.INPUT_TYPES()["required"]
    assert list(inputs) == ["model", "flipnet", "vae", "image", "positive", "negative", "phi", "t_y_policy", "t_y",
                            "lq_cache", "seed"]
    for cls in (fn.BFRLoadFlipNet, fn.BFRApplyFlipNet):
        for name, spec in cls.INPUT_TYPES()["required"].items():
            assert spec[1].get("tooltip"), f"{cls.__name__}.{name} has no tooltip"
        assert cls.DESCRIPTION and len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
    assert set(fn.NODE_CLASS_MAPPINGS) == {"BFRLoadFlipNet", "BFRApplyFlipNet"}


# ---------------------------------------------------------------------------------------------- doors, errors in ComfyUI

_SD15_KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"


def _write_sd15_lora(src, dst):
    """A copy of a FlipNet file whose attn2.to_k LoRA reads 768-wide contexts (SD1.x) instead of SD2.1's 1024."""
    tensors = load_file(str(src))
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    tensors[_SD15_KEY] = torch.zeros(tensors[_SD15_KEY].shape[0], 768)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_loader_node_door_names_the_file_and_the_misfit(files, tmp_path):
    """ComfyUI's LoRA code would only log an error for a 768-wide pair at merge time and leave the layer unpatched;
    the Load node refuses the file with the key, the layer and both widths."""
    import folder_paths

    _write_sd15_lora(files["restore"], tmp_path / "flipnet_sd15_lora.safetensors")
    saved = copy.deepcopy(folder_paths.folder_names_and_paths.get("bfr"))
    try:
        fn.BFRLoadFlipNet.INPUT_TYPES()
        folder_paths.add_model_folder_path("bfr", str(tmp_path))
        with pytest.raises(NodeInputError, match=(
                r"^\[BFR Load FlipNet\] flipnet_sd15_lora\.safetensors: LoRA down projection "
                + _SD15_KEY.replace(".", r"\.") + r" is 4x768, but the layer it targets "
                r"\(down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k\) takes 1024-wide inputs")):
            fn.BFRLoadFlipNet().load("flipnet_sd15_lora.safetensors")
    finally:
        if saved is None:
            folder_paths.folder_names_and_paths.pop("bfr", None)
        else:
            folder_paths.folder_names_and_paths["bfr"] = saved


def _flipnet_prompt(checkpoint_name, flipnet_name, image_name, latent_px):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint_name}},
        "2": {"class_type": "BFRLoadFlipNet", "inputs": {"flipnet_name": flipnet_name}},
        "3": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "5": {"class_type": "BFRApplyFlipNet", "inputs": {
            "model": ["1", 0], "flipnet": ["2", 0], "vae": ["1", 2], "image": ["3", 0], "positive": ["4", 0],
            "negative": ["4", 0], "phi": 1.0, "t_y_policy": "fixed", "t_y": 60, "lq_cache": True,
            "seed": 0}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": latent_px, "height": latent_px, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["5", 0], "positive": ["5", 1], "negative": ["5", 2], "latent_image": ["6", 0], "seed": 0,
            "steps": 1, "cfg": 1.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }


def test_comfyui_shows_the_node_errors(comfy_server, files, tmp_path):
    """Through a real server: a bad file fails in BFR Load FlipNet, and an error raised while sampling (inside the
    APPLY_MODEL wrapper) fails in KSampler -- both as NodeInputError with the words users read, nothing split."""
    from comfyui_bfr.cli.client import PromptFailed

    bfr = comfy_server.base / "models" / "bfr"
    bfr.mkdir(parents=True, exist_ok=True)
    (bfr / "flipnet_restore.safetensors").write_bytes(files["restore"].read_bytes())
    _write_sd15_lora(files["restore"], bfr / "flipnet_sd15_lora.safetensors")
    face = tmp_path / "face32.png"
    Image.fromarray((_images(1, seed=3)[0].numpy() * 255).astype("uint8")).save(face)
    with comfy_server.client() as client:
        name = client.upload_image(face)
        failures = {}
        for case, (flipnet_name, px) in {"door": ("flipnet_sd15_lora.safetensors", SIZE),
                                         "sampling": ("flipnet_restore.safetensors", 2 * SIZE)}.items():
            prompt_id = client.queue(_flipnet_prompt(comfy_server.checkpoint_name, flipnet_name, name, px))
            with pytest.raises(PromptFailed) as info:
                client.wait(prompt_id, timeout=600)
            failures[case] = info.value
    door, sampling = failures["door"], failures["sampling"]
    assert (door.node_id, door.node_type) == ("2", "BFRLoadFlipNet")
    assert door.exception_type.endswith("NodeInputError")
    assert door.exception_message.startswith("[BFR Load FlipNet] flipnet_sd15_lora.safetensors: LoRA down projection "
                                             f"{_SD15_KEY} is 4x768"), door.exception_message
    assert (sampling.node_id, sampling.node_type) == ("7", "KSampler")
    assert sampling.exception_type.endswith("NodeInputError")
    assert sampling.exception_message.startswith("[BFR Apply FlipNet] the sampled latent (4, 8, 8) does not match the "
                                                 "condition image's latent (4, 4, 4)"), sampling.exception_message

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


def _write_flipnet(path, mode="restore", zero_boosthub=False, phi=1.0, policy="same", t_y=60):
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
            else:  # BoostHub q/k/v (start = self-attention weights) and W_o (starts at zero)
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    kw = {}
    if mode == "restore":
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
    }


@pytest.fixture(scope="module")
def flipnet(files):
    return fn.load_flipnet(str(files["restore"]))


@pytest.fixture(scope="module")
def pipe(files):
    comps = tiny_sd.build_tiny_pipeline_components(0)
    return FlipNetPipeline.from_checkpoint(None, files["restore"], components=comps)


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
    params = dict(mode="restore", phi=1.0, t_y_policy="same", t_y=60, seed=5)
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
def diffusers_denoised(pipe, x, sigma, t, cond_latent, eps_y, t_y, pos, neg, cfg=1.5):
    """The pipeline's step math on the diffusers UNet: joint batch cat([x_t, y_{t_y}]), CFG, x0 = x - sigma eps."""
    b = x.shape[0]
    alphas = pipe.train_alphas
    x_in = (x / math.sqrt(1.0 + sigma**2)).repeat(2, 1, 1, 1)
    y = q_sample(cond_latent, eps_y, alphas, torch.full((b,), t_y, dtype=torch.long)).repeat(2, 1, 1, 1)
    context = torch.cat([neg, pos])
    tt = torch.full((2 * b,), t)
    ty = torch.full((2 * b,), t_y)
    out = pipe.unet(torch.cat([x_in, y]), torch.cat([tt, ty]), torch.cat([context, context])).sample[: 2 * b]
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


@pytest.mark.parametrize("policy,t_y,cache", [("same", None, False), ("fixed", 60, False), ("fixed", 60, True)])
def test_comfy_path_equals_the_diffusers_flipnet_path(comfy_models, flipnet, pipe, policy, t_y, cache):
    image = _images(2)
    m, pos, neg, latent = _apply(comfy_models, flipnet, image, t_y_policy=policy, t_y=t_y or 0, lq_cache=cache)
    wrapper = fn.joint_batch_wrapper(m)
    assert latent["samples"].shape == (2, 4, SIZE // 8, SIZE // 8) and not latent["samples"].any()
    sigma = _sigma(m)
    x = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(1)) * math.sqrt(1 + sigma**2)
    got = comfy_denoised(m, pos, neg, x, sigma)

    c_id, c_null = pipe.face_tokens(image.movedim(-1, 1))
    base_pos, base_neg = _conds()
    ref_pos = torch.cat([base_pos[0][0].expand(2, -1, -1), c_id], 1)
    ref_neg = torch.cat([base_neg[0][0].expand(2, -1, -1), c_null], 1)
    torch.testing.assert_close(pos[0][0], ref_pos, atol=1e-5, rtol=1e-5)  # face tokens: same encoder + adapter
    torch.testing.assert_close(neg[0][0], ref_neg, atol=1e-5, rtol=1e-5)
    pipe.state.phi = 1.0
    ref = diffusers_denoised(pipe, x, sigma, T_IDX, wrapper.condition, wrapper.noise, t_y or T_IDX, ref_pos, ref_neg)
    err = (got - ref).abs().max().item()
    logger.warning("parity %s (LQ cache %s): max |denoised diff| = %.2e (|denoised| max %.2f)", policy, cache, err,
                   ref.abs().max().item())
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert wrapper.condition_passes == (1 if cache else 0)

    # the condition latent is the VAE encoding of the image in model space, as the diffusers pipeline makes it
    torch.testing.assert_close(wrapper.condition, vae_encode(pipe.vae, image.movedim(-1, 1)), atol=2e-4, rtol=1e-3)


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
    torch.testing.assert_close(comfy_denoised(m0, pos, neg, x, sigma), reference, atol=1e-5, rtol=1e-5)
    assert (comfy_denoised(m1, pos, neg, x, sigma) - reference).abs().max() > 1e-3  # BoostHub does something

    zero = fn.load_flipnet(str(files["zero_hub"]))
    mz, pos_z, neg_z, _ = _apply(comfy_models, zero, image, phi=2.0)
    lora_z, _ = comfy.sd.load_lora_for_models(model, None, zero.checkpoint.lora, 1.0, 0)
    torch.testing.assert_close(comfy_denoised(mz, pos_z, neg_z, x, sigma), comfy_denoised(lora_z, pos_z, neg_z, x,
                                                                                          sigma), atol=1e-5,
                               rtol=1e-5)
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
    out_patch = c.model_options["transformer_options"]["patches"]["attn1_output_patch"][0]
    assert out_patch.hubs is flipnet.hubs and out_patch.source == flipnet.name
    (hub_patcher,) = c.additional_models[fn.WRAPPER_KEY]
    assert hub_patcher.model is flipnet.hubs
    assert fn.joint_batch_wrapper(c) is fn.joint_batch_wrapper(m)
    ptrs = {p.data_ptr() for p in flipnet.hubs.parameters()}
    assert {p.data_ptr() for p in hub_patcher.model.parameters()} == ptrs


# ---------------------------------------------------------------------------------------------- modes, batches


def test_degrade_mode_uses_no_face_tokens_and_the_fixed_condition(comfy_models, files):
    degrade = fn.load_flipnet(str(files["degrade"]))
    pos, neg = _conds()
    m, p2, n2, latent = _apply(comfy_models, degrade, _images(1), mode="degrade", t_y_policy="checkpoint")
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
        fn.BFRApplyFlipNet().apply(sd15, flipnet, vae, _images(1), pos, neg, "restore", 1.0, "same", 60, True, 0)


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
    (dict(mode="degrade"), r"restore-mode checkpoint; set mode to 'restore'"),
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
    assert v(mode="restore", phi=1.0, t_y_policy="same", t_y=100) is True
    assert v(mode=None, phi=None, t_y_policy=None, t_y=None) is True  # linked inputs: checked at run time
    assert "phi must be" in v(phi=2.5)
    assert "mode must be" in v(mode="upscale")
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
            "negative": ["4", 0], "mode": "restore", "phi": 1.0, "t_y_policy": "fixed", "t_y": 60, "lq_cache": True,
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

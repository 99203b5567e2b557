"""DR-BFR's LDRM on SD2.1 (lora/ldrm.py, lora/cond_checkpoint.py, train/drbfr.py, pipelines/drbfr.py)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from comfyui_bfr.lora import checkpoint as ck
from comfyui_bfr.lora import cond_checkpoint as cc
from comfyui_bfr.lora.dr_module import DegradationEncoder, DRConfig
from comfyui_bfr.lora.ldrm import ConcatConvIn, ConditioningError, DRPrompt, DRPromptConfig, concat_unet_eps, \
    install_concat_conv_in
from comfyui_bfr.pipelines.drbfr import DRBFRPipeline, DRBFRSampleConfig
from comfyui_bfr.train.drbfr import DRBFRTrainConfig, conditional_ldm_loss, prepare_conditional_unet, train_drbfr
from comfyui_bfr.train.flipnet import FrozenParts
from fixtures.flipnet import build_micro_unet, micro_components, write_faces, write_flipnet_checkpoint

SMALL_DR = DRConfig(encoder_blocks=((8,), (16,)), num_tokens=4, token_dim=16, proj_hidden=16, proj_dim=8,
                    gen_channels=(8, 16), mod_hidden=8)


def _inputs(seed=0, b=2, hw=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, hw, hw, generator=g), torch.randn(b, 4, hw, hw, generator=g),
            torch.randn(b, 77, 1024, generator=g) * 0.5, torch.randn(b, 4, 16, generator=g))


def _randomize_lora_and_extra(unet, seed=1, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n or n == "conv_in.extra":
                p.copy_(torch.randn(p.shape, generator=g) * std)


def test_zero_extra_channels_are_an_exact_no_op():
    unet = build_micro_unet(0)
    z, lq, text, _ = _inputs()
    t = torch.tensor([10, 700])
    with torch.no_grad():
        plain = unet(z, t, encoder_hidden_states=text).sample
        install_concat_conv_in(unet)
        widened = concat_unet_eps(unet, z, t, text, lq)
    assert torch.equal(plain, widened)  # bit for bit: y + conv(c, 0) adds exact zeros


def test_concat_conv_in_is_one_convolution_over_the_concatenation():
    base = torch.nn.Conv2d(4, 32, 3, padding=1)
    w = torch.randn(32, 4, 3, 3)
    conv = ConcatConvIn(base, 4, w)
    x = torch.randn(2, 8, 9, 7)
    full = F.conv2d(x, torch.cat([base.weight, w], dim=1), base.bias, padding=1)  # an 8-channel conv_in
    assert torch.allclose(conv(x), full, atol=1e-5)
    with pytest.raises(ConditioningError, match="8 input channels.*got 4.*LQ latent was not attached"):
        conv(x[:, :4])
    with pytest.raises(ValueError, match=r"\(32, 4, 3, 3\)"):
        ConcatConvIn(base, 4, torch.zeros(32, 3, 3, 3))


def test_dr_tokens_follow_mlp_of_t():
    torch.manual_seed(0)
    prompt = DRPrompt(DRPromptConfig(token_dim=16, num_tokens=4, hidden=32))
    with torch.no_grad():
        for p in prompt.time_mlp.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    f = torch.randn(3, 4, 16)
    t = torch.tensor([0.0, 250.5, 999.0])
    # the sinusoidal embedding written out from SD's formula, then Eq. 10 by hand
    half = 160
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
    emb = torch.tensor(np.concatenate([np.cos(t.numpy()[:, None] * freqs), np.sin(t.numpy()[:, None] * freqs)], 1),
                       dtype=torch.float32)
    l1, _, l2 = prompt.time_mlp
    ab = F.linear(F.silu(F.linear(emb, l1.weight, l1.bias)), l2.weight, l2.bias)
    alpha, beta = ab[:, :16], ab[:, 16:]
    want = F.linear(alpha[:, None] * f + beta[:, None], prompt.proj.weight, prompt.proj.bias)
    with torch.no_grad():
        got = prompt(f, t)
    assert torch.allclose(got, want, atol=1e-5)
    # tokens really depend on t, and the fresh MLP starts at alpha = 1, beta = 0
    assert (got[1] - prompt(f[1:2], torch.tensor([0.0]))[0]).abs().max() > 1e-3
    fresh = DRPrompt(DRPromptConfig(token_dim=16, num_tokens=4))
    a0, b0 = fresh.modulation(torch.tensor([3.0, 900.0]))
    assert torch.equal(a0, torch.ones_like(a0)) and torch.equal(b0, torch.zeros_like(b0))
    with pytest.raises(ConditioningError, match=r"\(B, 4, 16\)"):
        prompt(torch.randn(1, 9, 16), torch.tensor([1.0]))


def _drbfr_unet(seed=0):
    unet = build_micro_unet(seed)
    prepare_conditional_unet(unet, rank=4, alpha=4.0, what="DR-BFR")
    _randomize_lora_and_extra(unet, seed + 1)
    return unet.eval()


def _dr_modules(seed=0):
    torch.manual_seed(seed)
    enc = DegradationEncoder(SMALL_DR).eval()
    prompt = DRPrompt(DRPromptConfig(token_dim=16, num_tokens=4, hidden=32)).eval()
    return enc, prompt


def test_checkpoint_round_trip_gives_the_same_eps(tmp_path):
    unet = _drbfr_unet()
    enc, prompt = _dr_modules()
    path = cc.save_conditional_checkpoint(tmp_path / "drbfr.safetensors", unet, fmt=cc.DRBFR_FORMAT,
                                          modules={"dr_encoder": enc, "dr_prompt": prompt},
                                          defaults={"guidance_scale": 1.0})
    ckpt = cc.read_conditional_checkpoint(path)
    assert ckpt.fmt == "drbfr/1" and ckpt.rank == 4 and ckpt.extra_channels == 4 and not ckpt.conv_in_is_zero
    fresh = build_micro_unet(0)
    cc.apply_conditional_checkpoint(fresh, ckpt)
    z, lq, text, _ = _inputs()
    image = torch.rand(2, 3, 64, 64)
    t = torch.tensor([5, 500])
    with torch.no_grad():
        f_src = enc(image)
        f_new = ckpt.build("dr_encoder")(image)
        want = concat_unet_eps(unet, z, t, text, lq, prompt, f_src)
        got = concat_unet_eps(fresh.eval(), z, t, text, lq, ckpt.build("dr_prompt"), f_new)
    assert torch.equal(f_src, f_new)
    assert torch.allclose(got, want, atol=1e-5)
    # the LoRA keys are kohya keys: a FlipNet reader refuses the file with a hint, and vice versa
    with pytest.raises(ck.CheckpointError, match="DR-BFR checkpoint: load it with BFR Load DR-BFR"):
        ck.read_flipnet_checkpoint(path)
    flip = write_flipnet_checkpoint(tmp_path / "flip.safetensors", "degrade")
    with pytest.raises(ck.CheckpointError, match="FlipNet checkpoint: load it with BFR Load FlipNet"):
        cc.read_conditional_checkpoint(flip)
    with pytest.raises(ck.CheckpointError, match="expected 'clrface/1'.*It is a DR-BFR checkpoint"):
        cc.read_conditional_checkpoint(path, cc.CLRFACE_FORMAT)


def test_damaged_files_are_refused_with_the_reason(tmp_path):
    unet = _drbfr_unet()
    enc, prompt = _dr_modules()
    path = cc.save_conditional_checkpoint(tmp_path / "d.safetensors", unet, fmt=cc.DRBFR_FORMAT,
                                          modules={"dr_encoder": enc, "dr_prompt": prompt})
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()

    def write(name, t, m=None):
        save_file(t, str(tmp_path / name), metadata=m or meta)
        return tmp_path / name

    bad = dict(tensors, **{"conv_in_extra.weight": torch.zeros(32, 3, 3, 3)})
    with pytest.raises(ck.CheckpointError, match=r"conv_in_extra.weight is \(32, 3, 3, 3\).*\(32, 4, 3, 3\)"):
        cc.read_conditional_checkpoint(write("a.safetensors", bad))
    no_prompt = {k: v for k, v in tensors.items() if not k.startswith("dr_prompt.")}
    with pytest.raises(ck.CheckpointError, match="no 'dr_prompt.\\*' weights"):
        cc.read_conditional_checkpoint(write("b.safetensors", no_prompt))
    wide = dict(tensors, **{"dr_encoder.to_tokens.weight": torch.zeros(99, 16, 1, 1)})
    with pytest.raises(ck.CheckpointError, match=r"dr_encoder.to_tokens.weight is 99x16x1x1.*bfr train drbfr"):
        cc.read_conditional_checkpoint(write("c.safetensors", wide))
    pickled = tmp_path / "x.ckpt"
    pickled.write_bytes(b"not a safetensors file")
    with pytest.raises(ck.CheckpointError, match="expected a .safetensors"):
        cc.read_conditional_checkpoint(pickled)


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    root = tmp_path_factory.mktemp("drbfr_faces")
    write_faces(root, 4, size=64)
    return root


def test_conditional_ldm_loss_falls_on_a_fixed_batch():
    comps = micro_components(0)
    unet = comps["unet"]
    prepare_conditional_unet(unet, rank=4, alpha=4.0, what="DR-BFR")
    enc, prompt = _dr_modules()
    from comfyui_bfr.train.drbfr import ConditionalUNet

    module = ConditionalUNet(unet, prompt, enc)
    frozen = FrozenParts(vae=comps["vae"].requires_grad_(False), text_encoder=comps["text_encoder"],
                         tokenizer=comps["tokenizer"], alphas_cumprod=comps["scheduler"].alphas_cumprod)
    g = torch.Generator().manual_seed(0)
    hq = torch.rand(2, 3, 64, 64, generator=g)
    lq = (hq + 0.1 * torch.randn(hq.shape, generator=g)).clamp(0, 1)
    params = [p for p in module.parameters() if p.requires_grad]
    assert any(p is unet.conv_in.extra for p in params) and len(params) > 1
    opt = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for _ in range(8):
        loss, _ = conditional_ldm_loss(module, frozen, hq, lq, ["", ""], 0.0, torch.Generator().manual_seed(1),
                                       timesteps=torch.tensor([300, 600]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses
    assert unet.conv_in.extra.abs().max() > 0  # the LQ channels were trained


def test_training_run_exports_a_loadable_file_and_resumes(faces, tmp_path):
    out = tmp_path / "run"
    cfg = dict(hq_dir=str(faces), output_dir=str(out), resolution=64, train_batch_size=2, max_train_steps=2,
               lora_rank=4, checkpointing_steps=2, validation_steps=2, num_validation_images=2,
               validation_inference_steps=2, dataloader_num_workers=0, allow_random_dr_encoder=True, seed=1)
    final = train_drbfr(DRBFRTrainConfig(**cfg), components=micro_components(0))
    ckpt = cc.read_conditional_checkpoint(final, cc.DRBFR_FORMAT)
    assert ckpt.rank == 4 and set(ckpt.modules) == {"dr_encoder", "dr_prompt"}
    assert (out / "validation" / "drbfr_step_0000002.png").is_file()
    resumed = train_drbfr(DRBFRTrainConfig(**dict(cfg, max_train_steps=3, checkpointing_steps=1, validation_steps=0,
                                                   resume_from_checkpoint="latest")), components=micro_components(0))
    assert (out / "checkpoint-3").is_dir() and resumed.is_file()
    # the pipeline samples from the exported file, deterministically by seed
    comps = micro_components(0)
    pipe = DRBFRPipeline.from_checkpoint(None, resumed, components=comps)
    lq = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    a = pipe(lq, DRBFRSampleConfig(num_inference_steps=2, seed=4))
    b = pipe(lq, DRBFRSampleConfig(num_inference_steps=2, seeds=[4, 5]))
    c = pipe(lq[1:], DRBFRSampleConfig(num_inference_steps=2, seed=5))
    assert torch.equal(a, b) and torch.allclose(a[1:], c, atol=1e-5)  # row i: seed + i, independent of batching
    off = pipe(lq, DRBFRSampleConfig(num_inference_steps=2, seed=4, use_dr_prompt=False))
    assert (off - a).abs().max() > 1e-4


def test_cli_restores_a_folder_and_parses_its_flags(faces, tmp_path):
    from comfyui_bfr.cli.folders import DRBFRRestoreConfig, restore_drbfr
    from comfyui_bfr.cli.main import build_parser

    argv = ["restore", "in", "out", "--method", "drbfr", "--checkpoint", "d.safetensors", "--no-use-dr-prompt",
            "--num-inference-steps", "3"]
    ns = build_parser(argv).parse_args(argv)
    assert ns.method == "drbfr" and ns.use_dr_prompt is False and ns.num_inference_steps == 3
    unet = _drbfr_unet()
    comps = micro_components(0)
    enc, prompt = _dr_modules()
    pipe = DRBFRPipeline(unet, comps["vae"], comps["text_encoder"], comps["tokenizer"], comps["scheduler"], enc, prompt)
    cfg = DRBFRRestoreConfig(input=str(faces), out_dir=str(tmp_path / "out"), checkpoint="unused", size=64,
                             num_inference_steps=2, batch_size=3)
    written = restore_drbfr(cfg, pipeline=pipe)
    assert sorted(p.name for p in written) == sorted(p.name for p in faces.glob("*.png")) and len(written) == 4
    with pytest.raises(ValueError, match="--checkpoint is required"):
        restore_drbfr(DRBFRRestoreConfig(input=str(faces), out_dir=str(tmp_path / "o2")))


def test_config_errors_name_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--dr-encoder.*bfr train dr-encoder"):
        DRBFRTrainConfig(hq_dir=str(tmp_path), output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="--hq-dir"):
        DRBFRTrainConfig(output_dir=str(tmp_path), allow_random_dr_encoder=True)
    with pytest.raises(ValueError, match="--lambda-perceptual.*L_LDM alone"):
        DRBFRTrainConfig(hq_dir=str(tmp_path), allow_random_dr_encoder=True, lambda_perceptual=0.1)


def test_pipeline_refuses_bad_images():
    unet = _drbfr_unet()
    comps = micro_components(0)
    enc, prompt = _dr_modules()
    pipe = DRBFRPipeline(unet, comps["vae"], comps["text_encoder"], comps["tokenizer"], comps["scheduler"], enc, prompt)
    with pytest.raises(ValueError, match="multiples of 8"):
        pipe(torch.rand(1, 3, 60, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        pipe(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="NaN"):
        pipe(torch.full((1, 3, 64, 64), float("nan")))
    copy.deepcopy(pipe.dr_prompt)  # plain modules: picklable / copyable for the node's cast copies


def test_dr_encoder_file_round_trip_and_use_in_training(faces, tmp_path):
    from comfyui_bfr.lora.dr_checkpoint import read_dr_checkpoint, save_dr_checkpoint
    from comfyui_bfr.lora.dr_module import DRModule

    torch.manual_seed(2)
    module = DRModule(SMALL_DR).eval()
    path = save_dr_checkpoint(tmp_path / "dr_encoder.safetensors", module, patch_size=32)
    back, meta = read_dr_checkpoint(path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), module(x)) and meta["patch_size"] == "32"
    # a DR-BFR file, a FlipNet file and a wrong-shaped tensor are refused with what they are
    flip = write_flipnet_checkpoint(tmp_path / "flip.safetensors", "degrade")
    with pytest.raises(ck.CheckpointError, match="expected 'drbfr-dr/1'.*FlipNet checkpoint"):
        read_dr_checkpoint(flip)
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors["dr.encoder.to_tokens.weight"] = torch.zeros(5, 16, 1, 1)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ck.CheckpointError, match="dr.encoder.to_tokens.weight is 5x16x1x1.*bfr train dr-encoder"):
        read_dr_checkpoint(tmp_path / "bad.safetensors")
    # bfr train drbfr embeds exactly that E_DR
    out = tmp_path / "run"
    final = train_drbfr(DRBFRTrainConfig(hq_dir=str(faces), output_dir=str(out), resolution=64, train_batch_size=2,
                                         max_train_steps=1, lora_rank=4, checkpointing_steps=1, validation_steps=0,
                                         dataloader_num_workers=0, dr_encoder=str(path)),
                        components=micro_components(0))
    ckpt = cc.read_conditional_checkpoint(final)
    assert ckpt.configs["dr_encoder"] == SMALL_DR
    with torch.no_grad():
        assert torch.equal(ckpt.build("dr_encoder")(x), module.encoder(x))

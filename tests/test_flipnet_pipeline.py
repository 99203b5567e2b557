"""The diffusers FlipNet pipeline (restore / degrade), the LQ cache, the properties that could fail (phi = 0 is
LoRA-only, an all-zero checkpoint is the base model, the condition image reaches the output only through BoostHub,
``t_y = same`` is the hand-computed joint-batch sampler), and the folder entry points behind ``bfr restore --method
flipnet`` and ``bfr synthesize`` (:mod:`comfyui_bfr.cli.folders`)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_bfr.cli.main import main
from comfyui_bfr.cli.folders import (
    RestoreConfig,
    SynthesizeConfig,
    restore_flipnet,
    synthesis_jobs,
    synthesize_degraded,
)
from comfyui_bfr.lora import checkpoint as ck
from comfyui_bfr.lora.boosthub import BoostHubState
from comfyui_bfr.lora.lora_targets import add_flipnet_lora, load_lora_kohya
from comfyui_bfr.pipelines.flipnet import FlipNetPipeline, FlipNetSampleConfig
from comfyui_bfr.sd.diffusion import sd_alphas_cumprod
from comfyui_bfr.sd.loader import encode_prompts
from comfyui_bfr.sd.vae import decode as vae_decode
from comfyui_bfr.sd.vae import encode as vae_encode
from comfyui_bfr.lora.face_embedder import AdapterConfig, FaceAdapter, FaceAutoencoderPair, LQFaceEncoder
from comfyui_bfr.train.flipnet import prepare_flipnet_unet
from fixtures.flipnet import TINY_FACE, build_micro_unet, micro_components, write_faces, write_flipnet_checkpoint, \
    write_micro_folder


@pytest.fixture(scope="module")
def restore_pipe(tmp_path_factory):
    path = write_flipnet_checkpoint(tmp_path_factory.mktemp("p") / "flipnet_restore.safetensors", "restore")
    return FlipNetPipeline.from_checkpoint(None, path, components=micro_components(0))


@pytest.fixture(scope="module")
def degrade_ckpt(tmp_path_factory):
    return write_flipnet_checkpoint(tmp_path_factory.mktemp("p") / "flipnet_degrade.safetensors", "degrade")


@pytest.fixture(scope="module")
def degrade_pipe(degrade_ckpt):
    return FlipNetPipeline.from_checkpoint(None, degrade_ckpt, components=micro_components(0))


def _lq(n=2, size=64, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_restore_is_deterministic_and_uses_face_tokens(restore_pipe):
    lq = _lq()
    cfg = FlipNetSampleConfig(mode="restore", num_inference_steps=2, seed=4)
    a, b = restore_pipe(lq, cfg), restore_pipe(lq, cfg)
    assert a.shape == lq.shape and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b)
    c = restore_pipe(lq, FlipNetSampleConfig(mode="restore", num_inference_steps=2, seed=5))
    assert not torch.equal(a, c)
    no_face = restore_pipe(lq, FlipNetSampleConfig(mode="restore", num_inference_steps=2, seed=4,
                                                   use_face_embedding=False))
    assert not torch.allclose(a, no_face, atol=1e-4)
    ticks = []
    restore_pipe(lq[:1], FlipNetSampleConfig(num_inference_steps=3), callback=lambda i, n: ticks.append((i, n)))
    assert ticks == [(1, 3), (2, 3), (3, 3)]


def test_lq_cache_matches_the_joint_batch_and_phi_matters(restore_pipe):
    lq = _lq(1, seed=2)
    base = dict(mode="restore", num_inference_steps=2, seed=1, t_y_policy="fixed", t_y=50)
    cached = restore_pipe(lq, FlipNetSampleConfig(lq_cache=True, **base))
    joint = restore_pipe(lq, FlipNetSampleConfig(lq_cache=False, **base))
    torch.testing.assert_close(cached, joint, atol=2e-4, rtol=0)
    assert restore_pipe.state.cache_mode == "off" and not restore_pipe.state.kv_cache  # state restored
    phi0 = restore_pipe(lq, FlipNetSampleConfig(phi=0.0, **base))
    assert not torch.allclose(phi0, joint, atol=1e-4)


def test_degrade_mode_and_input_errors(degrade_pipe, restore_pipe):
    hq = _lq(1, seed=3)
    out = degrade_pipe(hq, FlipNetSampleConfig(mode="degrade", num_inference_steps=2))
    assert out.shape == hq.shape
    with pytest.raises(ValueError, match="multiple of 8"):
        restore_pipe(torch.rand(1, 3, 60, 64), FlipNetSampleConfig(num_inference_steps=1))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        restore_pipe(torch.rand(1, 4, 64, 64), FlipNetSampleConfig(num_inference_steps=1))
    bad = torch.rand(1, 3, 64, 64)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        restore_pipe(bad, FlipNetSampleConfig(num_inference_steps=1))
    with pytest.raises(ValueError, match="guidance_scale must be >= 1"):
        FlipNetSampleConfig(guidance_scale=0.5)
    with pytest.raises(ValueError, match="phi must be >= 0"):
        FlipNetSampleConfig(phi=-1)
    with pytest.raises(ValueError, match="mode must be one of"):
        FlipNetSampleConfig(mode="restoration")


def test_synthesize_writes_per_image_variants_resumably(degrade_pipe, tmp_path):
    write_faces(tmp_path / "hq", 2, size=64)
    cfg = SynthesizeConfig(hq_dir=str(tmp_path / "hq"), out_dir=str(tmp_path / "out"), checkpoint="unused",
                           base_model="unused", per_image=3, size=64, batch_size=4, num_inference_steps=2, seed=7)
    assert synthesize_degraded(cfg, pipeline=degrade_pipe) == 6
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [f"0000{i}_{k}.png" for i in range(2) for k in range(3)]
    assert synthesize_degraded(cfg, pipeline=degrade_pipe) == 0  # resumable: nothing left to do
    # one seed per (image, variant): the same file comes out with another batch size
    (tmp_path / "out" / "00001_2.png").unlink()
    first = np.asarray(Image.open(tmp_path / "out" / "00000_0.png"), dtype=np.int16)
    (tmp_path / "out" / "00000_0.png").unlink()
    assert synthesize_degraded(SynthesizeConfig(**dict(cfg.__dict__, batch_size=1)), pipeline=degrade_pipe) == 2
    again = np.asarray(Image.open(tmp_path / "out" / "00000_0.png"), dtype=np.int16)
    assert np.abs(first - again).max() <= 2
    assert len(synthesis_jobs(sorted((tmp_path / "hq").iterdir()), 4, tmp_path / "out")) == 2
    with pytest.raises(ValueError, match="--per-image must be >= 1"):
        synthesize_degraded(SynthesizeConfig(**dict(cfg.__dict__, per_image=0)), pipeline=degrade_pipe)
    with pytest.raises(ValueError, match="only --mode degrade"):
        SynthesizeConfig(**dict(cfg.__dict__, mode="restore")).validate()


def test_restore_folder_writes_one_png_per_input(restore_pipe, tmp_path):
    write_faces(tmp_path / "lq", 3, size=48)
    cfg = RestoreConfig(input=str(tmp_path / "lq"), out_dir=str(tmp_path / "out"), checkpoint="unused",
                        base_model="unused", size=64, batch_size=2, num_inference_steps=2)
    written = restore_flipnet(cfg, pipeline=restore_pipe)
    assert [p.name for p in written] == ["00000.png", "00001.png", "00002.png"]
    assert Image.open(written[0]).size == (64, 64)
    with pytest.raises(ValueError, match="--checkpoint is required"):
        restore_flipnet(RestoreConfig(input="x", out_dir="y", base_model="z"))


def test_module_cli_loads_a_diffusers_base_folder(tmp_path, caplog):
    """``bfr restore --method flipnet`` and ``bfr synthesize`` with a real base folder and checkpoint files."""
    base = write_micro_folder(tmp_path / "base")
    restore_ckpt = write_flipnet_checkpoint(tmp_path / "r.safetensors", "restore")
    degrade_ckpt = write_flipnet_checkpoint(tmp_path / "d.safetensors", "degrade")
    write_faces(tmp_path / "faces", 1, size=64)
    assert main(["restore", str(tmp_path / "faces"), "--out", str(tmp_path / "restored"), "--method", "flipnet",
                 "--checkpoint", str(restore_ckpt), "--base-model", str(base), "--size", "64",
                 "--num-inference-steps", "1", "--device", "cpu"]) == 0
    assert (tmp_path / "restored" / "00000.png").is_file()
    assert main(["synthesize", str(tmp_path / "faces"), str(tmp_path / "lq"), "--checkpoint", str(degrade_ckpt),
                 "--base-model", str(base), "--size", "64", "--per-image", "2", "--num-inference-steps", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "lq").iterdir()) == ["00000_0.png", "00000_1.png"]
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(["restore", str(tmp_path / "faces"), "--out", str(tmp_path / "x"), "--method", "flipnet",
                     "--checkpoint", str(restore_ckpt), "--base-model", str(tmp_path / "faces"), "--size", "64"]) == 2
    assert "lacks" in caplog.text and "not a diffusers SD 2.1 folder" in caplog.text


# ------------------------------------------------------------------------------------------------ properties


def _pipeline_on(unet, defaults=None) -> FlipNetPipeline:
    """A FlipNetPipeline on the micro components with ``unet`` (no BoostHub processors needed)."""
    comps = micro_components(0)
    return FlipNetPipeline(unet, comps["vae"], comps["text_encoder"], comps["tokenizer"], comps["scheduler"],
                           BoostHubState(), defaults=defaults or ck.FlipNetDefaults(1.0, "fixed", 50))


def _lora_only(path) -> FlipNetPipeline:
    """The micro UNet with the checkpoint's LoRA and no BoostHub: FlipNet's "LoRA-only" model."""
    ckpt = ck.read_flipnet_checkpoint(path)
    unet = micro_components(0)["unet"]
    add_flipnet_lora(unet, rank=ckpt.rank, alpha=ckpt.alpha)
    load_lora_kohya(unet, ckpt.lora, path.name)
    return _pipeline_on(unet.eval(), ckpt.defaults)


@pytest.mark.parametrize("policy", ["fixed", "same"])
def test_degrade_phi_zero_equals_lora_only(degrade_pipe, degrade_ckpt, policy, record_figure):
    hq = _lq(1, seed=8)
    cfg = dict(mode="degrade", num_inference_steps=2, seed=2, t_y_policy=policy)
    phi0 = degrade_pipe(hq, FlipNetSampleConfig(phi=0.0, **cfg))
    lora_only = _lora_only(degrade_ckpt)(hq, FlipNetSampleConfig(**cfg))
    err = (phi0 - lora_only).abs().max().item()
    record_figure(f"degrade phi=0 vs LoRA-only {policy}", f"{err:.1e}")
    assert err <= 1e-6
    boosted = degrade_pipe(hq, FlipNetSampleConfig(phi=1.0, **cfg))
    assert (boosted - lora_only).abs().max() > 1e-3  # and phi = 1 is not LoRA-only: the comparison can fail


def test_degrade_all_zero_checkpoint_equals_the_base_model(tmp_path, record_figure):
    zero = write_flipnet_checkpoint(tmp_path / "flipnet_zero.safetensors", "degrade", zero=True)
    pipe = FlipNetPipeline.from_checkpoint(None, zero, components=micro_components(0))
    base = _pipeline_on(micro_components(0)["unet"])
    hq = _lq(2, seed=9)
    worst = 0.0
    for policy, phi in (("fixed", 1.0), ("same", 2.0)):
        cfg = FlipNetSampleConfig(mode="degrade", num_inference_steps=2, seed=4, t_y_policy=policy, phi=phi)
        out, ref = pipe(hq, cfg), base(hq, cfg)
        worst = max(worst, (out - ref).abs().max().item())
    record_figure("degrade all-zero ckpt vs base", f"{worst:.1e}")
    assert worst <= 1e-6


def _write_micro(path, *, face: bool, zero_lora: bool, zero_wo: bool):
    """A restore-mode file for the micro UNet: every trained tensor N(0, 0.1)-shifted, then the LoRA (A and B) and/or
    the BoostHub W_o (weight and bias) zeroed; ``face``: with a tiny LQ face encoder + random adapter."""
    unet = build_micro_unet(0)
    prepare_flipnet_unet(unet, 4, None, 1.0)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
                if (zero_lora and "lora_" in name) or (zero_wo and ".processor.hub.out_proj." in name):
                    p.zero_()
    kw = {}
    if face:
        torch.manual_seed(0)
        kw = dict(face_encoder=LQFaceEncoder.from_pair(FaceAutoencoderPair(TINY_FACE)),
                  adapter=FaceAdapter(AdapterConfig(in_dim=TINY_FACE.token_dim, out_dim=1024, hidden_dim=64)),
                  face_image_size=32)
    return ck.save_flipnet_checkpoint(path, unet, mode="restore", defaults=ck.FlipNetDefaults(1.0, "fixed", 50), **kw)


_NOOP_CASES = (dict(t_y_policy="fixed", phi=1.0), dict(t_y_policy="fixed", phi=2.0, lq_cache=False),
               dict(t_y_policy="same", phi=1.0))


def test_restore_without_face_embedder_zero_lora_and_zero_boosthub_is_the_base_model(tmp_path, record_figure):
    """No face embedder (no tokens appended), zero LoRA, zero W_o: the plain SD sampler on the base UNet, bit for bit
    (the pipeline does not run the condition stream when BoostHub provably adds 0)."""
    path = _write_micro(tmp_path / "zero.safetensors", face=False, zero_lora=True, zero_wo=True)
    pipe = FlipNetPipeline.from_checkpoint(None, path, components=micro_components(0))
    base = _pipeline_on(micro_components(0)["unet"])
    assert pipe.face_encoder is None and not pipe.boosthub_active(1.0)
    lq = _lq(2, seed=13)
    worst = 0.0
    for case in _NOOP_CASES:
        cfg = FlipNetSampleConfig(mode="restore", num_inference_steps=2, seed=4, **case)
        out, ref = pipe(lq, cfg), base(lq, cfg)
        worst = max(worst, (out - ref).abs().max().item())
        assert torch.equal(out, ref), case
    record_figure("restore no-face zero ckpt vs base", f"{worst:.1e}")


def test_restore_phi_zero_with_zero_lora_is_the_base_model(tmp_path):
    """phi = 0 + zero LoRA, W_o NOT zero, no face tokens: the base model bit for bit; phi = 1 is not."""
    path = _write_micro(tmp_path / "zero_lora.safetensors", face=False, zero_lora=True, zero_wo=False)
    pipe = FlipNetPipeline.from_checkpoint(None, path, components=micro_components(0))
    base = _pipeline_on(micro_components(0)["unet"])
    lq = _lq(2, seed=14)
    cfg = dict(mode="restore", num_inference_steps=2, seed=5)
    ref = base(lq, FlipNetSampleConfig(**cfg))
    assert torch.equal(pipe(lq, FlipNetSampleConfig(phi=0.0, **cfg)), ref)
    assert (pipe(lq, FlipNetSampleConfig(phi=1.0, **cfg)) - ref).abs().max() > 1e-3


def test_a_zero_adapter_checkpoint_differs_from_the_base_model_only_by_its_face_tokens(tmp_path, record_figure):
    """Zero LoRA and W_o WITH a face embedder: the prompts get tau(z_y) / tau(0) (the neutral set, see
    lora/face_embedder.py). Exact: the base UNet given the same face tokens. Not equal, and it cannot be: the base
    UNet without them (appended keys change every cross-attention softmax)."""
    path = _write_micro(tmp_path / "face_zero.safetensors", face=True, zero_lora=True, zero_wo=True)
    pipe = FlipNetPipeline.from_checkpoint(None, path, components=micro_components(0))
    plain = _pipeline_on(micro_components(0)["unet"])
    with_tokens = _pipeline_on(micro_components(0)["unet"])
    with_tokens.face_encoder, with_tokens.adapter = pipe.face_encoder, pipe.adapter
    with_tokens.face_image_size = pipe.face_image_size
    lq = _lq(2, seed=15)
    cfg = FlipNetSampleConfig(mode="restore", num_inference_steps=2, seed=6)
    out = pipe(lq, cfg)
    assert torch.equal(out, with_tokens(lq, cfg))
    diff = (out - plain(lq, cfg)).abs().max().item()
    record_figure("zero-adapter ckpt vs base", f"same tokens 0; without the tokens {diff:.2e}")
    assert diff > 1e-4


@pytest.mark.parametrize("mode", ["restore", "degrade"])
def test_output_depends_on_the_condition_image_only_through_boosthub(restore_pipe, degrade_pipe, mode):
    """Two condition images, same seed: different outputs with phi = 1, identical with phi = 0 (restore mode without
    face tokens, so BoostHub is the only way in)."""
    pipe = restore_pipe if mode == "restore" else degrade_pipe
    a, b = _lq(1, seed=20), _lq(1, seed=21)
    outs = {}
    for phi in (0.0, 1.0):
        cfg = FlipNetSampleConfig(mode=mode, num_inference_steps=2, seed=6, phi=phi, use_face_embedding=False)
        outs[phi] = (pipe(a, cfg), pipe(b, cfg))
    assert (outs[1.0][0] - outs[1.0][1]).abs().max() > 1e-3
    torch.testing.assert_close(outs[0.0][0], outs[0.0][1], atol=1e-6, rtol=0)


@torch.no_grad()
def _hand_joint_sampler(pipe, images, seed, steps):
    """t_y = same written out: DDIM (eta 0, SD2.1 'leading' spacing, offset 1) on the joint batch cat([x_t, y_t]) with
    y_t = sqrt(a_t) y + sqrt(1 - a_t) eps_y, no CFG (degrade mode, null prompt), x_T and eps_y from one seed."""
    alphas = sd_alphas_cumprod().float()
    cond = vae_encode(pipe.vae, images)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(cond.shape[1:]), generator=g)[None]
    eps_y = torch.randn(tuple(cond.shape[1:]), generator=g)[None]
    ctx = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""])
    ts = [1000 // steps * i + 1 for i in reversed(range(steps))]
    for t in ts:
        a = alphas[t]
        y = a.sqrt() * cond + (1 - a).sqrt() * eps_y
        eps = pipe.unet(torch.cat([x, y]), torch.tensor([t, t]), torch.cat([ctx, ctx])).sample[:1]
        prev = t - 1000 // steps
        a_prev = alphas[prev] if prev >= 0 else alphas[0]
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return vae_decode(pipe.vae, x)


def test_t_y_same_is_the_hand_computed_joint_batch_and_differs_from_fixed(degrade_pipe, record_figure):
    hq = _lq(1, seed=12)
    cfg = dict(mode="degrade", num_inference_steps=2, seed=3, phi=1.0)
    same = degrade_pipe(hq, FlipNetSampleConfig(t_y_policy="same", **cfg))
    fixed = degrade_pipe(hq, FlipNetSampleConfig(t_y_policy="fixed", t_y=50, **cfg))
    degrade_pipe.state.phi, degrade_pipe.state.cache_mode = 1.0, "off"
    ref = _hand_joint_sampler(degrade_pipe, hq, seed=3, steps=2)
    err = (same - ref).abs().max().item()
    record_figure("t_y=same vs hand joint batch", f"{err:.1e} (fixed differs by {(same - fixed).abs().max():.2f})")
    assert err <= 1e-5
    assert (same - fixed).abs().max() > 1e-3

"""CLR-Face from the command line: ``bfr restore --method clrface`` (aligned crops and whole photos), ``bfr eval
--method clrface`` and ``bfr sweep --grid guidance_scale=...`` on the micro SD2.1-topology folder, a micro ``clrface/1``
file and a random-weights iresnet r18 in the arcface_torch layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_bfr.cli.folders import (CLRFaceRestoreConfig, clrface_runner, restore_clrface)
from comfyui_bfr.cli.main import build_parser, main
from comfyui_bfr.lora import cond_checkpoint as cc
from comfyui_bfr.lora.irn import IRN, IRNConfig, save_irn_checkpoint
from comfyui_bfr.lora.ldrm import ConcatConvIn
from comfyui_bfr.pipelines import dr2, testset
from comfyui_bfr.pipelines.image_io import ImageFolderError, read_rgb
from comfyui_bfr.sd.loader import SDModel
from comfyui_bfr.train.drbfr import prepare_conditional_unet
from fixtures.clrface import write_tiny_identity_model
from fixtures.flipnet import build_micro_unet, micro_components, write_faces, write_micro_folder

SIZE = 64
FAST = ["--size", str(SIZE), "--num-inference-steps", "2", "--dr2-steps", "8", "--dr2-tau", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("clrface_cli")
    unet = build_micro_unet(0)
    prepare_conditional_unet(unet, rank=4, alpha=4.0, what="CLR-Face")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in sorted(unet.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    torch.manual_seed(0)
    irn = IRN(IRNConfig(widths=(8, 16), blocks=1))
    with torch.no_grad():
        for p in irn.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return {"base": write_micro_folder(root / "sd21"),
            "ckpt": cc.save_conditional_checkpoint(root / "clrface.safetensors", unet, fmt=cc.CLRFACE_FORMAT),
            "identity": write_tiny_identity_model(root / "r18" / "backbone.pth"),
            "irn": save_irn_checkpoint(root / "irn.safetensors", irn, alpha=1.0),
            "faces": root / "faces", "face_paths": write_faces(root / "faces", 2, size=SIZE)}


def _restore(files, out, *extra) -> list[np.ndarray]:
    argv = ["restore", str(files["faces"]), str(out), "--method", "clrface", "--base-model", str(files["base"]),
            *FAST, *extra]
    assert main(argv) == 0
    return [read_rgb(out / p.name) for p in files["face_paths"]]


def test_parser_takes_the_clrface_flags():
    argv = ["restore", "in", "out", "--method", "clrface", "--identity-model", "b.pth", "--init", "lq",
            "--guidance-scale", "3", "--denoise", "0.4", "--mask", "m.safetensors"]
    ns = build_parser(argv).parse_args(argv)
    assert (ns.method, ns.identity_model, ns.init, ns.guidance_scale, ns.denoise, ns.mask) == \
        ("clrface", "b.pth", "lq", 3.0, 0.4, "m.safetensors")
    assert ns.num_inference_steps == 40, "the paper's 40 Heun steps are the default"


def test_restore_is_deterministic_and_the_guidance_acts(files, tmp_path):
    common = ["--checkpoint", str(files["ckpt"]), "--identity-model", str(files["identity"])]
    a = _restore(files, tmp_path / "a", *common, "--guidance-scale", "50")
    b = _restore(files, tmp_path / "b", *common, "--guidance-scale", "50")
    off = _restore(files, tmp_path / "off", "--checkpoint", str(files["ckpt"]), "--guidance-scale", "0")
    assert all(x.shape == (SIZE, SIZE, 3) for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)), "same seed, same faces"
    assert max(np.abs(x.astype(int) - y.astype(int)).max() for x, y in zip(a, off)) > 0, "s > 0 changed nothing"


def test_runner_keeps_a_plain_unet_for_dr2_and_patches_the_refiner(files):
    """--init dr2 runs DR2 on SD2.1 itself (a copy taken before the clrface/1 LoRA + conv_in are added): the x_id it
    gives equals DR2 on a freshly built plain UNet; the refiner's UNet is the conditional one."""
    cfg = CLRFaceRestoreConfig(input="x", out_dir="y", checkpoint=str(files["ckpt"]), guidance_scale=0, size=SIZE,
                               dr2_steps=8, dr2_tau=2, device="cpu")
    runner = clrface_runner(cfg, components=micro_components(0))
    assert isinstance(runner.pipeline.unet.conv_in, ConcatConvIn)
    assert not isinstance(runner.dr2_model.unet.conv_in, ConcatConvIn)
    lq = torch.from_numpy(np.stack([read_rgb(p) for p in files["face_paths"]])).permute(0, 3, 1, 2).float() / 255
    ours = runner.initial_estimate(lq, cfg, seed=5)
    comps = micro_components(0)
    plain = SDModel(unet=build_micro_unet(0).eval(), vae=comps["vae"], alphas_cumprod=runner.dr2_model.alphas_cumprod)
    ref = dr2.restore(plain, lq, cfg.dr2_config(5)).images.float()
    assert torch.allclose(ours, ref, atol=1e-5)
    assert (ours - lq).abs().max() > 1e-3, "DR2 must change the input"


def test_conditional_denoiser_reads_the_lq_faces(files):
    """The same x_id refined next to two different LQ latents gives two results (E(x^d) is concatenated)."""
    cfg = CLRFaceRestoreConfig(input="x", out_dir="y", checkpoint=str(files["ckpt"]), guidance_scale=0, size=SIZE,
                               num_inference_steps=2, init="lq", device="cpu")
    runner = clrface_runner(cfg, components=micro_components(0))
    x_id = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    a = runner(x_id, x_id, cfg, seed=1)
    b = runner(torch.zeros_like(x_id), x_id, cfg, seed=1)
    assert (a - b).abs().max() > 1e-4


def test_init_folder_lq_and_irn(files, tmp_path):
    """--init FOLDER reads each input's x_id by name: a folder holding the LQ faces equals --init lq; --init irn runs
    the IRN file; a missing x_id file is named before any model loads."""
    lq = _restore(files, tmp_path / "lq", "--init", "lq", "--guidance-scale", "0")
    folder = _restore(files, tmp_path / "folder", "--init", str(files["faces"]), "--guidance-scale", "0")
    assert all(np.array_equal(x, y) for x, y in zip(lq, folder))
    irn = _restore(files, tmp_path / "irn", "--init", "irn", "--irn", str(files["irn"]), "--guidance-scale", "0")
    assert max(np.abs(x.astype(int) - y.astype(int)).max() for x, y in zip(lq, irn)) > 0
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageFolderError, match="no x_id image named 00000"):
        restore_clrface(CLRFaceRestoreConfig(input=str(files["faces"]), out_dir=str(tmp_path / "o"), init=str(empty),
                                             guidance_scale=0, base_model="/nonexistent"))


def test_bad_settings_name_the_flag(files, tmp_path):
    base = {"input": str(files["faces"]), "out_dir": str(tmp_path / "o")}
    with pytest.raises(ValueError, match="--identity-model FILE.*--guidance-scale 0"):
        restore_clrface(CLRFaceRestoreConfig(**base))
    with pytest.raises(ValueError, match="--init irn and --irn FILE"):
        restore_clrface(CLRFaceRestoreConfig(**base, init="irn", guidance_scale=0))
    with pytest.raises(ValueError, match="--init 'nowhere'"):
        restore_clrface(CLRFaceRestoreConfig(**base, init="nowhere", guidance_scale=0))
    with pytest.raises(ValueError, match="denoise must be in"):
        restore_clrface(CLRFaceRestoreConfig(**base, denoise=0, guidance_scale=0))


def test_whole_photo_restores_each_face(files, tmp_path):
    from comfyui_bfr.pipelines.sample_data import sample_group_photo

    Image.fromarray(sample_group_photo()).save(tmp_path / "group.png")
    out = tmp_path / "photo"
    assert main(["restore", str(tmp_path / "group.png"), str(out), "--method", "clrface", "--faces", "largest",
                 "--base-model", str(files["base"]), "--checkpoint", str(files["ckpt"]), "--identity-model",
                 str(files["identity"]), *FAST]) == 0
    rec = json.loads((out / "restore_report.jsonl").read_text().splitlines()[-1])
    assert rec["status"] == "restored" and rec["config"]["method"] == "clrface"
    assert rec["config"]["checkpoint"] == str(files["ckpt"]) and rec["config"]["guidance_scale"] == 1.0
    assert read_rgb(out / "group.png").shape == sample_group_photo().shape


def test_eval_and_sweep_run_clrface(files, tmp_path):
    pairs = testset.make_testset(files["faces"], tmp_path / "set", "clr-face", seed=0, size=SIZE)
    common = ["--method", "clrface", "--base-model", str(files["base"]), "--checkpoint", str(files["ckpt"]),
              "--identity-model", str(files["identity"]), "--num-inference-steps", "2", "--dr2-steps", "8",
              "--dr2-tau", "2", "--size", str(SIZE), "--metrics", "psnr", "ssim"]
    assert main(["eval", str(pairs.root), "--out", str(tmp_path / "ev"), *common]) == 0
    summary = (tmp_path / "ev" / "summary.md").read_text()
    assert "| clrface | 2 |" in summary
    assert main(["sweep", str(pairs.root), "--out", str(tmp_path / "sw"), *common,
                 "--grid", "guidance_scale=0,50"]) == 0
    assert (tmp_path / "sw" / "sweep_psnr.png").is_file()
    run = json.loads((tmp_path / "sw" / "clrface_guidance_scale50" / "run.json").read_text())
    assert run["config"]["guidance_scale"] == 50 and run["config"]["init"] == "dr2"
    # Tab. 4's "IRN" row: the IRN alone gives what --init irn feeds the refiner (run_irn on the LQ crops)
    assert main(["eval", str(pairs.root), "--out", str(tmp_path / "ev"), "--method", "irn", "--irn", str(files["irn"]),
                 "--metrics", "psnr", "--size", str(SIZE)]) == 0
    from comfyui_bfr.lora.irn import load_irn_checkpoint

    net = load_irn_checkpoint(files["irn"]).net.eval()
    for pair in pairs.pairs:
        lq = torch.from_numpy(read_rgb(pair.lq)).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            expect = (net(lq).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round()
        got = read_rgb(tmp_path / "ev" / "irn" / "images" / f"{pair.name}.png").astype(np.float32)
        assert np.abs(got - expect).max() <= 1.0

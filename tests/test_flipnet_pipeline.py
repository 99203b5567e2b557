"""The diffusers FlipNet pipeline (restore / degrade), the LQ cache, and the folder entry points behind
``bfr restore --method flipnet`` and ``bfr synthesize --mode degrade``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_bfr.lora import checkpoint as ck
from comfyui_bfr.lora.face_embedder import AdapterConfig, FaceAdapter, FaceAEConfig, FaceAutoencoderPair, LQFaceEncoder
from comfyui_bfr.train.flipnet import prepare_flipnet_unet
from comfyui_bfr.pipelines.flipnet import (
    FlipNetPipeline,
    FlipNetSampleConfig,
    RestoreConfig,
    SynthesizeConfig,
    restore_folder,
    synthesis_jobs,
    synthesize_degraded,
)
from fixtures.flipnet import build_micro_unet, micro_components, write_faces

TINY_FACE = FaceAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, patch_size=2)


def _checkpoint(path, mode):
    unet = build_micro_unet(0)
    prepare_flipnet_unet(unet, 4, None, 1.0)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    kw = {}
    if mode == "restore":
        torch.manual_seed(0)
        kw = dict(face_encoder=LQFaceEncoder.from_pair(FaceAutoencoderPair(TINY_FACE)),
                  adapter=FaceAdapter(AdapterConfig(in_dim=TINY_FACE.token_dim, out_dim=1024, hidden_dim=64)),
                  face_image_size=32)
    return ck.save_flipnet_checkpoint(path, unet, mode=mode, defaults=ck.FlipNetDefaults(1.0, "fixed", 50), **kw)


@pytest.fixture(scope="module")
def restore_pipe(tmp_path_factory):
    path = _checkpoint(tmp_path_factory.mktemp("p") / "flipnet_restore.safetensors", "restore")
    return FlipNetPipeline.from_checkpoint(None, path, components=micro_components(0))


@pytest.fixture(scope="module")
def degrade_pipe(tmp_path_factory):
    path = _checkpoint(tmp_path_factory.mktemp("p") / "flipnet_degrade.safetensors", "degrade")
    return FlipNetPipeline.from_checkpoint(None, path, components=micro_components(0))


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
    same = restore_pipe(lq, FlipNetSampleConfig(**dict(base, t_y_policy="same")))
    assert same.shape == joint.shape


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
    written = restore_folder(cfg, pipeline=restore_pipe)
    assert [p.name for p in written] == ["00000.png", "00001.png", "00002.png"]
    assert Image.open(written[0]).size == (64, 64)
    with pytest.raises(ValueError, match="--checkpoint is required"):
        restore_folder(RestoreConfig(input="x", out_dir="y", base_model="z"))


def test_module_cli_loads_a_diffusers_base_folder(tmp_path):
    """``python -m comfyui_bfr.pipelines.flipnet restore|synthesize`` with a real base folder and checkpoint files."""
    from comfyui_bfr.pipelines.flipnet import main
    from fixtures.flipnet import write_micro_folder

    base = write_micro_folder(tmp_path / "base")
    restore_ckpt = _checkpoint(tmp_path / "r.safetensors", "restore")
    degrade_ckpt = _checkpoint(tmp_path / "d.safetensors", "degrade")
    write_faces(tmp_path / "faces", 1, size=64)
    assert main(["restore", str(tmp_path / "faces"), str(tmp_path / "restored"), "--checkpoint", str(restore_ckpt),
                 "--base-model", str(base), "--size", "64", "--num-inference-steps", "1", "--device", "cpu"]) == 0
    assert (tmp_path / "restored" / "00000.png").is_file()
    assert main(["synthesize", str(tmp_path / "faces"), str(tmp_path / "lq"), "--checkpoint", str(degrade_ckpt),
                 "--base-model", str(base), "--size", "64", "--per-image", "2", "--num-inference-steps", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "lq").iterdir()) == ["00000_0.png", "00000_1.png"]
    with pytest.raises(FileNotFoundError, match="lacks"):
        main(["restore", str(tmp_path / "faces"), str(tmp_path / "x"), "--checkpoint", str(restore_ckpt),
              "--base-model", str(tmp_path / "faces"), "--size", "64"])

"""CLR-Face's Identity Recovery Network (lora/irn.py, pipelines/irn.py, train/irn.py; CLR-Face §3.3, Eq. 11): the
untrained IRN is the identity map at any size, Eq. 11 equals its written-out value, the objective falls on a fixed
batch within a few of `bfr train irn`'s core steps (random r18 identity model), `bfr train irn` runs end to end from
the CLI (validation grid, checkpoints, resume, export), the clrface-irn/1 file round-trips and bad files are refused
with the fix."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from comfyui_bfr.cli.main import main as bfr_main
from comfyui_bfr.lora.checkpoint import CheckpointError
from comfyui_bfr.lora.irn import IRN, IRN_FORMAT, IRNConfig, load_irn_checkpoint, parameter_count, save_irn_checkpoint
from comfyui_bfr.pipelines.arcface import IdentityModel, build_iresnet
from comfyui_bfr.pipelines.irn import irn_loss, run_irn
from comfyui_bfr.train import irn as ti
from comfyui_bfr.train.data import DegradationBatchConfig, degrade_on_the_fly
from fixtures.flipnet import face_image, write_faces

TINY = IRNConfig(widths=(8, 16), blocks=1, mid_blocks=1)


def _randomised(cfg: IRNConfig = TINY, seed: int = 0, std: float = 0.05) -> IRN:
    torch.manual_seed(seed)
    net = IRN(cfg)
    with torch.no_grad():
        net.tail.weight.normal_(0, std)
        net.tail.bias.normal_(0, std)
    return net


def _faces(n: int, size: int = 64) -> torch.Tensor:
    return torch.stack([torch.from_numpy(face_image(i, size)).permute(2, 0, 1).float() / 255 for i in range(n)])


@pytest.fixture(scope="module")
def identity():
    torch.manual_seed(0)
    return IdentityModel(build_iresnet("r18"))


# ------------------------------------------------------------------------------------------------------ network


def test_untrained_irn_is_the_identity_map_at_any_size():
    net = IRN()  # the default: zero-initialised last layer
    assert parameter_count(net) == 4_686_979  # the figure in lora/irn.py's docstring
    for shape in [(2, 3, 64, 64), (1, 3, 37, 53), (1, 3, 1, 1)]:
        x = torch.rand(shape)
        assert torch.equal(net(x), x), shape
    trained = _randomised()
    y = trained(torch.rand(1, 3, 37, 53))
    assert y.shape == (1, 3, 37, 53) and not torch.equal(y, torch.rand(1, 3, 37, 53))
    with pytest.raises(ValueError, match=r"takes \(B, 3, H, W\) images"):
        net(torch.rand(1, 4, 8, 8))


def test_run_irn_chunks_clamps_and_reports_progress():
    net = _randomised(std=2.0)
    x = torch.rand(5, 3, 21, 30)
    done = []
    out = run_irn(net, x, batch_size=2, callback=done.append)
    assert done == [2, 4, 5] and out.shape == x.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    with torch.no_grad():
        torch.testing.assert_close(out, net(x).clamp(0, 1), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------- Eq. 11


def test_eq11_against_the_written_out_value(identity):
    torch.manual_seed(1)
    hq = torch.rand(3, 3, 64, 64)
    restored = torch.rand(3, 3, 64, 64, requires_grad=True)
    alpha = 0.7
    loss, logs = irn_loss(restored, hq, identity, alpha)
    # written out: alpha * mean |f_phi(x^d) - x| + mean_b (1 - <a_b, h_b> / (|a_b| |h_b|)), with the raw iresnet
    # features of the ArcFace inputs
    with torch.no_grad():
        a = identity.net(identity.preprocess(restored))
        h = identity.net(identity.preprocess(hq))
        l1 = (restored - hq).abs().mean()
        d_cos = 1 - (a * h).sum(-1) / (a.norm(dim=-1) * h.norm(dim=-1))
        direct = alpha * l1 + d_cos.mean()
    torch.testing.assert_close(loss.detach(), direct, atol=1e-5, rtol=1e-5)
    assert logs["l1"] == pytest.approx(float(l1), abs=1e-6)
    assert logs["l_arc"] == pytest.approx(float(d_cos.mean()), abs=1e-5)
    loss.backward()
    assert restored.grad is not None and restored.grad.abs().sum() > 0
    assert not any(p.grad is not None for p in identity.net.parameters())  # f_arc stays frozen
    same, logs = irn_loss(hq, hq, identity, alpha)
    assert float(same) == pytest.approx(0.0, abs=1e-5) and logs["l1"] == 0.0
    with pytest.raises(ValueError, match="shapes"):
        irn_loss(hq[:, :, :32], hq, identity, alpha)


def test_objective_falls_in_a_few_core_steps(identity, record_figure):
    """`bfr train irn`'s step (ti.irn_step_loss) with the trainer's AdamW on one fixed clr-face batch (2 faces of
    64 px, lr 1e-3: 1e-2 diverges, the net has no normalisation); deterministic on one CPU thread."""
    hq = _faces(2)
    lq = degrade_on_the_fly(hq, 0, DegradationBatchConfig(preset="clr-face"))
    torch.manual_seed(0)
    net = IRN(IRNConfig(widths=(16, 32), blocks=1, mid_blocks=1))
    cfg = ti.IRNTrainConfig(hq_dir="unused", output_dir="unused", allow_random_identity=True, learning_rate=1e-3)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.adam_weight_decay)
    first = logs0 = None
    for _ in range(12):
        loss, logs = ti.irn_step_loss(net, identity, hq, lq, cfg.alpha)
        if first is None:
            first, logs0 = float(loss.detach()), logs
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final, logs = ti.irn_step_loss(net, identity, hq, lq, cfg.alpha)
    assert first == pytest.approx(cfg.alpha * logs0["l1"] + logs0["l_arc"], rel=1e-5)
    assert float(final) < 0.98 * first, (first, float(final))
    assert logs["l_arc"] < logs0["l_arc"] and logs["l1"] < logs0["l1"]
    record_figure("IRN objective (12 steps)", f"{first:.4f} -> {float(final):.4f} (L1 {logs0['l1']:.4f} -> "
                  f"{logs['l1']:.4f}, L_arc {logs0['l_arc']:.4f} -> {logs['l_arc']:.4f}; random r18, 2 faces 64 px)")


# ----------------------------------------------------------------------------------------------- bfr train irn


def _argv(faces, out, steps, *extra):
    return ["train", "irn", "--hq-dir", str(faces), "--output-dir", str(out), "--allow-random-identity",
            "--resolution", "64", "--train-batch-size", "2", "--max-train-steps", str(steps),
            "--checkpointing-steps", "3", "--validation-steps", "3", "--num-validation-images", "2",
            "--dataloader-num-workers", "0", "--log-every", "100", "--irn-widths", "8", "16", "--irn-blocks", "1",
            "--irn-mid-blocks", "1", "--learning-rate", "1e-3", *extra]


def test_bfr_train_irn_end_to_end_with_resume(tmp_path, caplog):
    faces, out = tmp_path / "faces", tmp_path / "run"
    write_faces(faces, 4, size=64)
    torch.manual_seed(0)
    assert bfr_main(_argv(faces, out, 3)) == 0
    ckpt = load_irn_checkpoint(out / "irn.safetensors")
    assert ckpt.net.cfg == TINY and ckpt.alpha == 1.0
    assert ckpt.identity_model == {"arch": "r18", "align": "template", "file": "random weights (tests)"}
    assert json.loads(ckpt.metadata["train_config"])["degradation_preset"] == "clr-face"
    x = torch.rand(1, 3, 64, 64)
    assert not torch.equal(ckpt.net(x), x)  # trained away from the identity map
    grid = out / "validation" / "irn_step_0000003.png"
    from PIL import Image

    assert Image.open(grid).size[0] >= 3 * 64  # LQ | IRN | HQ
    assert (out / "checkpoint-3" / "bfr_run.json").is_file()
    with caplog.at_level(logging.INFO):
        assert bfr_main(_argv(faces, out, 4, "--resume-from-checkpoint", "latest")) == 0
    assert "Resumed `bfr train irn` from" in caplog.text and "at step 3" in caplog.text
    assert (out / "checkpoint-4").is_dir()
    with pytest.raises(ValueError, match="cannot resume from .*alpha"):  # another objective: refused
        ti.train_irn(ti.IRNTrainConfig(hq_dir=str(faces), output_dir=str(out), allow_random_identity=True,
                                       resolution=64, irn_widths=(8, 16), irn_blocks=1, irn_mid_blocks=1,
                                       learning_rate=1e-3, train_batch_size=2, max_train_steps=5, alpha=0.5,
                                       resume_from_checkpoint="latest", dataloader_num_workers=0))


def test_bad_flags_are_clear_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"--identity-model=None is required"):
        ti.IRNTrainConfig(hq_dir=str(tmp_path), output_dir=str(tmp_path))
    ok = dict(hq_dir=str(tmp_path), output_dir=str(tmp_path), allow_random_identity=True)
    with pytest.raises(ValueError, match=r"--lambda-perceptual=0.1 must be 0: .*Eq. 11"):
        ti.IRNTrainConfig(**ok, lambda_perceptual=0.1)
    with pytest.raises(ValueError, match=r"--alpha=-1.0 must be >= 0"):
        ti.IRNTrainConfig(**ok, alpha=-1.0)
    with pytest.raises(ValueError, match=r"--irn-widths=\(\) must be one or more"):
        ti.IRNTrainConfig(**ok, irn_widths=())
    with pytest.raises(ValueError, match=r"--identity-align='crop' must be one of"):
        ti.IRNTrainConfig(**ok, identity_align="crop")
    with pytest.raises(SystemExit):
        bfr_main(["train", "irn", "--help"])
    text = capsys.readouterr().out
    assert "--identity-model" in text and "--alpha" in text and IRN_FORMAT in text and "clr-face" in text


# ------------------------------------------------------------------------------------------------------- file


def test_checkpoint_round_trip(tmp_path):
    net = _randomised(IRNConfig(widths=(8, 16, 32), blocks=2, mid_blocks=0))
    x = torch.rand(2, 3, 30, 18)
    path = save_irn_checkpoint(tmp_path / "irn.safetensors", net, alpha=0.25, identity_model={"arch": "r50"},
                               train_config={"a": 1})
    back = load_irn_checkpoint(path)
    assert back.net.cfg == net.cfg and back.alpha == 0.25 and back.identity_model == {"arch": "r50"}
    assert not back.net.training and not any(p.requires_grad for p in back.net.parameters())
    with torch.no_grad():
        torch.testing.assert_close(back.net(x), net(x))
    half = load_irn_checkpoint(save_irn_checkpoint(tmp_path / "bf16.safetensors", net, alpha=1.0,
                                                   dtype=torch.bfloat16))
    assert half.metadata["dtype"] == "bf16" and next(half.net.parameters()).dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(half.net(x), net(x), atol=2e-2, rtol=0)


def _file(tmp_path, name, tensors, meta):
    path = tmp_path / name
    save_file(tensors, str(path), metadata=meta)
    return path


def test_bad_files_are_refused_with_the_fix(tmp_path):
    net = IRN(TINY)
    sd = {f"irn.{k}": v.contiguous() for k, v in net.state_dict().items()}
    meta = {"bfr_format": IRN_FORMAT, "irn_config": json.dumps(TINY.to_dict())}
    with pytest.raises(FileNotFoundError):
        load_irn_checkpoint(tmp_path / "missing.safetensors")
    pth = tmp_path / "swinir.pth"
    torch.save({"x": torch.zeros(1)}, str(pth))
    with pytest.raises(CheckpointError, match=r"expected the .safetensors IRN .* connect its output IMAGE as x_id"):
        load_irn_checkpoint(pth)
    for fmt, loader in [("flipnet/1", "BFR Load FlipNet"), ("drbfr/1", "BFR Load DR-BFR"),
                        ("clrface/1", "BFR Load CLR-Face"), ("clrface-mask/1", "BFR Load CLR-Face Mask"),
                        ("drbfr-dr/1", "BFR Load DR Encoder")]:
        with pytest.raises(CheckpointError, match=rf"bfr_format is '{fmt}', expected 'clrface-irn/1'.*{loader}"):
            load_irn_checkpoint(_file(tmp_path, "other.safetensors", {"x": torch.zeros(1)}, {"bfr_format": fmt}))
    with pytest.raises(CheckpointError, match="It has no bfr_format: not a comfyui-bfr file"):
        load_irn_checkpoint(_file(tmp_path, "foreign.safetensors", {"x": torch.zeros(1)}, {}))
    bad = dict(sd, **{"irn.head.weight": torch.zeros(8, 3, 1, 1)})
    with pytest.raises(CheckpointError, match=r"irn.head.weight is 8x3x1x1, but the stored irn_config .* needs "
                                              r"8x3x3x3.*bfr train irn"):
        load_irn_checkpoint(_file(tmp_path, "shape.safetensors", bad, meta))
    missing = {k: v for k, v in sd.items() if k != "irn.tail.bias"}
    with pytest.raises(CheckpointError, match=r"1 tensors missing \(e.g. \['tail.bias'\]\)"):
        load_irn_checkpoint(_file(tmp_path, "missing_key.safetensors", missing, meta))
    with pytest.raises(CheckpointError, match=r"tensors outside 'irn.\*'"):
        load_irn_checkpoint(_file(tmp_path, "extra.safetensors", dict(sd, **{"mask.w": torch.zeros(1)}), meta))
    with pytest.raises(CheckpointError, match=r"'irn_config' has unknown field\(s\) \['depth'\]"):
        load_irn_checkpoint(_file(tmp_path, "cfg.safetensors", sd, dict(meta, irn_config='{"depth": 3}')))
    with pytest.raises(CheckpointError, match=r"metadata alpha is '-1', but it must be a finite number >= 0"):
        load_irn_checkpoint(_file(tmp_path, "alpha.safetensors", sd, dict(meta, alpha="-1")))
    assert F.l1_loss(load_irn_checkpoint(_file(tmp_path, "ok.safetensors", sd, meta)).net(torch.ones(1, 3, 4, 4)),
                     torch.ones(1, 3, 4, 4)) == 0

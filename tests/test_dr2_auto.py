"""DR-driven DR2 (pipelines/dr2_auto.py, cli/dr2_auto.py, nodes/dr2_auto.py): the Gaussian-prior proxy denoiser,
the kNN choice of (N, tau), the calibration file, auto vs the best fixed (N, tau) on held-out synthetic faces, the
SD (tiny model) restorer path, the CLI and the node functions (no ComfyUI needed)."""

from __future__ import annotations

import json

import pytest
import torch

from comfyui_bfr.cli.main import main
from comfyui_bfr.lora.checkpoint import CheckpointError
from comfyui_bfr.lora.dr_checkpoint import save_dr_checkpoint
from comfyui_bfr.lora.dr_module import DRConfig, DRModule
from comfyui_bfr.nodes import dr2 as dr2_nodes
from comfyui_bfr.nodes import dr2_auto as auto_nodes
from comfyui_bfr.nodes.helpers import NodeInputError
from comfyui_bfr.pipelines import dr2_auto as Q
from comfyui_bfr.pipelines import ilvr
from fixtures.flipnet import face_image, write_faces

SMALL = DRConfig(encoder_blocks=((16, 16), (32, 32), (64, 64)), gen_channels=(16, 32), token_dim=64)


def _faces(a: int, b: int, size: int = 64) -> torch.Tensor:
    return torch.stack([torch.from_numpy(face_image(i, size)).permute(2, 0, 1).float() / 255 for i in range(a, b)])


def _encoder(seed: int = 0):
    torch.manual_seed(seed)
    return DRModule(SMALL).eval()


def test_gaussian_prior_denoiser_limits():
    hq = _faces(0, 6)
    prior = Q.GaussianFacePrior(hq)
    x = hq[:2].double() * 2 - 1
    # no noise: E[x0 | x0] = x0; infinite noise: the prior mean; at the mean itself: the mean at any level
    assert torch.allclose(prior.denoise(x, 1e-6), x, atol=1e-6)
    mean = prior.mean.expand_as(x)
    assert torch.allclose(prior.denoise(x * 1e-9, 1e6), mean, atol=1e-4)
    a = 1 / (1 + 2.0 ** 2) ** 0.5
    assert torch.allclose(prior.denoise(a * mean, 2.0), mean, atol=1e-9)


def _calibration(features, scores, grid):
    f = torch.as_tensor(features, dtype=torch.float64)
    return Q.DR2AutoCalibration(f, torch.as_tensor(scores, dtype=torch.float64), grid, f.mean(0), f.std(0), k=2)


def test_choice_is_the_best_mean_score_of_the_nearest_neighbours():
    grid = ((1.0, 5), (4.0, 25), (8.0, 40))
    # two clusters of calibration features: near 0 the first grid point scored best, near 10 the third
    feats = [[0.0, 0.0], [0.1, 0.0], [10.0, 10.0], [10.0, 10.1]]
    scores = [[30, 20, 10], [29, 21, 11], [15, 18, 25], [14, 19, 26]]
    cal = _calibration(feats, scores, grid)
    assert cal.choose([[0.05, 0.0], [9.9, 10.0]]) == [(1.0, 5, ilvr.omega_auto(5)), (8.0, 40, ilvr.omega_auto(40))]
    assert ilvr.omega_auto(40) == 65  # tau + T/4
    with pytest.raises(ValueError, match="different DR encoders"):
        cal.choose([[0.0, 0.0, 0.0]])


def test_calibration_file_round_trip_and_wrong_files(tmp_path):
    cal = _calibration([[0.0, 1.0], [2.0, 3.0], [4.0, 4.0]], [[1, 2], [3, 4], [5, 6]], ((1.0, 5), (2.0, 10)))
    path = Q.save_calibration(tmp_path / "cal.safetensors", cal)
    back = Q.load_calibration(path)
    assert back.grid == cal.grid and torch.equal(back.scores, cal.scores.float())
    assert back.choose([[4.0, 4.0]]) == cal.choose([[4.0, 4.0]])
    enc_file = save_dr_checkpoint(tmp_path / "dr_encoder.safetensors", _encoder(), patch_size=32)
    with pytest.raises(CheckpointError, match="calibrate-dr2"):
        Q.load_calibration(enc_file)
    (tmp_path / "cal.json").write_text("{}")
    with pytest.raises(CheckpointError, match="expected a .safetensors calibration"):
        Q.load_calibration(tmp_path / "cal.json")


def test_auto_beats_the_best_fixed_choice_on_held_out_faces(record_figure):
    """Proxy restorer (DR2's loop with a Gaussian face prior, not SD2.1), 64 px synthetic faces, a randomly
    initialised E_DR as the feature extractor (see the README: the short-trained E_DR does not do better here).
    Calibration on faces 0-11, test on faces 100-111, 6 severities each; margin 0.03 dB over the best single (N,
    tau) chosen on the TEST set itself (the strongest fixed choice; measured +0.08 dB)."""
    encoder = _encoder().encoder
    restore = Q.proxy_restorer(Q.GaussianFacePrior(_faces(0, 12)))
    cal = Q.calibrate(encoder, 32, restore, _faces(0, 12), space="pixel", restorer_name="proxy")
    res = Q.evaluate_auto(cal, encoder, restore, _faces(100, 112))
    record_figure("DR2 auto (proxy restorer, random E_DR) PSNR dB",
                  f"auto {res['auto']:.3f} | best fixed on calibration {res['fixed_calibrated_params']} "
                  f"{res['fixed_calibrated']:.3f} | best fixed on test {res['fixed_oracle_params']} "
                  f"{res['fixed_oracle']:.3f} | per-image oracle {res['per_image_oracle']:.3f}")
    assert res["auto"] > res["fixed_oracle"] + 0.03
    assert res["auto"] > res["fixed_calibrated"] + 0.03
    assert res["per_image_oracle"] >= res["auto"]
    assert len({tuple(c) for c in res["auto_choices"]}) > 1  # it does adapt per image


def test_model_restorer_plumbing_on_the_tiny_sd_model():
    """The SD path on the tiny random model (outputs are noise: this checks the wiring, not the choice)."""
    from comfyui_bfr.sd.loader import tiny_random_model

    restore = Q.model_restorer(tiny_random_model(0), steps=20, space="latent")
    cal = Q.calibrate(_encoder().encoder, 32, restore, _faces(0, 2), grid=((1.0, 2), (2.0, 4)),
                      presets=("light", "noisy"), steps=20)
    assert cal.scores.shape == (4, 2) and torch.isfinite(cal.scores).all()
    assert Q.auto_params(cal, _encoder().encoder, _faces(5, 6))[0] in [(1.0, 2, 7), (2.0, 4, 9)]
    with pytest.raises(ValueError, match="not the one this calibration was made with"):
        Q.auto_params(cal, _encoder(seed=1).encoder, _faces(5, 6))


def test_cli_calibrate_and_node_functions(tmp_path, record_figure):
    enc_file = save_dr_checkpoint(tmp_path / "dr_encoder.safetensors", _encoder(), patch_size=32)
    faces = tmp_path / "faces"
    write_faces(faces, 10, size=64)
    out = tmp_path / "cal.safetensors"
    assert main(["calibrate-dr2", str(enc_file), str(faces), "--out", str(out), "--restorer", "proxy", "--size", "64",
                 "--held-out", "3"]) == 0
    report = json.loads(out.with_suffix(".eval.json").read_text())
    assert {"auto", "fixed_calibrated", "fixed_oracle", "per_image_oracle"} <= set(report)
    # the node's outputs are exactly the types of the DR2 nodes' n / tau / omega inputs
    restore_inputs = dr2_nodes.BFRDR2Restore.INPUT_TYPES()["required"]
    assert auto_nodes.BFRDR2AutoParams.RETURN_TYPES == tuple(restore_inputs[k][0] for k in ("n", "tau", "omega"))
    dr = auto_nodes.load_dr_encoder(str(enc_file))
    image = _faces(200, 202).permute(0, 2, 3, 1)  # ComfyUI IMAGE (B, H, W, C)
    n, tau, omega = auto_nodes.auto_params(dr, image, str(out))
    cal = Q.load_calibration(out)
    assert (n, tau) in cal.grid and omega == ilvr.omega_auto(tau)
    # bfr restore --method dr2 --auto: per image its own (N, tau, omega); the tiny random SD model (no SD 2.1 here)
    lq_dir = tmp_path / "lq"
    write_faces(lq_dir, 2, size=64, seed=300)
    assert main(["restore", str(lq_dir), str(tmp_path / "restored"), "--method", "dr2", "--auto", str(out),
                 "--dr-encoder", str(enc_file)]) == 0
    assert sorted(p.name for p in (tmp_path / "restored").iterdir()) == ["00000_dr2.png", "00001_dr2.png"]
    assert main(["restore", str(lq_dir), str(tmp_path / "r2"), "--method", "dr2", "--auto", str(out)]) == 2
    with pytest.raises(NodeInputError, match="smaller than the DR encoder's 32 px"):
        auto_nodes.auto_params(dr, image[:, :16, :16], str(out))
    with pytest.raises(NodeInputError, match="drbfr-dr/1"):
        auto_nodes.load_dr_encoder(str(out))
    with pytest.raises(NodeInputError, match="calibrate-dr2"):
        auto_nodes.auto_params(dr, image, str(enc_file))

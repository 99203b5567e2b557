"""FID with our torchvision-free FID Inception-v3 (pipelines/fid_inception.py, pipelines/iqa.py FID): the weight
file layout, the distance against scipy's matrix square root, and the harness report. The weights are random (no
Inception file offline); parity of the features with pytorch-fid's own network is tests/comfy/test_fid_parity.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comfyui_bfr.cli.main import main
from comfyui_bfr.pipelines import evaluate, iqa, testset
from comfyui_bfr.pipelines.fid_inception import FIDInceptionV3, load_fid_inception

skimage_data = pytest.importorskip("skimage.data")


def random_fid_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict in pytorch-fid's pt_inception-2015-12-05 key layout with random weights (``num_batches_tracked``
    left out, as in the release file). The BatchNorm statistics are those of four photos pushed through the random
    convolutions (one train-mode pass), so activations keep a natural scale down to pool3 instead of vanishing."""
    torch.manual_seed(seed)
    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: the running statistics become this pass's batch statistics
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.normal_(m.bias, 0.0, 0.1)
    photos = [skimage_data.coffee(), skimage_data.astronaut(), skimage_data.chelsea(), skimage_data.rocket()]
    x = torch.stack([torch.from_numpy(p[:300, :300].copy()).permute(2, 0, 1).float() / 255 for p in photos])
    with torch.no_grad():
        net.train()(x)
    return {k: v.clone() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}


@pytest.fixture(scope="module")
def fid_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fid") / iqa.FID_WEIGHTS
    torch.save(random_fid_state_dict(), path)
    return path


@pytest.fixture(scope="module")
def faces():
    """8 small crops of scikit-image's photos: two sets of 4 that differ in content."""
    imgs = [skimage_data.astronaut(), skimage_data.chelsea(), skimage_data.coffee(), skimage_data.rocket()]
    crops = [im[y:y + 96, x:x + 96] for im in imgs for (y, x) in ((20, 120), (100, 60))]
    return crops[0::2], crops[1::2]


@pytest.fixture(scope="module")
def fid(fid_file):
    return iqa.FID(fid_file)


def test_release_layout_loads_every_key(fid_file):
    sd = torch.load(fid_file, weights_only=True)
    model = load_fid_inception(fid_file)
    own = model.state_dict()
    assert set(sd) == {k for k in own if not k.endswith("num_batches_tracked")}
    assert all(torch.equal(own[k], v) for k, v in sd.items())
    assert len(sd) == 94 * 5 + 2 and sd["fc.weight"].shape == (1008, 2048)  # 94 conv + BN units, fc


def test_wrong_layout_is_skipped_naming_the_problem(tmp_path):
    sd = random_fid_state_dict()
    sd["AuxLogits.fc.weight"] = torch.zeros(1008, 768)  # torchvision's ImageNet file has the auxiliary head
    del sd["Mixed_7c.branch_pool.conv.weight"]
    torch.save(sd, tmp_path / "inception.pth")
    f = iqa.FID(tmp_path / "inception.pth")
    assert not f.available
    assert "AuxLogits.fc.weight" in f.skipped and "Mixed_7c.branch_pool.conv.weight" in f.skipped
    assert f([np.zeros((8, 8, 3), np.uint8)] * 2, [np.zeros((8, 8, 3), np.uint8)] * 2).value is None


def test_pickled_code_is_refused(tmp_path):
    torch.save({"x": torch.zeros(1), "fn": print}, tmp_path / "evil.pth")
    f = iqa.FID(tmp_path / "evil.pth")
    assert not f.available and "refused unread" in f.skipped


def test_features_are_pool3_and_per_image(fid, faces):
    a, b = faces
    feats = fid.features(a + b)
    assert feats.shape == (8, 2048) and np.isfinite(feats).all() and feats.std() > 0
    # one image at a time, another input size (resized to 299 either way), and batch composition do not matter
    one = fid.features([a[1]])
    np.testing.assert_allclose(one[0], feats[1], rtol=1e-4, atol=1e-5 * np.abs(feats).max())
    assert (feats >= 0).all()  # a mean of ReLU outputs


def test_fid_same_set_is_zero_different_sets_positive_order_invariant(fid, faces, record_figure):
    a, b = faces
    same = fid(a, a).value
    diff = fid(a, b).value
    shuffled = fid(a[::-1], [b[2], b[0], b[3], b[1]]).value
    record_figure("fid random-weights", f"same set {same:.2e}, two sets {diff:.4f}")
    assert abs(same) < 1e-6 * diff
    assert diff > 0
    assert shuffled == pytest.approx(diff, rel=1e-6)
    assert fid(b, a).value == pytest.approx(diff, rel=1e-6)


def test_low_rank_trace_equals_sqrtm_small():
    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(5, 24)), rng.normal(size=(7, 24)) * 1.3 + 0.2
    direct = iqa.frechet_distance(*iqa.feature_statistics(f1), *iqa.feature_statistics(f2))
    assert iqa.frechet_distance_features(f1, f2) == pytest.approx(direct, rel=1e-6)  # sqrtm: ~1e-8
    f3, f4 = rng.normal(size=(40, 6)), rng.normal(size=(30, 6)) + 0.5  # more images than dims: covariance path
    assert iqa.frechet_distance_features(f3, f4) == pytest.approx(
        iqa.frechet_distance(*iqa.feature_statistics(f3), *iqa.feature_statistics(f4)), rel=1e-12)


@pytest.mark.slow
def test_fid_equals_scipy_sqrtm_on_inception_features(fid, faces, record_figure):
    """The reported FID against ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2))`` with scipy on the 2048-d features
    (one 2048 x 2048 sqrtm, ~20 s on one core)."""
    from scipy import linalg

    a, b = faces
    fa, fb = fid.features(a), fid.features(b)
    mu1, s1 = fa.mean(0), np.cov(fa, rowvar=False)
    mu2, s2 = fb.mean(0), np.cov(fb, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    direct = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(covmean)))
    ours = fid(a, b).value
    record_figure("fid vs scipy sqrtm", f"ours {ours:.6f}, scipy {direct:.6f}")
    assert ours == pytest.approx(direct, rel=1e-4)


def test_eval_reports_fid_with_file_and_sha256(fid_file, tmp_path):
    from PIL import Image

    from comfyui_bfr.pipelines.metrics import file_sha256

    hq, ref = tmp_path / "hq", tmp_path / "ref"
    hq.mkdir()
    ref.mkdir()
    for k, im in enumerate((skimage_data.astronaut(), skimage_data.chelsea(), skimage_data.coffee())):
        Image.fromarray(im[:256, :256]).resize((64, 64)).save(hq / f"{k}.png")
        Image.fromarray(im[-200:, -200:]).resize((80, 80)).save(ref / f"r{k}.png")
    ts = testset.make_testset(hq, tmp_path / "set", "dr2-medium-x4", seed=0, size=64)
    out = tmp_path / "res"
    rc = main(["eval", str(ts.root), "--out", str(out), "--method", "lq", "--metrics", "psnr", "fid",
               "--fid-weights", str(fid_file), "--fid-ref", str(ref)])
    assert rc == 0
    summary = (out / "summary.md").read_text()
    assert "FID (HQ)" in summary and "FID (ref)" in summary
    assert f"fid: {iqa.FID_WEIGHTS} (sha256 {file_sha256(fid_file)[:12]})" in summary
    row = next(line for line in summary.splitlines() if line.startswith("| lq |"))
    fid_hq, fid_ref = (float(c) for c in row.strip("|").split("|")[-2:])
    assert fid_hq > 0 and fid_ref > 0


def test_scorer_records_the_fid_file(fid_file):
    scorer = evaluate.Scorer(evaluate.MetricOptions(metrics=("fid",), fid_weights=str(fid_file)))
    assert scorer.fid.available and "fid" not in scorer.skipped
    assert scorer.weights["fid"][0]["file"] == iqa.FID_WEIGHTS and len(scorer.weights["fid"][0]["sha256"]) == 64

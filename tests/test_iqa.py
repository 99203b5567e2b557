"""NIQE, LPIPS and FID pieces of pipelines/iqa.py against independent computations on real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from comfyui_bfr.pipelines import iqa

skimage_data = pytest.importorskip("skimage.data")

# NIQE of scikit-image's photos by BasicSR 1.4.2's independent implementation (basicsr/metrics/niqe.py, run from
# its sdist in a throw-away folder; the RGB image given as BGR, convert_to='y', crop_border=0). Two numbers each:
# BasicSR's calculate_niqe as shipped (its Y channel and imresize in float32), and its niqe() fed our float64 Y.
# The patch fits pick the nearest point of a 0.001 grid, so float32 vs float64 alone moves BasicSR by up to 0.027.
BASICSR_NIQE = {"camera": (3.155388651626068, 3.156495659693474),
                "astronaut": (3.06460685312984, 3.0913085267258262)}


def _rgb(name: str) -> np.ndarray:
    img = getattr(skimage_data, name)()
    return np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img


@pytest.mark.parametrize("name", sorted(BASICSR_NIQE))
def test_niqe_matches_basicsr_on_real_photos(name, record_figure):
    shipped, f64 = BASICSR_NIQE[name]
    ours = iqa.niqe_score(_rgb(name))
    record_figure(f"niqe {name}", f"ours {ours:.4f}, BasicSR {shipped:.4f} (float64 input {f64:.4f})")
    assert abs(ours - f64) < 0.015
    assert abs(ours - shipped) < 0.05


def test_niqe_window_is_the_release_window():
    """The MATLAB release's fspecial('gaussian', 7, 7/6), as stored beside the pristine model."""
    with np.load(iqa.NIQE_PARAMS) as d:
        np.testing.assert_allclose(iqa.gaussian_window_2d(), d["gaussian_window"], atol=1e-15)
        assert d["mu_pris_param"].shape == (1, 36) and d["cov_pris_param"].shape == (36, 36)


def test_niqe_rises_with_blur_and_noise():
    from skimage.filters import gaussian

    img = _rgb("astronaut")
    clean = iqa.niqe_score(img)
    blurred = iqa.niqe_score((gaussian(img, sigma=3, channel_axis=-1) * 255).round().astype(np.uint8))
    noisy = np.clip(img + np.random.default_rng(0).normal(0, 25, img.shape), 0, 255).astype(np.uint8)
    assert blurred > clean + 2 and iqa.niqe_score(noisy) > clean + 2


def test_niqe_too_small_is_skipped_with_reason():
    r = iqa.niqe(np.zeros((64, 64, 3), np.uint8))
    assert r.value is None and "96x96" in r.skipped
    assert r.weights[0]["file"] == "niqe_pris_params.npz"


def test_matlab_imresize_keeps_constants_and_halves():
    x = np.full((40, 30), 7.5)
    y = iqa.imresize_matlab(x, 0.5)
    assert y.shape == (20, 15)
    np.testing.assert_allclose(y, 7.5, atol=1e-12)


def test_frechet_distance_against_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    # diagonal covariances: Tr(S1 + S2 - 2 (S1 S2)^1/2) = sum (sqrt(v1) - sqrt(v2))^2
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert iqa.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)
    a = rng.normal(size=(50, 4))
    cov = np.cov(a, rowvar=False)
    assert abs(iqa.frechet_distance(a.mean(0), cov, a.mean(0), cov)) < 1e-6


def test_fid_without_weights_is_skipped_naming_the_file(tmp_path):
    fid = iqa.FID(tmp_path / iqa.FID_WEIGHTS)
    assert not fid.available and iqa.FID_WEIGHTS in fid.skipped
    assert fid([np.zeros((8, 8, 3), np.uint8)] * 2, [np.zeros((8, 8, 3), np.uint8)] * 2).value is None


def test_lpips_skips_naming_missing_files(tmp_path, monkeypatch):
    monkeypatch.delenv("BFR_LPIPS_DIR", raising=False)
    missing_heads = iqa.LPIPS("alex", lpips_dir=tmp_path, backbone=tmp_path / "none.pth")
    if iqa.lpips_head_candidates("alex")[-1:] and any(p.is_file() for p in iqa.lpips_head_candidates("alex")):
        pytest.skip("an lpips package with its heads is installed here")
    assert not missing_heads.available and "alex.pth" in missing_heads.skipped
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / "alex.pth")
    no_backbone = iqa.LPIPS("alex", lpips_dir=tmp_path, backbone=tmp_path / "alexnet-owt-7be5be79.pth")
    assert "alexnet-owt-7be5be79.pth" in no_backbone.skipped
    assert no_backbone(np.zeros((64, 64, 3)), np.zeros((64, 64, 3))).value is None


def test_lpips_with_weight_files_in_the_published_layouts(tmp_path):
    """Files laid out as torchvision's alexnet (features.N) and lpips' heads (linL.model.1) load key for key; the
    distance is 0 for identical images, symmetric, and grows with the perturbation."""
    torch.manual_seed(0)
    net = iqa.LPIPSNet("alex")
    backbone = {k: v for k, v in net.state_dict().items() if k.startswith("features.")}
    backbone["classifier.1.weight"] = torch.zeros(2, 2)  # torchvision's file also has the classifier
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 192, 384, 256, 256))}
    save_file(backbone, str(tmp_path / "alexnet.safetensors"))
    torch.save(heads, tmp_path / "alex.pth")
    m = iqa.LPIPS("alex", lpips_dir=tmp_path, backbone=tmp_path / "alexnet.safetensors")
    assert m.available and [w["file"] for w in m.weights] == ["alex.pth", "alexnet.safetensors"]
    a = _rgb("astronaut")[::4, ::4]
    rng = np.random.default_rng(0)
    small = np.clip(a + rng.normal(0, 5, a.shape), 0, 255).astype(np.uint8)
    big = np.clip(a + rng.normal(0, 40, a.shape), 0, 255).astype(np.uint8)
    assert m(a, a).value == pytest.approx(0.0, abs=1e-7)
    assert m(a, big).value == pytest.approx(m(big, a).value, rel=1e-5)
    assert 0 < m(a, small).value < m(a, big).value

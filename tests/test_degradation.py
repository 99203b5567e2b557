"""Classical degradation (pipelines/degradation.py): presets, sampler, each stage against an independent
implementation (cv2 / scipy / PIL / numpy formulas), torch-vs-cv2 backend agreement, statistics, bad input."""

from __future__ import annotations

import io
import json
import math

import cv2
import numpy as np
import pytest
import scipy.ndimage
import scipy.special
import scipy.stats
import torch
from PIL import Image

from comfyui_bfr.pipelines import degradation as D

# Documented torch-vs-cv2 tolerances (max abs, [0,1] scale) for the same parameters and noise seed.
TOL_BLUR = 2e-6
TOL_RESIZE = 2e-5



# ------------------------------------------------------------------------------------------------ helpers
def face(size=128) -> np.ndarray:
    """A real photo: the astronaut's face (scikit-image, public domain), uint8 HWC."""
    from skimage import data

    img = data.astronaut()[20:260, 110:350]
    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC))


def to_bchw(*imgs) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(i, np.float32) / (255.0 if i.dtype == np.uint8 else 1.0))
                        .permute(2, 0, 1) for i in imgs])


def rand_img(h, w, seed=0, smooth=True) -> np.ndarray:
    x = np.random.default_rng(seed).random((h, w, 3)).astype(np.float32)
    return cv2.GaussianBlur(x, (5, 5), 1.0) if smooth else x


def params_for(h, w, blur=None, resize=None, noise=None, jpeg=None, back=None, order=None, round_output=False,
               **color):
    """A hand-written params dict in the documented format (one pass)."""
    return {"input_size": [h, w], "round_output": round_output,
            "passes": [{"order": order or list(D.STAGES), "blur": blur, "resize": resize, "noise": noise,
                        "jpeg": jpeg, "resize_back": back}],
            "color_shift": color.get("color_shift"), "gray": color.get("gray", False),
            "color_jitter": color.get("color_jitter")}


def gauss_spec(sx, sy=None, theta=0.0, size=21, ktype=None):
    return {"type": ktype or ("iso" if sy is None else "aniso"), "size": size, "sigma_x": sx,
            "sigma_y": sx if sy is None else sy, "theta": theta, "beta": None, "omega_c": None}


def run_both(img: np.ndarray, params: dict):
    """(torch backend, cv2 backend, degrade_numpy) outputs as float32 HWC numpy."""
    x = to_bchw(img)
    a, _ = D.degrade(x, D.get_preset("custom"), backend="torch", params=[params])
    b, _ = D.degrade(x, D.get_preset("custom"), backend="cv2", params=[params])
    c = D.degrade_numpy(img, params)
    if c.dtype == np.uint8:
        c = c.astype(np.float32) / 255
    return a[0].permute(1, 2, 0).numpy(), b[0].permute(1, 2, 0).numpy(), c


def psnr(a, b) -> float:
    return float(10 * np.log10(1.0 / np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def np_kernel(spec) -> np.ndarray:
    """Independent numpy formula of the BasicSR/Real-ESRGAN kernel families (x = column, y = row offset)."""
    k = spec["size"]
    ax = np.arange(k) - k // 2
    x, y = np.meshgrid(ax, ax)
    if spec["type"] == "sinc":
        w = spec["omega_c"]
        r = np.hypot(x, y)
        with np.errstate(invalid="ignore", divide="ignore"):
            ker = w * scipy.special.j1(w * r) / (2 * np.pi * r)
        ker[r == 0] = w**2 / (4 * np.pi)
        return ker / ker.sum()
    c, s = np.cos(spec["theta"]), np.sin(spec["theta"])
    rot = np.array([[c, -s], [s, c]])
    inv = np.linalg.inv(rot @ np.diag([spec["sigma_x"] ** 2, spec["sigma_y"] ** 2]) @ rot.T)
    q = inv[0, 0] * x * x + (inv[0, 1] + inv[1, 0]) * x * y + inv[1, 1] * y * y
    if spec["type"].startswith("generalized"):
        ker = np.exp(-0.5 * q ** spec["beta"])
    elif spec["type"].startswith("plateau"):
        ker = 1.0 / (1.0 + q ** spec["beta"])
    else:
        ker = np.exp(-0.5 * q)
    return ker / ker.sum()


# ------------------------------------------------------------------------------------------------ presets
def test_presets_carry_the_papers_ranges():
    p = D.PRESETS
    f = p["flipnet"]  # FlipNet §5.1
    assert (f.blur_sigma, f.resize_scale, f.noise_sigma, f.jpeg_quality) == ((0.1, 15), (0.8, 32), (0, 20), (30, 95))
    assert f.order == "second" and f.shuffle and not f.shuffle_first
    g = p["dr-bfr"]  # DR-BFR Eq. (11) = GFPGAN
    assert (g.blur_sigma, g.resize_scale, g.noise_sigma, g.jpeg_quality) == ((0.1, 10), (0.8, 8), (0, 20), (60, 100))
    assert g.kernel_size == 41 and g.order == "first"
    splits = {"mild": ((3, 5), (5, 20), (60, 80)), "medium": ((5, 7), (15, 40), (40, 60)),
              "severe": ((7, 9), (25, 50), (30, 40))}  # DR2 §4.1
    for sev, (sig, delta, q) in splits.items():
        for r in (4, 8, 16):
            c = p[f"dr2-{sev}-x{r}"]
            assert (c.blur_sigma, c.noise_sigma, c.jpeg_quality, c.resize_scale) == (sig, delta, q, (r, r))
            assert set(c.noise_types) == {"gaussian", "laplace", "poisson"} and c.resize_modes == ("bicubic",)
    c = p["clr-face"]  # CLR-Face §4
    assert (c.noise_sigma, c.resize_scale, c.jpeg_quality) == ((0, 20), (1, 32), (30, 90))
    x32 = p["clr-face-x32"]
    assert x32.resize_scale == (32, 32) and x32.blur_prob > 0 and x32.noise_sigma[1] > 0
    assert "custom" in p and len(p) == 14
    assert all(cfg.name == name for name, cfg in p.items())


def test_get_preset_and_unknown_name_lists_valid_ones():
    assert D.get_preset("FlipNet") is D.PRESETS["flipnet"]
    with pytest.raises(KeyError) as info:
        D.get_preset("gfpgan-v9")
    assert isinstance(info.value, ValueError)
    assert "gfpgan-v9" in str(info.value) and "dr2-severe-x16" in str(info.value)


@pytest.mark.parametrize("field, value, needle", [
    ("blur_sigma", (5, 1), "min 5"), ("jpeg_quality", (0, 50), "jpeg_quality"), ("jpeg_quality", (50, 101), "101"),
    ("noise_sigma", (-1, 5), "-1"), ("kernel_size", 40, "odd"), ("resize_scale", (0, 2), "resize_scale"),
    ("blur_prob", 1.5, "1.5"), ("noise_types", ["speckle"], "speckle"), ("order", "third", "third"),
    ("kernel_probs", (1.0,), "kernel_probs"), ("jpeg_quality", (30.5, 60), "integers"),
    ("blur_sigma", (float("nan"), 2), "blur_sigma"),
])
def test_with_overrides_rejects_bad_values_naming_field_and_value(field, value, needle):
    with pytest.raises(ValueError) as info:
        D.PRESETS["flipnet"].with_overrides(**{field: value})
    msg = str(info.value)
    assert field in msg and needle in msg and "Fix" in msg


def test_with_overrides_unknown_field_lists_valid_fields():
    with pytest.raises(ValueError, match="blur_sigma") as info:
        D.PRESETS["custom"].with_overrides(blur_sgima=(1, 2))
    assert "blur_sgima" in str(info.value)


def test_with_overrides_copies_and_accepts_json_shapes():
    base = D.PRESETS["flipnet"]
    cfg = base.with_overrides(blur_sigma=[1, 3], resize_scale=4, jpeg_quality=[40, 60])
    assert cfg.blur_sigma == (1.0, 3.0) and cfg.resize_scale == (4.0, 4.0) and cfg.jpeg_quality == (40, 60)
    assert base.blur_sigma == (0.1, 15.0)  # frozen original untouched
    json.dumps(cfg.to_dict())
    with pytest.raises(dataclass_error()):
        cfg.blur_sigma = (1, 2)


def dataclass_error():
    import dataclasses
    return dataclasses.FrozenInstanceError


# ------------------------------------------------------------------------------------------------ sampler
def test_params_are_json_and_reproduce_the_output_after_a_round_trip():
    x = to_bchw(face(64), face(64)[::-1].copy())
    cfg = D.PRESETS["flipnet"]
    out, params = D.degrade(x, cfg, seed=5)
    reloaded = json.loads(json.dumps(params))
    again, _ = D.degrade(x, cfg, params=reloaded)
    assert torch.equal(out, again)
    for p in params:
        assert [len(ps["order"]) for ps in p["passes"]] == [4, 4]


def test_sample_params_per_image_independent_of_batch_size_and_stage_settings():
    cfg = D.PRESETS["dr-bfr"]
    assert D.sample_params(cfg, 5, 3, 64, 64)[:2] == D.sample_params(cfg, 2, 3, 64, 64)
    other = D.sample_params(cfg.with_overrides(noise_sigma=(30, 40)), 3, 3, 64, 64)
    base = D.sample_params(cfg, 3, 3, 64, 64)
    assert [p["passes"][0]["blur"] for p in other] == [p["passes"][0]["blur"] for p in base]
    assert [p["passes"][0]["noise"] for p in other] != [p["passes"][0]["noise"] for p in base]


def test_sampled_values_stay_in_range_and_second_pass_is_shuffled():
    cfg = D.PRESETS["flipnet"]
    params = D.sample_params(cfg, 200, 11, 512, 512)
    orders = set()
    for p in params:
        first, second = p["passes"]
        assert first["order"] == list(D.STAGES)
        orders.add(tuple(second["order"]))
        for ps in p["passes"]:
            b, r, n, j = ps["blur"], ps["resize"], ps["noise"], ps["jpeg"]
            assert 0.1 <= b["sigma_x"] <= 15 and 0.1 <= b["sigma_y"] <= 15 and b["size"] == 41
            assert 0.8 <= r["scale"] <= 32 and r["mode"] in ("area", "bilinear", "bicubic")
            assert r["size"] == [max(1, math.floor(512 / r["scale"] + 1e-9))] * 2
            assert 0 <= n["sigma"] <= 20 and n["type"] == "gaussian"
            assert 30 <= j["quality"] <= 95 and isinstance(j["quality"], int)
    assert len(orders) > 10  # many of the 24 permutations occur
    grays = [ps["noise"]["gray"] for p in params for ps in p["passes"]]
    assert 0.3 < np.mean(grays) < 0.5  # Real-ESRGAN's gray-noise probability 0.4


def test_same_seed_same_output_new_seed_different_both_backends():
    x = to_bchw(face(64))
    cfg = D.PRESETS["flipnet"]
    for backend in D.BACKENDS:
        a, pa = D.degrade(x, cfg, seed=1, backend=backend)
        b, _ = D.degrade(x, cfg, seed=1, backend=backend)
        c, pc = D.degrade(x, cfg, seed=2, backend=backend)
        assert torch.equal(a, b) and not torch.equal(a, c) and pa != pc


# ------------------------------------------------------------------------------------------------ kernels / blur
@pytest.mark.parametrize("spec", [
    gauss_spec(2.5, size=21), gauss_spec(4.0, 1.5, theta=0.7, size=41), gauss_spec(3.0, 1.0, theta=-2.0, size=15),
    {**gauss_spec(2.0, 3.0, theta=0.3, size=21, ktype="generalized_aniso"), "beta": 2.5},
    {**gauss_spec(2.0, size=21, ktype="generalized_iso"), "beta": 0.6},
    {**gauss_spec(2.0, 1.2, theta=1.1, size=21, ktype="plateau_aniso"), "beta": 1.5},
    {"type": "sinc", "size": 21, "sigma_x": None, "sigma_y": None, "theta": None, "beta": None, "omega_c": 1.3},
])
def test_kernels_match_an_independent_numpy_formula(spec):
    ours = D.make_kernels([spec])[0].numpy()
    np.testing.assert_allclose(ours, np_kernel(spec), atol=1e-7)
    assert abs(ours.sum() - 1) < 1e-5


def test_iso_gaussian_is_the_outer_product_of_1d_gaussians_and_sigma_zero_is_a_delta():
    g = np.exp(-0.5 * (np.arange(41) - 20) ** 2 / 3.2**2)
    g /= g.sum()
    np.testing.assert_allclose(D.make_kernels([gauss_spec(3.2, size=41)])[0].numpy(), np.outer(g, g), atol=1e-8)
    delta = D.make_kernels([gauss_spec(0.0, size=7)])[0].numpy()
    assert delta[3, 3] == 1.0 and delta.sum() == 1.0


@pytest.mark.parametrize("h, w", [(37, 52), (16, 16), (3, 2), (1, 1)])
@pytest.mark.parametrize("method", ["conv", "fft"])
def test_blur_matches_cv2_filter2d_and_scipy_for_any_size(h, w, method):
    img = rand_img(h, w, seed=h, smooth=False)
    spec = gauss_spec(3.0, 1.2, theta=0.5, size=21)
    kernel = D.make_kernels([spec])
    ours = D.apply_blur(to_bchw(img), kernel, method=method)[0].permute(1, 2, 0).numpy()
    k = kernel[0].numpy()
    ref = cv2.filter2D(img, -1, k, borderType=cv2.BORDER_REFLECT_101)
    np.testing.assert_allclose(ours, ref, atol=TOL_BLUR)
    if min(h, w) > 10:  # scipy's 'mirror' equals reflect-101 while the pad is shorter than the image
        ref2 = np.stack([scipy.ndimage.correlate(img[..., c].astype(np.float64), k.astype(np.float64),
                                                 mode="mirror") for c in range(3)], -1)
        np.testing.assert_allclose(ours, ref2, atol=TOL_BLUR)


def test_per_sample_kernels_are_applied_per_sample():
    imgs = [rand_img(30, 30, seed=s) for s in range(3)]
    specs = [gauss_spec(1.0, size=15), gauss_spec(2.0, 4.0, theta=1.0, size=15),
             {"type": "sinc", "size": 15, "omega_c": 2.0}]
    kernels = D.make_kernels(specs)
    out = D.apply_blur(to_bchw(*imgs), kernels)
    for i in range(3):
        ref = cv2.filter2D(imgs[i], -1, kernels[i].numpy(), borderType=cv2.BORDER_REFLECT_101)
        np.testing.assert_allclose(out[i].permute(1, 2, 0).numpy(), ref, atol=TOL_BLUR)


# ------------------------------------------------------------------------------------------------ resize
@pytest.mark.parametrize("mode, pil", [("bilinear", Image.Resampling.BILINEAR), ("bicubic", Image.Resampling.BICUBIC)])
@pytest.mark.parametrize("lr", [(23, 17), (80, 96)])  # shrink (antialiased) then enlarge back; and the reverse
def test_resize_equals_pil_float_resampling(mode, pil, lr):
    h, w = 48, 40
    img = rand_img(h, w, seed=3)
    params = params_for(h, w, resize={"scale": h / lr[0], "mode": mode, "size": list(lr), "clamped": False},
                        back={"mode": mode, "size": [h, w]})

    def pil_resize(a, size):
        return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(a[..., c])).resize(size[::-1], pil))
                         for c in range(3)], -1).clip(0, 1)

    ref = pil_resize(pil_resize(img, lr), (h, w))
    for out in run_both(img, params):
        np.testing.assert_allclose(out, ref, atol=TOL_RESIZE)


def test_area_and_bilinear_equal_cv2_where_the_filters_coincide():
    # cv2 INTER_AREA = box average for integer shrink factors; cv2 INTER_LINEAR = torch/PIL bilinear when enlarging.
    img = rand_img(64, 48, seed=4)
    params = params_for(64, 48, resize={"scale": 4.0, "mode": "area", "size": [16, 12], "clamped": False},
                        back={"mode": "bilinear", "size": [64, 48]})
    ref = cv2.resize(cv2.resize(img, (12, 16), interpolation=cv2.INTER_AREA), (48, 64), interpolation=cv2.INTER_LINEAR)
    for out in run_both(img, params):
        np.testing.assert_allclose(out, ref, atol=TOL_RESIZE)


@pytest.mark.parametrize("size", [(29, 26), (10, 10), (100, 77)])
def test_non_integer_area_resize_is_identical_between_backends(size):
    # Both backends run torch's area kernel on the CPU, so they agree bit for bit. It matters on 8-bit levels (as
    # after a JPEG and an area enlargement): bin averages often land exactly on a rounding tie, which any float
    # difference breaks one way or the other (numpy cumsums flipped up to 1 % of the 8-bit values here).
    blocky = np.repeat(np.repeat(np.round(rand_img(10, 9, seed=5, smooth=False) * 255) / 255, 5, 0), 5, 1)
    for img in (rand_img(50, 45, seed=5), blocky.astype(np.float32)):
        params = params_for(50, 45, resize={"scale": 50 / size[0], "mode": "area", "size": list(size),
                                            "clamped": False}, back={"mode": "area", "size": [50, 45]})
        a, b, c = run_both(img, params)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(b, c)


# ------------------------------------------------------------------------------------------------ noise
def flat(value, size=128):
    return np.full((size, size, 3), value, np.float32)


def noise_only(value, ntype, sigma, gray=False, seed=7, size=128):
    img = flat(value, size)
    p = params_for(size, size, noise={"type": ntype, "sigma": sigma, "gray": gray, "seed": seed})
    a, b, c = run_both(img, p)
    np.testing.assert_array_equal(a, b)  # same field from the same seed, identical input
    return a - img


def test_gaussian_noise_mean_zero_std_sigma_over_255():
    n = noise_only(0.5, "gaussian", 10.0)
    assert abs(n.mean()) < 4 * (10 / 255) / math.sqrt(n.size)
    assert abs(n.std() / (10 / 255) - 1) < 0.02
    assert abs(scipy.stats.kurtosis(n.ravel())) < 0.15
    assert not np.allclose(n[..., 0], n[..., 1])  # per-channel noise
    g = noise_only(0.5, "gaussian", 10.0, gray=True)
    np.testing.assert_array_equal(g[..., 0], g[..., 1])
    assert abs(g.std() / (10 / 255) - 1) < 0.03


def test_laplace_noise_has_std_sigma_and_excess_kurtosis_3():
    n = noise_only(0.5, "laplace", 10.0)
    assert abs(n.mean()) < 4 * (10 / 255) / math.sqrt(n.size)
    assert abs(n.std() / (10 / 255) - 1) < 0.03
    assert abs(scipy.stats.kurtosis(n.ravel()) - 3.0) < 0.8


@pytest.mark.parametrize("sigma", [5.0, 50.0])  # lam*x >= 64 (normal branch) and < 64 (exact inverse CDF)
def test_poisson_noise_variance_is_proportional_to_intensity(sigma):
    lam = 0.5 * (255 / sigma) ** 2
    variances = {}
    for x in (0.2, 0.4):  # exact 8-bit levels (51, 102), little clipping at 1
        n = noise_only(x, "poisson", sigma)
        counts = (x + n) * lam
        inside = x + n < 1  # not clipped at 1
        np.testing.assert_allclose(counts[inside], np.round(counts[inside]), atol=2e-3 * max(1.0, lam * x) ** 0.5)
        assert abs(n.mean()) < 5 * math.sqrt(x / lam / n.size)
        variances[x] = n.var()
        assert abs(variances[x] / (x / lam) - 1) < 0.05  # Var = x / lam
    assert abs(variances[0.4] / variances[0.2] - 2.0) < 0.2
    assert not noise_only(0.0, "poisson", sigma).any()  # no photons, no noise


def test_poisson_small_rate_counts_follow_the_poisson_pmf():
    lam = 0.5 * (255 / 60.0) ** 2  # ~9 photons at full scale
    x = 0.2
    n = noise_only(x, "poisson", 60.0)
    counts = np.round((x + n) * lam).astype(int).ravel()
    emp = np.bincount(counts, minlength=20)[:20] / counts.size
    np.testing.assert_allclose(emp, scipy.stats.poisson.pmf(np.arange(20), lam * x), atol=0.01)


# ------------------------------------------------------------------------------------------------ JPEG
@pytest.mark.parametrize("q", [5, 50, 95, 100])
def test_jpeg_is_bit_exact_with_pil_libjpeg(q):
    img = face(48)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=q)
    ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).astype(np.float32) / 255
    for out in run_both(img, params_for(48, 48, jpeg={"quality": q})):
        np.testing.assert_array_equal(out, ref)


def test_differentiable_jpeg_is_close_to_libjpeg_and_passes_gradients():
    x = to_bchw(face(64)).requires_grad_(True)
    cfg = D.PRESETS["dr-bfr"].with_overrides(blur_sigma=(2, 2), resize_scale=2, noise_sigma=(3, 3))
    soft, params = D.degrade(x, cfg, seed=0, jpeg="differentiable")
    hard, _ = D.degrade(x.detach(), cfg, params=params, jpeg="libjpeg")
    assert (soft.detach() - hard).abs().mean() < 0.02
    soft.mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="differentiable"):
        D.degrade(x.detach(), cfg, backend="cv2", jpeg="differentiable")


@pytest.mark.parametrize("q", [0, 101, 50.5])
def test_jpeg_quality_outside_1_100_in_params_is_a_clear_error(q):
    p = params_for(16, 16, jpeg={"quality": q})
    with pytest.raises(ValueError, match=r"\[1, 100\]"):
        D.degrade(torch.rand(1, 3, 16, 16), D.PRESETS["custom"], params=[p])
    with pytest.raises(ValueError, match=r"\[1, 100\]"):
        D.degrade_numpy(flat(0.5, 16), p)


# ------------------------------------------------------------------------------------------------ identity / agreement
def test_identity_parameters_return_the_input():
    cfg = D.PRESETS["custom"].with_overrides(blur_sigma=0, resize_scale=1, noise_sigma=0, jpeg_prob=0,
                                             round_output=False)
    x = torch.rand(2, 3, 33, 47)
    for backend in D.BACKENDS:
        out, params = D.degrade(x, cfg, seed=3, backend=backend)
        assert (out - x).abs().max() <= 1e-6
        assert params[0]["passes"][0]["blur"]["sigma_x"] == 0
    u8 = torch.randint(0, 256, (2, 3, 20, 24)).float() / 255  # exact with 8-bit rounding on, blur skipped
    out, _ = D.degrade(u8, cfg.with_overrides(blur_prob=0, round_output=True), seed=3)
    assert torch.equal(out, u8)


@pytest.mark.parametrize("ktype", ["iso", "aniso", "generalized_aniso", "plateau_iso", "sinc"])
def test_backends_agree_on_blur_stage(ktype):
    img = face(40).astype(np.float32) / 255
    cfg = D.PRESETS["custom"].with_overrides(kernel_types=(ktype,), kernel_probs=(1,), blur_sigma=(1, 6),
                                             resize_prob=0, noise_prob=0, jpeg_prob=0, round_output=False)
    p = D.sample_params(cfg, 1, 4, 40, 40)[0]
    a, b, c = run_both(img, p)
    assert np.abs(a - b).max() <= TOL_BLUR and np.array_equal(b, c)


@pytest.mark.parametrize("ntype", ["gaussian", "laplace", "poisson"])
def test_backends_agree_on_noise_stage_with_the_same_seed(ntype):
    img = face(40).astype(np.float32) / 255
    for gray in (False, True):
        p = params_for(40, 40, noise={"type": ntype, "sigma": 25.0, "gray": gray, "seed": 123})
        a, b, c = run_both(img, p)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(b, c)


def full_chain_diff(name, seed, size=64, batch=3):
    x = to_bchw(*[face(size)] * batch)
    cfg = D.get_preset(name)
    a, params = D.degrade(x, cfg, seed=seed, backend="torch")
    b, _ = D.degrade(x, cfg, params=params, backend="cv2")
    return (a - b).abs()


@pytest.mark.parametrize("name", ["flipnet", "dr-bfr", "dr2-severe-x4", "dr2-mild-x16", "clr-face", "clr-face-x32"])
def test_backends_agree_on_whole_chains(name):
    d = full_chain_diff(name, seed=21)
    # Only 8-bit rounding flips before JPEG (float differences ~1e-6) can separate the backends.
    assert d.mean() < 1e-4, float(d.mean())
    assert (d > 1.5 / 255).float().mean() < 3e-3, float((d > 1.5 / 255).float().mean())
    assert (d > 0).float().mean() < 1e-2


def test_flipnet_backends_agree_where_tiny_grids_meet_jpeg():
    # Seed 2 at 256 px: image 9 goes 256 -> 8 px -> back (area) -> 10 px (area, x25.6) -> blur -> JPEG on a 10-px
    # image, so one 8-bit rounding tie broken differently moves a whole JPEG block, x25 once resized back. With
    # numpy's area pooling in the cv2 backend this batch had 3.5 % of its values off by > 1.5/255 (41 % of image
    # 9); with the shared torch kernel none (mean abs 3e-7; over seeds 0..24 at most 0.06 % per batch).
    d = full_chain_diff("flipnet", seed=2, size=256, batch=12)
    assert d.mean() < 1e-4, float(d.mean())
    assert (d > 1.5 / 255).float().mean() < 3e-3, float((d > 1.5 / 255).float().mean())


def test_backends_agree_with_colour_jitter_and_gray():
    x = to_bchw(*[face(48)] * 3)
    for gray in (0.0, 1.0):
        cfg = D.PRESETS["dr-bfr"].with_overrides(color_jitter_prob=1.0, color_jitter_pt_prob=1.0, gray_prob=gray)
        a, params = D.degrade(x, cfg, seed=8)
        b, _ = D.degrade(x, cfg, params=params, backend="cv2")
        assert (a - b).abs().mean() < 1e-3
        assert all(p["color_jitter"] and p["color_shift"] and p["gray"] == bool(gray) for p in params)
        if gray:
            assert torch.equal(a[:, 0], a[:, 1]) and torch.equal(a[:, 1], a[:, 2])
        else:
            assert not torch.equal(a[:, 0], a[:, 1])


def test_hue_rotation_keeps_gray_and_a_full_turn_is_identity():
    img = face(32).astype(np.float32) / 255
    jit = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.5}
    gray = np.repeat(img.mean(-1, keepdims=True), 3, -1)
    a, b, _ = run_both(gray, params_for(32, 32, color_jitter=jit))
    np.testing.assert_allclose(a, gray, atol=1e-6)
    np.testing.assert_allclose(b, gray, atol=1e-6)
    a, _, _ = run_both(img, params_for(32, 32, color_jitter={**jit, "hue": 0.0}))
    np.testing.assert_allclose(a, img, atol=1e-6)


# ------------------------------------------------------------------------------------------------ severity
def test_dr2_presets_order_by_psnr_on_a_real_face():
    hq = face(128)
    x = to_bchw(*[hq] * 4)
    ref = x.numpy()

    def mean_psnr(name):
        vals = []
        for seed in range(3):
            out, _ = D.degrade(x, D.get_preset(name), seed=seed)
            vals += [psnr(o, r) for o, r in zip(out.numpy(), ref)]
        return float(np.mean(vals))

    x4 = [mean_psnr(f"dr2-{s}-x4") for s in ("mild", "medium", "severe")]
    medium = [mean_psnr(f"dr2-medium-x{r}") for r in (4, 8, 16)]
    assert x4[0] > x4[1] > x4[2], x4
    assert medium[0] > medium[1] > medium[2], medium


# ------------------------------------------------------------------------------------------------ bad input
def test_tiny_image_x32_clamps_to_one_pixel_and_reports_it(caplog):
    x = to_bchw(face(16))
    for backend in D.BACKENDS:
        out, params = D.degrade(x, D.PRESETS["clr-face-x32"], seed=0, backend=backend)
        r = params[0]["passes"][0]["resize"]
        assert r["size"] == [1, 1] and r["clamped"] is True
        assert out.shape == x.shape and torch.isfinite(out).all()
    assert "clamped" in caplog.text


def test_gray_and_alpha_inputs_become_rgb():
    rgb = to_bchw(face(32))
    gray = rgb.mean(1, keepdim=True)
    cfg = D.PRESETS["dr-bfr"]
    ref, _ = D.degrade(gray.expand(-1, 3, -1, -1), cfg, seed=1)
    out1, _ = D.degrade(gray, cfg, seed=1)
    out2, _ = D.degrade(torch.cat([gray, torch.rand_like(gray)], 1), cfg, seed=1)  # gray + alpha
    assert out1.shape == ref.shape and torch.equal(out1, ref) and torch.equal(out2, ref)
    ref_rgb, _ = D.degrade(rgb, cfg, seed=1, backend="cv2")
    out4, _ = D.degrade(torch.cat([rgb, torch.zeros_like(gray)], 1), cfg, seed=1, backend="cv2")  # RGBA: alpha dropped
    assert torch.equal(out4, ref_rgb)
    p = D.sample_params(cfg, 1, 1, 32, 32)[0]
    g8 = face(32).mean(-1).astype(np.uint8)
    a = D.degrade_numpy(g8, p)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, D.degrade_numpy(np.repeat(g8[..., None], 3, -1), p))


@pytest.mark.parametrize("bad, match", [
    (float("nan"), "NaN"), (float("inf"), "NaN/inf"), (255.0, r"\[0, 1\]"), (-0.5, r"\[0, 1\]"),
])
def test_bad_pixel_values_are_clear_errors(bad, match):
    x = torch.rand(1, 3, 16, 16)
    x[0, 1, 2, 3] = bad
    with pytest.raises(ValueError, match=match):
        D.degrade(x, D.PRESETS["flipnet"])
    with pytest.raises(ValueError, match=match):
        D.degrade_numpy(x[0].permute(1, 2, 0).numpy(), D.sample_params(D.PRESETS["flipnet"], 1, 0, 16, 16)[0])


def test_shape_dtype_and_params_mismatch_errors():
    cfg = D.PRESETS["dr-bfr"]
    with pytest.raises(ValueError, match="movedim"):
        D.degrade(torch.rand(1, 16, 16, 3), cfg)
    with pytest.raises(ValueError, match="float"):
        D.degrade(torch.randint(0, 255, (1, 3, 8, 8), dtype=torch.uint8), cfg)
    with pytest.raises(ValueError, match="32x32"):
        D.degrade(torch.rand(1, 3, 16, 16), cfg, params=D.sample_params(cfg, 1, 0, 32, 32))
    with pytest.raises(ValueError, match="one dict per image"):
        D.degrade(torch.rand(2, 3, 16, 16), cfg, params=D.sample_params(cfg, 1, 0, 16, 16))
    with pytest.raises(ValueError, match="backend"):
        D.degrade(torch.rand(1, 3, 16, 16), cfg, backend="gpu")
    with pytest.raises(ValueError, match="seed"):
        D.sample_params(cfg, 1, -1, 16, 16)


def test_output_keeps_dtype_device_and_input_is_untouched():
    x = torch.rand(2, 3, 24, 24, dtype=torch.float64)
    before = x.clone()
    out, _ = D.degrade(x, D.PRESETS["flipnet"], seed=0)
    assert out.dtype == torch.float64 and out.device == x.device and out.shape == x.shape
    assert torch.equal(x, before)
    assert out.min() >= 0 and out.max() <= 1
    levels = out * 255
    assert torch.allclose(levels, levels.round(), atol=1e-4)  # rounded to 8-bit levels


# ------------------------------------------------------------------------------------------------ blur units
# FlipNet's second pass runs in shuffled order, so its blur can land after the down-sample. sigma is sampled in
# input (HQ) pixels (the paper's [0.1, 15]); a blur after the resize acts in the down-sampled grid's units
# (sigma * grid_scale, kernel size likewise), and the report records the kernel applied.
def spatial_std(x: torch.Tensor) -> float:
    """Per-channel spatial std, averaged over channels (a flat colour image has 0, whatever its colour)."""
    return float(x.std(dim=(-2, -1)).mean())


def as_written(params: dict) -> dict:
    """The same parameters with the blur applied as written in the grid it meets (the behaviour before the fix)."""
    out = json.loads(json.dumps(params))
    for ps in out["passes"]:
        if ps["blur"] is not None:
            ps["blur"].pop("grid_scale")
            ps["blur"].pop("applied")
    return out


def test_bug_report_seed0_flipnet_is_no_longer_flat(record_figure):
    # The demo's report (512 px, seed 0): pass 2 ran jpeg -> resize (x29.3, 512 -> 17 px) -> noise -> blur
    # sigma 10.4 with a 41-px kernel on the 17-px image, which flattened it.
    x = to_bchw(face(512))
    cfg = D.get_preset("flipnet")
    params = D.sample_params(cfg, 1, 0, 512, 512)
    second = params[0]["passes"][1]
    assert second["order"] == ["jpeg", "resize", "noise", "blur"] and second["resize"]["size"] == [17, 17]
    blur = second["blur"]
    assert blur["size"] == 41 and abs(blur["sigma_x"] - 10.43) < 0.01  # sampled, in HQ pixels (unchanged keys)
    assert blur["grid_scale"] == pytest.approx(17 / 512)
    assert blur["applied"] == {"size": 3, "sigma_x": pytest.approx(blur["sigma_x"] * 17 / 512),
                               "sigma_y": pytest.approx(blur["sigma_y"] * 17 / 512), "omega_c": None}
    first = params[0]["passes"][0]["blur"]  # pass 1 blurs before its resize: in HQ pixels, as sampled
    assert first["grid_scale"] == 1.0 and first["applied"]["sigma_x"] == first["sigma_x"]
    assert first["applied"]["size"] == 41
    ref = spatial_std(x)
    ratios = {}
    for backend in D.BACKENDS:
        out, _ = D.degrade(x, cfg, params=params, backend=backend)
        old, _ = D.degrade(x, cfg, params=[as_written(params[0])], backend=backend)
        ratios[backend] = (spatial_std(out) / ref, spatial_std(old) / ref)
        assert ratios[backend][0] > 0.5, ratios  # measured 0.82: a low-resolution face, not a flat colour
        assert ratios[backend][1] < 0.1, ratios  # measured 0.050: the bug, still reproducible from such a report
    record_figure("flipnet seed0 512px std ratio", f"{ratios['cv2'][0]:.3f} (blur as written: {ratios['cv2'][1]:.4f})")


def test_no_flipnet_sample_is_flat_over_200_seeds(record_figure):
    # Real face, 128 px (x32 leaves 4 px: harsher than the paper's 512 px). Measured spatial std / input's over
    # seeds 0..199: min 0.375, 1st percentile 0.41, median 0.57; before the fix 10 samples were exactly 0 (flat),
    # 19 below 0.01 and 64 below 0.2. Floor 0.2: about half the lowest measured ratio, and 20x above the 0.01 of
    # a flattened sample.
    x = to_bchw(face(128))
    cfg = D.get_preset("flipnet")
    ref = spatial_std(x)
    ratios = np.array([spatial_std(D.degrade(x, cfg, seed=s, backend="cv2")[0]) / ref for s in range(200)])
    record_figure("flipnet 200 seeds std ratio", f"min {ratios.min():.3f}, p1 {np.percentile(ratios, 1):.3f}, "
                                                 f"median {np.median(ratios):.3f} (floor 0.2)")
    assert ratios.min() > 0.2, (int(ratios.argmin()), float(ratios.min()))


@pytest.mark.parametrize("s", [2, 4, 8])
def test_blur_after_downsample_acts_in_hq_pixels(s):
    # Blurring the down-sampled image with the grid-scaled kernel ~ down-sampling the HQ blur (the two commute for
    # a Gaussian and area pooling up to the kernel's discretisation): the sampled sigma keeps its HQ meaning.
    x = to_bchw(face(256))
    spec = gauss_spec(10.4, size=41)
    lr = torch.nn.functional.interpolate(x, scale_factor=1 / s, mode="area")
    ref = torch.nn.functional.interpolate(D.apply_blur(x, D.make_kernels([spec])), scale_factor=1 / s, mode="area")
    eff = D.effective_blur({**spec, "grid_scale": 1 / s})
    assert eff["sigma_x"] == pytest.approx(10.4 / s) and eff["size"] == {2: 21, 4: 11, 8: 5}[s]
    scaled = (D.apply_blur(lr, D.make_kernels([eff])) - ref).abs().mean()
    unscaled = (D.apply_blur(lr, D.make_kernels([spec])) - ref).abs().mean()
    assert scaled < 4e-3 and unscaled > 10 * scaled, (float(scaled), float(unscaled))  # measured 1e-3..3e-3


def test_effective_blur_sizes_sinc_and_validation():
    assert D.effective_blur(gauss_spec(3.0, size=21)) == gauss_spec(3.0, size=21)  # no grid_scale: as written
    enlarged = D.effective_blur({**gauss_spec(4.0, 2.0, theta=0.3, size=41), "grid_scale": 1.25})  # s = 0.8
    assert enlarged["size"] == 51 and enlarged["sigma_x"] == 5.0 and enlarged["sigma_y"] == 2.5
    assert enlarged["theta"] == 0.3 and enlarged["grid_scale"] == 1.0
    assert D.effective_blur({**gauss_spec(1.0, size=41), "grid_scale": 1 / 512})["size"] == 3  # minimum 3
    assert D.effective_blur({**gauss_spec(0.0, size=1), "grid_scale": 0.1})["size"] == 1
    sinc = {"type": "sinc", "size": 21, "sigma_x": None, "sigma_y": None, "theta": None, "beta": None, "omega_c": 0.5}
    assert D.effective_blur({**sinc, "grid_scale": 0.5})["omega_c"] == 1.0  # cutoff in rad per grid pixel
    assert D.effective_blur({**sinc, "grid_scale": 0.1})["omega_c"] == math.pi  # capped at the grid's Nyquist
    p = params_for(16, 16, blur={**gauss_spec(2.0), "grid_scale": -1.0})
    with pytest.raises(ValueError, match="grid_scale"):
        D.degrade(torch.rand(1, 3, 16, 16), D.PRESETS["custom"], params=[p])


def test_backends_agree_on_a_blur_after_the_resize():
    img = face(96).astype(np.float32) / 255
    blur = {**gauss_spec(6.0, 3.0, theta=0.4, size=41), "grid_scale": 24 / 96}
    p = params_for(96, 96, order=["resize", "blur", "noise", "jpeg"], blur=blur,
                   resize={"scale": 4.0, "mode": "bicubic", "size": [24, 24], "clamped": False},
                   back={"mode": "bicubic", "size": [96, 96]})
    a, b, c = run_both(img, p)
    assert np.abs(a - b).max() <= TOL_BLUR + TOL_RESIZE and np.array_equal(b, c)
    # = the hand-written kernel of the grid-scaled values (sigma 1.5 x 0.75, 11 px), applied as written
    p["passes"][0]["blur"] = {**gauss_spec(1.5, 0.75, theta=0.4, size=11)}
    a2, b2, _ = run_both(img, p)
    np.testing.assert_array_equal(a, a2)
    np.testing.assert_array_equal(b, b2)

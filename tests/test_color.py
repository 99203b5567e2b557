"""Colour fix (pipelines/color.py, nodes/color.py): the a trous blur and pyramid against scipy, the wavelet and
AdaIN fixes on real photos with shifted colours, masked statistics against numpy, bad input, and the node."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch
from PIL import Image

from comfyui_bfr.nodes.color import BFRColorFix
from comfyui_bfr.nodes.helpers import NodeInputError
from comfyui_bfr.pipelines import color as C

KERNEL = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float64) / 16
TINT_GAIN, TINT_OFFSET = (1.2, 0.9, 0.8), (0.02, 0.03, -0.02)


# ------------------------------------------------------------------------------------------------ helpers
def photo(name: str, h: int, w: int) -> np.ndarray:
    """A real photo from scikit-image (public domain), resized, float64 HWC in [0,1]."""
    from skimage import data

    img = getattr(data, name)()
    if name == "astronaut":
        img = img[20:260, 110:350]  # the face
    return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BICUBIC), np.float64) / 255


def bchw(*imgs) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.ascontiguousarray(i)).permute(2, 0, 1) for i in imgs]).float()


def tint(x: torch.Tensor) -> torch.Tensor:
    gain = torch.tensor(TINT_GAIN)[None, :, None, None]
    off = torch.tensor(TINT_OFFSET)[None, :, None, None]
    return (x * gain + off).clamp(0, 1)


def lowres(x: torch.Tensor, factor: int) -> torch.Tensor:
    """A low-quality reference: the photo down-sampled (as an LQ input would be), at its small size."""
    return torch.nn.functional.interpolate(x, scale_factor=1 / factor, mode="bicubic", antialias=True).clamp(0, 1)


def scipy_blur(x: np.ndarray, r: int) -> np.ndarray:
    """Independent a trous blur: correlate each channel of an HW[C] float64 array with the dilated 3x3 kernel."""
    k = np.zeros((2 * r + 1, 2 * r + 1))
    k[::r, ::r] = KERNEL
    return np.stack([scipy.ndimage.correlate(x[..., c], k, mode="nearest") for c in range(x.shape[-1])], -1)


def scipy_decomposition(x: np.ndarray, levels: int = 5):
    high = np.zeros_like(x)
    for i in range(levels):
        low = scipy_blur(x, 2**i)
        high += x - low
        x = low
    return high, x


def hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).double().numpy()


def channel_means(x: torch.Tensor) -> torch.Tensor:
    return x.double().mean(dim=(-2, -1))


# ------------------------------------------------------------------------------------------------ blur / pyramid
@pytest.mark.parametrize("r", [1, 2, 4, 16])
def test_blur_equals_scipy_correlate_with_the_dilated_kernel(r):
    x = np.random.default_rng(r).random((13, 17, 2))  # 2 channels; r = 16 pads beyond the 13-px side
    ours = C.wavelet_blur(bchw(x), r)[0]
    np.testing.assert_allclose(hwc(ours), scipy_blur(x, r), atol=1e-6)


@pytest.mark.parametrize("channels", [1, 3, 5])
def test_decomposition_matches_scipy_and_high_plus_low_is_the_input(channels):
    x = photo("astronaut", 96, 96)
    x = np.concatenate([x, x[..., ::-1]], -1)[..., :channels] if channels != 3 else x
    t = bchw(x)
    high, low = C.wavelet_decomposition(t)
    assert high.shape == low.shape == t.shape and high.dtype == t.dtype
    assert (high + low - t).abs().max() <= 1e-6
    ref_high, ref_low = scipy_decomposition(x.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(hwc(high[0]), ref_high, atol=1e-5)
    np.testing.assert_allclose(hwc(low[0]), ref_low, atol=1e-5)
    assert high.abs().mean() > 0.01  # a photo has detail: the test is not vacuous


def test_constant_image_has_a_zero_high_band():
    x = torch.full((2, 3, 40, 28), 0.3)
    x[1] = 0.7
    high, low = C.wavelet_decomposition(x)
    assert high.abs().max() <= 1e-6
    assert (low - x).abs().max() <= 1e-6


# ------------------------------------------------------------------------------------------------ wavelet fix
@pytest.mark.parametrize("name, h, w", [("astronaut", 128, 128), ("chelsea", 128, 192), ("coffee", 128, 192)])
def test_wavelet_fix_restores_the_colour_of_a_tinted_photo(name, h, w, record_figure):
    orig = bchw(photo(name, h, w))
    image = tint(orig)  # the "restored" image: sharp, wrong colours
    reference = lowres(orig, 4)  # the LQ input: right colours, no detail, 4x smaller (resized inside)
    out = C.wavelet_color_fix(image, reference)
    assert out.shape == image.shape and out.dtype == image.dtype
    before = (channel_means(image) - channel_means(orig)).abs().mean()
    after = (channel_means(out) - channel_means(orig)).abs().mean()
    # measured (mean over channels): astronaut 0.087 -> 0.0008, chelsea 0.079 -> 0.00006, coffee 0.064 -> 0.0004
    assert after < before / 20, (float(before), float(after))
    # the coarse band (colour, shading) is the reference's, the detail the image's
    _, low_out = C.wavelet_decomposition(out)
    _, low_orig = C.wavelet_decomposition(orig)
    _, low_img = C.wavelet_decomposition(image)
    low_err, low_err_before = (low_out - low_orig).abs().mean(), (low_img - low_orig).abs().mean()
    assert low_err < low_err_before / 5, (float(low_err), float(low_err_before))
    # The two finest bands of the output are the image's, not the blurry reference's. Measured relative error
    # 0.009-0.055 per band (the most on the astronaut, where the tint clamps 2.7 % of the pixels), against 0.81-0.98 for
    # the reference's bands.
    ref_up = torch.nn.functional.interpolate(reference, size=(h, w), mode="bicubic", antialias=True)
    rels = []
    for band in (lambda x: x - C.wavelet_blur(x, 1),
                 lambda x: C.wavelet_blur(x, 1) - C.wavelet_blur(C.wavelet_blur(x, 1), 2)):
        rel = float((band(out) - band(image)).norm() / band(image).norm())
        rel_ref = float((band(ref_up) - band(image)).norm() / band(image).norm())
        assert rel < 0.1 and rel_ref > 0.5, (rel, rel_ref)
        rels.append(rel)
    record_figure(f"wavelet fix {name}", f"mean colour error {float(before):.4f} -> {float(after):.5f} "
                                         f"({float(before / after):.0f}x); low band {float(low_err_before):.4f} -> "
                                         f"{float(low_err):.4f}; fine bands rel. error {max(rels):.3f}")


def test_wavelet_fix_is_high_of_image_plus_low_of_reference_and_keeps_the_image_detail():
    # Ranges kept inside (0, 1) so no clamping occurs: then the output is exactly high(image) + low(reference)
    # (checked against the scipy pyramid) and its detail differs from the image's only by the change of low band.
    orig = photo("chelsea", 96, 144)
    image = 0.3 + 0.4 * orig * np.array([1.1, 0.95, 0.9])
    reference = 0.25 + 0.5 * orig
    out = C.wavelet_color_fix(bchw(image), bchw(reference))[0]
    assert 0 < float(out.min()) and float(out.max()) < 1  # no clamping
    high_img, _ = scipy_decomposition(bchw(image)[0].permute(1, 2, 0).double().numpy())
    _, low_ref = scipy_decomposition(bchw(reference)[0].permute(1, 2, 0).double().numpy())
    np.testing.assert_allclose(hwc(out), high_img + low_ref, atol=1e-5)
    # out - image = low(reference) - low(image), a smooth field: re-decomposed, the output's high band is the
    # image's within 4 % (measured 0.041; the reference's, whose detail is 1.25x weaker, is 0.28 away)
    high_out, _ = C.wavelet_decomposition(out[None])
    high_ref, _ = C.wavelet_decomposition(bchw(reference))
    h_img = torch.from_numpy(high_img).permute(2, 0, 1).float()
    assert (high_out[0] - h_img).norm() / h_img.norm() < 0.08
    assert (high_ref[0] - h_img).norm() / h_img.norm() > 0.2


def test_wavelet_fix_same_size_reference_broadcast_and_dtypes():
    a, b = bchw(photo("astronaut", 64, 64)), bchw(photo("coffee", 64, 64))
    image = torch.cat([tint(a), tint(b)])
    one = C.wavelet_color_fix(image, a)  # one reference for both images
    torch.testing.assert_close(one[1], C.wavelet_color_fix(image[1:], a)[0])
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        out = C.wavelet_color_fix(image.to(dtype), a.to(dtype))
        assert out.dtype == dtype
        assert (out.float() - one).abs().max() < (2e-2 if dtype == torch.bfloat16 else 2e-3)
    assert torch.equal(C.color_fix(image, a, "none"), image)
    torch.testing.assert_close(C.color_fix(image, a, "wavelet"), one)


# ------------------------------------------------------------------------------------------------ AdaIN
def test_adain_output_has_the_reference_mean_and_std(record_figure):
    image = bchw(0.3 + 0.4 * photo("chelsea", 96, 144))
    reference = bchw(0.4 + 0.2 * photo("coffee", 64, 96))  # another photo and size: stats need no resize
    out = C.adain_color_fix(image, reference)
    assert 0 < float(out.min()) and float(out.max()) < 1  # no clamping, so the statistics must match
    flat_out, flat_ref = out.flatten(2).double(), reference.flatten(2).double()
    torch.testing.assert_close(flat_out.mean(-1), flat_ref.mean(-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(flat_out.std(-1), flat_ref.std(-1), atol=1e-4, rtol=0)
    # per channel an affine map of the image: correlation 1 with it
    for c in range(3):
        corr = np.corrcoef(out[0, c].flatten().numpy(), image[0, c].flatten().numpy())[0, 1]
        assert corr > 0.9999
    orig = bchw(photo("astronaut", 96, 96))
    tinted = tint(orig)
    err = (channel_means(C.color_fix(tinted, orig, "adain")) - channel_means(orig)).abs().mean()
    before = (channel_means(tinted) - channel_means(orig)).abs().mean()
    assert err < before / 20
    record_figure("adain fix astronaut", f"mean colour error {float(before):.4f} -> {float(err):.5f}")


def test_masked_adain_uses_only_the_masked_pixels():
    image = bchw(0.3 + 0.4 * photo("chelsea", 64, 96))
    reference = bchw(0.35 + 0.3 * photo("coffee", 64, 96))
    mask = torch.zeros(1, 64, 96)
    mask[:, 10:50, 20:70] = 1
    out = C.adain_color_fix(image, reference, mask=mask)
    # independent: numpy statistics (ddof=1) of the masked pixels only
    m = mask[0].bool().numpy()
    x, r = image[0].double().numpy(), reference[0].double().numpy()
    expected = np.stack([(x[c] - x[c][m].mean()) / np.sqrt(x[c][m].var(ddof=1) + 1e-5)
                         * np.sqrt(r[c][m].var(ddof=1) + 1e-5) + r[c][m].mean() for c in range(3)])
    np.testing.assert_allclose(out[0].double().numpy(), np.clip(expected, 0, 1), atol=1e-5)
    # pixels outside the mask do not enter the statistics
    image2, reference2 = image.clone(), reference.clone()
    image2[..., :5, :] = 1.0
    reference2[..., 55:, :] = 0.0
    out2 = C.adain_color_fix(image2, reference2, mask=mask[:, None])  # (B,1,H,W) form
    torch.testing.assert_close(out2[..., 10:50, 20:70], out[..., 10:50, 20:70])
    assert not torch.allclose(C.adain_color_fix(image2, reference2), C.adain_color_fix(image, reference))
    # uniform weights = no mask (the weighted variance is scale-invariant); a reference at another size is resized
    torch.testing.assert_close(C.adain_color_fix(image, reference, mask=torch.full((1, 64, 96), 0.5)),
                               C.adain_color_fix(image, reference), atol=1e-6, rtol=0)
    small = C.adain_color_fix(image, lowres(reference, 2), mask=mask)
    assert (small - out).abs().mean() < 0.01


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_method_shapes_and_masks_are_clear_errors():
    x, r = torch.rand(2, 3, 16, 16), torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="'none', 'wavelet', 'adain'") as info:
        C.color_fix(x, r, "histogram")
    assert "histogram" in str(info.value)
    with pytest.raises(ValueError, match="channels"):
        C.wavelet_color_fix(x, torch.rand(1, 4, 16, 16))
    with pytest.raises(ValueError, match="3 images but image has 2"):
        C.adain_color_fix(x, torch.rand(3, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\(B,C,H,W\)"):
        C.wavelet_color_fix(x[0], r)
    with pytest.raises(ValueError, match="float"):
        C.wavelet_color_fix((x * 255).to(torch.uint8), r)
    with pytest.raises(ValueError, match="levels"):
        C.wavelet_decomposition(x, levels=0)
    with pytest.raises(ValueError, match="mask"):
        C.adain_color_fix(x, r, mask=torch.ones(2, 1, 8, 8))
    with pytest.raises(ValueError, match="empty for image"):
        C.adain_color_fix(x, r, mask=torch.cat([torch.ones(1, 16, 16), torch.zeros(1, 16, 16)]))
    with pytest.raises(ValueError, match="only used by method 'adain'"):
        C.color_fix(x, r, "wavelet", mask=torch.ones(2, 16, 16))


# ------------------------------------------------------------------------------------------------ node
def bhwc(x: torch.Tensor) -> torch.Tensor:
    return x.movedim(1, -1).contiguous()


@pytest.fixture(scope="module")
def faces():
    orig = torch.cat([bchw(photo("astronaut", 64, 64)), bchw(photo("chelsea", 64, 64))])
    return bhwc(tint(orig)), bhwc(orig)


def test_node_matches_the_pipeline_for_each_method(faces):
    image, reference = faces
    before = image.clone(), reference.clone()
    for method in ("wavelet", "adain"):
        (out,) = BFRColorFix().fix(image, reference, method)
        assert out.shape == image.shape and out.dtype == image.dtype
        expected = C.color_fix(image.movedim(-1, 1), reference.movedim(-1, 1), method).movedim(1, -1)
        torch.testing.assert_close(out, expected)
    assert torch.equal(before[0], image) and torch.equal(before[1], reference)  # inputs untouched


def test_node_broadcasts_one_reference_and_rejects_other_batch_sizes(faces):
    image, reference = faces
    image3 = torch.cat([image, image[:1]])
    (out,) = BFRColorFix().fix(image3, reference[:1], "wavelet")
    for i in range(3):
        (single,) = BFRColorFix().fix(image3[i:i + 1], reference[:1], "wavelet")
        torch.testing.assert_close(out[i:i + 1], single)
    with pytest.raises(NodeInputError, match="single reference") as info:
        BFRColorFix().fix(image3, reference, "wavelet")
    assert "BFR Color Fix" in str(info.value) and "2 images" in str(info.value)


def test_node_keeps_alpha_and_resizes_the_reference(faces):
    image, reference = faces
    alpha = torch.rand(*image.shape[:3], 1)
    (out,) = BFRColorFix().fix(torch.cat([image, alpha], -1), reference, "wavelet")
    assert out.shape[-1] == 4 and torch.equal(out[..., 3:], alpha)
    (rgb,) = BFRColorFix().fix(image, reference, "wavelet")
    torch.testing.assert_close(out[..., :3], rgb)
    gray = image.mean(-1, keepdim=True)
    (ga,) = BFRColorFix().fix(torch.cat([gray, alpha], -1), reference, "wavelet")  # gray + alpha: RGB + alpha
    assert ga.shape[-1] == 4 and torch.equal(ga[..., 3:], alpha)
    torch.testing.assert_close(ga[..., :3], BFRColorFix().fix(gray, reference, "wavelet")[0])
    ref_rgba = torch.cat([bhwc(lowres(reference.movedim(-1, 1), 2)), torch.ones(2, 32, 32, 1)], -1)
    (small,) = BFRColorFix().fix(image, ref_rgba, "adain")  # 32 px RGBA reference: alpha dropped, any size
    assert small.shape == image.shape and (small - BFRColorFix().fix(image, reference, "adain")[0]).abs().mean() < 0.01


def test_node_errors_and_declaration(faces):
    image, reference = faces
    with pytest.raises(NodeInputError, match="BFR Color Fix"):
        BFRColorFix().fix(image, reference, "histogram")
    bad = image.clone()
    bad[0, 1, 1, 0] = float("nan")
    with pytest.raises(NodeInputError, match="NaN"):
        BFRColorFix().fix(bad, reference, "wavelet")
    spec = BFRColorFix.INPUT_TYPES()["required"]
    assert spec["method"][0] == ["wavelet", "adain"] and spec["method"][1]["default"] == "wavelet"
    assert all("tooltip" in opts for _, opts in spec.values())
    assert BFRColorFix.CATEGORY == "BFR/faces" and BFRColorFix.RETURN_TYPES == ("IMAGE",)
    assert callable(getattr(BFRColorFix(), BFRColorFix.FUNCTION))

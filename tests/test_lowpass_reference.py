"""Phi_N (pipelines/ilvr.py:lowpass) against an independent re-implementation of ILVR's resizer.py, borders included.

ILVR / DR2 low-pass with Assaf Shocher's MATLAB-imresize clone: bicubic (Keys a = -0.5), kernel stretched by 1/s
when shrinking, and out-of-range taps mirrored with MATLAB's symmetric rule. The reference below is written per
output pixel in plain numpy, from the resizer's contributions() / forward, not from the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from comfyui_bfr.pipelines import ilvr

# ---------------------------------------------------------------- the reference (numpy, one output pixel at a time)


def _cubic(t: float) -> float:
    t = abs(t)
    if t <= 1:
        return 1.5 * t ** 3 - 2.5 * t ** 2 + 1
    if t <= 2:
        return -0.5 * t ** 3 + 2.5 * t ** 2 - 4 * t + 2
    return 0.0


def _resize_axis(img: np.ndarray, axis: int, out_len: int) -> np.ndarray:
    """resizer.py along one axis, given the output length (so scale = out / in, no centre shift)."""
    src = np.moveaxis(img, axis, 0)
    in_len = src.shape[0]
    scale = out_len / in_len
    shrink = scale < 1  # ILVR builds the Resizer with antialiasing=True; it only acts when shrinking
    kernel_width = 4.0 / scale if shrink else 4.0
    n_taps = int(math.ceil(kernel_width)) + 2
    mirror = list(range(in_len)) + list(range(in_len - 1, -1, -1))  # MATLAB's aux array, 0-based
    out = np.zeros((out_len,) + src.shape[1:])
    for x in range(1, out_len + 1):  # 1-based output coordinate
        shifted = x - (out_len - in_len * scale) / 2  # resizer.py's centring shift (0 here by construction)
        u = shifted / scale + 0.5 * (1 - 1 / scale)
        left = math.floor(u - kernel_width / 2)
        taps = [left + k - 1 for k in range(n_taps)]  # 0-based, may fall outside [0, in_len)
        weights = [scale * _cubic(scale * (u - j - 1)) if shrink else _cubic(u - j - 1) for j in taps]
        total = sum(weights)
        acc = np.zeros(src.shape[1:])
        for j, wgt in zip(taps, weights):
            acc += (wgt / total) * src[mirror[j % (2 * in_len)]]
        out[x - 1] = acc
    return np.moveaxis(out, 0, axis)


def reference_phi(img: np.ndarray, n: float) -> np.ndarray:
    """ILVR's up(down(img)) on the last two axes, small size round(size / N) as lowpass documents."""
    h, w = img.shape[-2:]
    small = (max(1, round(h / n)), max(1, round(w / n)))
    down = _resize_axis(_resize_axis(img, -2, small[0]), -1, small[1])
    return _resize_axis(_resize_axis(down, -2, h), -1, w)


def torch_phi(x: torch.Tensor, n: float) -> torch.Tensor:
    """torch's antialiased bicubic down/up (the previous Phi_N): right in the interior, renormalises at borders."""
    h, w = x.shape[-2:]
    small = (max(1, round(h / n)), max(1, round(w / n)))
    down = F.interpolate(x, size=small, mode="bicubic", align_corners=False, antialias=True)
    return F.interpolate(down, size=(h, w), mode="bicubic", align_corners=False, antialias=True)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, (1, 3, 64, 48))


def test_reference_boundary_rule_is_matlab_symmetric():
    """The reference's own boundary rule: 0 -> 1, -1 -> 2, in_len + 1 -> in_len (1-based), i.e. np.pad 'symmetric'."""
    mirror = list(range(5)) + list(range(4, -1, -1))
    assert [mirror[j % 10] for j in (-1, -2, 5, 6)] == [0, 1, 4, 3]
    # shrinking by 5 (kernel half-width 10): the 2 outputs of a 10-sample signal equal the middle of the 6 outputs
    # of the same signal symmetric-padded by 10, which never reach that padded signal's own edges
    row = np.random.default_rng(3).standard_normal((1, 10))
    padded = np.pad(row, ((0, 0), (10, 10)), mode="symmetric")
    np.testing.assert_allclose(_resize_axis(padded, 1, 6)[:, 2:4], _resize_axis(row, 1, 2), atol=1e-12)


# ---------------------------------------------------------------- 1. exact match, whole image


@pytest.mark.parametrize("n", [2, 4, 8, 16, 2.5, 3.7])
def test_lowpass_matches_reference_everywhere(image, n):
    ref = reference_phi(image, n)
    ours64 = ilvr.lowpass(torch.from_numpy(image), n).numpy()
    ours32 = ilvr.lowpass(torch.from_numpy(image).float(), n).double().numpy()
    assert np.abs(ours64 - ref).max() < 1e-10
    assert np.abs(ours32 - ref).max() < 1e-5


@pytest.mark.parametrize("n", [2, 4, 8, 16, 2.5])
def test_lowpass_matches_reference_on_a_ramp(n):
    rows, cols = np.meshgrid(np.linspace(-1, 1, 64), np.linspace(-1, 0.5, 48), indexing="ij")
    ramp = (0.7 * rows + 0.3 * cols)[None, None]
    ref = reference_phi(ramp, n)
    ours = ilvr.lowpass(torch.from_numpy(ramp).float(), n).double().numpy()
    assert np.abs(ours - ref).max() < 1e-5
    # the symmetric boundary bends the ramp at the edges (renormalised truncation would not do it this way)
    assert np.abs(ref - ramp).max() > 1e-3


@pytest.mark.parametrize("n", [2, 4, 8])
def test_lowpass_commutes_with_symmetric_padding(image, n):
    """Symmetric-pad by a multiple of N, low-pass, crop: same as low-pass directly. This is the boundary rule
    (MATLAB mirrors the input about the image edge), checked without any reference code."""
    pad = 8 * n
    padded = np.pad(image, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="symmetric")
    direct = ilvr.lowpass(torch.from_numpy(image), n)
    via_pad = ilvr.lowpass(torch.from_numpy(padded), n)[..., pad:-pad, pad:-pad]
    torch.testing.assert_close(direct, via_pad, atol=1e-10, rtol=0)
    # torch's renormalised borders do not have this property
    old_direct = torch_phi(torch.from_numpy(image), n)
    old_via_pad = torch_phi(torch.from_numpy(padded), n)[..., pad:-pad, pad:-pad]
    assert float((old_direct - old_via_pad).abs().max()) > 1e-3


# ---------------------------------------------------------------- 2. torch agrees in the interior only


@pytest.mark.parametrize("n", [2, 4, 8])
def test_interior_matches_torch_but_border_does_not(n):
    x = torch.from_numpy(np.random.default_rng(n).uniform(-1, 1, (1, 3, 96, 80)))
    ours, old = ilvr.lowpass(x, n), torch_phi(x, n)
    m = 4 * n  # down kernel reaches 2N big pixels, the up kernel 2 small ones: nothing beyond 4N sees the border
    assert float((ours - old)[..., m:-m, m:-m].abs().max()) < 1e-5
    border = torch.ones(96, 80, dtype=torch.bool)
    border[m:-m, m:-m] = False
    assert float((ours - old)[..., border].abs().max()) > 1e-2  # the boundary rule really changed
    assert float((ours - old)[..., 0, :].abs().mean()) > 1e-3  # on the edge rows, not at a few pixels


# ---------------------------------------------------------------- 3. properties


@pytest.mark.parametrize("n", [2, 2.5, 4, 8, 16])
def test_constant_preserved(n):
    const = torch.full((1, 3, 64, 48), 0.7)
    assert float((ilvr.lowpass(const, n) - 0.7).abs().max()) < 1e-6


def test_linear_identity_shape_and_errors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 40, 56, generator=g, dtype=torch.float64)
    y = torch.randn(2, 3, 40, 56, generator=g, dtype=torch.float64)
    for n in (2, 3.5, 8):
        out = ilvr.lowpass(x, n)
        assert out.shape == x.shape and out.dtype == x.dtype
        torch.testing.assert_close(ilvr.lowpass(2.5 * x - 0.5 * y, n), 2.5 * out - 0.5 * ilvr.lowpass(y, n))
        assert not torch.allclose(out, x)
    assert ilvr.lowpass(x, 1) is x
    with pytest.raises(ilvr.DR2ParameterError, match="N must be"):
        ilvr.lowpass(x, 0.5)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_half_precision_in_half_precision_out(dtype, tol):
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    out = ilvr.lowpass(x.to(dtype), 4)
    assert out.dtype == dtype and out.shape == x.shape
    assert float((out.float() - ilvr.lowpass(x.to(dtype).float(), 4)).abs().max()) < tol


def test_latent_batch_is_per_slice():
    x = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(1))
    out = ilvr.lowpass(x, 8)
    assert out.shape == (2, 4, 64, 64)
    ref = reference_phi(x[1, 2].double().numpy()[None, None], 8)[0, 0]
    assert np.abs(out[1, 2].double().numpy() - ref).max() < 1e-5
    torch.testing.assert_close(out[0, 3], ilvr.lowpass(x[0, 3], 8))  # any leading dims, 2-D too


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(2))
    for n in (2, 2.5, 8):
        gpu = ilvr.lowpass(x.cuda(), n)
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), ilvr.lowpass(x, n), atol=1e-5, rtol=0)
        assert ilvr.lowpass(x.cuda().half(), n).dtype == torch.float16

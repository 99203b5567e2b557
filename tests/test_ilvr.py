"""DR2 / ILVR core math (pipelines/ilvr.py): Phi_N, Eq. 9-11, the DDPM transition, the schedule, the loop.

The loop tests run DR2 in pixel space (exactly the paper's setting) with an analytic denoiser: the MMSE denoiser
of a stationary Gaussian image prior fitted to the photo's power spectrum, a stand-in for a face DDPM that is
cheap, exact and smooths more at higher noise, as a real prior does.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from comfyui_bfr.pipelines import ilvr
from comfyui_bfr.sd import diffusion



# ---------------------------------------------------------------- helpers


def keys_cubic(t: np.ndarray, a: float = -0.5) -> np.ndarray:
    t = np.abs(t)
    return np.where(t <= 1, (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1,
                    np.where(t < 2, a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a, 0.0))


def matlab_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """MATLAB imresize weights (Keys a=-0.5, kernel stretched by 1/s when shrinking), boundary rows truncated."""
    s = n_out / n_in
    stretch = min(s, 1.0)
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        u = (i + 0.5) / s - 0.5  # 0-based form of MATLAB's u = x/s + 0.5(1 - 1/s)
        j = np.arange(n_in)
        w = stretch * keys_cubic(stretch * (u - j))
        m[i] = w / w.sum()
    return m


def matlab_phi(x: np.ndarray, n: int) -> np.ndarray:
    h, w = x.shape
    down = matlab_resize_matrix(h, h // n) @ x @ matlab_resize_matrix(w, w // n).T
    return matlab_resize_matrix(h // n, h) @ down @ matlab_resize_matrix(w // n, w).T


class GaussianPriorDenoiser:
    """MMSE denoiser of a stationary Gaussian prior: x0-hat = mu + F^-1[P / (P + sigma^2) F(x - mu)].

    P is the radially averaged power spectrum of ``reference`` (natural images: about 1/f^2), so samples of the
    prior have the texture statistics of such images; without a reference, P ~ 1/(f^2 + f0^2) with variance 0.25.
    """

    def __init__(self, shape, reference: torch.Tensor | None = None, f0: float = 0.02):
        fy = torch.fft.fftfreq(shape[-2], dtype=torch.float64)[:, None]
        fx = torch.fft.fftfreq(shape[-1], dtype=torch.float64)[None, :]
        radius = (fx ** 2 + fy ** 2).sqrt()
        if reference is None:
            self.mean = 0.0
            p = 1.0 / (radius ** 2 + f0 ** 2)
            self.power = p / p.mean() * 0.25  # per-frequency variance; its mean is the pixel variance
            return
        self.mean = reference.mean(dim=(-2, -1), keepdim=True)
        spec = torch.fft.fft2(reference - self.mean).abs().pow(2).mean(dim=(0, 1)) / radius.numel()
        bins = (radius / radius.max() * 40).long().flatten()
        radial = torch.zeros(41, dtype=torch.float64).index_add_(0, bins, spec.flatten())
        radial = radial / torch.bincount(bins, minlength=41).clamp(min=1)
        self.power = radial[bins].reshape(radius.shape)

    def __call__(self, x_k: torch.Tensor, sigma: float) -> torch.Tensor:
        gain = self.power / (self.power + sigma ** 2)
        spec = torch.fft.fft2((x_k - self.mean).double())
        return (self.mean + torch.fft.ifft2(spec * gain).real).to(x_k.dtype)


def make_denoiser(prior: GaussianPriorDenoiser, parameterization):
    def denoise(x, sigma, _i):
        a, _ = ilvr.scales(sigma, parameterization, x)
        return prior(x / a, sigma)  # x0-hat does not depend on the parameterization
    return denoise


def run_dr2(y, n, tau, omega="auto", seed=0, parameterization="ddpm", steps=100, refiner=None, callback=None):
    schedule = ilvr.make_schedule(n, tau, omega, steps)
    sigmas = diffusion.sigmas_from_alphas_cumprod(diffusion.sd_alphas_cumprod())[list(schedule.timesteps)]
    noise = ilvr.DR2Noise(seed, y.shape)
    refiner = refiner or ilvr.LatentRefiner(y, n, parameterization)
    denoise = make_denoiser(GaussianPriorDenoiser(y.shape, reference=y), parameterization)
    return ilvr.dr2_sample(denoise, y, sigmas, noise, refiner, parameterization, callback=callback), sigmas, noise


@pytest.fixture(scope="module")
def astronaut():
    """The astronaut face (skimage.data.astronaut), 128 px, in [-1, 1], (1, 3, H, W) float64."""
    from comfyui_bfr.pipelines.sample_data import sample_face

    img = torch.from_numpy(sample_face(128).copy()).permute(2, 0, 1)[None].double() / 127.5 - 1.0
    return img


# ---------------------------------------------------------------- Phi_N


@pytest.mark.parametrize("n", [2, 4, 8])
def test_lowpass_matches_matlab_style_resizer_in_the_interior(n):
    """Away from the borders the boundary rule does not matter: the down step's taps reach 2N px, the up step's 2
    small px = 2N px, so outputs 4N px inside see no out-of-range tap (the borders: test_lowpass_reference.py)."""
    rng = np.random.default_rng(n)
    x = rng.standard_normal((128, 128))
    ours = ilvr.lowpass(torch.from_numpy(x)[None, None], n)[0, 0].numpy()
    ref = matlab_phi(x, n)
    border = 4 * n
    np.testing.assert_allclose(ours[border:-border, border:-border], ref[border:-border, border:-border], atol=1e-6)


def test_lowpass_identity_constant_shape_dtype_and_fractional_n():
    x = torch.randn(2, 4, 24, 40)
    assert ilvr.lowpass(x, 1) is x
    const = torch.full((1, 4, 24, 40), 0.7)
    torch.testing.assert_close(ilvr.lowpass(const, 3.5), const)
    assert ilvr.lowpass(x, 2.5).shape == x.shape
    assert ilvr.lowpass(x.half(), 2).dtype == torch.float16
    # fractional N sits between its integer neighbours in how much it removes
    removed = [float((x - ilvr.lowpass(x, n)).pow(2).mean()) for n in (2, 2.5, 3)]
    assert removed[0] < removed[1] < removed[2]
    with pytest.raises(ilvr.DR2ParameterError, match="N must be"):
        ilvr.lowpass(x, 0.5)


def test_refine_is_eq10():
    x, y_t = torch.randn(2, 4, 32, 32, dtype=torch.float64), torch.randn(2, 4, 32, 32, dtype=torch.float64)
    expected = ilvr.lowpass(y_t, 4) + x - ilvr.lowpass(x, 4)
    torch.testing.assert_close(ilvr.refine(x, y_t, 4), expected)
    torch.testing.assert_close(ilvr.refine(x, y_t, 1), y_t)  # N = 1 replaces everything (official code)


# ---------------------------------------------------------------- parameterizations


def test_ddpm_and_sigma_forms_agree():
    ab = diffusion.sd_alphas_cumprod()
    sig = diffusion.sigmas_from_alphas_cumprod(ab)
    torch.testing.assert_close(diffusion.alphas_cumprod_from_sigmas(sig), ab)
    t, t_next = 474, 464
    s, s_next = float(sig[t]), float(sig[t_next])
    y, eps, x0, z = (torch.randn(1, 4, 8, 8, dtype=torch.float64) for _ in range(4))
    x_ddpm = ilvr.diffuse(y, eps, s, "ddpm")
    torch.testing.assert_close(x_ddpm, ab[t].sqrt() * y + (1 - ab[t]).sqrt() * eps)  # Eq. 9 literally
    x_sig = ilvr.diffuse(y, eps, s, "sigma")
    torch.testing.assert_close(x_sig, y + s * eps)
    torch.testing.assert_close(x_ddpm, x_sig * ab[t].sqrt())
    torch.testing.assert_close(ilvr.predict_x0(x_ddpm, eps, s, "ddpm"), y)  # Eq. 11 inverts Eq. 9
    torch.testing.assert_close(ilvr.predict_x0(x_sig, eps, s, "sigma"), y)
    torch.testing.assert_close(ilvr.eps_from_x0(x_ddpm, y, s, "ddpm"), eps)
    step_ddpm = ilvr.ancestral_step(x_ddpm, x0, s, s_next, z, "ddpm")
    step_sig = ilvr.ancestral_step(x_sig, x0, s, s_next, z, "sigma")
    torch.testing.assert_close(step_ddpm, step_sig * ab[t_next].sqrt())


def test_ancestral_step_is_the_ddpm_posterior():
    """Mean and std of x_{t-1} match q(x_{t-1} | x_t, x0) of the respaced chain (DDPM Eq. 6-7)."""
    ab = diffusion.sd_alphas_cumprod()
    sig = diffusion.sigmas_from_alphas_cumprod(ab)
    t, tp = 353, 343
    a_t, a_p = ab[t], ab[tp]
    beta = 1 - a_t / a_p
    x_t, x0 = torch.randn(1, 4, 8, 8, dtype=torch.float64), torch.randn(1, 4, 8, 8, dtype=torch.float64)
    mean = (a_p.sqrt() * beta / (1 - a_t)) * x0 + ((1 - beta).sqrt() * (1 - a_p) / (1 - a_t)) * x_t
    std = ((1 - a_p) / (1 - a_t) * beta).sqrt()
    zero, one = torch.zeros_like(x_t), torch.ones_like(x_t)
    got_mean = ilvr.ancestral_step(x_t, x0, float(sig[t]), float(sig[tp]), zero, "ddpm")
    torch.testing.assert_close(got_mean, mean)
    got_std = ilvr.ancestral_step(x_t, x0, float(sig[t]), float(sig[tp]), one, "ddpm") - got_mean
    torch.testing.assert_close(got_std, std * one)
    assert ilvr.ancestral_step(x_t, x0, float(sig[t]), 0.0, one, "ddpm") is x0


# ---------------------------------------------------------------- schedule and validation


def test_respaced_schedule_matches_dr2_units():
    grid = ilvr.respaced_timesteps(100)
    assert (grid[0], grid[22], grid[35], grid[99]) == (0, 222, 353, 999)
    sched = ilvr.make_schedule(4, 22)
    assert (sched.tau, sched.omega) == (22, 47)  # omega = tau + 0.25 T
    assert sched.timesteps[0] == grid[47] and sched.timesteps[-1] == 222 and len(sched.timesteps) == 26
    assert list(sched.levels) == list(range(47, 21, -1))
    assert ilvr.make_schedule(8, 22, omega=30).omega == 30
    assert ilvr.make_schedule(8, 90).omega == 99  # clipped to T - 1
    # coarser schedule: tau/omega count levels of that schedule
    assert ilvr.make_schedule(4, 10, steps=50).timesteps[-1] == round(10 * 999 / 49)


@pytest.mark.parametrize("n,offset", [(1, 5), (2, 10), (3, 20), (4, 20), (8, 25), (16, 30)])
def test_official_omega_offsets(n, offset):
    assert ilvr.resolve_omega(22, "official", n) == 22 + offset
    assert ilvr.resolve_omega(90, "official", n) == min(90 + offset, 99)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n=4, tau=30, omega=30), "must be greater than tau"),
    (dict(n=4, tau=30, omega=20), "must be greater than tau"),
    (dict(n=4, tau=22, omega=100), "exceeds the last level"),
    (dict(n=4, tau=22, omega=150), "exceeds the last level"),
    (dict(n=0.5, tau=22), "N must be"),
    (dict(n=float("nan"), tau=22), "N must be"),
    (dict(n=4, tau=22, steps=0), "steps must be"),
    (dict(n=4, tau=0, steps=1), "steps must be"),
    (dict(n=4, tau=-1), "tau must be"),
    (dict(n=4, tau=99), "tau=99 leaves no room"),
    (dict(n=4, tau=22, omega="sometimes"), "omega must be"),
    (dict(n=4, tau=22, space="frequency"), "space must be"),
])
def test_bad_parameters_raise_clear_errors(kwargs, match):
    with pytest.raises(ilvr.DR2ParameterError, match=match):
        ilvr.validate_parameters(**kwargs)


def test_presets_scale_with_resolution_and_space():
    assert ilvr.preset("mild", "pixel", 256) == (4, 22)
    assert ilvr.preset("medium", "pixel", 512) == (16, 35)
    assert ilvr.preset("severe", "latent", 512) == (4, 35)
    assert ilvr.preset("mild", "latent", 512) == (1.0, 22)
    with pytest.raises(ilvr.DR2ParameterError):
        ilvr.preset("extreme")


def test_noise_matches_comfy_prepare_noise_and_step_stream_is_decorrelated():
    noise = ilvr.DR2Noise(42, (2, 4, 8, 8))
    expected = torch.randn((2, 4, 8, 8), generator=torch.manual_seed(42), device="cpu")
    torch.testing.assert_close(noise.initial, expected)
    z, eps = noise.step(expected)
    assert not torch.equal(z, expected) and not torch.equal(z, eps)
    z2, _ = ilvr.DR2Noise(42, (2, 4, 8, 8)).step(expected)
    torch.testing.assert_close(z, z2)


# ---------------------------------------------------------------- the loop (DR2 in pixel space, analytic prior)


def test_model_evaluations_and_callbacks():
    y = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    calls, seen = [], []

    def denoise(x, sigma, i):
        calls.append((i, sigma))
        return torch.zeros_like(x)

    sched = ilvr.make_schedule(2, 10, 14)
    sigmas = diffusion.sigmas_from_alphas_cumprod(diffusion.sd_alphas_cumprod())[list(sched.timesteps)]
    out = ilvr.dr2_sample(denoise, y, sigmas, ilvr.DR2Noise(0, y.shape), ilvr.LatentRefiner(y, 2, "sigma"),
                          "sigma", callback=lambda i, x, x0: seen.append(i))
    assert [i for i, _ in calls] == [0, 1, 2, 3, 4]  # omega..tau inclusive: one more evaluation at tau
    assert calls[-1][1] == pytest.approx(float(sigmas[-1]))
    assert seen == [0, 1, 2, 3, 4]
    assert out.x0.shape == y.shape
    with pytest.raises(ilvr.DR2ParameterError, match="decreasing"):
        ilvr.dr2_sample(denoise, y, sigmas.flip(0), ilvr.DR2Noise(0, y.shape),
                        ilvr.LatentRefiner(y, 2, "sigma"), "sigma")


def test_both_parameterizations_give_the_same_output(astronaut):
    y = astronaut[:, :, :64, :64]
    out_ddpm, sigmas, _ = run_dr2(y, 4, 22, parameterization="ddpm")
    out_sig, _, _ = run_dr2(y, 4, 22, parameterization="sigma")
    torch.testing.assert_close(out_ddpm.x0, out_sig.x0, atol=1e-9, rtol=1e-9)
    a_tau = ilvr.scales(float(sigmas[-1]), "ddpm", y)[0]
    torch.testing.assert_close(out_ddpm.x_tau, out_sig.x_tau * a_tau, atol=1e-9, rtol=1e-9)


def test_low_frequencies_of_x_tau_are_those_of_the_diffused_input(astronaut):
    """Eq. 10 holds at tau: x_tau - y_tau has (almost) no energy in the band Phi_N passes."""
    y, n = astronaut, 8
    steps_seen = {}
    out, sigmas, _ = run_dr2(y, n, 22, seed=3, callback=lambda i, x, x0: steps_seen.setdefault("x", x))
    # rebuild y_tau with the eps the loop used at the last transition
    noise = ilvr.DR2Noise(3, y.shape)
    for _ in range(len(sigmas) - 1):
        _z, eps = noise.step(y)
    y_tau = ilvr.diffuse(y, eps, float(sigmas[-1]), "ddpm")

    def band(x):  # ideal low band, well inside Phi_N's passband
        spec = torch.fft.fft2(x)
        f = torch.fft.fftfreq(x.shape[-1])
        mask = (f[:, None].abs() < 0.25 / n) & (f[None, :].abs() < 0.25 / n)
        return torch.fft.ifft2(spec * mask).real

    diff = (band(out.x_tau) - band(y_tau)).pow(2).mean()
    # the same run without refinement drifts in that band
    free, _, _ = run_dr2(y, n, 22, seed=3, refiner=lambda x, x0, eps, s: x)
    free_diff = (band(free.x_tau) - band(y_tau)).pow(2).mean()
    assert diff < 1e-3 * band(y_tau).pow(2).mean()
    assert diff < 1e-2 * free_diff


def test_n1_small_tau_reproduces_the_input(astronaut):
    """N = 1 replaces x_t by y_t at every step, so x0-hat at tau = 0 is the input up to the tiny noise left there."""
    out, _, _ = run_dr2(astronaut, 1, 0)
    mse = float((out.x0 - astronaut).pow(2).mean())
    psnr = 10 * math.log10(4.0 / mse)  # peak-to-peak 2 in [-1, 1]
    assert psnr > 33, psnr


def test_larger_n_and_tau_move_the_output_further_from_the_input(astronaut):
    """DR2 Fig. 8/9: fidelity falls as N and tau grow (mean over seeds)."""

    def dist(n, tau):
        return np.mean([float((run_dr2(astronaut, n, tau, seed=s)[0].x0 - astronaut).pow(2).mean())
                        for s in range(3)])

    by_tau = [dist(4, tau) for tau in (10, 22, 35, 50)]
    by_n = [dist(n, 35) for n in (2, 8, 16)]
    assert all(a < b for a, b in zip(by_tau, by_tau[1:])), by_tau
    assert all(a < b for a, b in zip(by_n, by_n[1:])), by_n


def test_same_seed_same_output_other_seed_differs(astronaut):
    y = astronaut[:, :, :64, :64]
    a, _, _ = run_dr2(y, 4, 22, seed=7)
    b, _, _ = run_dr2(y, 4, 22, seed=7)
    c, _, _ = run_dr2(y, 4, 22, seed=8)
    assert torch.equal(a.x0, b.x0)
    assert not torch.allclose(a.x0, c.x0)


def test_pixel_refiner_split_equals_eq10_with_an_identity_codec(astronaut):
    """With an identity 'VAE' (factor 1) the clean/noise split of Eq. 10 is Eq. 10 itself."""
    y = astronaut[:, :, :64, :64]
    x, x0, eps = (torch.randn_like(y) for _ in range(3))
    sigma = 0.8
    split = ilvr.PixelRefiner(y, 4, lambda z: z, lambda im: im, "ddpm", vae_scale_factor=1)
    torch.testing.assert_close(split(x, x0, eps, sigma), ilvr.LatentRefiner(y, 4, "ddpm")(x, x0, eps, sigma))
    # with a real factor, the noise part is filtered on the coarser grid: N/f < 1 means fresh noise
    coarse = ilvr.PixelRefiner(y, 4, lambda z: z, lambda im: im, "sigma", vae_scale_factor=8)
    assert coarse.noise_n == 1.0
    torch.testing.assert_close(coarse(x, x0, eps, sigma) - coarse.refine_clean(x0), sigma * eps)


def test_eps_from_v_inverts_the_v_definition():
    sig = float(diffusion.sigmas_from_alphas_cumprod(diffusion.sd_alphas_cumprod())[500])
    x0, eps = torch.randn(1, 4, 8, 8, dtype=torch.float64), torch.randn(1, 4, 8, 8, dtype=torch.float64)
    a, b = ilvr.scales(sig, "ddpm", x0)
    v = a * eps - b * x0
    torch.testing.assert_close(ilvr.eps_from_v(ilvr.diffuse(x0, eps, sig, "ddpm"), v, sig, "ddpm"), eps)
    torch.testing.assert_close(ilvr.eps_from_v(ilvr.diffuse(x0, eps, sig, "sigma"), v, sig, "sigma"), eps)

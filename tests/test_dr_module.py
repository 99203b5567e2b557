"""DR-BFR Degradation Representation Module (DR-BFR §3.1, Eq. 3-7): E_DR tokens, G_LQ with AdaIN, InfoNCE (Eq. 5),
energy distance (Eq. 6), L_DR (Eq. 7) on a tiny synthetic blur + noise task."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from comfyui_bfr.lora.dr_module import (
    AdaIN,
    DegradationEncoder,
    DRConfig,
    DRModule,
    ReDegrader,
    energy_distance,
    info_nce,
)

TINY = DRConfig(encoder_blocks=((16, 16), (32, 32), (64, 64)), num_tokens=4, token_dim=32, proj_hidden=32,
                proj_dim=32, gen_channels=(16, 32), mod_hidden=32)


# ------------------------------------------------------------------------------------------------ synthetic data
def _smooth_images(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Smooth random colour images in [0, 1]: 16x16 noise upsampled bicubically."""
    low = torch.rand(n, 3, 16, 16, generator=gen)
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def _blur(x: torch.Tensor, sigmas: torch.Tensor, radius: int = 5) -> torch.Tensor:
    """Per-image isotropic Gaussian blur (reflect padding), one sigma per image, as a grouped conv."""
    b, c = x.shape[:2]
    r = torch.arange(-radius, radius + 1, dtype=x.dtype)
    g = torch.exp(-(r[None] ** 2) / (2 * sigmas[:, None] ** 2))
    k2 = g[:, :, None] * g[:, None, :]
    k2 = k2 / k2.sum((1, 2), keepdim=True)
    w = k2.repeat_interleave(c, 0)[:, None]  # (b*c, 1, k, k)
    xp = F.pad(x.reshape(1, b * c, *x.shape[2:]), (radius,) * 4, mode="reflect")
    return F.conv2d(xp, w, groups=b * c).reshape(x.shape)


def _batch(gen: torch.Generator, n: int = 8, size: int = 48, patch: int = 24):
    """(p1, p2, r1, r2): each image its own degradation (blur sigma and noise level spread over the batch, as the paper
    asks: 'the degradation parameters for each image pair in the same batch are different'), two patches at the same
    positions in HQ and LQ (Eq. 2)."""
    hq = _smooth_images(n, size, gen)
    sigmas = torch.linspace(0.4, 3.0, n)[torch.randperm(n, generator=gen)]
    noise = torch.linspace(0.0, 0.08, n)[torch.randperm(n, generator=gen)]
    lq = (_blur(hq, sigmas) + noise[:, None, None, None] * torch.randn(hq.shape, generator=gen)).clamp(0, 1)
    pos = torch.randint(0, size - patch + 1, (2, n, 2), generator=gen)

    def crop(img, k):
        return torch.stack([img[i, :, y:y + patch, x:x + patch] for i, (y, x) in enumerate(pos[k].tolist())])

    return crop(lq, 0), crop(lq, 1), crop(hq, 0), crop(hq, 1)


# ------------------------------------------------------------------------------------------------ config + shapes
def test_config_defaults_and_validation():
    cfg = DRConfig()
    assert [c for block in cfg.encoder_blocks for c in block] == [64, 64, 128, 128, 256, 256]  # six 3x3, 64 -> 256
    assert (cfg.num_tokens, cfg.token_dim, cfg.grid, cfg.temperature) == (4, 256, 2, 0.07)
    assert DRConfig(**{k: v for k, v in cfg.to_dict().items()}) == cfg
    with pytest.raises(ValueError, match="perfect square"):
        DRConfig(num_tokens=3)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        DRConfig(temperature=0.0)
    with pytest.raises(ValueError, match="token_dim must be positive"):
        DRConfig(token_dim=0)


def test_shapes_default_config():
    torch.manual_seed(0)
    cfg = DRConfig()
    enc, gen = DegradationEncoder(cfg), ReDegrader(cfg)
    assert sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in enc.modules()) == 6
    x = torch.rand(2, 3, 32, 40)
    with torch.no_grad():
        tokens = enc(x)
        assert tokens.shape == (2, cfg.num_tokens, cfg.token_dim)
        r2 = torch.rand(2, 3, 32, 40)
        assert gen(r2, tokens).shape == r2.shape
        assert DRModule(TINY).project(torch.randn(3, 4, 32)).shape == (3, 32)
    with pytest.raises(ValueError, match="divisible by 4"):
        gen(torch.rand(2, 3, 30, 40), tokens)
    with pytest.raises(ValueError, match="at least 4 px"):
        enc(torch.rand(1, 3, 3, 8))
    with pytest.raises(ValueError, match=r"expects images \(B, 3, H, W\)"):
        enc(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="f_DR tokens"):
        gen(r2, tokens[:, :, :8])


def test_standardized_input_ignores_colour_brightness_and_contrast_but_not_degradation():
    """input_norm="standardize" (ours): f_DR is invariant to x -> a x + b_c (a > 0, per-channel b: content statistics
    that Eq. 11's degradations keep) up to the 0.02 floor, but still sees a blur; "none" is 2x - 1, the old layout
    (same tensors, so a file written before the field loads as it was trained)."""
    torch.manual_seed(0)
    enc = DegradationEncoder(DRConfig(**dict(TINY.to_dict(), input_norm="standardize"))).eval()
    x = _smooth_images(4, 32, torch.Generator().manual_seed(3))  # RMS contrast ~0.25
    shifted = 0.7 * x + torch.tensor([0.1, -0.05, 0.2])[None, :, None, None]
    old = DegradationEncoder(TINY)
    old.load_state_dict(enc.state_dict())  # the same tensors
    with torch.no_grad():
        f, f_shift, f_blur = enc(x), enc(shifted), enc(_blur(x, torch.full((4,), 2.0)))
    shift, blur = float((f - f_shift).abs().max()), float((f - f_blur).abs().max())
    assert shift < 0.1 * blur, (shift, blur)  # measured 1.4e-4 vs 1.9e-3
    assert TINY.input_norm == "none" and torch.equal(old.normalize_input(x), x * 2 - 1)
    assert set(old.state_dict()) == set(enc.state_dict())
    with pytest.raises(ValueError, match="input_norm"):
        DRConfig(input_norm="whiten")


def test_tokens_are_a_row_major_pooled_grid():
    """Token k of the 2x2 grid reads only its quadrant: changing the bottom-right quadrant of the input changes only
    the last token (the conv receptive field reaches a little across the border, so we change pixels well inside)."""
    torch.manual_seed(0)
    enc = DegradationEncoder(DRConfig(encoder_blocks=((8,), (8,)), num_tokens=4, token_dim=8))
    x = torch.rand(1, 3, 32, 32)
    y = x.clone()
    y[:, :, 20:, 20:] = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        a, b = enc(x), enc(y)
    assert torch.equal(a[0, :3], b[0, :3])
    assert not torch.allclose(a[0, 3], b[0, 3])


# ------------------------------------------------------------------------------------------------ InfoNCE (Eq. 5)
def test_info_nce_equals_a_hand_computation():
    torch.manual_seed(1)
    z1, z2, tau = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64), 0.3
    a = [[float(v) for v in row / np.linalg.norm(row)] for row in z1.numpy()]
    b = [[float(v) for v in row / np.linalg.norm(row)] for row in z2.numpy()]
    s = [[sum(p * q for p, q in zip(a[i], b[j])) / tau for j in range(4)] for i in range(4)]
    rows = [-(s[i][i] - math.log(sum(math.exp(s[i][j]) for j in range(4)))) for i in range(4)]
    cols = [-(s[j][j] - math.log(sum(math.exp(s[i][j]) for i in range(4)))) for j in range(4)]
    expected = 0.5 * (sum(rows) / 4 + sum(cols) / 4)
    assert float(info_nce(z1, z2, tau)) == pytest.approx(expected, rel=1e-12)
    # the function is symmetric in its two arguments, and not symmetric rows-only (the column term matters)
    assert float(info_nce(z2, z1, tau)) == pytest.approx(expected, rel=1e-12)
    assert sum(rows) / 4 != pytest.approx(expected, rel=1e-3)


def test_info_nce_limits():
    gen = torch.Generator().manual_seed(0)
    b = 16
    # random independent embeddings in high dimension: cosine similarities ~ 0, so every logit ~ 0 -> log B
    z1, z2 = torch.randn(b, 4096, generator=gen), torch.randn(b, 4096, generator=gen)
    assert float(info_nce(z1, z2, temperature=1.0)) == pytest.approx(math.log(b), abs=0.02)
    # identical, well separated (orthogonal) rows at a low temperature: the positive wins every softmax
    e = torch.eye(b, 32) * 3.0
    assert float(info_nce(e, e.clone(), temperature=0.05)) < 1e-6
    # and the same rows paired with the wrong partner are heavily penalised
    assert float(info_nce(e, e.roll(1, 0), temperature=0.05)) > 10.0
    with pytest.raises(ValueError, match="at least 2"):
        info_nce(torch.randn(1, 4), torch.randn(1, 4))


# ------------------------------------------------------------------------------------------------ energy distance (Eq. 6)
def _energy_numpy(x: np.ndarray, y: np.ndarray, unbiased: bool) -> float:
    x, y = x.reshape(len(x), -1), y.reshape(len(y), -1)
    n, m = len(x), len(y)
    xy = sum(np.linalg.norm(x[i] - y[j]) for i in range(n) for j in range(m)) / (n * m)
    xx = sum(np.linalg.norm(x[i] - x[j]) for i in range(n) for j in range(n))
    yy = sum(np.linalg.norm(y[i] - y[j]) for i in range(m) for j in range(m))
    if unbiased:
        return 2 * xy - xx / (n * (n - 1)) - yy / (m * (m - 1))
    return 2 * xy - xx / n**2 - yy / m**2


def test_energy_distance_equals_a_direct_computation():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 4, 3)), rng.normal(0.5, 1.2, size=(5, 4, 3))  # (n, l, d) token sets, n != m
    for unbiased in (False, True):
        got = float(energy_distance(torch.from_numpy(x), torch.from_numpy(y), unbiased=unbiased))
        assert got == pytest.approx(_energy_numpy(x, y, unbiased), rel=1e-12)


def test_energy_distance_zero_for_identical_sets_positive_for_shifted():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=gen, dtype=torch.float64)
    assert float(energy_distance(x, x.clone())) == 0.0  # biased (Eq. 6) form: exactly 0
    assert float(energy_distance(x, x.clone(), unbiased=True)) < 0  # the U-statistic is not 0 here
    same = float(energy_distance(x, torch.randn(32, 8, generator=gen, dtype=torch.float64), unbiased=True))
    shifted = float(energy_distance(x, torch.randn(32, 8, generator=gen, dtype=torch.float64) + 1.5))
    assert shifted > 1.0 and abs(same) < 0.3 * shifted
    # finite gradients at zero distance (the diagonal of the within-set terms)
    xg = x.clone().requires_grad_(True)
    energy_distance(xg, torch.randn(32, 8, generator=gen, dtype=torch.float64)).backward()
    assert torch.isfinite(xg.grad).all()
    with pytest.raises(ValueError, match="must match"):
        energy_distance(torch.randn(3, 4), torch.randn(3, 5))


# ------------------------------------------------------------------------------------------------ AdaIN / G_LQ
def test_adain_sets_per_channel_statistics_from_the_condition():
    torch.manual_seed(0)
    ada = AdaIN(channels=5, cond_dim=7, hidden=16)
    h, c = torch.randn(3, 5, 12, 12) * 4 + 2, torch.randn(3, 7)
    out = ada(h, c)
    gamma, beta = ada.scale_shift(c)
    torch.testing.assert_close(out.mean((2, 3)), beta, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std((2, 3), unbiased=False), (1 + gamma).abs(), atol=1e-4, rtol=1e-4)


def test_degrader_output_depends_on_the_representation():
    torch.manual_seed(0)
    gen = ReDegrader(TINY)
    r2 = torch.rand(2, 3, 16, 16)
    fa, fb = torch.randn(2, 4, 32), torch.randn(2, 4, 32)
    with torch.no_grad():
        ya, yb = gen(r2, fa), gen(r2, fb)
        # only the token mean enters (pooled f_DR): permuting tokens changes nothing
        torch.testing.assert_close(gen(r2, fa.flip(1)), ya)
    assert (ya - yb).abs().mean() > 1e-3
    # same representation, different sample order: each sample is modulated by its own f_DR
    with torch.no_grad():
        torch.testing.assert_close(gen(r2.flip(0), fa.flip(0)), ya.flip(0))


# ------------------------------------------------------------------------------------------------ L_DR (Eq. 3-7)
def test_loss_terms_follow_eq_3_to_7():
    torch.manual_seed(0)
    model = DRModule(TINY)
    with torch.no_grad():  # at init the tokens barely vary with the input; amplify them so the roles are told apart
        model.encoder.to_tokens.weight.mul_(30.0)
    p1, p2, _, r2 = _batch(torch.Generator().manual_seed(1))
    out = model.loss(p1, p2, r2, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        f1, f2 = model(p1), model(p2)
        recon = (model.degrader(r2, f1) - p2).abs().mean()  # Eq. 4: G_LQ(r2, f1) vs p2
        contras = info_nce(model.project(f2), model.project(f1), TINY.temperature)  # Eq. 5: q from p2, k from p1
        t = torch.randn(f1.shape, generator=torch.Generator().manual_seed(5))
        dist = energy_distance(f1, t) / math.sqrt(4 * 32)  # Eq. 6 on f1
    for key, want in (("recon", recon), ("contras", contras), ("distribution", dist)):
        torch.testing.assert_close(out[key].detach(), want, msg=key)
    torch.testing.assert_close(out["total"].detach(), recon + 0.1 * contras + 0.01 * dist)  # lambda1, lambda2
    # the roles matter: p2's own representation, p1 as the target, or f2 in Eq. 6 give numbers the checks above
    # would reject (beyond assert_close's float32 tolerance)
    with torch.no_grad():
        wrong = {"recon": (model.degrader(r2, f2) - p2).abs().mean(),
                 "recon target": (model.degrader(r2, f1) - p1).abs().mean(),
                 "distribution": energy_distance(f2, t) / math.sqrt(4 * 32)}
    for key, value in wrong.items():
        want = dist if key == "distribution" else recon
        assert not torch.isclose(value, want, rtol=1.3e-6, atol=1e-5), key
    with pytest.raises(ValueError, match="at least 2 images"):
        model.loss(p1[:1], p2[:1], r2[:1])
    with pytest.raises(ValueError, match="of one shape"):
        model.loss(p1, p2, r2[:, :, :16, :16])


def test_gradients_reach_the_encoder_through_every_term():
    torch.manual_seed(0)
    model = DRModule(TINY)
    p1, p2, _, r2 = _batch(torch.Generator().manual_seed(2))
    out = model.loss(p1, p2, r2)
    first_conv = model.encoder.features[0].weight
    for key in ("recon", "contras", "distribution"):
        model.zero_grad(set_to_none=True)
        out[key].backward(retain_graph=True)
        assert first_conv.grad is not None and torch.isfinite(first_conv.grad).all(), key
        assert first_conv.grad.abs().sum() > 0, key
        head = model.degrader.head.weight.grad
        proj = model.projection[0].weight.grad
        assert (head is not None) == (key == "recon"), key  # G_LQ is trained by L_recon only
        assert (proj is not None) == (key == "contras"), key  # the MLP by L_contras only


def test_determinism_by_seed():
    def run(seed):
        torch.manual_seed(seed)
        model = DRModule(TINY)
        p1, p2, _, r2 = _batch(torch.Generator().manual_seed(3))
        return {k: v.detach() for k, v in model.loss(p1, p2, r2).items()}

    a, b, c = run(0), run(0), run(1)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["total"], c["total"])


def _content_vs_degradation_ratio(model: DRModule) -> float:
    """Mean DR distance between *different images with one degradation* over the mean distance between *one image
    with two degradations* (blur 0.5 / clean vs blur 2.5 / noise 0.06), on 16 unseen images: small = the DR encodes
    the degradation, not the content (the paper's 'content-irrelevant' DR)."""
    g = torch.Generator().manual_seed(123)
    hq = _smooth_images(16, 24, g)

    def degrade(x, sigma, noise):
        return (_blur(x, torch.full((len(x),), sigma)) + noise * torch.randn(x.shape, generator=g)).clamp(0, 1)

    with torch.no_grad():
        a, b = model(degrade(hq, 0.5, 0.0)).flatten(1), model(degrade(hq, 2.5, 0.06)).flatten(1)
    same_degradation = torch.cdist(a, a)[~torch.eye(16, dtype=torch.bool)].mean()
    same_content = (a - b).norm(dim=1).mean()
    return float(same_degradation / same_content)


def test_training_lowers_l_dr_and_makes_the_dr_degradation_driven(record_figure):
    torch.manual_seed(0)
    model = DRModule(TINY)
    ratio_init = _content_vs_degradation_ratio(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(10)
    held_out = [_batch(torch.Generator().manual_seed(99 + k)) for k in range(4)]

    def evaluate():  # the mean over 4 held-out batches of 8 (one batch's InfoNCE is too noisy to compare)
        total: dict[str, float] = {}
        for k, (p1, p2, _, r2) in enumerate(held_out):
            with torch.no_grad():
                for name, v in model.loss(p1, p2, r2, generator=torch.Generator().manual_seed(7 + k)).items():
                    total[name] = total.get(name, 0.0) + float(v) / len(held_out)
        return total

    def train(steps):
        for _ in range(steps):
            p1, p2, _, r2 = _batch(data)
            loss = model.loss(p1, p2, r2)["total"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    before = evaluate()
    train(30)
    after = evaluate()
    train(120)
    late = evaluate()
    ratio = _content_vs_degradation_ratio(model)
    record_figure("DRM L_DR 0->30 Adam steps", " ".join(f"{k} {before[k]:.4f}->{after[k]:.4f}" for k in before))
    record_figure("DRM L_DR at 150 steps", " ".join(f"{k} {late[k]:.4f}" for k in late))
    record_figure("DRM content/degradation ratio", f"init {ratio_init:.3f} -> 150 steps {ratio:.3f}")
    assert after["total"] < 0.8 * before["total"]
    assert after["recon"] < before["recon"] and after["contras"] < before["contras"]
    assert late["total"] < after["total"] and late["contras"] < 0.5 * before["contras"]
    assert late["distribution"] < before["distribution"]
    assert ratio < 0.5 * ratio_init

"""Face embedder (FlipNet §4.1): autoencoders, patch tokens, association loss (Eq. 6), adapter; and the losses module
pieces it uses (VGG19 topology and weight loading, discriminator), and the Eq. 1-3 helpers of ``sd.diffusion``."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from fixtures.flipnet import TINY_FACE
from comfyui_bfr.lora import losses
from comfyui_bfr.lora.face_embedder import (
    AdapterConfig,
    FaceAdapter,
    FaceAEConfig,
    FaceAutoencoderPair,
    LQFaceEncoder,
    append_face_tokens,
    build_autoencoder,
    drop_mask,
    face_context_tokens,
    null_face_tokens,
    patchify_latent,
)
from comfyui_bfr.sd.diffusion import diffusion_target, predict_x0, q_sample



def test_patchify_is_a_lossless_regrouping():
    z = torch.arange(2 * 4 * 4 * 6, dtype=torch.float32).reshape(2, 4, 4, 6)
    tokens = patchify_latent(z, 2)
    assert tokens.shape == (2, 6, 16)  # N = (4/2)*(6/2), d = 4 * 2 * 2
    # token (row 0, col 1) holds exactly the 2x2 latent patch at rows 0-1, cols 2-3, all channels
    assert torch.equal(tokens[0, 1].sort().values, z[0, :, 0:2, 2:4].flatten().sort().values)
    assert torch.equal(patchify_latent(z, 1), z.flatten(2).transpose(1, 2))
    with pytest.raises(ValueError, match="not divisible by patch_size=4"):
        patchify_latent(z, 4)


def test_config_validation_and_token_geometry():
    assert FaceAEConfig().downscale == 8 and FaceAEConfig().token_dim == 64
    assert FaceAEConfig().num_tokens(512) == 256  # default: 4x4 latent patches at 512 px
    assert FaceAEConfig(patch_size=1).num_tokens(512) == 4096  # the paper's literal N = h * w
    with pytest.raises(ValueError, match="multiples of norm_num_groups"):
        FaceAEConfig(block_out_channels=(30, 64), norm_num_groups=8)
    with pytest.raises(ValueError, match="patch_size must be positive"):
        FaceAEConfig(patch_size=0)


def test_autoencoders_encoder_and_adapter_shapes():
    torch.manual_seed(0)
    pair = FaceAutoencoderPair(TINY_FACE)
    x = torch.rand(2, 3, 32, 32)
    recon, z = pair.hq(x)
    assert recon.shape == x.shape and z.shape == (2, 4, 16, 16)
    enc = LQFaceEncoder.from_pair(pair)
    with torch.no_grad():
        assert torch.equal(enc(x), pair.tokens(pair.lq.encode(x)))
    ada = FaceAdapter(AdapterConfig(in_dim=TINY_FACE.token_dim, out_dim=1024, hidden_dim=64, num_layers=3))
    tokens = ada(enc(x))
    assert tokens.shape == (2, 64, 1024)
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(2, 64), atol=1e-5, rtol=0)  # LayerNorm output
    ctx = append_face_tokens(torch.randn(2, 77, 1024), tokens)
    assert ctx.shape == (2, 77 + 64, 1024)
    with pytest.raises(ValueError, match="width 16, got"):
        FaceAdapter(AdapterConfig(in_dim=16))(torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="do not fit text context"):
        append_face_tokens(torch.randn(2, 77, 1024), torch.randn(2, 4, 768))
    with pytest.raises(ValueError, match=r"expects images \(B, 3, H, W\)"):
        enc(torch.rand(1, 1, 32, 32))


def test_dropped_face_embedding_is_the_null_embedding():
    torch.manual_seed(0)
    enc = LQFaceEncoder(TINY_FACE)
    ada = FaceAdapter(AdapterConfig(in_dim=TINY_FACE.token_dim, out_dim=1024, hidden_dim=32))
    x = torch.rand(3, 3, 32, 32)
    drop = torch.tensor([False, True, False])
    with torch.no_grad():
        out = face_context_tokens(enc, ada, x, drop)
        null = null_face_tokens(ada, 3, out.shape[1])
        full = face_context_tokens(enc, ada, x)
    assert torch.equal(out[1], null[1]) and torch.equal(out[0], full[0]) and not torch.equal(out[0], null[0])
    g = torch.Generator().manual_seed(0)
    m = drop_mask(20000, 0.3, g)
    assert abs(m.float().mean().item() - 0.3) < 0.02
    with pytest.raises(ValueError, match="Drop probability"):
        drop_mask(2, 1.5)


def test_appended_tokens_always_change_cross_attention():
    """Why no face-token set is an exact no-op (null_face_tokens docstring): with SD's bias-free to_k / to_v, appending
    N all-zero tokens scales the attention output by Z / (Z + N), Z = sum_i exp(q.k_i / sqrt d) over the text keys;
    any other finite tokens change it too. Only appending nothing leaves it unchanged."""
    torch.manual_seed(0)
    heads, d, width = 2, 8, 16
    to_q, to_k, to_v = (torch.nn.Linear(width, width, bias=False) for _ in range(3))
    hidden, text = torch.randn(1, 5, width), torch.randn(1, 7, width)

    def attend(context):
        q = to_q(hidden).view(1, -1, heads, d).transpose(1, 2)
        k = to_k(context).view(1, -1, heads, d).transpose(1, 2)
        v = to_v(context).view(1, -1, heads, d).transpose(1, 2)
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v, q, k

    with torch.no_grad():
        plain, q, k = attend(text)
        z = torch.exp(q @ k.transpose(-1, -2) / math.sqrt(d)).sum(-1, keepdim=True)
        n = 4
        zeros, _, _ = attend(append_face_tokens(text, torch.zeros(1, n, width)))
        other, _, _ = attend(append_face_tokens(text, torch.randn(1, n, width)))
        empty, _, _ = attend(append_face_tokens(text, torch.zeros(1, 0, width)))
    torch.testing.assert_close(zeros, plain * z / (z + n), atol=1e-6, rtol=1e-5)
    assert (zeros - plain).abs().max() > 1e-3 and (other - plain).abs().max() > 1e-3
    assert torch.equal(empty, plain)


def test_symmetric_patch_ce_matches_definition():
    torch.manual_seed(0)
    zx, zy = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    m = losses.patch_similarity(zx, zy, temperature=None)
    torch.testing.assert_close(m, torch.einsum("bnd,bmd->bnm", zx, zy))
    ce_x, ce_y = losses.symmetric_patch_ce(m)
    # Eq. (6) with one-hot labels on the diagonal: -mean_i log softmax_j(M_ij)[i]
    ref_x = -torch.stack([torch.log_softmax(m[b], dim=1).diagonal() for b in range(2)]).mean()
    ref_y = -torch.stack([torch.log_softmax(m[b], dim=0).diagonal() for b in range(2)]).mean()
    torch.testing.assert_close(ce_x, ref_x)
    torch.testing.assert_close(ce_y, ref_y)
    assert math.isclose(float(losses.association_loss(torch.tensor(1.0), ce_x, ce_y)),
                        1.0 + 0.5 * float(ce_x + ce_y), rel_tol=1e-6)


def test_association_prefers_aligned_patches():
    torch.manual_seed(0)
    z = torch.randn(2, 16, 8)
    aligned = losses.symmetric_patch_ce(losses.patch_similarity(z, z + 0.05 * torch.randn_like(z)))
    shuffled = losses.symmetric_patch_ce(losses.patch_similarity(z, z[:, torch.randperm(16)]))
    assert sum(aligned) < 0.1 * sum(shuffled)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        losses.patch_similarity(z, z, temperature=0.0)


# ------------------------------------------------------------------------------------------------ losses module
def test_vgg19_topology_matches_torchvision_indexing():
    names = losses.VGG19_LAYER_NAMES
    assert names.index("relu1_2") == 3 and names.index("relu3_4") == 17 and names.index("relu5_4") == 35
    assert len(names) == 37 and names[-1] == "pool5"
    vgg = losses.VGG19Features(["relu2_2"])
    assert len(vgg.features) == 9  # truncated after the deepest requested layer
    assert [k for k in vgg.state_dict()] == ["features.0.weight", "features.0.bias", "features.2.weight",
                                             "features.2.bias", "features.5.weight", "features.5.bias",
                                             "features.7.weight", "features.7.bias"]
    with pytest.raises(ValueError, match="Unknown VGG19 layer"):
        losses.VGG19Features(["relu6_1"])


def test_vgg19_weights_load_from_safetensors_and_pth(tmp_path):
    torch.manual_seed(0)
    full = losses.VGG19Features(["relu5_4"])
    sd = {k: v.clone() for k, v in full.state_dict().items()}
    sd["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision files carry the classifier too
    save_file(sd, str(tmp_path / "vgg19.safetensors"))
    torch.save(sd, tmp_path / "vgg19.pth")
    x, y = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    a = losses.VGGPerceptualLoss(tmp_path / "vgg19.safetensors")
    b = losses.VGGPerceptualLoss(tmp_path / "vgg19.pth")
    assert torch.equal(a(x, y), b(x, y)) and a(x, x) == 0 and a(x, y) > 0
    assert not any(p.requires_grad for p in a.parameters())
    torch.save({k: v for k, v in sd.items() if k.startswith("features.0")}, tmp_path / "trunc.pth")
    with pytest.raises(ValueError, match="lack"):
        losses.VGGPerceptualLoss(tmp_path / "trunc.pth")
    with pytest.raises(FileNotFoundError, match="VGG19 weights file"):
        losses.VGGPerceptualLoss(tmp_path / "missing.pth")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no 'features"):
        losses.VGGPerceptualLoss(tmp_path / "other.pth")


def test_diffusion_equations_round_trip():
    torch.manual_seed(0)
    ab = torch.linspace(0.999, 0.01, 1000)
    z0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    zt = q_sample(z0, eps, ab, t)
    a = ab[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(zt, a.sqrt() * z0 + (1 - a).sqrt() * eps)  # Eq. (1)
    torch.testing.assert_close(predict_x0(zt, eps, ab, t, "epsilon"), z0, atol=1e-4, rtol=1e-4)  # Eq. (3)
    v = diffusion_target(z0, eps, ab, t, "v_prediction")
    torch.testing.assert_close(predict_x0(zt, v, ab, t, "v_prediction"), z0, atol=1e-4, rtol=1e-4)
    assert losses.ldm_loss(eps, eps) == 0
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        predict_x0(zt, eps, ab, t, "sample")


def test_discriminator_and_gan_losses():
    d = losses.PatchDiscriminator(3, 16, 2)
    logits = d(torch.rand(2, 3, 32, 32))
    assert logits.ndim == 4 and logits.shape[1] == 1 and logits.shape[-1] > 1  # per-patch logits
    assert float(losses.hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0))) == 0.0
    assert float(losses.generator_adv_loss(torch.full((4,), 3.0))) == -3.0
    l_ae, l1 = losses.reconstruction_loss(torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4), torch.tensor(2.0),
                                          torch.tensor(1.0))
    assert float(l1) == 1.0 and math.isclose(float(l_ae), 1.0 + 0.5 * 2.0 + 0.8 * 1.0, rel_tol=1e-6)
    r = losses.restoration_loss(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0))
    assert math.isclose(float(r), 1.0 + 1.0 * 2.0 + 0.01 * 3.0, rel_tol=1e-6)


def test_init_from_the_sd_vae_copies_weights_or_says_why_not():
    torch.manual_seed(0)
    vae = build_autoencoder(TINY_FACE)  # stands in for the SD VAE (same AutoencoderKL key layout)
    pair = FaceAutoencoderPair(TINY_FACE)
    pair.init_from_vae(vae.state_dict(), "tiny vae")
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        ref = vae.encode(x * 2 - 1).latent_dist.mean
        assert torch.equal(pair.hq.encode(x), ref) and torch.equal(pair.lq.encode(x), ref)
    other = FaceAutoencoderPair(FaceAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8))
    with pytest.raises(ValueError, match="Cannot initialise the face autoencoders from tiny vae"):
        other.init_from_vae(vae.state_dict(), "tiny vae")

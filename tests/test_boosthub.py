"""BoostHub (FlipNet Eq. 4-5): the pure math, the diffusers processor on the SD2.1-topology tiny UNet, and the
properties that could fail: zero-initialised BoostHub + zero LoRA reproduce the base UNet exactly, phi = 0 equals
LoRA-only, only the input half of the joint batch is touched, the LQ cache equals the joint batch."""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_bfr.lora import boosthub, lora_targets
from comfyui_bfr.lora.boosthub import (
    BoostHubAttnProcessor,
    BoostHubProjections,
    BoostHubState,
    boosthub_residual,
    comfy_block_key,
    install_boosthub,
    multihead_attention,
)
from fixtures.flipnet import fixture_unet


def _reference_attention(q, k, v, heads):
    """Independent reference: explicit softmax(QK^T / sqrt(d)) V per head with einsum."""
    b, n, c = q.shape
    d = c // heads
    qh = q.reshape(b, n, heads, d).permute(0, 2, 1, 3)
    kh = k.reshape(b, -1, heads, d).permute(0, 2, 1, 3)
    vh = v.reshape(b, -1, heads, d).permute(0, 2, 1, 3)
    w = torch.softmax(torch.einsum("bhnd,bhmd->bhnm", qh, kh) / math.sqrt(d), dim=-1)
    return torch.einsum("bhnm,bhmd->bhnd", w, vh).permute(0, 2, 1, 3).reshape(b, n, c)


def _random_hub(c=16, seed=0):
    torch.manual_seed(seed)
    hub = BoostHubProjections(c)
    for lin in (hub.q_proj, hub.k_proj, hub.v_proj, hub.out_proj):
        torch.nn.init.normal_(lin.weight, std=0.3)
    torch.nn.init.normal_(hub.out_proj.bias, std=0.1)
    return hub


def test_multihead_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 5, 16), torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    torch.testing.assert_close(multihead_attention(q, k, v, 4), _reference_attention(q, k, v, 4))


def test_boosthub_residual_is_phi_times_wo_attn():
    hub = _random_hub()
    torch.manual_seed(1)
    fx, fy = torch.randn(2, 6, 16), torch.randn(2, 9, 16)
    with torch.no_grad():
        ref = hub.out_proj(_reference_attention(hub.q_proj(fx), hub.k_proj(fy), hub.v_proj(fy), 2))
        torch.testing.assert_close(boosthub_residual(fx, fy, hub, 2, 1.0), ref)
        torch.testing.assert_close(boosthub_residual(fx, fy, hub, 2, 2.0), 2.0 * ref)
        assert torch.count_nonzero(boosthub_residual(fx, fy, hub, 2, 0.0)) == 0
        # precomputed K/V (the LQ cache) gives the same, batch-1 K/V broadcast
        kv = boosthub.boosthub_kv(fy, hub)
        torch.testing.assert_close(boosthub_residual(fx, None, hub, 2, 1.0, kv=kv), ref)
        kv1 = boosthub.boosthub_kv(fy[:1], hub)
        torch.testing.assert_close(boosthub_residual(fx, None, hub, 2, 1.0, kv=kv1)[1],
                                   hub.out_proj(_reference_attention(hub.q_proj(fx[1:]), *kv1, 2))[0])


def test_zero_initialised_output_projection_is_exact_noop():
    hub = BoostHubProjections(16)
    assert torch.count_nonzero(hub.out_proj.weight) == 0 and torch.count_nonzero(hub.out_proj.bias) == 0
    fx, fy = torch.randn(1, 4, 16), torch.randn(1, 4, 16)
    assert torch.count_nonzero(boosthub_residual(fx, fy, hub, 4, 1.0)) == 0


def test_state_and_residual_validation():
    with pytest.raises(ValueError, match="phi"):
        BoostHubState(phi=-1)
    with pytest.raises(ValueError, match="cache_mode"):
        BoostHubState(cache_mode="sometimes")
    hub = BoostHubProjections(8)
    with pytest.raises(ValueError, match="does not match input batch"):
        boosthub_residual(torch.randn(2, 3, 8), torch.randn(3, 3, 8), hub, 2, 1.0)
    with pytest.raises(ValueError, match="divisible"):
        multihead_attention(torch.randn(1, 2, 8), torch.randn(1, 2, 8), torch.randn(1, 2, 8), 3)


def test_comfy_style_output_patch_matches_the_diffusers_processor():
    """The contract for the ComfyUI wrapper: stock self-attention (after to_out) + boost_joint_batch on the stashed
    norm1 output, with projections rebuilt from the checkpoint namespace, equals the diffusers processor."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=4, dim_head=8).eval()
    proc = BoostHubAttnProcessor(32, "mid_block.attentions.0.transformer_blocks.0.attn1", BoostHubState(phi=0.7))
    proc.hub.load_state_dict(_random_hub(32, seed=3).state_dict())
    n = torch.randn(4, 10, 32)  # joint batch: 2 input rows, 2 condition rows
    with torch.no_grad():
        diffusers_out = proc(attn, n)
        hubs = boosthub.boosthub_modules_from_state_dict(
            {f"{proc.layer_name}.{k}": v for k, v in proc.hub.state_dict().items()})
        comfy_out = boosthub.boost_joint_batch(AttnProcessor2_0()(attn, n), n, hubs[proc.layer_name], 4, 0.7)
    assert torch.equal(diffusers_out, comfy_out)
    assert torch.equal(diffusers_out[2:], AttnProcessor2_0()(attn, n)[2:])
    with pytest.raises(ValueError, match="Unexpected BoostHub key"):
        boosthub.boosthub_modules_from_state_dict({"x.attn1.w_q.weight": torch.zeros(2, 2)})


# ------------------------------------------------------------------------------------------------ on the UNet
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 8, 8)
    y = torch.randn(1, 4, 8, 8)
    z = torch.cat([x, y])
    t = torch.tensor([700, 300])
    ctx = torch.randn(1, 77, 1024)
    return fixture_unet(0), z, t, torch.cat([ctx, ctx])


def _randomize_trainables(unet, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n or ".processor.hub.out_proj" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_installs_on_every_self_attention_layer_only(tiny):
    unet = fixture_unet(0)
    n_attn1 = sum(1 for k in unet.attn_processors if k.endswith("attn1.processor"))
    install_boosthub(unet)
    procs = boosthub.boosthub_processors(unet)
    assert len(procs) == n_attn1 == 4  # tiny UNet: down 1, mid 1, up 2 transformer blocks
    assert all(p.endswith(".attn1") for p in procs)
    # W_q/W_k/W_v copied from the layer's self-attention, W_o zero
    path, proc = next(iter(procs.items()))
    attn = unet.get_submodule(path)
    assert torch.equal(proc.hub.q_proj.weight, attn.to_q.weight)
    assert torch.equal(proc.hub.v_proj.weight, attn.to_v.weight)
    assert torch.count_nonzero(proc.hub.out_proj.weight) == 0


def test_zero_boosthub_and_zero_lora_reproduce_base_unet_exactly(tiny):
    _, z, t, ctx = tiny
    unet = fixture_unet(0)
    with torch.no_grad():
        base_joint = unet(z, t, ctx).sample
        base_hq = unet(z[:1], t[:1], ctx[:1]).sample
    lora_targets.add_flipnet_lora(unet, rank=4)
    install_boosthub(unet, BoostHubState(phi=1.0))
    lora_b = [p for n, p in unet.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)
    with torch.no_grad():
        out = unet(z, t, ctx).sample
    assert torch.equal(out, base_joint)
    torch.testing.assert_close(out[:1], base_hq, rtol=1e-4, atol=1e-4)  # batch composition does not leak


def test_phi_zero_equals_lora_only_and_condition_half_is_untouched(tiny):
    _, z, t, ctx = tiny
    unet = fixture_unet(0)
    lora_targets.add_flipnet_lora(unet, rank=4)
    state = install_boosthub(unet, BoostHubState(phi=1.0))
    _randomize_trainables(unet, 3)
    with torch.no_grad():
        boosted = unet(z, t, ctx).sample
        state.phi = 0.0
        phi0 = unet(z, t, ctx).sample
        state.enabled = False
        lora_only = unet(z, t, ctx).sample
    assert torch.equal(phi0, lora_only)
    assert not torch.allclose(boosted[:1], lora_only[:1], atol=1e-4)  # the branch does something once trained
    assert torch.equal(boosted[1:], lora_only[1:])  # the condition half runs the plain LoRA UNet


def test_lq_cache_record_replay_equals_joint_batch(tiny):
    _, z, t, ctx = tiny
    unet = fixture_unet(0)
    state = install_boosthub(unet, BoostHubState(phi=1.5))
    _randomize_trainables(unet, 5)
    with torch.no_grad():
        joint = unet(z, t, ctx).sample[:1]
        state.cache_mode = "record"
        unet(z[1:], t[1:], ctx[1:])
        assert len(state.kv_cache) == 4
        state.cache_mode = "replay"
        cached = unet(z[:1], t[:1], ctx[:1]).sample
    torch.testing.assert_close(cached, joint, rtol=1e-4, atol=1e-4)


def test_processor_rejects_odd_joint_batch(tiny):
    _, z, t, ctx = tiny
    unet = fixture_unet(0)
    install_boosthub(unet)
    with pytest.raises(ValueError, match="even number of rows"):
        with torch.no_grad():
            unet(torch.cat([z, z[:1]]), torch.cat([t, t[:1]]), torch.cat([ctx, ctx[:1]]))


def test_boosthub_state_dict_round_trip_and_errors(tiny):
    unet = fixture_unet(0)
    install_boosthub(unet)
    _randomize_trainables(unet, 7)
    sd = boosthub.boosthub_state_dict(unet)
    assert len(sd) == 4 * 5  # q, k, v, out weight + out bias per layer
    other = fixture_unet(0)
    install_boosthub(other)
    boosthub.load_boosthub_state_dict(other, sd)
    for k, v in boosthub.boosthub_state_dict(other).items():
        assert torch.equal(v, sd[k])
    bad = dict(sd)
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="1 missing"):
        boosthub.load_boosthub_state_dict(other, bad)
    with pytest.raises(ValueError, match="no BoostHub processors"):
        boosthub.load_boosthub_state_dict(fixture_unet(0), sd)


def test_comfy_block_keys_for_sd21_base():
    """The 16 SD2.1 self-attention layers map to ComfyUI's (block, id, index) tuples (comfyui-notes §3.3/§4.1)."""
    from comfyui_bfr.sd.convert import SD21_BASE_UNET_CONFIG

    paths = [f"down_blocks.{i}.attentions.{j}.transformer_blocks.0.attn1" for i in range(3) for j in range(2)]
    paths += ["mid_block.attentions.0.transformer_blocks.0.attn1"]
    paths += [f"up_blocks.{i}.attentions.{j}.transformer_blocks.0.attn1" for i in (1, 2, 3) for j in range(3)]
    keys = [comfy_block_key(p, SD21_BASE_UNET_CONFIG) for p in paths]
    assert keys == ([("input", n, 0) for n in (1, 2, 4, 5, 7, 8)] + [("middle", 0, 0)]
                    + [("output", n, 0) for n in range(3, 12)])
    with pytest.raises(ValueError, match="not a diffusers UNet"):
        comfy_block_key("conv_in", SD21_BASE_UNET_CONFIG)
    comfy_cfg = {"num_res_blocks": [2, 2, 2, 2]}  # ComfyUI's unet_config form
    assert [comfy_block_key(p, comfy_cfg) for p in paths] == keys == [comfy_block_key(p, 2) for p in paths]

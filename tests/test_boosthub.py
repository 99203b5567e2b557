"""BoostHub (FlipNet Eq. 4-5): the pure math, the diffusers processor on the SD2.1-topology tiny UNet, and the
properties that could fail: zero-initialised BoostHub + zero LoRA reproduce the base UNet exactly, phi = 0 equals
LoRA-only, only the input half of the joint batch is touched, the LQ cache equals the joint batch."""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_bfr.lora import boosthub, lora_targets
from comfyui_bfr.nodes import flipnet_patches as patches
from comfyui_bfr.lora.boosthub import (
    BoostHubAttnProcessor,
    BoostHubProjections,
    BoostHubState,
    boosthub_residual,
    comfy_block_key,
    install_boosthub,
    multihead_attention,
)
from comfyui_bfr.sd.convert import SD21_BASE_UNET_CONFIG
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_boosthub_computes_in_the_activations_dtype(dtype):
    """An fp32 bank under a half-precision UNet: every projection runs in the activations' dtype, bit-identical to
    the bank cast to that dtype (what ComfyUI's Apply node stores), and the output keeps that dtype."""
    hub = _random_hub(16, seed=3)
    torch.manual_seed(1)
    out, normed = torch.randn(4, 6, 16).to(dtype), torch.randn(4, 6, 16).to(dtype)
    with torch.no_grad():
        got, _ = boosthub.boosthub_forward(out, normed, hub, 2, 1.0)
        cast = BoostHubProjections(16).to(dtype)
        cast.load_state_dict({k: v.to(dtype) for k, v in hub.state_dict().items()})
        ref, _ = boosthub.boosthub_forward(out, normed, cast, 2, 1.0)
        kv = boosthub.boosthub_kv(normed[2:], hub)
    assert got.dtype == dtype and kv[0].dtype == dtype and kv[1].dtype == dtype
    assert torch.equal(got, ref)
    assert hub.q_proj.weight.dtype == torch.float32  # the bank itself is not converted


def test_bank_from_a_state_dict_shares_the_tensors_and_knows_when_it_is_zero():
    hub = _random_hub(16, seed=5)
    sd = {f"mid_block.attentions.0.transformer_blocks.0.attn1.{k}": v.clone() for k, v in hub.state_dict().items()}
    (built,) = boosthub.boosthub_modules_from_state_dict(sd).values()
    assert built.q_proj.weight.data_ptr() == sd["mid_block.attentions.0.transformer_blocks.0.attn1.q_proj.weight"
                                                ].data_ptr()  # no second copy of the bank
    assert not boosthub.boosthub_is_zero([built]) and boosthub.boosthub_is_zero([BoostHubProjections(8)])
    with torch.no_grad():
        built.out_proj.weight.zero_()
    assert not boosthub.boosthub_is_zero([built])  # the bias alone still adds phi * b_o
    with torch.no_grad():
        built.out_proj.bias.zero_()
    assert boosthub.boosthub_is_zero([built]) and boosthub.boosthub_is_zero([])


# ------------------------------------------------------------------------------- parity: ComfyUI patches vs processor
# The ComfyUI wrapper (nodes/flipnet_patches.py) is driven exactly as ComfyUI drives it: BasicTransformerBlock.forward
# (comfy/ldm/modules/attention.py:848-914) builds one extra_options dict per block call from transformer_options (all
# keys but patches / patches_replace, plus n_heads, dim_head, attn_precision), computes n = norm1(x), calls every
# attn1_patch(n, context_attn1, value_attn1, extra_options) with context = value = n, runs CrossAttention (to_q(n),
# to_k(context), to_v(value), attention, to_out), calls every attn1_output_patch(out, extra_options) and adds x. That
# emulation uses the weights of a diffusers Attention; the reference is the diffusers processor on the same module.

LAYERS = {  # diffusers attn1 path -> (ComfyUI block key, width, heads)
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1": (("input", 1, 0), 32, 4),
    "mid_block.attentions.0.transformer_blocks.0.attn1": (("middle", 0, 0), 64, 8),
}


class _Layer(torch.nn.Module):
    """One self-attention layer: norm1 + a diffusers Attention + its BoostHub processor (random, non-zero W_o)."""

    def __init__(self, path, width, heads, seed):
        from diffusers.models.attention_processor import Attention

        super().__init__()
        torch.manual_seed(seed)
        self.norm1 = torch.nn.LayerNorm(width)
        torch.nn.init.normal_(self.norm1.weight, 1.0, 0.2)
        torch.nn.init.normal_(self.norm1.bias, 0.0, 0.2)
        self.attn = Attention(query_dim=width, heads=heads, dim_head=width // heads, out_bias=True).eval()
        self.state = BoostHubState()
        self.proc = BoostHubAttnProcessor(width, path, self.state)
        self.proc.hub.load_state_dict(_random_hub(width, seed=seed + 1).state_dict())
        self.path, self.heads = path, heads

    def diffusers(self, x):
        """diffusers BasicTransformerBlock, self-attention half: attn1(norm1(x)) + x through the processor."""
        return self.proc(self.attn, self.norm1(x)) + x

    def comfy(self, x, transformer_options):
        """ComfyUI BasicTransformerBlock.forward up to ``x = n + x`` (see the comment above)."""
        patches = transformer_options.get("patches", {})
        extra_options = {k: v for k, v in transformer_options.items() if k not in ("patches", "patches_replace")}
        extra_options.update(n_heads=self.heads, dim_head=self.attn.to_q.out_features // self.heads,
                             attn_precision=torch.float32)
        n = self.norm1(x)
        context_attn1 = value_attn1 = None
        if "attn1_patch" in patches:
            context_attn1 = n
            value_attn1 = context_attn1
            for patch in patches["attn1_patch"]:
                n, context_attn1, value_attn1 = patch(n, context_attn1, value_attn1, extra_options)
        q = self.attn.to_q(n)  # CrossAttention.forward
        context = n if context_attn1 is None else context_attn1
        k = self.attn.to_k(context)
        v = self.attn.to_v(context if value_attn1 is None else value_attn1)
        replace = transformer_options.get("patches_replace", {}).get("attn1", {})
        block = (*transformer_options["block"], transformer_options.get("block_index", 0))
        if block in replace:  # an attn1 replace gets the projected q, k, v and returns the pre-to_out result
            n = self.attn.to_out[0](replace[block](q, k, v, extra_options))
        else:
            n = self.attn.to_out[0](_reference_attention(q, k, v, self.heads))
        for patch in patches.get("attn1_output_patch", []):
            n = patch(n, extra_options)
        return n + x


@pytest.fixture(scope="module")
def layers():
    return {path: _Layer(path, width, heads, seed=10 * i) for i, (path, (_, width, heads)) in enumerate(LAYERS.items())}


def _comfy_patches(layers, phi):
    """The patch objects Apply FlipNet installs, built from the checkpoint namespace (``boosthub.*`` keys)."""
    sd = {f"{path}.{k}": v for path, layer in layers.items() for k, v in layer.proc.hub.state_dict().items()}
    bank = patches.HubBank(boosthub.boosthub_modules_from_state_dict(sd))
    keys = {key: path for path, (key, _, _) in LAYERS.items()}
    return {"attn1_patch": [patches.BoostHubStash()],
            "attn1_output_patch": [patches.BoostHubOutput(bank, keys, phi, node="BFR Apply FlipNet", source="t")]}


def _options(key, rows, patch_dict, **flags):
    """transformer_options as a ComfyUI UNet call hands them to a block (samplers.py + openaimodel.py + SpatialTransformer)."""
    return {"cond_or_uncond": [1, 0], "uuids": ["u-neg", "u-pos"], "sigmas": torch.full((rows,), 2.5),
            "sample_sigmas": torch.tensor([14.6, 2.5, 0.0]), "original_shape": [rows, 4, 8, 8],
            "transformer_index": 0, "block": key[:2], "activations_shape": [rows, 4, 8, 8], "block_index": key[2],
            "patches": patch_dict, **flags}


@pytest.mark.parametrize("phi", [0.0, 1.0, 2.0])
def test_comfy_patches_equal_the_diffusers_processor(layers, phi, record_figure):
    """Joint batch, LQ-cache record and replay, phi 0/1/2: the ComfyUI patches fed exactly what ComfyUI feeds them
    give the diffusers processor's numbers on random tensors (both layers, picked by ComfyUI block key)."""
    torch.manual_seed(int(phi * 10) + 1)
    patch_dict = _comfy_patches(layers, phi)
    diffs = {}
    with torch.no_grad():
        for path, (key, width, _) in LAYERS.items():
            layer = layers[path]
            layer.state.phi = phi
            rows = 4  # (uncond, cond) x 2 images of the input stream, then as many condition rows
            x = torch.randn(2 * rows, 24, width)
            layer.state.cache_mode = "off"
            ref_joint = layer.diffusers(x)
            got_joint = layer.comfy(x, _options(key, 2 * rows, patch_dict, **{patches.JOINT: 2 * rows}))
            diffs["joint"] = max(diffs.get("joint", 0.0), (got_joint - ref_joint).abs().max().item())

            layer.state.kv_cache.clear()
            layer.state.cache_mode = "record"
            ref_record = layer.diffusers(x[rows:])
            store = {}
            got_record = layer.comfy(x[rows:], _options(key, rows, patch_dict, **{patches.RECORD: store}))
            assert set(store) == {key} and set(layer.state.kv_cache) == {path}
            diffs["record"] = max(diffs.get("record", 0.0), (got_record - ref_record).abs().max().item(),
                                  *((a - b).abs().max().item() for a, b in zip(store[key], layer.state.kv_cache[path])))

            layer.state.cache_mode = "replay"
            ref_replay = layer.diffusers(x[:rows])
            got_replay = layer.comfy(x[:rows], _options(key, rows, patch_dict, **{patches.REPLAY: store}))
            diffs["replay"] = max(diffs.get("replay", 0.0), (got_replay - ref_replay).abs().max().item())
            layer.state.cache_mode = "off"

            # what the numbers mean: condition rows plain, record = plain, replay = the joint batch's input rows
            plain = layer.attn.to_out[0](_reference_attention(*(f(layer.norm1(x)) for f in (
                layer.attn.to_q, layer.attn.to_k, layer.attn.to_v)), layer.heads)) + x
            torch.testing.assert_close(got_joint[rows:], plain[rows:], atol=1e-5, rtol=0)
            torch.testing.assert_close(got_replay, got_joint[:rows], atol=1e-5, rtol=0)
            if phi == 0:
                torch.testing.assert_close(got_joint, plain, atol=1e-5, rtol=0)
            else:
                assert (got_joint[:rows] - plain[:rows]).abs().max() > 1e-2  # BoostHub does something
    record_figure(f"boosthub parity phi={phi:g}", ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    for case, err in diffs.items():
        assert err <= 1e-5, (case, err)


def _fake_unet(layer, attn1):
    """A stand-in ComfyUI executor (APPLY_MODEL's inner call) whose only token mixing is one self-attention layer:
    the latent, its sigma and the prompt set the tokens; ``attn1(h, transformer_options)`` is that layer."""
    g = torch.Generator().manual_seed(99)
    c = layer.proc.hub.hidden_size
    w_in, w_sig = torch.randn(4, c, generator=g) / 2, torch.randn(1, 1, c, generator=g) / 4
    w_ctx, w_out = torch.randn(16, c, generator=g) / 4, torch.randn(c, 4, generator=g) / c ** 0.5

    def run(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        rows, _, hh, ww = x.shape
        h = x.flatten(2).transpose(1, 2) @ w_in + t.view(-1, 1, 1) * w_sig
        h = h + c_crossattn.mean(1, keepdim=True) @ w_ctx
        opts = dict(transformer_options, original_shape=list(x.shape), transformer_index=0, block=("middle", 0),
                    activations_shape=list(x.shape), block_index=0)
        return (attn1(h, opts) @ w_out).transpose(1, 2).reshape(rows, 4, hh, ww)

    return run


@pytest.mark.parametrize("policy,cache", [("same", False), ("fixed", False), ("fixed", True)])
def test_joint_batch_wrapper_with_the_patches_equals_the_processor_on_the_joint_batch(layers, policy, cache,
                                                                                        record_figure):
    """The APPLY_MODEL wrapper + patches (two steps, cond/uncond chunks [1, 0], one condition image for a batch of 2)
    against the processor on the hand-built joint batch cat([x, y]) with y = condition + sigma_y * noise."""
    path = "mid_block.attentions.0.transformer_blocks.0.attn1"
    layer = layers[path]
    phi = 1.5
    layer.state.phi, layer.state.cache_mode = phi, "off"
    patch_dict = _comfy_patches(layers, phi)
    comfy_unet = _fake_unet(layer, lambda h, opts: layer.comfy(h, dict(opts, patches=patch_dict)))
    diffusers_unet = _fake_unet(layer, lambda h, opts: layer.diffusers(h))
    g = torch.Generator().manual_seed(5)
    condition, noise = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    sigma_y = 0.4 if policy == "fixed" else None
    wrapper = patches.JointBatchWrapper(condition, noise, sigma_y, lq_cache=cache, node="BFR Apply FlipNet")
    ctx = torch.randn(2, 7, 16, generator=g).repeat_interleave(2, 0)  # rows: uncond x2, cond x2
    worst = 0.0
    with torch.no_grad():
        for sigma in (3.0, 1.2):  # two sampling steps: the second one replays the cache
            x = torch.randn(4, 4, 4, 4, generator=g)
            t = torch.full((4,), sigma)
            opts = {"cond_or_uncond": [1, 0], "uuids": ["u-neg", "u-pos"], "sigmas": t}
            got = wrapper(comfy_unet, x, t, None, ctx, None, opts)
            s_y = torch.full((4,), sigma if sigma_y is None else sigma_y)
            y = condition.expand(4, -1, -1, -1) + s_y.view(-1, 1, 1, 1) * noise.expand(4, -1, -1, -1)
            ref = diffusers_unet(torch.cat([x, y]), torch.cat([t, s_y]), None, torch.cat([ctx, ctx]), None, {})[:4]
            worst = max(worst, (got - ref).abs().max().item())
            scale = ref.abs().max().item()
            layer.state.enabled = False  # the condition stream does reach the output through BoostHub
            without = diffusers_unet(torch.cat([x, y]), torch.cat([t, s_y]), None, torch.cat([ctx, ctx]), None, {})
            layer.state.enabled = True
            assert (ref - without[:4]).abs().max() > 1e-2
    assert wrapper.condition_passes == (1 if cache else 0)
    record_figure(f"wrapper parity {policy}{' +cache' if cache else ''}", f"{worst:.1e} (|out| max {scale:.2f})")
    assert worst <= 1e-5


def test_equal_cfg_chunks_share_the_first_block(layers, record_figure):
    """At the first transformer block the equal cond/uncond chunks are computed once (self-attention through the
    replace, BoostHub in the output patch) and copied: joint batch, record and replay give the every-row numbers;
    chunks that differ are computed row by row, bit for bit as without sharing."""
    path, (key, width, _) = next(iter(LAYERS.items()))
    layer = layers[path]
    every = _comfy_patches(layers, 1.0)
    rows_seen = []

    def attention(q, k, v, heads, extra_options):
        rows_seen.append(q.shape[0])
        return _reference_attention(q, k, v, heads)

    shared_attn = patches.SharedRowsAttention(attention)
    shared = dict(every, attn1_patch=[patches.BoostHubStash(first_block=key)])
    replace = {"attn1": {key: shared_attn}}
    torch.manual_seed(5)
    per = 2
    stream_in, stream_y = torch.randn(per, 24, width), torch.randn(per, 24, width)
    joint = torch.cat([stream_in, stream_in, stream_y, stream_y])  # [input: uncond, cond][condition: uncond, cond]
    worst = 0.0
    with torch.no_grad():
        ref = layer.comfy(joint, _options(key, 4 * per, every, **{patches.JOINT: 4 * per}))
        got = layer.comfy(joint, dict(_options(key, 4 * per, shared, **{patches.JOINT: 4 * per}),
                                      patches_replace=replace))
        assert rows_seen == [2 * per] and shared_attn.shared_calls == 1  # one chunk per stream
        worst = max(worst, (got - ref).abs().max().item())
        store_ref, store = {}, {}
        rec_ref = layer.comfy(joint[2 * per:], _options(key, 2 * per, every, **{patches.RECORD: store_ref}))
        rec = layer.comfy(joint[2 * per:], dict(_options(key, 2 * per, shared, **{patches.RECORD: store}),
                                                patches_replace=replace))
        worst = max(worst, (rec - rec_ref).abs().max().item(),
                    *((a - b).abs().max().item() for a, b in zip(store[key], store_ref[key])))
        assert torch.equal(store[key][0][:per], store[key][0][per:])  # recorded K_y: equal chunks by construction
        rep_ref = layer.comfy(joint[:2 * per], _options(key, 2 * per, every, **{patches.REPLAY: store_ref}))
        rep = layer.comfy(joint[:2 * per], dict(_options(key, 2 * per, shared, **{patches.REPLAY: store}),
                                                patches_replace=replace))
        worst = max(worst, (rep - rep_ref).abs().max().item())
        assert shared_attn.shared_calls == 3
        torch.testing.assert_close(rep, got[:2 * per], atol=1e-5, rtol=0)  # replay = the joint batch's input rows
        # chunks that differ: nothing shared, the block's own numbers bit for bit
        other = joint.clone()
        other[per:2 * per] += 0.1
        ref_other = layer.comfy(other, _options(key, 4 * per, every, **{patches.JOINT: 4 * per}))
        got_other = layer.comfy(other, dict(_options(key, 4 * per, shared, **{patches.JOINT: 4 * per}),
                                            patches_replace=replace))
    assert shared_attn.shared_calls == 3 and torch.equal(got_other, ref_other)
    record_figure("shared CFG chunks (patches)", f"max|diff| {worst:.1e}")
    assert worst <= 1e-6
    x = torch.arange(12.0).view(6, 2)
    assert torch.equal(patches.first_chunks(x, 2, 3), x[[0, 3]]) and patches.chunks_equal(
        patches.expand_chunks(x[[0, 3]], 2, 3), 2, 3) and not patches.chunks_equal(x, 2, 3)


def test_patches_reject_what_does_not_fit(layers):
    from comfyui_bfr.nodes.helpers import NodeInputError

    patch_dict = _comfy_patches(layers, 1.0)
    layer = layers["mid_block.attentions.0.transformer_blocks.0.attn1"]
    x = torch.randn(2, 5, 64)
    with pytest.raises(NodeInputError, match=r"^\[BFR Apply FlipNet\] no BoostHub for self-attention block "
                                             r"\('output', 5, 0\)"):
        layer.comfy(x, _options(("output", 5, 0), 2, patch_dict, **{patches.JOINT: 2}))
    with pytest.raises(NodeInputError, match=r"^\[BFR Apply FlipNet\] self-attention block \('middle', 0, 0\) .*the "
                                             r"BoostHub LQ cache holds no K/V"):
        layer.comfy(x, _options(("middle", 0, 0), 2, patch_dict, **{patches.REPLAY: {}}))
    wrapper = patches.JointBatchWrapper(torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4), None, node="BFR Apply FlipNet")
    with pytest.raises(NodeInputError, match=r"^\[BFR Apply FlipNet\] the sampled latent has batch 3 but the "
                                             "condition IMAGE has 2 images"):
        wrapper(lambda *a, **k: None, torch.zeros(3, 4, 4, 4), torch.ones(3), None, None, None, {})
    with pytest.raises(ValueError, match="Unexpected BoostHub key"):
        boosthub.boosthub_modules_from_state_dict({"x.attn1.w_q.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=r"k_proj\.weight is 4x8 but q_proj\.weight is 4x4"):
        boosthub.check_boosthub_layer("p", {"q_proj.weight": torch.zeros(4, 4), "k_proj.weight": torch.zeros(4, 8),
                                            "v_proj.weight": torch.zeros(4, 4), "out_proj.weight": torch.zeros(4, 4),
                                            "out_proj.bias": torch.zeros(4)})


def test_boosthub_forward_is_the_one_dispatch():
    """record returns the output unchanged plus K_y/V_y; replay with them equals the joint batch's input rows."""
    hub = _random_hub(16, seed=4)
    torch.manual_seed(2)
    out, normed = torch.randn(4, 6, 16), torch.randn(4, 6, 16)
    with torch.no_grad():
        joint, none = boosthub.boosthub_forward(out, normed, hub, 2, 1.0)
        same, kv = boosthub.boosthub_forward(out[2:], normed[2:], hub, 2, 1.0, "record")
        replay, _ = boosthub.boosthub_forward(out[:2], normed[:2], hub, 2, 1.0, "replay", kv)
    assert none is None and torch.equal(same, out[2:]) and torch.equal(joint[2:], out[2:])
    torch.testing.assert_close(replay, joint[:2], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="holds no K/V"):
        boosthub.boosthub_forward(out, normed, hub, 2, 1.0, "replay")
    with pytest.raises(ValueError, match="cache_mode 'sometimes'"):
        boosthub.boosthub_forward(out, normed, hub, 2, 1.0, "sometimes")


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

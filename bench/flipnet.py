"""FlipNet restoration UNet step with the LQ cache vs a plain SD2.1 step (design §7), measured side by side in one run,
beside the counted-FLOP ratio (the compute floor of a faithful BoostHub).

Full SD2.1-base topology with random weights (timing only): UNet2DConditionModel from sd.convert's
SD21_BASE_UNET_CONFIG (866 M parameters), 512 px (64x64 latent), classifier-free guidance (uncond + cond rows,
so 1 image = UNet batch 2), context of 77 text tokens (+ --face-tokens) of width 1024; fp32 on the CPU unless
--device/--dtype say otherwise. No LoRA modules: in ComfyUI the LoRA is merged into the UNet weights, so it costs
nothing at inference. BoostHub comes from the pack (lora.boosthub.install_boosthub, one processor per
self-attention layer, 16 for SD2.1) with random non-zero W_o, so the branch really computes. Per repeat,
interleaved so that machine load hits every case alike:

- plain: the stock UNet step (diffusers' own processors, BoostHub not installed) at batch 2B;
- cached: the FlipNet step with the LQ cache at batch 2B (``cache_mode="replay"``): the condition stream's K/V of
  every BoostHub layer were recorded once beforehand (``"record"`` pass at batch 2B, timed once and reported
  separately), the step runs only the HQ rows plus the BoostHub branch against the cached K/V;
- shared: the cached step plus the pack's shared first self-attention (ComfyUI path, nodes/flipnet_patches.py:
  under CFG the cond and uncond rows are bitwise equal up to the first cross-attention, so the first transformer
  block's self-attention core and its BoostHub branch run for one CFG chunk and are copied): the first ``attn1``
  runs the pack's own patch objects (BoostHubStash, SharedRowsAttention, BoostHubOutput) inside a diffusers
  processor; every other layer as in ``cached``. pipelines.flipnet (diffusers) does not share; ``--no-shared``
  skips this case;
- joint: the FlipNet step without the cache (``cache_mode="off"``): the joint batch cat([HQ, LQ]) at batch 4B, as
  pipelines.flipnet runs it with policy ``t_y = same``.

The HQ latent is one draw repeated for the CFG rows, as in real CFG sampling (what lets ``shared`` share).

FLOPs: the warm-up call of each case runs under torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions,
SDPA as 4 B H Nq Nk D; common.count_flops adds the CPU SDPA kernel, which torch's registry lacks), and the
BoostHub part is also computed analytically from the self-attention layers' shapes as a cross-check. The gap is
measured ratio / FLOP ratio - 1 (target: within 3 %). ``--profile`` adds a torch.profiler table of one step per case
(per aten op, and the BoostHub branch's parts). ``--device meta`` counts FLOPs only (no data, seconds).

The LQ cache's size (the recorded K/V of the 16 layers) is read from the cache dict of the record pass and
computed analytically, per image, for fp32 and fp16.

Run: ``python bench/flipnet.py`` (see --help); medians over --repeats, ratios = median case / median plain.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from common import (build_sd21_unet, command, count_flops, device_dtype, loadavg, machine, n_params,
                    peak_memory_gb, peak_rss_gb, require_pack, reset_peak_memory, setup_logging, sync, tensor_bytes,
                    timed, timed_cpu, unet_bench_parser)

boosthub, flipnet, patches = require_pack("lora.boosthub", "pipelines.flipnet", "nodes.flipnet_patches")

GAP_TARGET = 0.03
CASES = ("plain", "cached", "shared", "joint")
FIRST_ATTN1 = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"  # ComfyUI ("input", 1, 0)
FIRST_KEY = ("input", 1, 0)


def sdpa_attention(q, k, v, heads, extra_options):
    """ComfyUI's attention-function convention ((B, N, C) in and out) on torch's SDPA, as ComfyUI's pytorch
    attention runs it; ``F`` is looked up per call so that :class:`Instrument` labels it."""
    b, n, c = q.shape
    d = c // heads
    qh, kh, vh = (t.view(t.shape[0], -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(b, n, c).to(q.dtype)


class SharedFirstAttention:
    """diffusers processor for the UNet's first ``attn1`` that runs the pack's ComfyUI patches on it, as a patched
    ComfyUI MODEL does (nodes/flipnet.py: BoostHubStash(first block) + SharedRowsAttention + BoostHubOutput): the
    stash checks that the CFG chunks are bitwise equal, the replace runs the attention core on one chunk, the layer's
    to_q/k/v and to_out run on every row (ComfyUI's CrossAttention does), the output patch runs BoostHub on one chunk.
    ``state.cache_mode`` says what the rows are (off: joint batch, record / replay: one stream).
    ``assume_equal`` (meta tensors hold no data) takes the chunks as equal, as they are under CFG."""

    def __init__(self, attn, hub, layer_name: str, state, chunks: int = 2, assume_equal: bool = False):
        if attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_q is not None \
                or attn.residual_connection or attn.rescale_output_factor != 1.0:
            raise ValueError(f"{layer_name}: SharedFirstAttention mirrors a plain SD self-attention only")
        self.layer_name, self.state, self.chunks, self.assume_equal = layer_name, state, chunks, assume_equal
        self.stash = patches.BoostHubStash(FIRST_KEY)
        self.attention = patches.SharedRowsAttention(sdpa_attention)
        self.output = patches.BoostHubOutput(patches.HubBank({layer_name: hub}), {FIRST_KEY: layer_name}, state.phi,
                                             node="bench")
        self.hub_shared_calls = 0  # calls whose BoostHub branch ran on one chunk

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            raise ValueError(f"{self.layer_name}: SharedFirstAttention is a self-attention on (B, N, C)")
        mode, state = self.state.cache_mode, self.state
        eo = {"block": FIRST_KEY[:2], "block_index": FIRST_KEY[2], "n_heads": attn.heads,
              "cond_or_uncond": list(range(self.chunks))}
        if mode == "off":
            eo[patches.JOINT] = hidden_states.shape[0]
        elif mode == "record":
            eo[patches.RECORD] = {}
        else:
            eo[patches.REPLAY] = {FIRST_KEY: state.kv_cache[self.layer_name]}
        equal = patches.chunks_equal
        if self.assume_equal:
            patches.chunks_equal = lambda t, streams, chunks: t.shape[0] % (streams * chunks) == 0
        try:
            n, _, _ = self.stash(hidden_states, None, None, eo)
            out = self.attention(attn.to_q(n), attn.to_k(n), attn.to_v(n), eo)
            out = attn.to_out[1](attn.to_out[0](out))
            if eo.get(patches.SHARED) is not None:
                self.hub_shared_calls += 1
            out = self.output(out, eo)
        finally:
            patches.chunks_equal = equal
        if mode == "record":
            state.kv_cache[self.layer_name] = eo[patches.RECORD][FIRST_KEY]
        return out


def boosthub_flops(layers: list[tuple[int, int]], rows: int) -> dict[str, int]:
    """Analytic FLOPs BoostHub adds (multiply-add = 2), from the (tokens N, width C) of every self-attention layer:

    per row and layer, a C x C projection costs 2 N C^2 and the attention (QK^T and AV) 4 N^2 C (heads x head dim = C).
    cached step: W_q and W_o on the input rows + the attention; joint batch: W_q, W_k, W_v, W_o + the attention (its
    other extra is the condition rows' plain UNet, i.e. 2x plain); record pass: W_k, W_v.
    """
    proj = sum(2 * n * c * c for n, c in layers) * rows
    attn = sum(4 * n * n * c for n, c in layers) * rows
    return {"projection_each": proj, "attention": attn, "cached_extra": 2 * proj + attn,
            "joint_extra_over_2x_plain": 4 * proj + attn, "record_extra": 2 * proj}


def cache_elements_per_row(layers: list[tuple[int, int]]) -> int:
    """K and V of every BoostHub layer: 2 N C numbers per UNet row."""
    return sum(2 * n * c for n, c in layers)


class Instrument:
    """Labels and CPU-time accounts of the attention work, this process only (patched in on enter, restored on exit).

    Wraps lora.boosthub's dispatch and parts and torch's SDPA in torch.profiler.record_function labels
    (``hub.total`` = boosthub_forward, ``hub.<q|k|v|out>_proj``, ``hub.attention N=<tokens>``, ``sdpa <self|cross|hub>
    N=<tokens>``) and, when ``account`` (CPU runs), adds each label's process CPU time to :attr:`cpu` (seconds since
    :meth:`reset`; labels nest: hub.attention includes its sdpa).
    """

    def __init__(self, hubs: dict, account: bool):
        self.owners = {id(m): name for proc in hubs.values() for name, m in proc.hub.named_children()}
        self.account = account
        self.cpu: dict[str, float] = {}
        self._in_hub = 0

    def reset(self) -> None:
        self.cpu = {}

    def _timed(self, label: str, fn, *args, **kwargs):
        from torch.profiler import record_function

        with record_function(label):
            if not self.account:
                return fn(*args, **kwargs)
            c0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.cpu[label] = self.cpu.get(label, 0.0) + time.process_time() - c0

    def __enter__(self):
        import torch.nn.functional as F

        self._orig = {name: getattr(boosthub, name) for name in ("boosthub_forward", "_project", "multihead_attention")}
        self._sdpa = F.scaled_dot_product_attention
        orig, sdpa = self._orig, self._sdpa

        def forward(*args, **kwargs):
            self._in_hub += 1
            try:
                return self._timed("hub.total", orig["boosthub_forward"], *args, **kwargs)
            finally:
                self._in_hub -= 1

        def project(layer, x):
            return self._timed(f"hub.{self.owners.get(id(layer), 'proj')}", orig["_project"], layer, x)

        def attention(q, k, v, heads):
            return self._timed(f"hub.attention N={q.shape[1]}", orig["multihead_attention"], q, k, v, heads)

        def scaled_dot_product_attention(q, k, *args, **kwargs):
            kind = "hub" if self._in_hub else ("self" if k.shape[-2] == q.shape[-2] else "cross")
            return self._timed(f"sdpa {kind} N={q.shape[-2]}", sdpa, q, k, *args, **kwargs)

        boosthub.boosthub_forward, boosthub._project, boosthub.multihead_attention = forward, project, attention
        F.scaled_dot_product_attention = scaled_dot_product_attention
        return self

    def __exit__(self, *exc):
        import torch.nn.functional as F

        for name, fn in self._orig.items():
            setattr(boosthub, name, fn)
        F.scaled_dot_product_attention = self._sdpa
        return False


def profile_steps(fns: dict, device) -> dict:
    """One step per case under torch.profiler (run inside an :class:`Instrument`):
    {case: {"ops": {aten op: self ms}, "labels": {label: inclusive ms}, "wall_ms"}}."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = {}
    for name, fn in fns.items():
        sync(device)
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            fn()
            sync(device)
        wall = time.perf_counter() - t0
        ops, labels = {}, {}
        for ev in prof.key_averages():
            if ev.key.startswith(("hub.", "sdpa ")):
                dev_total = getattr(ev, "device_time_total", 0) or 0
                labels[ev.key] = (dev_total if device.type == "cuda" else ev.cpu_time_total) / 1e3
            else:
                dev_self = getattr(ev, "self_device_time_total", 0) or 0
                ops[ev.key] = (dev_self if device.type == "cuda" else ev.self_cpu_time_total) / 1e3
        out[name] = {"ops": ops, "labels": labels, "wall_ms": wall * 1e3}
    return out


def gap_analysis(parts: dict, med: dict, flops: dict, layers: list[tuple[int, int]], rows: int) -> dict:
    """Where the cached step's time beyond the FLOP floor goes, from the CPU-time accounts (medians per step).

    At the plain step's own rate r = F_plain / T_plain the branch would cost F_branch / r; each part's excess over
    that, divided by T_plain, is its share of the gap (numerator of measured / FLOP ratio - 1)."""
    tokens = {n: c for n, c in layers}
    r_plain = flops["plain"] / med["plain"]
    cached = {k: statistics.median(d.get(k, 0.0) for d in parts["cached"]) for k in
              set().union(*parts["cached"])}
    plain = {k: statistics.median(d.get(k, 0.0) for d in parts["plain"]) for k in set().union(*parts["plain"])}
    n_layers = {n: sum(1 for m, _ in layers if m == n) for n in tokens}

    def attn_flops(n):
        return 4 * rows * n * n * tokens[n] * n_layers[n]

    def proj_flops():
        return sum(2 * rows * n * c * c for n, c in layers)

    rows_out = []
    for label, seconds in sorted(cached.items(), key=lambda kv: -kv[1]):
        if not label.startswith("hub.") or label == "hub.total":
            continue
        if label.startswith("hub.attention"):
            f = attn_flops(int(label.split("=")[1]))
        elif label in ("hub.q_proj", "hub.out_proj"):
            f = proj_flops()
        else:
            f = 0
        rows_out.append({"part": label, "s": seconds, "gflop": f / 1e9, "gflop_per_s": f / seconds / 1e9 if seconds else 0,
                         "excess_s": seconds - f / r_plain})
    branch = cached.get("hub.total", 0.0)
    attn_parts = sum(r["s"] for r in rows_out)
    extra = med["cached"] - med["plain"]
    return {
        "plain_rate_gflop_per_s": r_plain / 1e9, "measured_extra_s": extra,
        "floor_extra_s": (flops["cached"] - flops["plain"]) / r_plain, "branch_s": branch,
        "branch_other_s": branch - attn_parts, "outside_branch_s": extra - branch, "parts": rows_out,
        "plain_sdpa_s": {k: v for k, v in plain.items() if k.startswith("sdpa")},
        "cached_sdpa_s": {k: v for k, v in cached.items() if k.startswith("sdpa")},
        "sdpa_self_gflop_per_s": {k: attn_flops(int(k.split("=")[1])) / v / 1e9 for k, v in plain.items()
                                  if k.startswith("sdpa self") and v},
        "t_plain_s": med["plain"],
    }


def print_gap_analysis(g: dict) -> None:
    t = g["t_plain_s"]
    print("where the cached step's time goes (CPU clock, medians per step; excess = time beyond the plain step's "
          f"rate of {g['plain_rate_gflop_per_s']:.1f} GFLOP/s, in % of a plain step = its share of the gap):")
    print(f"  measured extra {g['measured_extra_s']:.3f} s vs the FLOP floor {g['floor_extra_s']:.3f} s "
          f"(excess {g['measured_extra_s'] - g['floor_extra_s']:+.3f} s = {100 * (g['measured_extra_s'] - g['floor_extra_s']) / t:+.1f} %)")
    print(f"  {'part':<26}{'CPU s':>9}{'GFLOP':>8}{'GFLOP/s':>9}{'excess s':>10}{'% plain':>9}")
    for r in g["parts"]:
        print(f"  {r['part']:<26}{r['s']:>9.3f}{r['gflop']:>8.1f}{r['gflop_per_s']:>9.1f}{r['excess_s']:>+10.3f}"
              f"{100 * r['excess_s'] / t:>+8.1f}%")
    print(f"  {'rest of hub.total (add, casts)':<26}{g['branch_other_s']:>9.3f}{0:>8.1f}{'':>9}{g['branch_other_s']:>+10.3f}"
          f"{100 * g['branch_other_s'] / t:>+8.1f}%")
    print(f"  {'outside the branch':<26}{g['outside_branch_s']:>9.3f}{0:>8.1f}{'':>9}{g['outside_branch_s']:>+10.3f}"
          f"{100 * g['outside_branch_s'] / t:>+8.1f}%   (dispatch, record/replay bookkeeping, noise)")
    same = ", ".join(f"{k.removeprefix('sdpa self ')} {v:.3f} s ({g['sdpa_self_gflop_per_s'][k]:.0f} GFLOP/s)"
                     for k, v in sorted(g["plain_sdpa_s"].items(), key=lambda kv: -kv[1]) if k.startswith("sdpa self"))
    print(f"  for comparison, the plain step's own self-attention SDPA (same shapes as the hub's): {same}")


def print_profile(prof: dict, flops_per_op: dict, top: int = 14) -> None:
    names = [n for n in CASES if n in prof]
    walls = ", ".join(f"{n} {prof[n]['wall_ms']:.0f}" for n in names)
    print(f"profile, one step per case (self time per aten op, ms; wall with profiler: {walls}):")
    ops = sorted(set().union(*(prof[n]["ops"] for n in names)), key=lambda k: -prof["cached"]["ops"].get(k, 0))
    print(f"  {'op':<52}" + "".join(f"{n:>10}" for n in names) + f"{'cached-plain':>14}")
    for k in ops[:top]:
        vals = [prof[n]["ops"].get(k, 0.0) for n in names]
        print(f"  {k[:51]:<52}" + "".join(f"{v:>10.1f}" for v in vals)
              + f"{prof['cached']['ops'].get(k, 0.0) - prof['plain']['ops'].get(k, 0.0):>+14.1f}")
    labels = prof["cached"]["labels"]
    if labels:
        print("  labelled attention work in the cached step (inclusive, ms):")
        for k in sorted(labels, key=lambda k: -labels[k]):
            print(f"    {k:<30}{labels[k]:>10.1f}")
    for case in ("cached", "shared", "joint"):
        if case in flops_per_op:
            extra = {k: flops_per_op[case].get(k, 0) - flops_per_op["plain"].get(k, 0) * (2 if case == "joint" else 1)
                     for k in flops_per_op[case]}
            print(f"  counted extra GFLOP per op, {case}: "
                  + ", ".join(f"{k} {v / 1e9:+.1f}" for k, v in extra.items() if v))


def main(argv=None) -> int:
    ap = unet_bench_parser(__doc__, batch_help="images per step (CFG doubles it: 1 image = UNet batch 2)", repeats=3,
                           threads=1, threads_help="torch threads (1: the CPU clock then counts work, not waits)")
    ap.add_argument("--face-tokens", type=int, default=0, help="extra context tokens appended to the 77 text tokens")
    ap.add_argument("--phi", type=float, default=1.0, help="BoostHub enhance weight")
    ap.add_argument("--wo-std", type=float, default=0.02, help="std of the random BoostHub W_o (weight and bias)")
    ap.add_argument("--warmup", type=int, default=None, help="extra untimed calls per case after the counted one "
                    "(default: 0 on the CPU, 2 on CUDA)")
    ap.add_argument("--profile", action="store_true", help="also profile one step per case (torch.profiler)")
    ap.add_argument("--no-shared", action="store_true", help="skip the 'shared' case (cached + shared first "
                    "self-attention, the ComfyUI path)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default=None,
                    help="clock of the ratios and the gap: process CPU time (default on the CPU: robust to other jobs "
                         "with --threads 1) or wall (default on CUDA)")
    args = ap.parse_args(argv)
    setup_logging()
    log = logging.getLogger("bench.flipnet")
    device, dtype = device_dtype(args)
    meta = device.type == "meta"
    torch.set_num_threads(args.threads)
    load_start = loadavg()
    t0 = time.perf_counter()
    unet = build_sd21_unet(device=device, dtype=dtype)
    n_params_unet = n_params(unet)
    plain_procs = dict(unet.attn_processors)
    # W_q/W_k/W_v start as copies of the layer's projections (as in training); meta tensors hold nothing to copy
    state = boosthub.install_boosthub(unet, boosthub.BoostHubState(phi=args.phi), init_from_self_attention=not meta)
    hub_procs = dict(unet.attn_processors)
    hubs = boosthub.boosthub_processors(unet)
    with torch.no_grad():
        for proc in hubs.values():
            torch.nn.init.normal_(proc.hub.out_proj.weight, std=args.wo_std)
            torch.nn.init.normal_(proc.hub.out_proj.bias, std=args.wo_std)
    n_hub = sum(n_params(proc.hub) for proc in hubs.values())
    log.info("+ BoostHub on %d self-attention layers (%.0f M params), %.0f s in all; load average %s", len(hubs),
             n_hub / 1e6, time.perf_counter() - t0, " ".join(f"{v:.2f}" for v in load_start))

    b, h = args.batch, args.size // 8
    rows = 2 * b  # CFG: uncond + cond rows
    n_ctx = 77 + args.face_tokens
    like = {"device": device, "dtype": dtype}
    x_in = torch.randn(b, 4, h, h, **like).repeat(2, 1, 1, 1)  # scaled HQ latent, repeated for CFG
    y = torch.randn(b, 4, h, h, **like).repeat(2, 1, 1, 1)  # the diffused LQ latent at t_y, repeated for CFG
    ctx = torch.randn(rows, n_ctx, 1024, **like)  # cat([neg, pos])
    t_step, t_y = 501, 400
    tt = torch.full((rows,), t_step, dtype=torch.long, device=device)
    ty = torch.full((rows,), t_y, dtype=torch.long, device=device)
    joint_x = flipnet.joint_batch(x_in, y)
    joint_t, joint_ctx = torch.cat([tt, ty]), torch.cat([ctx, ctx])

    def use(procs, mode="off"):
        unet.set_attn_processor(dict(procs))
        state.cache_mode = mode

    def plain():
        use(plain_procs)
        return unet(x_in, tt, ctx).sample

    def record():
        state.kv_cache.clear()
        use(hub_procs, "record")
        unet(y, ty, ctx)

    def cached():
        use(hub_procs, "replay")
        return unet(x_in, tt, ctx).sample

    def joint():
        use(hub_procs, "off")
        return unet(joint_x, joint_t, joint_ctx).sample[:rows]

    shared_proc = None
    if not args.no_shared:
        if FIRST_ATTN1 not in hubs:
            sys.exit(f"bench: no BoostHub on {FIRST_ATTN1}; the shared case needs the SD2.1 topology")
        shared_proc = SharedFirstAttention(unet.get_submodule(FIRST_ATTN1), hubs[FIRST_ATTN1].hub, FIRST_ATTN1, state,
                                           assume_equal=meta)
        shared_procs = dict(hub_procs, **{FIRST_ATTN1 + ".processor": shared_proc})

    def shared():
        use(shared_procs, "replay")
        return unet(x_in, tt, ctx).sample

    fns = {"plain": plain, "cached": cached, "shared": shared, "joint": joint}
    if args.no_shared:
        del fns["shared"]
    cases = tuple(fns)
    # (tokens, width) of every self-attention layer, seen on the plain call
    layer_shapes: dict[str, tuple[int, int]] = {}

    def shape_hook(path):
        def hook(module, args):
            layer_shapes.setdefault(path, tuple(args[0].shape[1:]))
        return hook

    hooks = [unet.get_submodule(path).register_forward_pre_hook(shape_hook(path)) for path in hubs]
    flops, flops_per_op = {}, {}
    reset_peak_memory(device)
    with torch.no_grad():
        log.info("warm-up, FLOPs counted ...")
        flops["plain"], flops_per_op["plain"], _ = count_flops(plain)
        for hk in hooks:
            hk.remove()
        t_record, _ = timed(record, device)
        cache_bytes = tensor_bytes(state.kv_cache)
        log.info("record pass (once per image, batch %d): %.2f s; %d layers cached, %.1f MB", rows, t_record,
                 len(state.kv_cache), cache_bytes / 1e6)
        flops["cached"], flops_per_op["cached"], _ = count_flops(cached)
        if shared_proc is not None:
            flops["shared"], flops_per_op["shared"], _ = count_flops(shared)
        flops["joint"], flops_per_op["joint"], _ = count_flops(joint)
        flops["record"], _, _ = count_flops(record)
    layers = list(layer_shapes.values())
    analytic = boosthub_flops(layers, rows)
    compared = tuple(k for k in cases if k != "plain")
    flop_ratio = {k: flops[k] / flops["plain"] for k in compared}
    counted_minus_analytic = {"cached": flops["cached"] - flops["plain"] - analytic["cached_extra"],
                              "joint": flops["joint"] - 2 * flops["plain"] - analytic["joint_extra_over_2x_plain"]}
    cache_per_image = {"fp32": cache_elements_per_row(layers) * rows // b * 4,
                       "fp16": cache_elements_per_row(layers) * rows // b * 2,
                       "measured_" + str(dtype).removeprefix("torch."): cache_bytes // b}
    print(f"FLOPs per step at {args.size} px, {b} image(s), CFG (FlopCounterMode: matmul/conv, SDPA 4 B H Nq Nk D; "
          f"element-wise ops not counted):")
    print(f"  plain {flops['plain'] / 1e9:.1f} GFLOP, cached {flops['cached'] / 1e9:.1f} ({flop_ratio['cached']:.3f}x), "
          f"joint {flops['joint'] / 1e9:.1f} ({flop_ratio['joint']:.3f}x), record pass {flops['record'] / 1e9:.1f}")
    if "shared" in flops:
        saved = flops["cached"] - flops["shared"]
        print(f"  cached + shared first self-attention {flops['shared'] / 1e9:.1f} GFLOP ({flop_ratio['shared']:.3f}x): "
              f"saves {saved / 1e9:.1f} GFLOP = {100 * saved / flops['plain']:.2f} % of a plain step, "
              f"{100 * saved / flops['cached']:.2f} % of the cached step")
    print(f"  BoostHub analytic (from the {len(layers)} self-attention layers' shapes): cached +"
          f"{analytic['cached_extra'] / 1e9:.1f} GFLOP (attention {analytic['attention'] / 1e9:.1f}, W_q + W_o "
          f"{2 * analytic['projection_each'] / 1e9:.1f}), joint 2x plain +{analytic['joint_extra_over_2x_plain'] / 1e9:.1f};"
          f" counted - analytic: {counted_minus_analytic['cached'] / 1e9:+.3f} / {counted_minus_analytic['joint'] / 1e9:+.3f}")
    print(f"LQ cache (K/V of {len(state.kv_cache)} layers, {rows // b} CFG rows per image): {cache_bytes / b / 1e6:.1f} MB "
          f"per image measured ({str(dtype).removeprefix('torch.')}); analytic {cache_per_image['fp32'] / 1e6:.1f} MB "
          f"fp32, {cache_per_image['fp16'] / 1e6:.1f} MB fp16 per image")

    result = {
        "command": command("flipnet.py", argv), "machine": machine(device), "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "batch_images": b, "unet_rows_plain_cached": rows, "unet_rows_joint": 2 * rows, "size": args.size,
        "context_tokens": n_ctx, "phi": args.phi, "wo_std": args.wo_std, "lora": "merged (none)",
        "unet_params": n_params_unet, "boosthub_params": n_hub, "boosthub_layers": len(hubs),
        "flops": flops, "flops_per_op": flops_per_op, "flop_ratio": flop_ratio, "boosthub_analytic_flops": analytic,
        "counted_minus_analytic_flops": counted_minus_analytic, "self_attention_layers_tokens_width": layers,
        "lq_cache_bytes_per_image": cache_per_image, "loadavg_start": load_start,
    }
    if meta:
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return 0

    warmup = args.warmup if args.warmup is not None else (2 if device.type == "cuda" else 0)
    on_cpu = device.type == "cpu"
    clock = args.clock or ("cpu" if on_cpu else "wall")
    if clock == "cpu" and not on_cpu:
        ap.error("--clock cpu measures host CPU time; on CUDA use wall")
    times = {"wall": {k: [] for k in cases}, "cpu": {k: [] for k in cases}}
    parts = {k: [] for k in cases}  # CPU-time accounts of the attention work, per repeat
    with torch.no_grad(), Instrument(hubs, account=on_cpu) as inst:
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        outs = {}
        for r in range(args.repeats):
            for name, fn in fns.items():
                inst.reset()
                wall, cpu, outs[name] = timed_cpu(fn, device)
                times["wall"][name].append(wall)
                times["cpu"][name].append(cpu)
                parts[name].append(dict(inst.cpu))
            log.info("repeat %d/%d (wall / CPU s): %s; load %.2f", r + 1, args.repeats,
                     ", ".join(f"{k} {times['wall'][k][-1]:.3f} / {times['cpu'][k][-1]:.3f}" for k in cases),
                     loadavg()[0])
        inst.account = False
        prof = profile_steps(fns, device) if args.profile else None
    load_end = loadavg()
    # sanity: the branch computes (cached != plain) and record + replay equals the joint batch
    boost_effect = float((outs["cached"] - outs["plain"]).abs().max())
    cache_vs_joint = float((outs["cached"] - outs["joint"]).abs().max())
    shared_vs_cached = float((outs["shared"] - outs["cached"]).abs().max()) if "shared" in outs else None
    shared_calls = ({"attention": shared_proc.attention.shared_calls, "boosthub": shared_proc.hub_shared_calls}
                    if shared_proc is not None else None)

    clocks = ("wall", "cpu") if on_cpu else ("wall",)
    med = {c: {k: statistics.median(v) for k, v in times[c].items()} for c in clocks}
    ratio = {c: {k: med[c][k] / med[c]["plain"] for k in compared} for c in clocks}
    gap = {c: {k: ratio[c][k] / flop_ratio[k] - 1 for k in compared} for c in clocks}
    per_repeat = {c: {k: [x / p for x, p in zip(times[c][k], times[c]["plain"])] for k in compared}
                  for c in clocks}
    rate = {c: {k: flops[k] / med[c][k] / 1e9 for k in cases} for c in clocks}
    cpu_per_wall = {k: med["cpu"][k] / med["wall"][k] for k in cases} if on_cpu else None
    analysis = gap_analysis(parts, med["cpu"], flops, layers, rows) if on_cpu else None
    result.update({
        "clock": clock, "threads": torch.get_num_threads(), "times_s": times, "median_s": med[clock],
        "median_s_by_clock": med, "record_once_s": t_record, "ratio_to_plain": ratio[clock], "gap": gap[clock],
        "ratio_by_clock": ratio, "gap_by_clock": gap, "per_repeat_ratio": per_repeat, "gflops_per_s": rate,
        "cpu_per_wall": cpu_per_wall, "attention_cpu_s": parts, "gap_analysis": analysis,
        "max_abs_cached_minus_plain": boost_effect, "max_abs_cached_minus_joint": cache_vs_joint,
        "max_abs_shared_minus_cached": shared_vs_cached, "shared_calls": shared_calls,
        "loadavg_end": load_end, "peak_rss_gb": peak_rss_gb(), "peak_memory_gib": peak_memory_gb(device),
        "profile": prof,
    })
    print(f"FlipNet restoration step at {args.size} px, {b} image(s), CFG ({result['machine']}, {result['dtype']}), "
          f"context {n_ctx} tokens, medians of {args.repeats}" + (", wall and process CPU time:" if on_cpu else ":"))
    print(f"  {'case':<46}{'GFLOP':>9}{'FLOPs':>8}" + "".join(f"{c + ' s':>10}{'ratio':>8}{'gap':>8}" for c in clocks))
    labels = {"plain": f"plain SD2.1 step, batch {rows}", "cached": f"FlipNet + LQ cache (replay), batch {rows}",
              "shared": f"  + shared first self-attn (ComfyUI), batch {rows}",
              "joint": f"FlipNet joint batch, no cache, batch {2 * rows}"}
    for name, label in ((k, labels[k]) for k in cases):
        line = f"  {label:<46}{flops[name] / 1e9:>9.1f}{flop_ratio.get(name, 1.0):>7.3f}x"
        for c in clocks:
            g = f"{100 * gap[c][name]:+.1f}%" if name in gap[c] else ""
            line += f"{med[c][name]:>10.3f}{ratio[c].get(name, 1.0):>7.3f}x{g:>8}"
        print(line)
    print(f"  {f'LQ cache record pass (once per image), batch {rows}':<46}{flops['record'] / 1e9:>9.1f}"
          f"{flops['record'] / flops['plain']:>7.3f}x{t_record:>10.3f}{t_record / med['wall']['plain']:>7.3f}x (wall, once)")
    g = gap[clock]
    for k in compared:
        print(f"{k}: {ratio[clock][k]:.3f}x a plain step ({clock} clock), FLOP ratio {flop_ratio[k]:.3f}x: gap "
              f"{100 * g[k]:+.1f} % (target within {100 * GAP_TARGET:.0f} %): "
              f"{'OK' if abs(g[k]) <= GAP_TARGET else 'OVER'}")
    for c in clocks:
        print(f"per-repeat ratios ({c}): " + "; ".join(f"{k} {' / '.join(f'{v:.3f}' for v in per_repeat[c][k])}"
                                                         for k in compared))
    print("throughput (" + clock + "): " + ", ".join(f"{k} {rate[clock][k]:.1f} GFLOP/s" for k in cases)
          + ("; CPU s per wall s: " + ", ".join(f"{k} {v:.2f}" for k, v in cpu_per_wall.items()) if on_cpu else ""))
    print(f"checks: max|cached - plain| = {boost_effect:.3g} (BoostHub active), max|cached - joint| = "
          f"{cache_vs_joint:.3g} (cache equals joint batch)" + (
              f", max|shared - cached| = {shared_vs_cached:.3g} (shared calls per step x calls: attention "
              f"{shared_calls['attention']}, BoostHub {shared_calls['boosthub']})" if shared_calls else ""))
    print(f"load average start {' '.join(f'{v:.2f}' for v in load_start)}, end "
          f"{' '.join(f'{v:.2f}' for v in load_end)}; {torch.get_num_threads()} thread(s); peak RSS "
          f"{result['peak_rss_gb']:.1f} GiB" + (f", peak GPU memory {result['peak_memory_gib']:.2f} GiB"
                                               if device.type == "cuda" else ""))
    if analysis:
        print_gap_analysis(analysis)
    if prof:
        print_profile(prof, flops_per_op)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if all(abs(g[k]) <= GAP_TARGET for k in ("cached", "shared") if k in g) else 1


if __name__ == "__main__":
    sys.exit(main())
